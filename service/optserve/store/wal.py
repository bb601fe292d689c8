"""The write-ahead log of steps and the checkpoint it is relative to (Redis commands only).

A session's tensors are its last checkpoint (``keys.checkpoint``: every tensor at version
``k``) plus the steps logged since: the stream ``keys.wal`` holds one entry per step, its
id the version the step made (``<version>-0``: XADD refuses an id out of order, XTRIM MINID
drops everything a checkpoint covers in one command, XRANGE reads the log in order), with
the gradients' bytes exactly as applied and the resolved hyperparameters. The small hash
``keys.wal_index`` maps each logged version to ``"<bytes> <commit nonce>"``: what a
checkpoint needs to trim the log and to recognise the step it holds, without reading the
gradients back. All keys share the session's hash slot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from optserve_client.wire import WireTensor

from ..tensors import to_bytes
from . import keys


@dataclass
class Record:
    """One logged step: the version it made, its gradients and hyperparameters."""

    version: int
    grads: dict[str, WireTensor]
    hyperparams: dict[str, Any]
    fresh_momentum: bool
    device_type: str
    kernel: str = "exact"


def _wire(t: WireTensor | torch.Tensor) -> WireTensor:
    if isinstance(t, WireTensor):
        return t
    return WireTensor(str(t.dtype).removeprefix("torch."), tuple(t.shape), to_bytes(t))


def log_cmds(sid: str, version: int, nonce: str, grads: Mapping[str, WireTensor | torch.Tensor],
             hyperparams: Mapping[str, Any], *, fresh_momentum: bool,
             device_type: str, kernel: str = "exact") -> tuple[list[tuple[Any, ...]], int]:
    """The commands that log one step (to run inside the step's MULTI), and its bytes.

    Gradients go in as the buffers they arrived in (memoryview slices of the request body,
    or a sync round's mean tensor's memory): no copy before the socket."""
    wires = {n: _wire(g) for n, g in grads.items()}
    header = json.dumps({"hp": dict(hyperparams), "fm": fresh_momentum, "dev": device_type,
                         "k": kernel,
                         "g": [[n, w.dtype, list(w.shape)] for n, w in wires.items()]})
    size = sum(w.data.nbytes for w in wires.values())
    fields: list[Any] = ["h", header]
    for i, w in enumerate(wires.values()):
        fields += [f"g{i}", w.data]
    cmds: list[tuple[Any, ...]] = [
        ("XADD", keys.wal(sid), f"{version}-0", *fields),
        ("HSET", keys.wal_index(sid), str(version), f"{size} {nonce}"),
        ("HINCRBY", keys.checkpoint(sid), keys.LOG_BYTES, size),
    ]
    return cmds, size


def parse_entries(raw: Sequence[Any]) -> list[Record]:
    """XRANGE's reply (raw, from a connection) as records, in version order."""
    out = []
    for entry_id, flat in raw:
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        header = json.loads(fields[b"h"])
        grads = {name: WireTensor(dtype, tuple(shape), memoryview(fields[f"g{i}".encode()]))
                 for i, (name, dtype, shape) in enumerate(header["g"])}
        out.append(Record(int(entry_id.split(b"-")[0]), grads, header["hp"],
                          bool(header["fm"]), header["dev"], header.get("k", "exact")))
    return out


def full_checkpoint_cmds(sid: str, version: int, fields: Mapping[str, Any]
                         ) -> list[tuple[Any, ...]]:
    """Replace the checkpoint with `fields` at `version` and clear the log (one MULTI's)."""
    flat: list[Any] = []
    for name, value in fields.items():
        flat += [name, value]
    ck = keys.checkpoint(sid)
    return [("DEL", ck, keys.wal(sid), keys.wal_index(sid)),
            ("HSET", ck, keys.CKPT_VERSION, str(version), keys.LOG_BYTES, 0, *flat)]


def read_cmds(sid: str) -> list[tuple[Any, ...]]:
    """The log, then the checkpoint: in this order a background checkpoint landing between
    the two only makes the checkpoint newer, never loses a step (see `rebuild_inputs`)."""
    return [("XRANGE", keys.wal(sid), "-", "+"), ("HGETALL", keys.checkpoint(sid))]


def split_checkpoint(raw: Any) -> tuple[int | None, dict[str, bytes]]:
    """The checkpoint's version and its tensor fields, from HGETALL's reply (a flat list or
    a dict, depending on the connection's protocol)."""
    if not isinstance(raw, dict):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    fields = {k.decode(): v for k, v in raw.items()}
    k = fields.pop(keys.CKPT_VERSION, None)
    fields.pop(keys.LOG_BYTES, None)
    return (int(k) if k is not None else None), fields


def tensor_fields(raw: Any) -> dict[str, bytes]:
    """The tensor fields of a session stored before the log (all in the ``keys.tensors``
    hash, at its version): read as a checkpoint at that version until the first write."""
    if not isinstance(raw, dict):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    return {k.decode(): v for k, v in raw.items() if keys.parse_field(k.decode()) is not None}


def replay_plan(sid: str, version: int, ck_version: int | None,
                records: list[Record]) -> list[Record]:
    """The logged steps to apply to the checkpoint to reach `version` (checked complete)."""
    todo = [r for r in records if ck_version is not None and ck_version < r.version <= version]
    expected = list(range((ck_version or 0) + 1, version + 1))
    if ck_version is None or [r.version for r in todo] != expected:
        raise LogGap(f"session {sid}: checkpoint {ck_version} and log "
                     f"{[r.version for r in records]} do not reach version {version}")
    return todo


class LogGap(Exception):
    """The checkpoint and the log read do not make the version asked for (a race: retry)."""


# A background checkpoint: its tensors were written to a staging key; this makes them the
# checkpoint if they still extend the history (the checkpoint is older, and the log holds
# the very step they were computed by: its nonce), and trims the log up to them.
# KEYS: checkpoint, staging, wal, wal_index. ARGV: version, nonce.
PROMOTE = """
local v = tonumber(ARGV[1])
local k = redis.call('HGET', KEYS[1], 'k')
local rec = redis.call('HGET', KEYS[4], ARGV[1])
if (not k) or tonumber(k) >= v or (not rec) or string.match(rec, ' (.*)$') ~= ARGV[2] then
  redis.call('DEL', KEYS[2])
  return 0
end
local all = redis.call('HGETALL', KEYS[4])
local left, gone = 0, {}
for i = 1, #all, 2 do
  if tonumber(all[i]) <= v then
    gone[#gone + 1] = all[i]
  else
    left = left + tonumber(string.match(all[i + 1], '^(%d+)'))
  end
end
redis.call('HSET', KEYS[2], 'k', ARGV[1], 'lb', left)
redis.call('RENAME', KEYS[2], KEYS[1])
redis.call('PERSIST', KEYS[1])
redis.call('XTRIM', KEYS[3], 'MINID', (v + 1) .. '-0')
for i = 1, #gone, 1000 do
  redis.call('HDEL', KEYS[4], unpack(gone, i, math.min(i + 999, #gone)))
end
return 1
"""


def promote_cmds(sid: str, version: int, nonce: str, token: str,
                 fields: Mapping[str, Any], ttl_s: int) -> list[tuple[Any, ...]]:
    """Stage the tensors (big values, plain HSET: no script copies them), then promote."""
    staging = keys.checkpoint_staging(sid, token)
    flat: list[Any] = []
    for name, value in fields.items():
        flat += [name, value]
    return [("HSET", staging, *flat), ("EXPIRE", staging, ttl_s),
            ("EVAL", PROMOTE, 4, keys.checkpoint(sid), staging, keys.wal(sid),
             keys.wal_index(sid), str(version), nonce)]
