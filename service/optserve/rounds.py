"""Sync mode: a round collects contributions for one version, then applies one averaged step.

Contributions live in Redis (the session's ``round`` hash), so any server process can take
one and any can close the round; the session lock and the WATCH on the tensors make exactly
one process apply it. Waiters are woken through Redis pub/sub, with a once-a-second look at
the round's outcome key as a safety net; at the deadline any waiter closes the round (with at
least ``min_contributions`` or ``min_weight``) or fails it, so a worker that dies mid-round
hangs nobody. A round closes when it has ``contributions`` or its weights add up to
``target_weight`` (whichever comes first), by the settings it opened with. Contributions
open and join a round without the lock (`round_join`); only its close takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import Mapping
from typing import Any

import torch

from optserve_client.wire import FLOAT_DTYPES, WireTensor

from . import metrics
from .cache import Loaded
from .checks import (
    check_finite_as_params,
    check_same_request,
    check_tensors,
    check_version,
    locked_session,
    step_hyperparams,
    without_kernel_options,
)
from .engine import Encoder, Engine, StepOutcome
from .errors import Busy, DomainError
from .round_handoff import RoundHandoff
from .round_join import join_unlocked
from .round_notifier import RoundNotifier
from .session import SessionMeta
from .store import keys
from .store import rounds as stored
from .store.clients import pubsub_client
from .store.redis_store import StepTxn
from .store.rounds import Contribution, RoundHead
from .tensors import DTYPES, from_bytes, to_bytes


class SyncRounds:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self.redis = engine.store.redis
        self.notifier = RoundNotifier(pubsub_client(self.redis))
        self.handoff = RoundHandoff()  # rounds closed here, for the waiters here

    async def contribute(self, meta: SessionMeta, grads: dict[str, WireTensor], *,
                         idempotency_key: str | None, base_version: int | None,
                         if_match: int | None, weight: float,
                         encode: Encoder | None, bad_header: DomainError | None = None,
                         hyperparams: Mapping[str, Any] | None = None,
                         request_digest: str | None = None) -> StepOutcome:
        """Add one contribution to the round for its version; the one that fills it (by
        count or by accumulated weight) closes it.

        Contributions carry the same ``hyperparameters`` or none (else 409
        ``hyperparams_conflict``); the round's step applies them."""
        sid = meta.id
        # A retry of a contribution whose round closed is found by the join's read (it then
        # declines) and replayed under the lock: no read of its own first.
        # Field names must not depend on what clients put in keys (tensor names hold dots).
        cid = (hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
               if idempotency_key is not None else secrets.token_hex(16))
        mine = Contribution(weight, idempotency_key, grads, request_digest)
        for _ in range(3 if not hyperparams else 0):  # another opened the round: join it
            joined = await join_unlocked(self, meta, mine, cid, base_version, if_match,
                                         bad_header)
            if isinstance(joined, tuple):  # the document as read with the round
                head, fut, meta = joined
                return await self._wait(meta, head.token, head.deadline, fut, encode)
            if not joined:
                break
        for _ in range(3):  # at most: settle an expired round, then join the next one
            async with self.store.step_txn(sid) as txn:
                meta, version = self._checks(txn, base_version, if_match)
                assert meta.sync is not None
                if bad_header is not None:  # an invalid header, after the version checks
                    raise bad_header
                if idempotency_key is not None and await txn.call(
                        "EXISTS", keys.idempotency(sid, idempotency_key)):
                    await txn.finish()  # the round closed while we waited for the lock
                    replay = await self.engine.replay(meta, idempotency_key, encode,
                                                      request_digest)
                    if replay is not None:
                        return replay
                    continue
                check_tensors(meta.tensors, grads, what="gradient", require_all=False,
                              dtypes=FLOAT_DTYPES)
                check_finite_as_params(grads, meta.tensors)
                head = await stored.read_head(txn, cid)
                if head is not None and head.v == version and head.deadline <= time.time():
                    # An expired round nobody settled: settle it, then join the next one.
                    outcome = await self._settle(txn, meta, version, head, None)
                    if outcome is not None:
                        raise DomainError("round_closed", f"the round for version {version} "
                                          "closed at its deadline; pull the new parameters",
                                          current_version=outcome.version)
                    continue
                cmds: list[Any] = []
                if head is not None and head.v != version:
                    # Left over from before the parameters were replaced: its waiters fail.
                    cmds += stored.fail_cmds(meta, head.token, head.v, head.n, "superseded",
                                             head)
                    metrics.ROUNDS.labels("failed").inc()
                    head = None
                if head is None:
                    head = RoundHead.open(version, meta.sync)
                hp = await self._round_hyperparams(txn, meta, head, hyperparams)
                token = head.token
                fut = await self.notifier.future(token, sid)
                try:
                    if head.mine:  # a retry of a contribution already in this round
                        await txn.finish()
                        check_same_request(head.mine_digest, request_digest)
                    elif head.rule.full(head.n + 1, head.weight + weight):
                        self.notifier.forget(token, fut)  # the closer waits for nobody
                        if head.new:  # a one-contribution round: opened and closed at once
                            metrics.ROUNDS.labels("opened").inc()
                        return await self._close(txn, meta, version, token, encode,
                                                 pending=(cid, mine), before=cmds, hp=hp,
                                                 head=head)
                    elif cmds:  # replaces a superseded round (no join can race it)
                        await txn.execute([*cmds, *stored.add_cmds(meta, head, cid, mine, hp)])
                        metrics.ROUNDS.labels("opened").inc()
                    else:  # as joins without the lock do, which it may race
                        joined = await txn.call(*stored.join_cmd(
                            meta, head, cid, mine, None, hp if head.hp is None else None))
                        await txn.finish()
                        if joined != b"ok":  # opened or filled meanwhile: join or close
                            self.notifier.forget(token, fut)
                            continue
                        if head.new:
                            metrics.ROUNDS.labels("opened").inc()
                except BaseException:
                    self.notifier.forget(token, fut)
                    raise
            return await self._wait(meta, token, head.deadline, fut, encode)
        raise DomainError("session_busy", "the session's round kept changing; retry",
                          retry_after=1)

    @staticmethod
    async def _round_hyperparams(txn: StepTxn, meta: SessionMeta, head: RoundHead,
                                 requested: Mapping[str, Any] | None
                                 ) -> dict[str, Any] | None:
        """The round's hyperparameters with this contribution's: 409 where they differ (as
        applied to the session's), then checked as a step's are."""
        if not requested:
            return head.hp
        if head.hp is not None:
            asked = {**meta.hyperparams, **without_kernel_options(requested)}
            differ = sorted(k for k in set(asked) | set(head.hp)
                            if asked.get(k) != head.hp.get(k))
            if differ:
                raise DomainError("hyperparams_conflict", f"this contribution's hyperparameters "
                                  f"differ from its round's in {differ}; a round's contributions "
                                  "carry the same hyperparameters or none",
                                  fields=differ, hyperparams=head.hp)
        return await step_hyperparams(txn, meta, requested)

    def _checks(self, txn: StepTxn, base_version: int | None, if_match: int | None
                ) -> tuple[SessionMeta, int]:
        meta, stored_version = locked_session(txn)
        version = check_version(stored_version, if_match)
        target = version if base_version is None else base_version
        if target > version:
            raise DomainError("future_version", f"round {target} is ahead of the session's "
                              f"version {version}", current_version=version)
        if target < version:
            raise DomainError("round_closed", f"the round for version {target} is closed; "
                              f"the session is at {version}", current_version=version)
        return meta, version

    def _mean(self, meta: SessionMeta, contributions: Mapping[str, Contribution]
              ) -> dict[str, torch.Tensor]:
        """Weighted mean per tensor, over the contributions that carry it (float64 sums)."""
        out: dict[str, torch.Tensor] = {}
        for name, spec in meta.tensors.items():
            acc: torch.Tensor | None = None
            total = 0.0
            for cid in sorted(contributions):
                c = contributions[cid]
                g = c.grads.get(name)
                if g is None:
                    continue
                t = from_bytes(g.data, g.dtype, g.shape, writable=False).to(torch.float64)
                acc = t * c.weight if acc is None else acc.add_(t, alpha=c.weight)
                total += c.weight
            if acc is not None:
                out[name] = (acc / total).to(DTYPES[spec.dtype])
        return out

    async def _close(self, txn: StepTxn, meta: SessionMeta, version: int, token: str,
                     encode: Encoder | None,
                     pending: tuple[str, Contribution] | None = None,
                     before: list[Any] | None = None,
                     hp: Mapping[str, Any] | None = None, head: RoundHead | None = None
                     ) -> StepOutcome:
        contributions = {} if before else await stored.read_contributions(txn, meta)
        if pending is not None:
            contributions[pending[0]] = pending[1]
        grads = self._mean(meta, contributions)
        idem_keys = [(c.idem, c.digest) for c in contributions.values() if c.idem]

        local: dict[str, WireTensor] = {}

        def extra(loaded: Loaded) -> list[Any]:
            params = {n: to_bytes(t) for n, t in loaded.params.items()}
            if self.notifier.waiters.get(token):  # waiters here: a copy for them
                local.update({n: WireTensor(meta.tensors[n].dtype, meta.tensors[n].shape,
                                            memoryview(bytes(b))) for n, b in params.items()})
            return [*(before or []), *stored.close_cmds(meta, token, loaded.version, params)]

        try:
            async with self.handoff.committing(token):
                outcome = await self.engine.step_locked(
                    txn, meta, version, grads, None, encode, extra_idempotency_keys=idem_keys,
                    extra=extra, hyperparams=hp)
                if local:
                    self.handoff.record(token, outcome.version, local)
            metrics.ROUNDS.labels("closed").inc()
            self.notifier.wake(token)
            if head is not None:  # opened = deadline - the round's timeout
                metrics.ROUND_SECONDS.observe(
                    max(0.0, time.time() - head.deadline + head.rule.timeout_s))
            return outcome
        except Busy:
            raise
        except DomainError as exc:
            # Whatever makes the round's step unusable fails the round for all its waiters,
            # rather than leaving it to be retried (and refused) forever.
            if not txn.done:
                await txn.execute([*(before or []), *stored.fail_cmds(
                    meta, token, version, len(contributions), exc.code, head)])
                metrics.ROUNDS.labels("failed").inc()
            raise

    async def _settle(self, txn: StepTxn, meta: SessionMeta, version: int,
                      head: RoundHead, encode: Encoder | None) -> StepOutcome | None:
        """At the deadline: step with what arrived (if enough), else fail the round."""
        if head.rule.enough(head.n, head.weight):
            try:
                return await self._close(txn, meta, version, head.token, encode, hp=head.hp,
                                         head=head)
            except Busy:
                raise
            except DomainError:  # a non-finite result fails the round
                return None
        await txn.execute(stored.fail_cmds(meta, head.token, version, head.n,
                                           "too_few_contributions", head))
        metrics.ROUNDS.labels("failed").inc()
        return None

    async def _wait(self, meta: SessionMeta, token: str, deadline: float,
                    fut: asyncio.Future[None], encode: Encoder | None) -> StepOutcome:
        sid = meta.id
        # However a round ends, its waiters end too: by its outcome, by settling it at its
        # deadline, or (the round vanished with no outcome: session deleted) a refusal.
        hard_stop = deadline + self.store.lock_timeout_s + 30
        started = time.perf_counter()
        try:
            # Registered before the join: a live subscription will announce the closure.
            trust = self.notifier.announced()
            while True:
                here = await self.handoff.get(token)
                outcome = here[0] if here else None if trust and not fut.done() else \
                    await stored.read_outcome(self.redis, sid, token)
                trust = False
                if outcome is not None:
                    return await self._outcome(meta, token, outcome, encode)
                now = time.time()
                remaining = deadline - now
                if remaining <= 0:
                    if now > hard_stop or await self._expire(meta, token) == "gone":
                        outcome = await stored.read_outcome(self.redis, sid, token)
                        if outcome is not None:
                            return await self._outcome(meta, token, outcome, encode)
                        raise DomainError("round_failed", "the round was abandoned (its "
                                          "session was deleted or its parameters replaced); "
                                          "nothing was applied", current_version=None,
                                          reason="abandoned")
                    deadline = now + 1.0  # then read the outcome the settling wrote
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), timeout=min(remaining, 1.0))
        finally:
            metrics.ROUND_WAIT.observe(time.perf_counter() - started)
            self.notifier.forget(token, fut)

    async def _expire(self, meta: SessionMeta, token: str) -> str:
        """Settle the round at its deadline: "settled" (here or elsewhere) or "gone"."""
        try:
            async with self.store.step_txn(meta.id) as txn:
                head = await stored.read_head(txn, "-")
                if head is None or head.token != token or txn.version is None \
                        or txn.meta is None:
                    return "gone"  # settled by someone else (outcome written) or vanished
                await self._settle(txn, txn.meta, txn.version, head, None)
                return "settled"
        except Busy:
            return "settled"  # another process holds it; its outcome will be read

    async def _outcome(self, meta: SessionMeta, token: str, outcome: Mapping[str, Any],
                       encode: Encoder | None) -> StepOutcome:
        assert meta.sync is not None
        if outcome["status"] == "failed" and outcome.get("reason") == "non_finite_result":
            raise DomainError("round_failed", "the round's averaged step would make parameters "
                              "NaN or infinite; nothing was applied",
                              current_version=outcome["version"], reason="non_finite_result")
        if outcome["status"] == "failed":
            needs = outcome.get("needs") or f"min_contributions={meta.sync.min_contributions}"
            raise DomainError("round_failed", f"the round for version {outcome['version']} "
                              f"timed out with {outcome.get('received', 0)} contribution(s) "
                              f"of total weight {outcome.get('weight', 0):g}, short of "
                              f"{needs}; nothing was applied",
                              current_version=outcome["version"])
        version = int(outcome["version"])
        body = None
        if encode is not None:
            here = await self.handoff.get(token)
            tensors = here[1] if here else await stored.read_params(self.redis, meta, token)
            if tensors is None:
                raise DomainError("round_expired", "the round's parameters expired; GET "
                                  "the session's params", retry_after=0)
            body = encode(tensors)
        return StepOutcome(version, body)
