"""The step engine: from decoded gradients to a committed new version.

Under the session's lock: re-check the idempotency record and the version preconditions,
take the tensors from this process's cache (if still at the stored version) or from Redis,
apply the optimizer in place, refuse non-finite results, and commit tensors, version and
idempotency record in one transaction. Any failure drops the cache entry, so mutated
tensors never outlive a step that was not committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import torch

from optserve_client.spec import STEP_KEY
from optserve_client.wire import FLOAT_DTYPES, WireTensor

from . import hot_step, metrics, optim, tracing, update
from .cache import Loaded, TensorCache, nbytes
from .checkpoint import Checkpoints, all_fields
from .checks import (
    check_same_request,
    check_staleness,
    check_tensors,
    check_version,
    locked_session,
    step_hyperparams,
)
from .errors import DomainError
from .optim import native
from .session import SessionMeta
from .settings import Settings
from .store import keys, wal
from .store.redis_store import StepTxn, Store
from .tensors import from_bytes

log = logging.getLogger("optserve")

# Gradients of at least this many bytes start towards Redis before the update runs.
STAGE_BYTES = 1 << 20

Body = list[bytes | memoryview]
Encoder = Callable[[Mapping[str, Any]], Body]


@dataclass
class StepOutcome:
    version: int
    body: Body | None
    replayed: bool = False
    stats: dict[str, float | None] = field(default_factory=dict)
    # Called once the response is handed to the server: gives the step's tensors back to
    # the cache, with an event set once the server holds none of the body's bytes (the body
    # may point into them: no step changes them before, `Loaded.settled`).
    after_send: Callable[..., None] | None = None


class Engine:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.device = settings.torch_device()
        self.device_type = torch.device(self.device).type  # what a logged step records
        self.kernel: optim.KernelName = settings.kernel
        if self.kernel == "compiled":  # learn now, in the background, whether compiling works
            from .optim import fused

            threading.Thread(target=fused.probe, args=(self.device,), name="optserve-probe",
                             daemon=True).start()
        if self.kernel == "exact" and self.device == "cpu":  # build the C++ kernel now
            native.start()
        self.cache = TensorCache(settings.cache_bytes)
        self.checkpoints = Checkpoints(self)
        self._warmed: set[tuple[Any, ...]] = set()

    def warm(self, meta: SessionMeta) -> None:
        """Compile the session's kernel in the background, off the first step's path."""
        if self.kernel != "compiled":
            return
        from .optim import fused

        dtypes = {spec.dtype for spec in meta.tensors.values()
                  if spec.numel >= fused.FUSED_MIN_NUMEL}
        if not dtypes:
            return
        opt = optim.get_optimizer(meta.optimizer)
        hp = opt.hyperparams.model_validate(meta.hyperparams)
        for dtype in dtypes:
            key = (opt.name, opt.fused_flags(hp), dtype)
            if key in self._warmed:
                continue
            self._warmed.add(key)
            threading.Thread(target=optim.warmup, args=(opt, hp, getattr(torch, dtype),
                                                        self.device),
                             name="optserve-warmup", daemon=True).start()

    # ------------------------------------------------------------------ loading

    def materialize(self, meta: SessionMeta, version: int,
                    fields: Mapping[str, bytes]) -> Loaded:
        """Torch tensors over the tensor hash's fields (those of declared tensors only)."""
        declared = meta.tensors
        params: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        total = 0
        for fname, raw in fields.items():
            parsed = keys.parse_field(fname)
            if parsed is None:
                continue
            kind, name, key = parsed
            if name not in declared:
                continue
            spec = declared[name]
            if kind == "p":
                t = from_bytes(raw, spec.dtype, spec.shape, self.device)
                params[name] = t
            else:
                assert key is not None
                if key == STEP_KEY:
                    t = from_bytes(raw, "float32", (), self.device)
                else:
                    t = from_bytes(raw, spec.dtype, spec.shape, self.device)
                state.setdefault(name, {})[key] = t
            total += nbytes(t)
        return Loaded(version, params, state, total)

    async def load(self, meta: SessionMeta, version: int, txn: StepTxn) -> Loaded:
        """The session's tensors at `version`: this process's cached copy if it is that very
        commit, else rebuilt from the checkpoint and the log on the transaction's
        connection (under the lock and the WATCH)."""
        sid = meta.id
        await self.checkpoints.wait_copy(sid)
        cached = self.cache.take(sid, version, txn.nonce)
        if cached is not None and await cached.settled():
            return cached
        loaded = await self.checkpoints.load_locked(meta, version, txn)
        loaded.nonce = txn.nonce
        return loaded

    def should_offload(self, count: int, nbytes: int | Callable[[], int]) -> bool:
        """Whether tensor work is big enough for a worker thread: by bytes (the math), or by
        tensor count (per-tensor Python: 20,000 one-element tensors are 6 s of it)."""
        s = self.settings
        if count > s.offload_tensors:
            return True
        return (nbytes() if callable(nbytes) else nbytes) > s.offload_bytes

    async def offload(self, fn: Callable[..., Any], *args: Any, count: int,
                      nbytes: int | Callable[[], int]) -> Any:
        """`fn(*args)`, in a worker thread when `should_offload`, so the event loop keeps
        serving other tenants; small work stays on the loop (a thread hop costs more)."""
        if self.should_offload(count, nbytes):
            return await anyio.to_thread.run_sync(lambda: fn(*args))
        return fn(*args)

    # ------------------------------------------------------------------ step

    async def step(
        self,
        meta: SessionMeta,
        grads: dict[str, WireTensor],
        *,
        idempotency_key: str | None,
        base_version: int | None,
        if_match: int | None,
        encode: Encoder | None,
        bad_header: DomainError | None = None,
        hyperparams: Mapping[str, Any] | None = None,
        request_digest: str | None = None,
    ) -> StepOutcome:
        """One async-mode step: replay, or the checks then the step, under the lock.

        ``hyperparams`` (the body's) are merged, checked as PATCH checks them, and committed
        with the step's tensors; a replay does not apply them again."""
        sid = meta.id
        if bad_header is None and not hyperparams:
            hot = await hot_step.try_step(self, meta, grads, idempotency_key=idempotency_key,
                                          base_version=base_version, if_match=if_match,
                                          encode=encode, request_digest=request_digest)
            if hot is not None:
                return hot
        if idempotency_key is not None:
            replay = await self.replay(meta, idempotency_key, encode, request_digest)
            if replay is not None:
                return replay
        # SessionBusy / StoreConflict are refusals (session_busy) like any other.
        async with self.store.step_txn(sid) as txn:
            meta, version = locked_session(txn)  # a PATCH may have changed meta since
            if idempotency_key is not None:
                # Another process may have finished this key while we waited for the lock.
                raw_record = await txn.call("GET", keys.idempotency(sid, idempotency_key))
                record = json.loads(raw_record) if raw_record else None
                if record is not None:
                    await txn.finish()
                    check_same_request(record.get("digest"), request_digest)
                    return await self.replay(meta, idempotency_key, encode) or StepOutcome(
                        int(record["version"]), None, replayed=True)
            version = check_version(version, if_match)
            check_staleness(meta, version, base_version)
            if bad_header is not None:  # an invalid header, after the version checks
                raise bad_header
            await self.offload(partial(check_tensors, meta.tensors, grads, what="gradient",
                                       require_all=False, dtypes=FLOAT_DTYPES),
                               count=len(grads), nbytes=0)
            hp = await step_hyperparams(txn, meta, hyperparams) if hyperparams else None
            try:
                return await self.step_locked(txn, meta, version, grads, idempotency_key,
                                              encode, hyperparams=hp,
                                              idempotency_digest=request_digest)
            except BaseException:
                self.cache.drop(sid)
                raise

    async def replay(self, meta: SessionMeta, key: str, encode: Encoder | None,
                     digest: str | None = None) -> StepOutcome | None:
        """The step this idempotency key already made (with today's parameters), if any;
        a key first sent with another request (`digest`) is refused."""
        record = await self.store.get_idempotency(meta.id, key)
        if record is None:
            return None
        check_same_request(record.get("digest"), digest)
        body = None
        if encode is not None:  # today's declared tensors (`meta` may be a cached copy)
            fresh = await self.store.get_meta(meta.id)
            if fresh is None:
                raise DomainError("session_not_found", f"no session {meta.id!r}")
            _, body = await self.encode_params(fresh, encode)
        return StepOutcome(int(record["version"]), body, replayed=True)

    async def encode_params(self, meta: SessionMeta, encode: Encoder) -> tuple[int | None, Body]:
        """The current parameters and their version, straight from Redis bytes to the wire."""
        declared = meta.tensors
        version, raw = await self.checkpoints.read(meta)
        if version is None:
            raise DomainError("no_params", "the session has no parameters yet",
                              current_version=None)
        tensors = {
            n: WireTensor(declared[n].dtype, declared[n].shape,
                          memoryview(raw[keys.param_field(n)]))
            for n in declared
        }
        body = await self.offload(encode, tensors, count=len(tensors),
                                  nbytes=lambda: sum(map(len, raw.values())))
        return version, body

    async def step_locked(self, txn: StepTxn, meta: SessionMeta, version: int,
                          grads: Mapping[str, WireTensor | torch.Tensor],
                          idempotency_key: str | None, encode: Encoder | None,
                          *, idempotency_digest: str | None = None,
                          extra_idempotency_keys: Iterable[tuple[str, str | None]] = (),
                          extra: Callable[[Loaded], list[Any]] | None = None,
                          hyperparams: Mapping[str, Any] | None = None) -> StepOutcome:
        """Apply one step to the locked session and commit it (with `extra` commands).

        New ``hyperparams`` (validated) apply to this step and are committed with it, in the
        same transaction as its tensors and version."""
        sid = meta.id
        started = time.perf_counter()
        new_meta = None
        if hyperparams is not None and dict(hyperparams) != dict(meta.hyperparams):
            new_meta = meta.replace(hyperparams=dict(hyperparams))
        opt = optim.get_optimizer(meta.optimizer)
        hp = opt.hyperparams.model_validate((new_meta or meta).hyperparams)
        loaded = await self.load(meta, version, txn)
        stale = update.momentum_switched_on(meta, new_meta, loaded)
        new_version = version + 1
        log_cmds, logged = wal.log_cmds(
            sid, new_version, txn.new_nonce(), grads, (new_meta or meta).hyperparams,
            fresh_momentum=bool(stale), device_type=self.device_type,
            kernel=self.kernel)
        steps, nbytes_ = txn.log_steps + 1, txn.log_bytes + logged
        # A session stored before the log (`txn.legacy`) gets its first checkpoint now.
        sync_checkpoint = txn.legacy is not None or self.checkpoints.overdue(steps, nbytes_)
        if not sync_checkpoint and extra is None and logged >= STAGE_BYTES:
            txn.stage(log_cmds)  # the gradient goes to Redis while the update runs
        stats = await self.update(opt, hp, loaded, grads, logged)
        loaded.count_bytes()
        more = [txn.remember(k, new_version, d) for k, d in extra_idempotency_keys]
        loaded.version = new_version
        await txn.commit(
            new_version, all_fields(loaded) if sync_checkpoint else None,
            log=() if sync_checkpoint else log_cmds, stats=stats,
            idempotency_key=idempotency_key, idempotency_digest=idempotency_digest,
            meta=new_meta, extra=more + (extra(loaded) if extra is not None else []),
        )
        if sync_checkpoint:
            metrics.CHECKPOINTS.labels("sync").inc()
            metrics.CHECKPOINT_BYTES.inc(loaded.nbytes)
        else:
            metrics.LOGGED_BYTES.inc(logged)
        loaded.nonce, loaded.meta = txn.nonce, new_meta or meta
        loaded.log_steps, loaded.log_bytes = (0, 0) if sync_checkpoint else (steps, nbytes_)
        if new_meta is not None:
            self.warm(new_meta)
        body = None
        if encode is not None:
            body = await self.offload(encode, loaded.wire_params(), count=len(loaded.params),
                                      nbytes=lambda: sum(map(nbytes, loaded.params.values())))
        metrics.child(metrics.STEP_SECONDS, "sync" if meta.is_sync else "async").observe(
            time.perf_counter() - started)
        return StepOutcome(new_version, body, stats=stats,
                           after_send=self.give_back(sid, loaded))

    async def update(self, opt: optim.OptimizerDef, hp: Any, loaded: Loaded,
                     grads: Mapping[str, WireTensor | torch.Tensor], nbytes: int
                     ) -> dict[str, float | None]:
        """`update.apply` in place on `loaded` (offloaded by size), traced and timed; the
        step's stats."""
        numel = sum(map(update.numel, grads.values()))
        with tracing.span("optimizer.update", **{"optserve.optimizer": opt.name,
                                                 "optserve.numel": numel}), \
                metrics.timed(metrics.child(metrics.UPDATE_SECONDS, opt.name).observe):
            _, stats = await self.offload(
                partial(update.apply, device=self.device, kernel=self.kernel),
                opt, hp, loaded, grads, count=len(grads), nbytes=nbytes)
        return stats

    def give_back(self, sid: str, loaded: Loaded) -> Callable[..., None]:
        """What runs once a step's response is sent: its tensors (taken out of the cache
        for the step) go back, or to a background checkpoint when the log is long enough.
        ``sending``: set once the transport holds none of the response's bytes; the next
        step waits for it before changing the tensors (`Loaded.settled`)."""
        assert loaded.log_steps is not None
        background = self.checkpoints.due(loaded.log_steps, loaded.log_bytes)

        def after_send(sending: asyncio.Event | None = None) -> None:
            loaded.sending = sending
            if not (background and self.checkpoints.start(sid, loaded)):
                self.cache.put(sid, loaded)

        return after_send
