"""The step transaction: one locked, WATCHed read-compute-commit of a session, on one
connection to the primary that owns the session's slot (see `Store.step_txn`)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics, tracing
from ..deadline import deadline
from ..errors import SessionBusy, StoreConflict
from ..session import SessionMeta
from . import keys, resp, wal
from .faults import classify, first_refusal, raise_classified

if TYPE_CHECKING:
    from .redis_store import Store

Buffer = bytes | bytearray | memoryview


def idempotency_record(version: int, digest: str | None = None) -> str:
    """What an idempotency key remembers of the step it made: the version it produced, and
    the digest of the request (a reuse with another request is refused, not replayed)."""
    record: dict[str, Any] = {"version": version}
    if digest is not None:
        record["digest"] = digest
    return json.dumps(record)


def now() -> float:
    return time.time()


async def run_batch(conn: AbstractConnection, commands: Sequence[Sequence[Any]],
                    sent: int = 0) -> list[Any]:
    """Send commands together on one connection, read every reply (errors returned, not
    raised; first those of `sent` commands sent before); a connection that fails midway is
    dropped, never reused half-read.

    One deadline for the whole batch (the connection's socket timeout), not redis-py's own
    per write and per reply: its write timeout runs the write as a task of its own and its
    read timeout opens a scope per reply, 15-40 us a batch here. Past the deadline the
    connection is dropped and redis-py's TimeoutError raised, as redis-py would."""
    limit = conn.socket_timeout
    if limit:
        conn.socket_timeout = None
        try:
            async with deadline(limit):
                return await _run_batch(conn, commands, sent)
        except TimeoutError as exc:
            await conn.disconnect()
            raise RedisTimeoutError(f"Redis did not answer within {limit} s") from exc
        finally:
            conn.socket_timeout = limit
    return await _run_batch(conn, commands, sent)


async def _run_batch(conn: AbstractConnection, commands: Sequence[Sequence[Any]],
                     sent: int) -> list[Any]:
    try:
        if commands:
            await conn.send_packed_command(resp.pack(commands))
        replies: list[Any] = []
        for _ in range(sent + len(commands)):
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        await conn.disconnect()
        raise


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
        self.next_nonce: str | None = None  # the nonce the commit will write (`new_nonce`)
        self.log_steps = 0
        self.log_bytes = 0
        self.legacy: list[str] | None = None  # tensor fields still in the head hash
        self.done = False
        self.locked = False
        self.staged: list[Sequence[Any]] = []  # sent ahead of the commit (see `stage`)
        self.sending: asyncio.Future[None] | None = None

    async def _batch(self, commands: Sequence[Sequence[Any]], sent: int = 0) -> list[Any]:
        op = "MULTI" if sent else str(commands[0][0]) if commands else "-"
        with tracing.redis_span(commands), \
                metrics.timed(metrics.STORE_LATENCY.labels(op).observe):
            if self.sending is not None and sent:
                await self.sending  # its failure dropped the connection: raised here
            return await run_batch(self.conn, commands, sent)

    def stage(self, log: Sequence[Sequence[Any]]) -> None:
        """Start sending MULTI and the step's log record now, so a large gradient travels
        to Redis while the update runs; `commit(log=...)` with the same record then sends
        only the rest and EXEC, and `abort` a DISCARD. Nothing applies before EXEC."""
        self.staged = [("MULTI",), *log]
        self.sending = asyncio.ensure_future(
            self.conn.send_packed_command(resp.pack(self.staged)))

    async def begin(self) -> None:
        store, sid = self.store, self.sid
        ttl_ms = int(store.lock_timeout_s * 1000)
        deadline = time.monotonic() + store.lock_timeout_s
        delay = 0.0005
        started = time.perf_counter()
        while True:
            got, _, raw_meta, head, log_steps, log_bytes = await self._batch([
                ("SET", keys.lock(sid), self.token, "NX", "PX", ttl_ms),
                ("WATCH", keys.tensors(sid)),
                ("GET", keys.meta(sid)),
                ("HMGET", keys.tensors(sid), keys.VERSION, keys.NONCE),
                ("HLEN", keys.wal_index(sid)),
                ("HGET", keys.checkpoint(sid), keys.LOG_BYTES),
            ])
            for reply in (got, raw_meta, head, log_steps, log_bytes):
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
        # The log since the checkpoint (a background checkpoint may only shrink it).
        self.log_steps = int(log_steps)
        self.log_bytes = int(log_bytes or 0)

    async def call(self, *command: Any) -> Any:
        """One command on this transaction's own connection (reads while WATCHing: no second
        pooled connection is held, so a full pool cannot deadlock steps)."""
        (reply,) = await self._batch([command])
        if isinstance(reply, Exception):
            raise_classified(reply)
        return reply

    def new_nonce(self) -> str:
        """The nonce the coming commit writes (a logged step records it: see store/wal.py)."""
        self.next_nonce = secrets.token_hex(8)
        return self.next_nonce

    async def commit(self, new: int, checkpoint: Mapping[str, Buffer] | None = None, *,
                     log: Sequence[Sequence[Any]] = (),
                     stats: Mapping[str, float | None] | None = None,
                     idempotency_key: str | None = None,
                     idempotency_digest: str | None = None,
                     count_step: bool = True,
                     meta: SessionMeta | None = None,
                     extra: Sequence[Sequence[Any]] = ()) -> None:
        """Make version `new` atomically, then unlock: either `log` (a step's write-ahead
        record) or a `checkpoint` (every tensor's bytes: the log is cleared), with the
        version, the stats and `extra` commands."""
        sid = self.sid
        cmds: list[Sequence[Any]] = [*log]
        if checkpoint is not None:
            cmds += wal.full_checkpoint_cmds(sid, new, checkpoint)
            if self.legacy:  # the session was stored before the log: move it out
                cmds.append(("HDEL", keys.tensors(sid), *self.legacy))
        cmds += head_cmds(sid, new, stats, count_step=count_step)
        if meta is not None:
            cmds.append(("SET", keys.meta(sid), meta.to_json()))
        if idempotency_key is not None:
            cmds.append(self.remember(idempotency_key, new, idempotency_digest))
        cmds.extend(extra)
        replies = await self.execute(cmds)
        failed = first_refusal(replies)
        if failed is not None:  # e.g. XADD out of order: the history is not what we read
            raise StoreConflict(f"session {sid}: the commit was refused in part: {failed}")

    def remember(self, idempotency_key: str, version: int,
                 digest: str | None = None) -> tuple[Any, ...]:
        """The command that records `idempotency_key` as having made `version`."""
        return remember_cmd(self.store, self.sid, idempotency_key, version, digest)

    async def execute(self, cmds: Sequence[Sequence[Any]]) -> list[Any]:
        """MULTI, the commands, EXEC (void if the WATCHed hash moved), and the lock's release.

        A transaction that writes anything a step reads (the session document or the tensor
        hash: hyperparameters, state, params) also writes a fresh commit nonce, which every
        process's tensor cache checks: a cached copy from before it can never be stepped
        again, even when the version number did not move (a PATCH).
        """
        sid = self.sid
        if writes_session(sid, cmds):
            self.nonce = self.next_nonce or secrets.token_hex(8)
        cmds = finish_cmds(self.store, sid, cmds, self.nonce)
        wait = self.store._wait_cmds()
        batch = [("MULTI",), *cmds, ("EXEC",), *wait,
                 ("EVAL", _RELEASE, 1, keys.lock(sid), self.token)]
        sent = len(self.staged)  # a staged log is the same first commands, already sent
        if not all(a is b for a, b in zip(batch[1:sent], self.staged[1:], strict=False)):
            raise RuntimeError("a commit after `stage` must begin with the staged record")
        replies = await self._batch(batch[sent:], sent)
        self.done = True
        self.locked = False
        exec_reply = replies[len(cmds) + 1]
        if isinstance(exec_reply, Exception):  # EXECABORT: a queued command was refused
            cause = first_refusal(replies[1:len(cmds) + 1])
            if cause is not None:
                raise cause from exec_reply
            raise classify(exec_reply) or exec_reply
        if exec_reply is None:
            metrics.SESSION_BUSY.labels("conflict").inc()
            raise StoreConflict(f"session {sid} changed during the step (its lock expired)")
        if wait:
            self.store._check_acked(replies[len(cmds) + 2])
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
            if self.staged:  # a transaction is open on the connection: dropped
                cmds.insert(0, ("DISCARD",))
            await self._batch(cmds, len(self.staged))
        except Exception:  # the connection is gone; the lock's TTL frees the session
            pass

    async def finish(self) -> None:
        """Release without writing (a replay or a rejected step)."""
        await self.abort()


def head_cmds(sid: str, new: int, stats: Mapping[str, float | None] | None, *,
              count_step: bool = True) -> list[tuple[Any, ...]]:
    """The head hash's writes of a commit: version, time, the step's stats (None clears
    one: unknown, not the last step's), the step count."""
    tkey = keys.tensors(sid)
    mapping: list[Any] = [keys.VERSION, str(new), keys.UPDATED, repr(now())]
    unknown = [name for name, value in (stats or {}).items() if value is None]
    for name, value in (stats or {}).items():
        if value is not None:
            mapping += [name, repr(float(value))]
    cmds: list[tuple[Any, ...]] = [("HSET", tkey, *mapping)]
    if unknown:
        cmds.append(("HDEL", tkey, *unknown))
    if count_step:
        cmds.append(("HINCRBY", tkey, keys.STEPS, 1))
    return cmds


def remember_cmd(store: Store, sid: str, idempotency_key: str, version: int,
                 digest: str | None = None) -> tuple[Any, ...]:
    """The command that records `idempotency_key` as having made `version`."""
    return ("SET", keys.idempotency(sid, idempotency_key),
            idempotency_record(version, digest), "EX", store.idempotency_ttl_s)


def writes_session(sid: str, cmds: Sequence[Sequence[Any]]) -> bool:
    """Whether `cmds` write anything a step reads (then the commit needs a fresh nonce)."""
    written = (keys.tensors(sid), keys.meta(sid), keys.checkpoint(sid), keys.wal(sid))
    return any(len(c) > 1 and c[1] in written for c in cmds)


def finish_cmds(store: Store, sid: str, cmds: Sequence[Sequence[Any]],
                nonce: str | None) -> list[Sequence[Any]]:
    """A commit's writes as sent: the commit nonce (when they write the session: see
    `StepTxn.execute`), the idempotency records' index, rounds announced in the session's
    slot on a cluster (round_notifier.py)."""
    out: list[Sequence[Any]] = list(cmds)
    if writes_session(sid, cmds):
        out.append(("HSET", keys.tensors(sid), keys.NONCE, nonce))
    prefix = keys.idempotency(sid, "")
    records = [c[1] for c in cmds if c[0] == "SET" and str(c[1]).startswith(prefix)]
    if records:  # Store.delete finds them here
        iset = keys.idempotency_set(sid)
        out += [("SADD", iset, *records), ("EXPIRE", iset, store.idempotency_ttl_s)]
    if store.cluster:
        out = [("SPUBLISH", keys.round_channel(sid), *c[2:])
               if c[0] == "PUBLISH" and c[1] == keys.ROUNDS_CHANNEL else c for c in out]
    return out
