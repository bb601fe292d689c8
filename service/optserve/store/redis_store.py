"""Sessions in Redis: documents, tensors as raw bytes in one hash, versioned atomic commits.

A session's tensors and its version live in one hash (``keys.tensors``), so a reader that
fetches them with one HMGET/HGETALL always sees a single version, and a commit writes them
with one MULTI/EXEC guarded by WATCH on that hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.exceptions import AskError

from .. import metrics
from ..errors import DomainError, SessionBusy, StoreConflict, StoreUnavailable
from ..session import SessionHead, SessionMeta
from . import keys, quotas, wal
from .clients import Client, is_cluster, make_redis, refresh_slots, slot_connection
from .faults import classify, first_refusal, raise_classified
from .step_txn import Buffer, StepTxn, idempotency_record, now, run_batch

__all__ = ["Buffer", "SessionBusy", "StepTxn", "Store", "StoreConflict", "idempotency_record",
           "make_redis", "now", "run_batch"]


@dataclass
class Snapshot:
    """A session's tensors as stored: a checkpoint and the steps logged after it."""

    version: int | None
    nonce: str | None
    ck_version: int | None
    fields: dict[str, bytes]
    log: list[wal.Record]


def _head(values: Sequence[Any]) -> SessionHead:
    return SessionHead.from_values({f: (float(v) if v is not None else None)
                                    for f, v in zip(keys.HEAD_FIELDS, values, strict=True)})


class Store:
    def __init__(self, redis: Client, *, idempotency_ttl_s: int, lock_timeout_s: float,
                 min_replicas_ack: int = 0, wait_timeout_s: float = 1.0,
                 pool_timeout_s: float = 5.0) -> None:
        self.redis = redis
        self.idempotency_ttl_s = idempotency_ttl_s
        self.lock_timeout_s = lock_timeout_s
        self.min_replicas_ack = min_replicas_ack
        self.wait_timeout_s = wait_timeout_s
        self.pool_timeout_s = pool_timeout_s
        self.cluster = is_cluster(redis)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def check_writable(self) -> None:
        """Raise unless Redis takes a write now: one tiny SET with a TTL, which Redis refuses
        exactly when a session write would be refused (OOM, a read-only replica, a cluster
        slot moved or down, still loading), at the cost of one round trip. On a cluster,
        also ``cluster_state:ok`` and every primary answering (a lost shard is not ready)."""
        try:
            if self.cluster:
                info = await self.redis.cluster_info()
                state = info.get("cluster_state")
                state = state.decode() if isinstance(state, bytes) else state
                if state != "ok":
                    raise StoreUnavailable(f"cluster_state:{state}")
                await self.redis.ping(target_nodes=self.redis.PRIMARIES)
            await self.redis.set(keys.HEALTH, "1", px=10_000)
        except Exception as exc:
            if self.cluster:
                await refresh_slots(self.redis)
            raise_classified(exc)

    def _wait_cmds(self) -> list[tuple[Any, ...]]:
        """``WAIT n ms`` when steps must reach `min_replicas_ack` replicas before answering."""
        n = self.min_replicas_ack
        return [("WAIT", n, int(self.wait_timeout_s * 1000))] if n else []

    def _check_acked(self, reply: Any) -> None:
        if isinstance(reply, Exception) or int(reply) < self.min_replicas_ack:
            raise DomainError(
                "store_unavailable", f"the write reached the primary but only {reply} of "
                f"{self.min_replicas_ack} replicas confirmed it within {self.wait_timeout_s} s:"
                " it may or may not survive a failover; retry with the same Idempotency-Key "
                "(a retry of a step that did land answers with the version it made)",
                retry_after=1)

    # ------------------------------------------------------------------ documents

    async def create(self, meta: SessionMeta, fields: Mapping[str, Buffer] | None) -> None:
        """The tenant index first (its own slot; idempotent, filtered on read), then the
        session's keys in one MULTI on its slot: a create that fails leaves no session
        that listing cannot see."""
        sid, tenant = meta.id, meta.tenant or ""
        await self.redis.sadd(keys.tenant_sessions(tenant), sid)
        head: list[Any] = [keys.UPDATED, repr(meta.created_at)]
        writes: list[tuple[Any, ...]] = [("SET", keys.meta(sid), meta.to_json())]
        if fields is not None:
            head += [keys.VERSION, "0"]
            writes += wal.full_checkpoint_cmds(sid, 0, fields)
        writes.append(("HSET", keys.tensors(sid), *head))
        n = len(writes)
        cmds = [("MULTI",), *writes, ("EXEC",), *self._wait_cmds()]
        try:
            replies = await self._on_slot(keys.tensors(sid), cmds)
            exec_reply = replies[n + 1]
            if isinstance(exec_reply, Exception):
                cause = first_refusal(replies[1:n + 1])
                raise cause or classify(exec_reply) or exec_reply
            if len(replies) > n + 2:
                self._check_acked(replies[n + 2])
        except BaseException:
            with contextlib.suppress(Exception):
                await self.redis.srem(keys.tenant_sessions(tenant), sid)
            raise

    async def _on_slot(self, key: str, cmds: Sequence[Sequence[Any]]) -> list[Any]:
        """One batch on a connection to `key`'s primary (MOVED: the slot map re-read)."""
        try:
            async with slot_connection(self.redis, key, self.pool_timeout_s) as conn:
                replies = await run_batch(conn, cmds)
        except Exception:
            await refresh_slots(self.redis)
            raise
        if any(isinstance(r, AskError) for r in replies):
            await refresh_slots(self.redis)
        return replies

    async def claim_create(self, tenant: str, key: str, sid: str, ttl_s: int,
                           digest: str | None = None) -> tuple[str, str | None]:
        """Record `sid` (and its request's digest) as what this create key made; returns the
        first session and digest recorded."""
        rkey = keys.create_idempotency(tenant, key)
        if await self.redis.set(rkey, f"{sid} {digest}" if digest else sid, nx=True, ex=ttl_s):
            return sid, digest
        first = await self.redis.get(rkey)
        if not first:
            return sid, digest
        first_sid, _, first_digest = first.decode().partition(" ")
        return first_sid, first_digest or None

    async def get_meta(self, sid: str) -> SessionMeta | None:
        raw = await self.redis.get(keys.meta(sid))
        return SessionMeta.from_json(raw) if raw else None

    async def head(self, sid: str) -> SessionHead:
        """The small fields of the tensor hash: version, updated_at, last norms, steps."""
        values = await self.redis.hmget(keys.tensors(sid), list(keys.HEAD_FIELDS))
        return _head(values)

    async def heads(self, sids: list[str]) -> list[SessionHead]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(keys.tensors(sid), list(keys.HEAD_FIELDS))
            rows = await pipe.execute()
        return [_head(row) for row in rows]

    async def get_metas(self, sids: list[str]) -> list[SessionMeta | None]:
        """One GET per session, pipelined (grouped by node on a cluster: no MGET there,
        the sessions' keys live in different slots)."""
        if not sids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.get(keys.meta(sid))
            raws = await pipe.execute()
        return [SessionMeta.from_json(r) if r else None for r in raws]

    async def list_ids(self, tenant: str) -> list[str]:
        ids = await self.redis.smembers(keys.tenant_sessions(tenant))
        return sorted(i.decode() for i in ids)

    async def delete(self, sid: str, tenant: str, *, wait_s: float | None = None) -> bool:
        """Delete a session once no step holds its lock; release its quota and index entry.

        One Lua call checks the lock and deletes the keys, rather than taking the lock: SET
        and MULTI are refused when Redis is out of memory, DEL is not, so a tenant can
        always free space. A step in flight holds the lock, so the call waits (polling, up
        to `wait_s`, default the lock's lifetime) for it to finish, as before. Returns
        whether this call deleted the session (False: it was gone already).
        """
        wait_s = self.lock_timeout_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        delay = 0.0005
        while True:
            deleted = await self.redis.eval(_DELETE, 7, keys.lock(sid), keys.meta(sid),
                                            keys.tensors(sid), keys.round_(sid),
                                            keys.checkpoint(sid), keys.wal(sid),
                                            keys.wal_index(sid))
            if deleted != -1:
                break
            if time.monotonic() > deadline:
                metrics.SESSION_BUSY.labels("lock").inc()
                raise SessionBusy(f"session {sid} stayed locked for {wait_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.002)
        await self.redis.srem(keys.tenant_sessions(tenant), sid)
        await quotas.release(self.redis.execute_command, tenant, sid)
        # Idempotency records expire by themselves; drop them now anyway, found through
        # the set of them kept in the session's slot (no scan of the keyspace).
        iset = keys.idempotency_set(sid)
        records = list(await self.redis.smembers(iset))
        for i in range(0, len(records), 500):
            await self.redis.delete(*records[i:i + 500])
        await self.redis.delete(iset)
        return bool(deleted)

    # ------------------------------------------------------------------ tensors

    async def snapshot(self, sid: str) -> Snapshot:
        """The version, its commit nonce, then the log, then the checkpoint, in one batch of
        reads (no MULTI: Redis refuses those when out of memory, and reads must work then).
        A write landing between the reads shows as a checkpoint and log that do not make the
        version read (`wal.LogGap`, the caller reads again); a step landing after the version
        was read only adds log entries past it, which replay ignores."""
        tkey = keys.tensors(sid)
        cmds = [("HMGET", tkey, keys.VERSION, keys.NONCE), *wal.read_cmds(sid)]
        replies = await self._on_slot(tkey, cmds)
        for reply in replies:
            if isinstance(reply, Exception):
                raise_classified(reply)
        (raw_v, raw_nonce), entries, raw_ck = replies
        ck_version, fields = wal.split_checkpoint(raw_ck)
        return Snapshot(int(raw_v) if raw_v is not None else None,
                        raw_nonce.decode() if raw_nonce is not None else None,
                        ck_version, fields, wal.parse_entries(entries))

    @asynccontextmanager
    async def step_txn(self, sid: str) -> AsyncIterator[StepTxn]:
        """The step's whole Redis conversation in two round trips, on one connection to the
        primary that owns the session's slot.

        Round trip 1: take the session lock (SET NX PX with a random token), WATCH the tensor
        hash, read the document and the version. Round trip 2: MULTI, the writes, EXEC (aborted
        by Redis if anything touched the hash since the WATCH), and the lock's release. The
        version seen under the lock is re-checked by the WATCH at commit time. On a cluster,
        a MOVED/ASK answer to round trip 1 re-reads the slot map and starts over once.
        """
        async with contextlib.AsyncExitStack() as stack:
            for attempt in (0, 1):
                conns = contextlib.AsyncExitStack()
                conn = await conns.enter_async_context(
                    slot_connection(self.redis, keys.tensors(sid), self.pool_timeout_s))
                txn = StepTxn(self, sid, conn)
                try:
                    await txn.begin()
                except StoreUnavailable as exc:
                    await conns.aclose()
                    if self.cluster and isinstance(exc.__cause__, AskError):
                        await refresh_slots(self.redis)  # MovedError is an AskError
                        if attempt == 0:
                            continue
                    raise
                except BaseException:
                    await conns.aclose()
                    await refresh_slots(self.redis)  # a lost node: find its successor
                    raise
                stack.push_async_exit(conns)
                break
            try:
                yield txn
            finally:
                await txn.abort()  # a no-op after a commit

    async def get_idempotency(self, sid: str, key: str) -> dict[str, Any] | None:
        raw = await self.redis.get(keys.idempotency(sid, key))
        return json.loads(raw) if raw else None


_DELETE = """
if redis.call('exists', KEYS[1]) == 1 then return -1 end
redis.call('del', KEYS[5], KEYS[6], KEYS[7])
return redis.call('del', KEYS[2], KEYS[3], KEYS[4])
"""


