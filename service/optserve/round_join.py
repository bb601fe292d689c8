"""Joining a sync round without the session lock (see `rounds.SyncRounds.contribute`).

One read of the session's document, version, commit nonce and open round
(`store.rounds.snapshot`), the locked path's checks on what it read, in the same order, then
one atomic EVAL that opens or joins the round only if what was read still holds
(`store.rounds.join_cmd`). Only a round's close takes the lock.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from optserve_client.wire import FLOAT_DTYPES

from . import metrics
from .checks import check_finite_as_params, check_tensors
from .errors import DomainError
from .session import SessionMeta
from .store import keys
from .store import rounds as stored
from .store.rounds import Contribution, RoundHead

if TYPE_CHECKING:
    from .rounds import SyncRounds

Joined = tuple[RoundHead, asyncio.Future[None], SessionMeta]


async def join_unlocked(rounds: SyncRounds, meta: SessionMeta, mine: Contribution,
                        cid: str, base_version: int | None, if_match: int | None,
                        bad_header: DomainError | None) -> Joined | bool:
    """Join the open round (or open it) without the session lock: one read, one atomic
    EVAL, the locked path's checks in its order. False where only the locked path can go
    on (an expired round, a retry, a round this one would fill...); True: try again
    (another opened the round, or a commit landed, since the read)."""
    snap = await stored.snapshot(rounds.store, meta.id, cid, mine.idem)
    if snap.meta is None or snap.nonce is None or snap.replayed:
        return False
    meta, version = rounds._checks(snap, base_version, if_match)  # type: ignore[arg-type]
    if bad_header is not None:
        raise bad_header
    check_tensors(meta.tensors, mine.grads, what="gradient", require_all=False,
                  dtypes=FLOAT_DTYPES)
    check_finite_as_params(mine.grads, meta.tensors)
    head = snap.head or RoundHead.open(version, meta.sync)  # type: ignore[arg-type]
    if (head.v != version or head.sealed or head.mine or head.deadline <= time.time()
            or head.rule.full(head.n + 1, head.weight + mine.weight)):
        return False
    fut = await rounds.notifier.future(head.token, meta.id)
    try:
        (joined,) = await rounds.store._on_slot(keys.round_(meta.id), [stored.join_cmd(
            meta, head, cid, mine, snap.nonce)])
    except BaseException:
        rounds.notifier.forget(head.token, fut)
        raise
    if joined != b"ok":
        rounds.notifier.forget(head.token, fut)
        return joined in (b"changed", b"moved")
    if head.new:
        metrics.ROUNDS.labels("opened").inc()
    return head, fut, meta
