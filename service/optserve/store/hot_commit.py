"""One-round-trip commit of a step computed on this process's cached tensors.

The locked path (`StepTxn`) needs two round trips: lock + WATCH + reads, then MULTI/EXEC.
A process that holds a session hot already knows what those reads would say (the version
and commit nonce its cached tensors are at, the log's length), so it computes first and
then sends one script that commits only if they still hold: nobody holds the session lock
(a locked step in any process would otherwise lose its WATCH), the head is at the version
and nonce the tensors were computed from (no other commit, PUT or PATCH since: they all
write a fresh nonce), and the idempotency key, if any, is unused. Anything else answers
"not committed, nothing written", and the caller takes the locked path from scratch.

The guards run before the first write, so a refusal (lock held, moved on, key used, OOM on
the first write, a read-only replica) writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import AskError

from .. import metrics, tracing
from . import keys
from .clients import refresh_slots, slot_connection
from .faults import raise_classified
from .step_txn import run_batch

if TYPE_CHECKING:
    from .redis_store import Store

# KEYS: lock, tensors, wal_index, checkpoint, the idempotency key (or the lock again), then
# every other key the commands write (declared for a cluster's slot check).
# ARGV: version, nonce, command count, then each command as its length and its words.
_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 'locked'} end
local head = redis.call('HMGET', KEYS[2], 'v', 'c')
if head[1] ~= ARGV[1] or head[2] ~= ARGV[2] then return {0, 'moved'} end
if KEYS[5] ~= KEYS[1] and redis.call('EXISTS', KEYS[5]) == 1 then return {0, 'used'} end
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return {1, redis.call('HLEN', KEYS[3]), redis.call('HGET', KEYS[4], 'lb') or '0'}
"""

# Lua's unpack takes at most a few thousand values; a step's log entry has two per tensor.
MAX_TENSORS = 500


@dataclass
class Committed:
    """The log's length after the commit (for the next checkpoint decision)."""

    log_steps: int
    log_bytes: int


def script_args(sid: str, version: int, nonce: str | None, cmds: Sequence[Sequence[Any]],
                idempotency_key: str | None) -> list[Any]:
    """EVAL's arguments for `cmds` guarded by `version` and `nonce`."""
    lock = keys.lock(sid)
    declared = [lock, keys.tensors(sid), keys.wal_index(sid), keys.checkpoint(sid),
                keys.idempotency(sid, idempotency_key) if idempotency_key is not None else lock]
    for c in cmds:
        if c[1] not in declared:
            declared.append(c[1])
    argv: list[Any] = [str(version), nonce or "", len(cmds)]
    for c in cmds:
        argv += [len(c), *c]
    return ["EVAL", _SCRIPT, len(declared), *declared, *argv]


async def hot_commit(store: Store, sid: str, version: int, nonce: str | None,
                     cmds: Sequence[Sequence[Any]], idempotency_key: str | None
                     ) -> Committed | None:
    """Commit `cmds` if the session is unlocked at `version`/`nonce` and the key unused;
    None when it was not (nothing written). Errors (a lost connection: the commit may or
    may not have landed) are raised, as the locked path raises them."""
    command = script_args(sid, version, nonce, cmds, idempotency_key)
    batch = [command, *store._wait_cmds()]
    latency = metrics.child(metrics.STORE_LATENCY, "EVAL")
    with tracing.redis_span(batch), metrics.timed(latency.observe):
        try:
            async with slot_connection(store.redis, keys.tensors(sid),
                                       store.pool_timeout_s) as conn:
                replies = await run_batch(conn, batch)
        except Exception:
            await refresh_slots(store.redis)
            raise
    reply = replies[0]
    if isinstance(reply, AskError):  # the slot moved: the locked path routes afresh
        await refresh_slots(store.redis)
        return None
    if isinstance(reply, Exception):
        raise_classified(reply)
    if int(reply[0]) != 1:
        metrics.child(metrics.HOT_STEPS, _word(reply[1])).inc()
        return None
    if len(replies) > 1:
        store._check_acked(replies[1])
    metrics.child(metrics.HOT_STEPS, "committed").inc()
    return Committed(int(reply[1]), int(reply[2]))


def _word(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
