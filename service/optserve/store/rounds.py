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

from ..session import SessionMeta, SyncSpec
from . import keys
from .redis_store import Buffer, StepTxn

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


async def read_head(txn: StepTxn, cid: str) -> RoundHead | None:
    token, v, deadline, n, wsum, rule, mine, hp = await txn.call(
        "HMGET", keys.round_(txn.sid), "token", "v", "deadline", "n", "wsum", "rule",
        f"w.{cid}", "hp")
    # A round opened by an older server has no rule or weight: the session's settings hold.
    spec = (SyncSpec.from_json(json.loads(rule)) if rule is not None
            else txn.meta.sync if txn.meta is not None else None)
    if token is None or spec is None:  # none, or nothing left to settle it by
        return None
    return RoundHead(token.decode(), int(v), float(deadline), int(n or 0), spec,
                     float(wsum or 0.0), mine is not None,
                     hp=json.loads(hp) if hp is not None else None,
                     mine_digest=json.loads(mine).get("digest") if mine is not None else None)


def add_cmds(meta: SessionMeta, head: RoundHead, cid: str, c: Contribution,
             hp: Mapping[str, Any] | None = None) -> list[Command]:
    """Add one contribution to the round (opening it first if `head` is new); ``hp``: the
    round's hyperparameters, set by the first contribution that carries any."""
    rkey = keys.round_(meta.id)
    info = {"weight": c.weight, "idem": c.idem, "digest": c.digest,
            "dtypes": {n: g.dtype for n, g in c.grads.items()}}
    fields: list[Any] = [f"w.{cid}", json.dumps(info)]
    for name, g in c.grads.items():
        fields += [f"g.{cid}.{name}", g.data]
    if head.new:
        fields += ["token", head.token, "v", str(head.v), "deadline", repr(head.deadline),
                   "rule", json.dumps(head.rule.to_json())]
    if hp is not None:
        fields += ["hp", json.dumps(dict(hp))]
    # The session lock is held: the total is read and written here, not summed by Redis.
    fields += ["wsum", repr(head.weight + c.weight)]
    return [("HSET", rkey, *fields), ("HINCRBY", rkey, "n", 1),
            ("EXPIRE", rkey, ttl(meta, head))]


async def read_contributions(txn: StepTxn, meta: SessionMeta) -> dict[str, Contribution]:
    raw = await txn.call("HGETALL", keys.round_(txn.sid))
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
