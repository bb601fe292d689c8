"""A sync round in Redis: the commands that open, join, close and fail it, and their reads.

The open round is one hash (``keys.round_``): ``token``, ``v`` (the version it is for),
``deadline``, ``n`` (contributions so far), ``wsum`` (their total weight), ``rule`` (the
session's sync settings when the round opened: a PATCH applies from the next round), and per
contribution ``w.<cid>`` (its weight,
idempotency key and dtypes as JSON) and ``g.<cid>.<tensor>`` (its gradient's bytes). A
closed or failed round leaves an outcome key and, when closed, the parameters it made.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from optserve_client.wire import WireTensor

from ..session import WEIGHT_RTOL, SessionMeta, SyncSpec
from . import keys
from .faults import raise_classified
from .redis_store import Buffer, StepTxn, Store

Command = tuple[Any, ...]


@dataclass
class RoundHead:
    """The open round's small fields, and whether contribution ``cid`` is already in it."""

    token: str
    v: int
    deadline: float
    n: int
    rule: SyncSpec
    weight: float = 0.0
    mine: bool = False
    new: bool = False
    hp: dict[str, Any] | None = None  # the hyperparameters its contributions carry
    mine_digest: str | None = None  # the request digest of contribution ``cid``, if in
    sealed: bool = False  # its close has read it: joins take the lock (and find it closed)

    @classmethod
    def open(cls, version: int, rule: SyncSpec) -> RoundHead:
        return cls(secrets.token_hex(12), version, time.time() + rule.timeout_s, 0, rule,
                   new=True)


@dataclass
class Contribution:
    weight: float
    idem: str | None
    grads: dict[str, WireTensor] = field(default_factory=dict)
    digest: str | None = None  # of the request, remembered with the idempotency key


def ttl(meta: SessionMeta, head: RoundHead | None = None) -> int:
    """How long a round and its outcome are kept: well past any waiter's deadline (also
    the open round's, whose timeout a PATCH may since have shortened)."""
    assert meta.sync is not None
    timeout = max(meta.sync.timeout_s, head.rule.timeout_s if head is not None else 0.0)
    return int(max(300, 2 * timeout + 60))


def _head_fields(cid: str) -> tuple[str, ...]:
    return ("token", "v", "deadline", "n", "wsum", "rule", f"w.{cid}", "hp", "sealed")


def _parse_head(values: list[Any], fallback: SyncSpec | None) -> RoundHead | None:
    token, v, deadline, n, wsum, rule, mine, hp, sealed = values
    # A round opened by an older server has no rule or weight: the session's settings hold.
    spec = SyncSpec.from_json(json.loads(rule)) if rule is not None else fallback
    if token is None or spec is None:  # none, or nothing left to settle it by
        return None
    return RoundHead(token.decode(), int(v), float(deadline), int(n or 0), spec,
                     float(wsum or 0.0), mine is not None,
                     hp=json.loads(hp) if hp is not None else None,
                     mine_digest=json.loads(mine).get("digest") if mine is not None else None,
                     sealed=sealed is not None)


async def read_head(txn: StepTxn, cid: str) -> RoundHead | None:
    values = await txn.call("HMGET", keys.round_(txn.sid), *_head_fields(cid))
    return _parse_head(values, txn.meta.sync if txn.meta is not None else None)


@dataclass
class Snapshot:
    """A sync session as read without its lock, in one round trip: what a contribution's
    checks read (the document, version, commit nonce, open round, its idempotency record)."""

    sid: str
    meta: SessionMeta | None
    version: int | None
    nonce: str | None
    head: RoundHead | None
    replayed: bool


async def snapshot(store: Store, sid: str, cid: str, idem: str | None) -> Snapshot:
    rkey = keys.round_(sid)
    raw_meta, (raw_v, raw_nonce), head, done = await store._on_slot(rkey, [
        ("GET", keys.meta(sid)), ("HMGET", keys.tensors(sid), keys.VERSION, keys.NONCE),
        ("HMGET", rkey, *_head_fields(cid)),
        ("EXISTS", keys.idempotency(sid, idem)) if idem is not None else ("EXISTS", rkey)])
    for reply in (raw_meta, raw_v, head, done):
        if isinstance(reply, Exception):
            raise_classified(reply)
    meta = SessionMeta.from_json(raw_meta) if raw_meta else None
    return Snapshot(sid, meta, int(raw_v) if raw_v is not None else None,
                    raw_nonce.decode() if raw_nonce is not None else None,
                    _parse_head(head, meta.sync if meta is not None else None),
                    idem is not None and bool(done))


# Joins the open round atomically (or opens it, when none is open): the round must still
# be the one read (same token; not sealed by its closer, unless the caller holds the
# lock), the commit still the one read
# (nonce; '' skips: the caller holds the lock), the contribution not in it yet nor its key
# done; a contribution that would fill the round is refused ('full': the locked path
# closes it). Thresholds come pre-scaled (SyncSpec.full); weights are summed in doubles and
# kept exactly (%.17g).
_JOIN = f"""
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], '{keys.NONCE}') ~= ARGV[1] then
  return 'moved' end
local h = redis.call('HMGET', KEYS[2], 'token', 'n', 'wsum', 'sealed', ARGV[3])
if ARGV[9] == '1' then
  if h[1] then return 'changed' end
elseif h[1] ~= ARGV[2] or (h[4] and ARGV[1] ~= '') then return 'changed' end
if h[5] then return 'mine' end
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 'done' end
local n = tonumber(h[2] or '0') + 1
local w = tonumber(h[3] or '0') + tonumber(ARGV[6])
if (ARGV[4] ~= '' and n >= tonumber(ARGV[4])) or (ARGV[5] ~= '' and w >= tonumber(ARGV[5]))
  then return 'full' end
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], 'wsum', string.format('%.17g', w))
redis.call('HINCRBY', KEYS[2], 'n', 1)
redis.call('EXPIRE', KEYS[2], ARGV[7])
return 'ok'
"""


def _threshold(value: float | None) -> str:
    return "" if value is None else repr(value * (1 - WEIGHT_RTOL))


def join_cmd(meta: SessionMeta, head: RoundHead, cid: str, c: Contribution,
             nonce: str | None, hp: Mapping[str, Any] | None = None) -> Command:
    """The EVAL that adds `c` to the open round `head` (opens it, if `head` is new) without
    the session lock; it answers 'ok', or why not: 'moved', 'changed', 'mine', 'done' or
    'full'. `nonce`: the commit the caller's checks read (None: it holds the lock)."""
    sid = meta.id
    idem = keys.idempotency(sid, c.idem) if c.idem is not None else keys.round_(sid)
    fields = _contribution_fields(cid, c)
    if head.new:
        fields += _open_fields(head)
    if hp is not None:
        fields += ["hp", json.dumps(dict(hp))]
    return ("EVAL", _JOIN, 3, keys.tensors(sid), keys.round_(sid), idem, nonce or "",
            head.token, f"w.{cid}", _threshold(head.rule.contributions),
            _threshold(head.rule.target_weight), repr(c.weight), ttl(meta, head),
            "1" if c.idem is not None else "0", "1" if head.new else "0", *fields)


def _open_fields(head: RoundHead) -> list[Any]:
    return ["token", head.token, "v", str(head.v), "deadline", repr(head.deadline),
            "rule", json.dumps(head.rule.to_json())]


def _contribution_fields(cid: str, c: Contribution) -> list[Any]:
    info = {"weight": c.weight, "idem": c.idem, "digest": c.digest,
            "dtypes": {n: g.dtype for n, g in c.grads.items()}}
    fields: list[Any] = [f"w.{cid}", json.dumps(info)]
    for name, g in c.grads.items():
        fields += [f"g.{cid}.{name}", g.data]
    return fields


def add_cmds(meta: SessionMeta, head: RoundHead, cid: str, c: Contribution,
             hp: Mapping[str, Any] | None = None) -> list[Command]:
    """Add one contribution to the round (opening it first if `head` is new); ``hp``: the
    round's hyperparameters, set by the first contribution that carries any."""
    rkey = keys.round_(meta.id)
    fields = _contribution_fields(cid, c)
    if head.new:
        fields += _open_fields(head)
    if hp is not None:
        fields += ["hp", json.dumps(dict(hp))]
    # Opening (the lock held, no token to join yet): the total is this one's weight.
    fields += ["wsum", repr(head.weight + c.weight)]
    return [("HSET", rkey, *fields), ("HINCRBY", rkey, "n", 1),
            ("EXPIRE", rkey, ttl(meta, head))]


async def read_contributions(txn: StepTxn, meta: SessionMeta) -> dict[str, Contribution]:
    """The round's contributions, for its close: sealed first (joins without the lock are
    refused from then on, so none lands after this read and is lost with the round)."""
    rkey = keys.round_(txn.sid)
    await txn.call("HSET", rkey, "sealed", "1")
    raw = await txn.call("HGETALL", rkey)
    out: dict[str, Contribution] = {}
    dtypes: dict[str, dict[str, str]] = {}
    for f, v in raw.items():
        name = f.decode()
        if name.startswith("w."):
            info = json.loads(v)
            out[name[2:]] = Contribution(info["weight"], info["idem"],
                                         digest=info.get("digest"))
            dtypes[name[2:]] = info["dtypes"]
    for f, v in raw.items():
        name = f.decode()
        if name.startswith("g."):
            cid, _, tensor = name[2:].partition(".")  # cids are hex: the first dot splits
            c = out.get(cid)
            if c is None or tensor not in meta.tensors:
                continue
            c.grads[tensor] = WireTensor(dtypes[cid][tensor], meta.tensors[tensor].shape,
                                         memoryview(v))
    return out


def _notify(sid: str, token: str) -> Command:
    return ("PUBLISH", keys.ROUNDS_CHANNEL, json.dumps({"sid": sid, "token": token}))


def close_cmds(meta: SessionMeta, token: str, version: int,
               params: Mapping[str, Buffer]) -> list[Command]:
    """The round made `version`: record it and its parameters for the waiters, wake them."""
    sid, keep = meta.id, ttl(meta)
    flat: list[Any] = []
    for n, data in params.items():
        flat += [keys.param_field(n), data]
    return [
        ("DEL", keys.round_(sid)),
        ("SET", keys.round_outcome(sid, token),
         json.dumps({"status": "closed", "version": version}), "EX", keep),
        ("HSET", keys.round_params(sid, token), *flat),
        ("EXPIRE", keys.round_params(sid, token), keep),
        _notify(sid, token),
    ]


def fail_cmds(meta: SessionMeta, token: str, version: int, received: int,
              reason: str, head: RoundHead | None = None) -> list[Command]:
    """End a round without a step: its waiters read this outcome and are refused."""
    sid = meta.id
    info: dict[str, Any] = {"status": "failed", "version": version, "received": received,
                            "reason": reason}
    if head is not None:  # what the round had and what it needed, for the refusal's detail
        info |= {"weight": head.weight, "needs": head.rule.needs()}
    outcome = json.dumps(info)
    return [
        ("DEL", keys.round_(sid)),
        ("SET", keys.round_outcome(sid, token), outcome, "EX", ttl(meta)),
        _notify(sid, token),
    ]


async def abandon_cmds(txn: StepTxn, meta: SessionMeta) -> list[Command]:
    """For replacing params or state: the open round (if any) fails, its gradients were
    computed on parameters that are being replaced."""
    if not meta.is_sync:
        return []
    head = await read_head(txn, "-")
    if head is None:
        return []
    return fail_cmds(meta, head.token, head.v, head.n, "superseded", head)


async def read_outcome(redis: Redis, sid: str, token: str) -> dict[str, Any] | None:
    raw = await redis.get(keys.round_outcome(sid, token))
    return json.loads(raw) if raw is not None else None


async def read_params(redis: Redis, meta: SessionMeta, token: str
                      ) -> dict[str, WireTensor] | None:
    """The parameters a closed round made (None once they have expired)."""
    raw = await redis.hgetall(keys.round_params(meta.id, token))
    out: dict[str, WireTensor] = {}
    for n, spec in meta.tensors.items():
        data = raw.get(keys.param_field(n).encode())
        if data is None:
            return None
        out[n] = WireTensor(spec.dtype, spec.shape, memoryview(data))
    return out
