"""A step of a session this process holds hot: computed first, committed in one round trip.

The locked path reads under a lock what this process's cache entry already says (version,
commit nonce, session document, log length), so for a small step of a cached session the
engine computes on the cached tensors and sends one guarded script
(`store/hot_commit.py`) that commits only if all of it still holds in Redis. When it does
not (another process stepped, a PUT or PATCH landed, a locked step is under way, the
Idempotency-Key was used), the script writes nothing, the tensors this attempt changed are
dropped, and the step goes the locked way from scratch: same answer, one attempt later.

Correctness never depends on the hot path: it commits the same records as the locked path
(the write-ahead entry, head, idempotency record) and the guards make it a no-op whenever
its view is not the current commit. Any refusal it would raise (version checks, a bad
gradient, a non-finite result) is left to the locked path, which checks against Redis.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from optserve_client.wire import FLOAT_DTYPES, WireTensor

from . import metrics, optim
from .cache import Loaded
from .checks import check_staleness, check_tensors, check_version
from .errors import DomainError
from .session import SessionMeta
from .store import hot_commit, step_txn, wal

if TYPE_CHECKING:
    from .engine import Encoder, Engine, StepOutcome


def _usable(engine: Engine, item: Loaded, meta: SessionMeta,
            grads: dict[str, WireTensor], logged: int, if_match: int | None,
            base_version: int | None) -> bool:
    """Whether the cached entry can serve this step (else it goes back, untouched)."""
    m = item.meta
    if m is None or item.log_steps is None or item.nonce is None or m.is_sync \
            or m.tenant != meta.tenant:
        return False
    try:
        check_version(item.version, if_match)
        check_staleness(m, item.version, base_version)
        check_tensors(m.tensors, grads, what="gradient", require_all=False,
                      dtypes=FLOAT_DTYPES)
    except DomainError:  # maybe only against a stale view: the locked path decides
        return False
    return not engine.checkpoints.overdue(item.log_steps + 1, item.log_bytes + logged)


async def try_step(engine: Engine, meta: SessionMeta, grads: dict[str, WireTensor], *,
                   idempotency_key: str | None, base_version: int | None,
                   if_match: int | None, encode: Encoder | None,
                   request_digest: str | None) -> StepOutcome | None:
    """The step in one round trip, or None: the caller takes the locked path."""
    from .engine import StepOutcome

    limit = engine.settings.hot_step_bytes
    logged = sum(g.data.nbytes for g in grads.values())  # what the log entry holds
    if not limit or logged > limit \
            or len(grads) > min(engine.settings.offload_tensors, hot_commit.MAX_TENSORS):
        return None
    sid = meta.id
    if sid in engine.checkpoints.copying:  # a background checkpoint owns the tensors
        return None
    item = engine.cache.take_any(sid)
    if item is None:
        return None
    if not _usable(engine, item, meta, grads, logged, if_match, base_version):
        engine.cache.put(sid, item)
        return None
    if not await item.settled():
        return None  # the tensors stay with a slow reader's response; the locked path rebuilds
    started = time.perf_counter()
    m = item.meta
    assert m is not None and item.log_steps is not None
    opt = optim.get_optimizer(m.optimizer)
    hp = opt.hyperparams.model_validate(m.hyperparams)
    try:
        stats = await engine.update(opt, hp, item, grads, logged)
    except DomainError:  # e.g. non-finite: the locked path answers it against Redis
        return None  # `item` is dropped: it may be half-updated
    new_version, nonce = item.version + 1, secrets.token_hex(8)
    log_cmds, _ = wal.log_cmds(sid, new_version, nonce, grads, m.hyperparams,
                               fresh_momentum=False, device_type=engine.device_type,
                               kernel=engine.kernel)
    store = engine.store
    cmds: list[Any] = [*log_cmds, *step_txn.head_cmds(sid, new_version, stats)]
    if idempotency_key is not None:
        cmds.append(step_txn.remember_cmd(store, sid, idempotency_key, new_version,
                                          request_digest))
    cmds = step_txn.finish_cmds(store, sid, cmds, nonce)
    done = await hot_commit.hot_commit(store, sid, item.version, item.nonce, cmds,
                                       idempotency_key)
    if done is None:
        return None
    item.version, item.nonce = new_version, nonce
    item.log_steps, item.log_bytes = done.log_steps, done.log_bytes  # sizes unchanged
    metrics.LOGGED_BYTES.inc(logged)
    body = None
    if encode is not None:
        body = await engine.offload(encode, item.wire_params(), count=len(item.params),
                                    nbytes=item.nbytes)
    metrics.child(metrics.STEP_SECONDS, "async").observe(time.perf_counter() - started)
    return StepOutcome(new_version, body, stats=stats,
                       after_send=engine.give_back(sid, item))
