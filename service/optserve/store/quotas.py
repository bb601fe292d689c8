"""Per-tenant quotas in Redis: how many sessions, how many stored tensor bytes.

The usage of tenant ``T`` lives in its own hash tag ``{t:T}`` (Redis Cluster safe, like the
tenant's session index): a hash ``session id -> bytes charged`` (its HLEN is the session
count) and the sum of its values as a counter. One Lua call checks a limit and charges, so
two creates racing for the last slot cannot both pass; one call releases a session's charge,
keyed by its id, so a second DELETE releases nothing. The release writes only HDEL first
(allowed when Redis is out of memory), and drops the counter rather than fail when Redis
refuses to update it: the next charge rebuilds it from the hash.

What a session is charged (`stored_bytes`): each parameter's bytes, ``STATE_COPIES`` times
more for the optimizer state that steps will create (the most any optimizer keeps per
parameter: RMSprop's ``square_avg``, ``momentum_buffer`` and ``grad_avg``), and a 4-byte
``step`` per parameter. It depends only on the parameters, so no later step, PATCH (momentum
switched on, another optimizer) or import can take a session over what it was charged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from optserve_client.spec import STATE_KEYS, STEP_KEY

from ..errors import QuotaExceeded
from . import keys

STATE_COPIES = max(len([k for k in ks if k != STEP_KEY]) for ks in STATE_KEYS.values())
STEP_BYTES = 4  # torch's 0-dim float32 step

Run = Callable[..., Awaitable[Any]]  # e.g. ``redis.execute_command`` or ``StepTxn.call``

_CHARGE = """
local function total()
  local t = redis.call('GET', KEYS[2])
  if t then return tonumber(t) end
  local s = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do s = s + tonumber(v) end
  return s
end
local want = tonumber(ARGV[2])
local prev = redis.call('HGET', KEYS[1], ARGV[1])
local maxn, maxb = tonumber(ARGV[3]), tonumber(ARGV[4])
if not prev and ARGV[5] == '1' and maxn then
  local n = redis.call('HLEN', KEYS[1])
  if n >= maxn then return {1, n, maxn} end
end
local old = tonumber(prev or '0')
local used = total()
if maxb and want > old and used - old + want > maxb then return {2, used, maxb} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], string.format('%d', used - old + want))
if prev then return {0, old, 0} end
return {0, -1, 0}
"""

_RELEASE = """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if not prev then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local t = redis.call('GET', KEYS[2])
if t then
  local ok = redis.pcall('SET', KEYS[2], string.format('%d', tonumber(t) - tonumber(prev)))
  if type(ok) == 'table' and ok.err then redis.call('DEL', KEYS[2]) end
end
return 1
"""


def stored_bytes(tensors: Mapping[str, Any]) -> int:
    """What a session with these parameters (wire tensors) is charged (see the module)."""
    return sum(memoryview(t.data).nbytes * (1 + STATE_COPIES) + STEP_BYTES
               for t in tensors.values())


@dataclass(frozen=True)
class Limits:
    """Per-tenant limits; None: unlimited."""

    sessions: int | None = None
    bytes: int | None = None


def _keys(tenant: str) -> tuple[str, str]:
    return keys.tenant_usage(tenant), keys.tenant_bytes(tenant)


def _arg(limit: int | None) -> str:
    return "" if limit is None else str(limit)


async def charge(run: Run, tenant: str, sid: str, nbytes: int, limits: Limits, *,
                 new: bool) -> int:
    """Charge session `sid` `nbytes` in all (a `new` session also takes a session slot).

    Returns what it was charged before (-1: nothing); raises `QuotaExceeded`, charging
    nothing, when a limit would be passed. Shrinking always passes.
    """
    status, usage, limit = await run(
        "EVAL", _CHARGE, 2, *_keys(tenant), sid, str(nbytes), _arg(limits.sessions),
        _arg(limits.bytes), "1" if new else "0")
    if status == 1:
        raise QuotaExceeded(tenant, "sessions", int(usage), int(limit), 1)
    if status == 2:
        raise QuotaExceeded(tenant, "bytes", int(usage), int(limit), nbytes)
    return int(usage)


async def restore(run: Run, tenant: str, sid: str, previous: int) -> None:
    """Undo a `charge` whose write did not happen: back to `previous` (-1: none)."""
    if previous < 0:
        await release(run, tenant, sid)
    else:
        await charge(run, tenant, sid, previous, Limits(), new=False)


async def release(run: Run, tenant: str, sid: str) -> bool:
    """Free the session's slot and bytes; False when it held none (released already)."""
    return bool(await run("EVAL", _RELEASE, 2, *_keys(tenant), sid))


async def usage(run: Run, tenant: str) -> tuple[int, int]:
    """(sessions, bytes) charged to the tenant now."""
    n = await run("HLEN", keys.tenant_usage(tenant))
    values = await run("HVALS", keys.tenant_usage(tenant))
    return int(n), sum(int(v) for v in values)
