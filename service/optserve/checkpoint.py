"""Checkpoints and replay: a session's tensors from its last checkpoint and its logged steps.

An acknowledged step commits only its write-ahead record (store/wal.py). The full tensors
are written later, off the acknowledgement path: once the log holds `checkpoint_steps`
steps or `checkpoint_bytes` bytes, the process that made the step copies its tensors and
writes them in the background; a log that reaches twice either bound before a background
checkpoint lands makes the step that would pass it write a checkpoint itself (its commit is
then the full tensors, as before the log). A process without the session hot (or with an
older version) rebuilds it by replaying the log onto the checkpoint with `update.apply`,
the very code the live step ran, on gradients decoded the way the live step decoded them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import metrics, optim, update
from .cache import Loaded
from .errors import StoreConflict
from .session import SessionMeta
from .store import keys, wal
from .tensors import to_bytes

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("optserve")


def all_fields(loaded: Loaded, *, state_only: bool = False) -> dict[str, memoryview]:
    """Every tensor of `loaded` as the checkpoint's fields (bytes without a copy)."""
    fields: dict[str, memoryview] = {}
    if not state_only:
        for name, t in loaded.params.items():
            fields[keys.param_field(name)] = to_bytes(t)
    for name, st in loaded.state.items():
        for key, t in st.items():
            fields[keys.state_field(name, key)] = to_bytes(t)
    return fields


class Checkpoints:
    """Replay for one engine, and its background checkpoints."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps = engine.settings.checkpoint_steps
        self.bytes = engine.settings.checkpoint_bytes
        self.copying: dict[str, asyncio.Event] = {}  # sid -> set once its tensors are back
        self.writing: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ bounds

    def due(self, log_steps: int, log_bytes: int) -> bool:
        """Whether a log this long should be checkpointed (in the background)."""
        return log_steps >= self.steps or log_bytes >= self.bytes

    def overdue(self, log_steps: int, log_bytes: int) -> bool:
        """Whether a log this long must not grow: the step checkpoints synchronously."""
        return log_steps >= 2 * self.steps or log_bytes >= 2 * self.bytes

    # ------------------------------------------------------------------ replay

    def rebuild(self, meta: SessionMeta, version: int, ck_version: int | None,
                fields: Mapping[str, bytes], records: list[wal.Record]) -> Loaded:
        """The tensors at `version`: the checkpoint, then each logged step after it."""
        todo = wal.replay_plan(meta.id, version, ck_version, records)
        assert ck_version is not None
        engine = self.engine
        loaded = engine.materialize(meta, ck_version, fields)
        opt = optim.get_optimizer(meta.optimizer)
        replayed = 0
        for record in todo:
            if (record.device_type, record.kernel) != (engine.device_type, engine.kernel):
                raise StoreConflict(
                    f"session {meta.id}: its log was written on {record.device_type} with "
                    f"the {record.kernel} kernel, this process computes on "
                    f"{engine.device_type} with the {engine.kernel} kernel (replay would not "
                    "be bitwise equal); serve it from a process like the one that logged it, "
                    "or after a checkpoint")
            if record.fresh_momentum:  # as `update.momentum_switched_on` did live
                for st in loaded.state.values():
                    st.pop("momentum_buffer", None)
            hp = opt.hyperparams.model_validate(record.hyperparams)
            update.apply(opt, hp, loaded, record.grads, device=engine.device,
                         kernel=engine.kernel)
            loaded.version = record.version
            replayed += sum(g.data.nbytes for g in record.grads.values())
        loaded.version = version
        loaded.count_bytes()
        if todo:
            metrics.REPLAYS.inc(len(todo))
            metrics.REPLAY_BYTES.inc(replayed)
        return loaded

    async def load_locked(self, meta: SessionMeta, version: int, txn: Any) -> Loaded:
        """Rebuild on the step transaction's connection (the lock is held: no step can be
        logged meanwhile; a background checkpoint may land, which the read order covers)."""
        for attempt in range(3):
            entries, raw_ck = await txn._batch(wal.read_cmds(meta.id))
            for reply in (entries, raw_ck):
                if isinstance(reply, Exception):
                    raise reply
            records = wal.parse_entries(entries)
            ck_version, fields = wal.split_checkpoint(raw_ck)
            if ck_version is None and not records:  # stored before the log: upgrade it
                fields = wal.tensor_fields(await txn.call("HGETALL", keys.tensors(meta.id)))
                if fields:
                    ck_version, txn.legacy = version, list(fields)
            try:
                return await self.engine.offload(
                    self.rebuild, meta, version, ck_version, fields, records,
                    count=len(fields) + len(records), nbytes=sum(map(len, fields.values())))
            except wal.LogGap as exc:
                if attempt == 2:
                    raise StoreConflict(str(exc)) from exc
        raise AssertionError("unreachable")

    async def read(self, meta: SessionMeta) -> tuple[int | None, dict[str, Any]]:
        """The current version and every tensor's bytes, for readers without the lock (GET
        params, export, stats): one consistent snapshot, replayed if the log is not empty."""
        for attempt in range(5):
            snap = await self.engine.store.snapshot(meta.id)
            if snap.version is None or snap.ck_version == snap.version:
                return snap.version, snap.fields
            if snap.ck_version is None and not snap.log:  # stored before the log
                raw = await self.engine.store.redis.hgetall(keys.tensors(meta.id))
                return snap.version, wal.tensor_fields(raw)
            try:
                loaded = await self.engine.offload(
                    self.rebuild, meta, snap.version, snap.ck_version, snap.fields, snap.log,
                    count=len(snap.fields) + len(snap.log),
                    nbytes=sum(map(len, snap.fields.values())))
            except wal.LogGap as exc:  # a PUT or a checkpoint landed between the reads
                if attempt == 4:
                    raise StoreConflict(str(exc)) from exc
                continue
            return snap.version, all_fields(loaded)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ background

    async def wait_copy(self, sid: str) -> None:
        """Wait while a background checkpoint copies the session's tensors (it owns them)."""
        event = self.copying.get(sid)
        if event is not None:
            await event.wait()

    def start(self, sid: str, loaded: Loaded) -> bool:
        """Begin a background checkpoint of `loaded` (owned by the caller, given over);
        False when one is under way for the session already (the caller keeps `loaded`)."""
        if sid in self.writing or loaded.nonce is None:
            return False
        self.writing.add(sid)
        self.copying[sid] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(sid, loaded))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _run(self, sid: str, loaded: Loaded) -> None:
        engine = self.engine
        version, nonce = loaded.version, loaded.nonce
        assert nonce is not None
        try:
            try:
                copy = await engine.offload(_clone, loaded, count=len(loaded.params),
                                            nbytes=loaded.nbytes)
            finally:  # the tensors go back to the cache, for the next step
                engine.cache.put(sid, loaded)
                self.copying.pop(sid).set()
            fields = all_fields(copy)
            cmds = wal.promote_cmds(sid, version, nonce, secrets.token_hex(8), fields,
                                    ttl_s=max(60, int(engine.store.lock_timeout_s * 4)))
            replies = await engine.store._on_slot(keys.tensors(sid), cmds)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            landed = bool(replies[-1])
            metrics.CHECKPOINTS.labels("background" if landed else "superseded").inc()
            if landed:
                metrics.CHECKPOINT_BYTES.inc(sum(v.nbytes for v in fields.values()))
        except Exception:  # the log stays; a later step checkpoints (or the bound does)
            log.warning("background checkpoint of %s failed", sid, exc_info=True)
            metrics.CHECKPOINTS.labels("failed").inc()
        finally:
            self.writing.discard(sid)


def _clone(loaded: Loaded) -> Loaded:
    with torch.no_grad():
        return Loaded(loaded.version,
                      {n: t.clone() for n, t in loaded.params.items()},
                      {n: {k: t.clone() for k, t in st.items()}
                       for n, st in loaded.state.items()})
