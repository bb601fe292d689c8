"""Sync mode: a round collects contributions for one version, then applies one averaged step.

Contributions live in Redis (the session's ``round`` hash), so any server process can take
one and any can close the round; the session lock and the WATCH on the tensors make exactly
one process apply it. Waiters are woken through Redis pub/sub, with a once-a-second look at
the round's outcome key as a safety net; at the deadline any waiter closes the round (with at
least ``min_contributions``) or fails it, so a worker that dies mid-round hangs nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from redis.asyncio import Redis

from optserve_client.wire import FLOAT_DTYPES, WireTensor

from .api.problems import Problem
from .engine import (
    Engine,
    Loaded,
    StepOutcome,
    check_finite_as_params,
    check_tensors,
    check_version,
    locked_session,
)
from .store import keys
from .store.redis_store import SessionBusy, StepTxn, StoreConflict
from .tensors import DTYPES, from_bytes, to_bytes

log = logging.getLogger("optserve")

Encoder = Callable[[Mapping[str, Any]], list[bytes | memoryview]]


class RoundNotifier:
    """One pub/sub subscription per process, fanning round closures out to waiting requests."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.task: asyncio.Task[None] | None = None

    def future(self, token: str) -> asyncio.Future[None]:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._listen())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(token, []).append(fut)
        return fut

    def forget(self, token: str, fut: asyncio.Future[None]) -> None:
        futs = self.waiters.get(token, [])
        if fut in futs:
            futs.remove(fut)
        if not futs:
            self.waiters.pop(token, None)

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.ROUNDS_CHANNEL)
                async for message in pubsub.listen():
                    token = json.loads(message["data"]).get("token")
                    for fut in self.waiters.pop(token, []):
                        if not fut.done():
                            fut.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: waiters fall back to their checks
                log.debug("round notifier reconnecting after %s", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class SyncRounds:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self.redis = engine.store.redis
        self.notifier = RoundNotifier(self.redis)

    def _ttl(self, meta: Mapping[str, Any]) -> int:
        return int(max(300, 2 * meta["sync"]["timeout_s"] + 60))

    async def contribute(self, meta: dict[str, Any], grads: dict[str, WireTensor], *,
                         idempotency_key: str | None, base_version: int | None,
                         if_match: int | None, weight: float,
                         encode: Encoder | None, bad_header: Problem | None = None
                         ) -> StepOutcome:
        sid = meta["id"]
        if idempotency_key is not None:
            replay = await self.engine._replay(meta, idempotency_key, encode)
            if replay is not None:
                return replay
        # Field names must not depend on what clients put in keys (tensor names hold dots).
        cid = (hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
               if idempotency_key is not None else secrets.token_hex(16))
        # SessionBusy / StoreConflict become 503 session_busy in the app's handlers.
        for _ in range(3):  # at most: settle an expired round, then join the next one
            async with self.store.step_txn(sid) as txn:
                meta, version = self._checks(txn, base_version, if_match)
                if bad_header is not None:  # a 422, after the 412/409 checks
                    raise bad_header
                if idempotency_key is not None and await txn.call(
                        "EXISTS", keys.idempotency(sid, idempotency_key)):
                    await txn.finish()  # the round closed while we waited for the lock
                    replay = await self.engine._replay(meta, idempotency_key, encode)
                    if replay is not None:
                        return replay
                    continue
                check_tensors(meta["tensors"], grads, what="gradient", require_all=False,
                              dtypes=FLOAT_DTYPES)
                check_finite_as_params(grads, meta["tensors"])
                head = await self._round_head(txn, cid)
                if head is not None and head["v"] == version and head["deadline"] <= time.time():
                    # An expired round nobody settled: settle it, then join the next one.
                    outcome = await self._settle(txn, meta, version, head, None)
                    if outcome is not None:
                        raise Problem(409, "round_closed", f"the round for version {version} "
                                      "closed at its deadline; pull the new parameters",
                                      current_version=outcome.version)
                    continue
                cmds: list[Any] = []
                if head is not None and head["v"] != version:
                    # Left over from before the parameters were replaced: its waiters fail.
                    cmds += self._fail_cmds(meta, head["token"], head["v"], head["n"],
                                            "superseded")
                    head = None
                if head is None:
                    head = {"token": secrets.token_hex(12), "v": version, "n": 0,
                            "deadline": time.time() + meta["sync"]["timeout_s"],
                            "mine": False, "new": True}
                token = head["token"]
                fut = self.notifier.future(token)
                try:
                    if head["mine"]:  # a retry of a contribution already in this round
                        await txn.finish()
                    elif head["n"] + 1 >= meta["sync"]["contributions"]:
                        mine = {"weight": weight, "grads": grads, "idem": idempotency_key}
                        self.notifier.forget(token, fut)  # the closer waits for nobody
                        return await self._close(txn, meta, version, token, encode,
                                                 pending=(cid, mine), before=cmds)
                    else:
                        cmds += self._add_cmds(sid, head, cid, weight, grads, idempotency_key,
                                               meta)
                        await txn.execute(cmds)
                except BaseException:
                    self.notifier.forget(token, fut)
                    raise
            return await self._wait(meta, token, head["deadline"], fut, encode)
        raise Problem(503, "session_busy", "the session's round kept changing; retry",
                      headers={"Retry-After": "1"})

    def _checks(self, txn: StepTxn, base_version: int | None, if_match: int | None
                ) -> tuple[dict[str, Any], int]:
        meta, stored = locked_session(txn)
        version = check_version(stored, if_match)
        target = version if base_version is None else base_version
        if target > version:
            raise Problem(409, "future_version", f"round {target} is ahead of the session's "
                          f"version {version}", current_version=version)
        if target < version:
            raise Problem(409, "round_closed", f"the round for version {target} is closed; "
                          f"the session is at {version}", current_version=version)
        return meta, version

    async def _round_head(self, txn: StepTxn, cid: str) -> dict[str, Any] | None:
        token, v, deadline, n, mine = await txn.call(
            "HMGET", keys.round_(txn.sid), "token", "v", "deadline", "n", f"w.{cid}")
        if token is None:
            return None
        return {"token": token.decode(), "v": int(v), "deadline": float(deadline),
                "n": int(n or 0), "mine": mine is not None, "new": False}

    def _add_cmds(self, sid: str, head: Mapping[str, Any], cid: str, weight: float,
                  grads: Mapping[str, WireTensor], idem: str | None,
                  meta: Mapping[str, Any]) -> list[Any]:
        rkey = keys.round_(sid)
        info = {"weight": weight, "idem": idem,
                "dtypes": {n: g.dtype for n, g in grads.items()}}
        fields: list[Any] = [f"w.{cid}", json.dumps(info)]
        for name, g in grads.items():
            fields += [f"g.{cid}.{name}", g.data]
        if head["new"]:
            fields += ["token", head["token"], "v", str(head["v"]),
                       "deadline", repr(head["deadline"])]
        return [("HSET", rkey, *fields), ("HINCRBY", rkey, "n", 1),
                ("EXPIRE", rkey, self._ttl(meta))]

    async def _contributions(self, txn: StepTxn, meta: Mapping[str, Any]
                             ) -> dict[str, dict[str, Any]]:
        raw = await txn.call("HGETALL", keys.round_(txn.sid))
        out: dict[str, dict[str, Any]] = {}
        declared = meta["tensors"]
        for f, v in raw.items():
            field = f.decode()
            if field.startswith("w."):
                info = json.loads(v)
                out.setdefault(field[2:], {"grads": {}}).update(
                    weight=info["weight"], idem=info["idem"], dtypes=info["dtypes"])
        for f, v in raw.items():
            field = f.decode()
            if field.startswith("g."):
                cid, _, name = field[2:].partition(".")  # cids are hex: the first dot splits
                c = out.get(cid)
                if c is None or name not in declared:
                    continue
                c["grads"][name] = WireTensor(c["dtypes"][name], tuple(declared[name]["shape"]),
                                              memoryview(v))
        return out

    def _mean(self, meta: Mapping[str, Any], contributions: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, torch.Tensor]:
        """Weighted mean per tensor, over the contributions that carry it (float64 sums)."""
        out: dict[str, torch.Tensor] = {}
        for name, spec in meta["tensors"].items():
            acc: torch.Tensor | None = None
            total = 0.0
            for cid in sorted(contributions):
                c = contributions[cid]
                g = c["grads"].get(name)
                if g is None:
                    continue
                t = from_bytes(g.data, g.dtype, g.shape, writable=False).to(torch.float64)
                acc = t * c["weight"] if acc is None else acc.add_(t, alpha=c["weight"])
                total += c["weight"]
            if acc is not None:
                out[name] = (acc / total).to(DTYPES[spec["dtype"]])
        return out

    async def _close(self, txn: StepTxn, meta: dict[str, Any], version: int, token: str,
                     encode: Encoder | None,
                     pending: tuple[str, dict[str, Any]] | None = None,
                     before: list[Any] | None = None) -> StepOutcome:
        sid = meta["id"]
        contributions = {} if before else await self._contributions(txn, meta)
        if pending is not None:
            contributions[pending[0]] = pending[1]
        grads = self._mean(meta, contributions)
        idem_keys = [c["idem"] for c in contributions.values() if c["idem"]]
        ttl = self._ttl(meta)

        def extra(loaded: Loaded) -> list[Any]:
            outcome = json.dumps({"status": "closed", "version": loaded.version})
            params: list[Any] = []
            for n, t in loaded.params.items():
                params += [keys.param_field(n), to_bytes(t)]
            return [
                *(before or []),
                ("DEL", keys.round_(sid)),
                ("SET", keys.round_outcome(sid, token), outcome, "EX", ttl),
                ("HSET", keys.round_params(sid, token), *params),
                ("EXPIRE", keys.round_params(sid, token), ttl),
                ("PUBLISH", keys.ROUNDS_CHANNEL, json.dumps({"sid": sid, "token": token})),
            ]

        try:
            return await self.engine._step_locked(txn, meta, version, grads, None, encode,
                                                  extra_idempotency_keys=idem_keys, extra=extra)
        except Problem as exc:
            # Whatever makes the round's step unusable fails the round for all its waiters,
            # rather than leaving it to be retried (and refused) forever.
            if not txn.done:
                await txn.execute([*(before or []), *self._fail_cmds(
                    meta, token, version, len(contributions), exc.code)])
            raise

    def _fail_cmds(self, meta: Mapping[str, Any], token: str, version: int, received: int,
                   reason: str) -> list[Any]:
        """End a round without a step: its waiters read this outcome and get 409."""
        sid = meta["id"]
        outcome = json.dumps({"status": "failed", "version": version, "received": received,
                              "reason": reason})
        return [
            ("DEL", keys.round_(sid)),
            ("SET", keys.round_outcome(sid, token), outcome, "EX", self._ttl(meta)),
            ("PUBLISH", keys.ROUNDS_CHANNEL, json.dumps({"sid": sid, "token": token})),
        ]

    async def abandon_cmds(self, txn: StepTxn, meta: Mapping[str, Any]) -> list[Any]:
        """For PUT params/state: the open round (if any) fails, its gradients were computed
        on parameters that are being replaced."""
        if meta.get("mode") != "sync":
            return []
        head = await self._round_head(txn, "-")
        if head is None:
            return []
        return self._fail_cmds(meta, head["token"], head["v"], head["n"], "superseded")

    async def _settle(self, txn: StepTxn, meta: dict[str, Any], version: int,
                      head: Mapping[str, Any], encode: Encoder | None) -> StepOutcome | None:
        """At the deadline: step with what arrived (if enough), else fail the round."""
        if head["n"] >= meta["sync"]["min_contributions"]:
            with contextlib.suppress(Problem):  # a non-finite result fails the round
                return await self._close(txn, meta, version, head["token"], encode)
            return None
        await txn.execute(self._fail_cmds(meta, head["token"], version, head["n"],
                                          "too_few_contributions"))
        return None

    async def _wait(self, meta: dict[str, Any], token: str, deadline: float,
                    fut: asyncio.Future[None], encode: Encoder | None) -> StepOutcome:
        sid = meta["id"]
        # However a round ends, its waiters end too: by its outcome, by settling it at its
        # deadline, or (the round vanished with no outcome: session deleted) with a 409.
        hard_stop = deadline + self.store.lock_timeout_s + 30
        try:
            while True:
                raw = await self.redis.get(keys.round_outcome(sid, token))
                if raw is not None:
                    return await self._outcome(meta, token, json.loads(raw), encode)
                now = time.time()
                remaining = deadline - now
                if remaining <= 0:
                    if now > hard_stop or await self._expire(meta, token) == "gone":
                        raw = await self.redis.get(keys.round_outcome(sid, token))
                        if raw is not None:
                            return await self._outcome(meta, token, json.loads(raw), encode)
                        raise Problem(409, "round_failed", "the round was abandoned (its "
                                      "session was deleted or its parameters replaced); "
                                      "nothing was applied", current_version=None,
                                      reason="abandoned")
                    deadline = now + 1.0  # then read the outcome the settling wrote
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), timeout=min(remaining, 1.0))
        finally:
            self.notifier.forget(token, fut)

    async def _expire(self, meta: dict[str, Any], token: str) -> str:
        """Settle the round at its deadline: "settled" (here or elsewhere) or "gone"."""
        sid = meta["id"]
        try:
            async with self.store.step_txn(sid) as txn:
                head = await self._round_head(txn, "-")
                if head is None or head["token"] != token or txn.version is None \
                        or txn.meta is None:
                    return "gone"  # settled by someone else (outcome written) or vanished
                await self._settle(txn, txn.meta, txn.version, head, None)
                return "settled"
        except (SessionBusy, StoreConflict):
            return "settled"  # another process holds it; its outcome will be read

    async def _outcome(self, meta: Mapping[str, Any], token: str, outcome: Mapping[str, Any],
                       encode: Encoder | None) -> StepOutcome:
        if outcome["status"] == "failed" and outcome.get("reason") == "non_finite_result":
            raise Problem(409, "round_failed", "the round's averaged step would make parameters "
                          "NaN or infinite; nothing was applied",
                          current_version=outcome["version"], reason="non_finite_result")
        if outcome["status"] == "failed":
            raise Problem(409, "round_failed", f"the round for version {outcome['version']} "
                          f"timed out with {outcome.get('received', 0)} contribution(s), fewer "
                          f"than min_contributions={meta['sync']['min_contributions']}; "
                          "nothing was applied", current_version=outcome["version"])
        version = int(outcome["version"])
        body = None
        if encode is not None:
            raw = await self.redis.hgetall(keys.round_params(meta["id"], token))
            declared = meta["tensors"]
            tensors = {}
            for n, spec in declared.items():
                data = raw.get(keys.param_field(n).encode())
                if data is None:
                    raise Problem(503, "round_expired", "the round's parameters expired; GET "
                                  "the session's params", headers={"Retry-After": "0"})
                tensors[n] = WireTensor(spec["dtype"], tuple(spec["shape"]), memoryview(data))
            body = encode(tensors)
        return StepOutcome(version, body)
