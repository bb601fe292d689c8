"""Sessions in Redis: documents, tensors as raw bytes in one hash, versioned atomic commits.

A session's tensors and its version live in one hash (``keys.tensors``), so a reader that
fetches them with one HMGET/HGETALL always sees a single version, and a commit writes them
with one MULTI/EXEC guarded by WATCH on that hash.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from .. import metrics, tracing
from ..errors import SessionBusy, StoreConflict
from ..session import SessionHead, SessionMeta
from . import keys, quotas
from .faults import classify, first_refusal, raise_classified

Buffer = bytes | bytearray | memoryview

__all__ = ["SessionBusy", "StepTxn", "Store", "StoreConflict", "make_redis"]


def make_redis(url: str, timeout_s: float, max_connections: int = 512) -> Redis:
    """A pooled asyncio client; redis-py's Python packer sends large values without copying.

    The pool blocks (up to `timeout_s`) when all its connections are busy, rather than
    failing at once: a burst of parallel steps waits its turn instead of getting 503s.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry_on_timeout=False,
        decode_responses=False,
    )
    return Redis(connection_pool=pool)


def _head(values: Sequence[Any]) -> SessionHead:
    return SessionHead.from_values({f: (float(v) if v is not None else None)
                                    for f, v in zip(keys.HEAD_FIELDS, values, strict=True)})


def idempotency_record(version: int, digest: str | None = None) -> str:
    """What an idempotency key remembers of the step it made: the version it produced, and
    the digest of the request (a reuse with another request is refused, not replayed)."""
    record: dict[str, Any] = {"version": version}
    if digest is not None:
        record["digest"] = digest
    return json.dumps(record)


def now() -> float:
    return time.time()


class Store:
    def __init__(self, redis: Redis, *, idempotency_ttl_s: int, lock_timeout_s: float) -> None:
        self.redis = redis
        self.idempotency_ttl_s = idempotency_ttl_s
        self.lock_timeout_s = lock_timeout_s

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def check_writable(self) -> None:
        """Raise unless Redis takes a write now: one tiny SET with a TTL, which Redis refuses
        exactly when a session write would be refused (OOM, a read-only replica, a cluster
        slot moved or down, still loading), at the cost of one round trip."""
        try:
            await self.redis.set(keys.HEALTH, "1", px=10_000)
        except Exception as exc:
            raise_classified(exc)

    # ------------------------------------------------------------------ documents

    async def create(self, meta: SessionMeta, fields: Mapping[str, Buffer] | None) -> None:
        sid = meta.id
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.meta(sid), meta.to_json())
            head = {keys.UPDATED: repr(meta.created_at)}
            if fields is not None:
                head[keys.VERSION] = "0"
            pipe.hset(keys.tensors(sid), mapping={**head, **(fields or {})})
            await pipe.execute()
        # The tenant index lives in another slot; it is only an index, filtered on read.
        await self.redis.sadd(keys.tenant_sessions(meta.tenant or ""), sid)

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
        if not sids:
            return []
        raws = await self.redis.mget([keys.meta(s) for s in sids])
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
            deleted = await self.redis.eval(_DELETE, 4, keys.lock(sid), keys.meta(sid),
                                            keys.tensors(sid), keys.round_(sid))
            if deleted != -1:
                break
            if time.monotonic() > deadline:
                metrics.SESSION_BUSY.labels("lock").inc()
                raise SessionBusy(f"session {sid} stayed locked for {wait_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.002)
        await self.redis.srem(keys.tenant_sessions(tenant), sid)
        await quotas.release(self.redis.execute_command, tenant, sid)
        # Idempotency records expire by themselves; drop them now anyway.
        async for key in self.redis.scan_iter(match=keys.idempotency(sid, "*"), count=1000):
            await self.redis.delete(key)
        return bool(deleted)

    # ------------------------------------------------------------------ tensors

    async def load(self, sid: str, fields: list[str] | None = None
                   ) -> tuple[int | None, dict[str, bytes]]:
        """One consistent snapshot: the version and the asked fields (all tensors if None)."""
        key = keys.tensors(sid)
        if fields is None:
            raw = await self.redis.hgetall(key)
            out = {k.decode(): v for k, v in raw.items()}
            v = out.get(keys.VERSION)
            for f in (*keys.HEAD_FIELDS, keys.NONCE):
                out.pop(f, None)
            return (int(v) if v is not None else None), out
        values = await self.redis.hmget(key, [keys.VERSION, *fields])
        v = values[0]
        got = {f: b for f, b in zip(fields, values[1:], strict=True) if b is not None}
        return (int(v) if v is not None else None), got

    @asynccontextmanager
    async def step_txn(self, sid: str) -> AsyncIterator[StepTxn]:
        """The step's whole Redis conversation in two round trips, on one pooled connection.

        Round trip 1: take the session lock (SET NX PX with a random token), WATCH the tensor
        hash, read the document and the version. Round trip 2: MULTI, the writes, EXEC (aborted
        by Redis if anything touched the hash since the WATCH), and the lock's release. The
        version seen under the lock is re-checked by the WATCH at commit time.
        """
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        txn = StepTxn(self, sid, conn)
        try:
            await txn.begin()
            yield txn
        finally:
            await txn.abort()  # a no-op after a commit
            await pool.release(conn)

    async def get_idempotency(self, sid: str, key: str) -> dict[str, Any] | None:
        raw = await self.redis.get(keys.idempotency(sid, key))
        return json.loads(raw) if raw else None


_DELETE = """
if redis.call('exists', KEYS[1]) == 1 then return -1 end
return redis.call('del', KEYS[2], KEYS[3], KEYS[4])
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class StepTxn:
    """One locked, WATCHed read-compute-commit of a session (see `Store.step_txn`)."""

    def __init__(self, store: Store, sid: str, conn: AbstractConnection) -> None:
        self.store = store
        self.sid = sid
        self.conn = conn
        self.token = secrets.token_hex(16)
        self.meta: SessionMeta | None = None
        self.version: int | None = None
        self.nonce: str | None = None  # changes with every commit (see `commit`)
        self.done = False
        self.locked = False

    async def _batch(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send commands together, read every reply (errors returned, not raised)."""
        conn = self.conn
        op = str(commands[0][0]) if commands else "-"
        try:
            with tracing.redis_span(commands), \
                    metrics.timed(metrics.STORE_LATENCY.labels(op).observe):
                await conn.send_packed_command(conn.pack_commands(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect()
            raise

    async def begin(self) -> None:
        store, sid = self.store, self.sid
        ttl_ms = int(store.lock_timeout_s * 1000)
        deadline = time.monotonic() + store.lock_timeout_s
        delay = 0.0005
        started = time.perf_counter()
        while True:
            got, _, raw_meta, head = await self._batch([
                ("SET", keys.lock(sid), self.token, "NX", "PX", ttl_ms),
                ("WATCH", keys.tensors(sid)),
                ("GET", keys.meta(sid)),
                ("HMGET", keys.tensors(sid), keys.VERSION, keys.NONCE),
            ])
            for reply in (got, raw_meta, head):
                if isinstance(reply, Exception):  # e.g. OOM or READONLY: not "lock held"
                    await self._batch([("UNWATCH",)])
                    raise_classified(reply)
            if got:
                break
            await self._batch([("UNWATCH",)])
            if time.monotonic() > deadline:
                metrics.SESSION_BUSY.labels("lock").inc()
                raise SessionBusy(f"session {sid} stayed locked for {store.lock_timeout_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.002)  # lock holders are quick: poll often, briefly
        self.locked = True
        metrics.LOCK_WAIT.observe(time.perf_counter() - started)
        self.meta = SessionMeta.from_json(raw_meta) if raw_meta else None
        raw_v, raw_nonce = head
        self.version = int(raw_v) if raw_v is not None else None
        self.nonce = raw_nonce.decode() if raw_nonce is not None else None

    async def call(self, *command: Any) -> Any:
        """One command on this transaction's own connection (reads while WATCHing: no second
        pooled connection is held, so a full pool cannot deadlock steps)."""
        (reply,) = await self._batch([command])
        if isinstance(reply, Exception):
            raise_classified(reply)
        return reply

    async def commit(self, new: int, fields: Mapping[str, Buffer], *,
                     stats: Mapping[str, float | None] | None = None,
                     idempotency_key: str | None = None,
                     idempotency_digest: str | None = None,
                     count_step: bool = True,
                     delete_fields: Sequence[str] = (),
                     meta: SessionMeta | None = None,
                     extra: Sequence[Sequence[Any]] = ()) -> None:
        """Write the new version's tensors (and `extra` commands) atomically, then unlock."""
        sid = self.sid
        tkey = keys.tensors(sid)
        mapping: list[Any] = [keys.VERSION, str(new), keys.UPDATED, repr(now())]
        unknown = [name for name, value in (stats or {}).items() if value is None]
        for name, value in (stats or {}).items():
            if value is not None:
                mapping += [name, repr(float(value))]
        delete_fields = [*delete_fields, *unknown]
        for name, value in fields.items():
            mapping += [name, value]
        cmds: list[Sequence[Any]] = [("HSET", tkey, *mapping)]
        if delete_fields:
            cmds.append(("HDEL", tkey, *delete_fields))
        if meta is not None:
            cmds.append(("SET", keys.meta(sid), meta.to_json()))
        if count_step:
            cmds.append(("HINCRBY", tkey, keys.STEPS, 1))
        if idempotency_key is not None:
            cmds.append(self.remember(idempotency_key, new, idempotency_digest))
        cmds.extend(extra)
        await self.execute(cmds)

    def remember(self, idempotency_key: str, version: int,
                 digest: str | None = None) -> tuple[Any, ...]:
        """The command that records `idempotency_key` as having made `version`."""
        return ("SET", keys.idempotency(self.sid, idempotency_key),
                idempotency_record(version, digest), "EX", self.store.idempotency_ttl_s)

    async def execute(self, cmds: Sequence[Sequence[Any]]) -> list[Any]:
        """MULTI, the commands, EXEC (void if the WATCHed hash moved), and the lock's release.

        A transaction that writes anything a step reads (the session document or the tensor
        hash: hyperparameters, state, params) also writes a fresh commit nonce, which every
        process's tensor cache checks: a cached copy from before it can never be stepped
        again, even when the version number did not move (a PATCH).
        """
        sid = self.sid
        tkey, mkey = keys.tensors(sid), keys.meta(sid)
        if any(len(c) > 1 and c[1] in (tkey, mkey) for c in cmds):
            self.nonce = secrets.token_hex(8)
            cmds = [*cmds, ("HSET", tkey, keys.NONCE, self.nonce)]
        batch = [("MULTI",), *cmds, ("EXEC",),
                 ("EVAL", _RELEASE, 1, keys.lock(sid), self.token)]
        replies = await self._batch(batch)
        self.done = True
        self.locked = False
        exec_reply = replies[-2]
        if isinstance(exec_reply, Exception):  # EXECABORT: a queued command was refused
            cause = first_refusal(replies[1:-2])
            if cause is not None:
                raise cause from exec_reply
            raise classify(exec_reply) or exec_reply
        if exec_reply is None:
            metrics.SESSION_BUSY.labels("conflict").inc()
            raise StoreConflict(f"session {sid} changed during the step (its lock expired)")
        return list(exec_reply)

    async def abort(self) -> None:
        """Undo the WATCH and release the lock (best effort: the lock also expires)."""
        if self.done:
            return
        self.done = True
        try:
            cmds: list[Sequence[Any]] = [("UNWATCH",)]
            if self.locked:
                cmds.append(("EVAL", _RELEASE, 1, keys.lock(self.sid), self.token))
            await self._batch(cmds)
        except Exception:  # the connection is gone; the lock's TTL frees the session
            pass

    async def finish(self) -> None:
        """Release without writing (a replay or a rejected step)."""
        await self.abort()
