"""The step engine: from decoded gradients to a committed new version.

Under the session's lock: re-check the idempotency record and the version preconditions,
take the tensors from this process's cache (if still at the stored version) or from Redis,
apply the optimizer in place, refuse non-finite results, and commit tensors, version and
idempotency record in one transaction. Any failure drops the cache entry, so mutated
tensors never outlive a step that was not committed.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch

from optserve_client.wire import FLOAT_DTYPES, WireTensor

from . import optim
from .api.problems import Problem
from .settings import Settings
from .store import keys
from .store.redis_store import StepTxn, Store, StoreConflict
from .tensors import DTYPES, PARAM_DTYPES, from_bytes, to_bytes

log = logging.getLogger("optserve")


@dataclass
class Loaded:
    """One session's tensors at one version, as torch tensors on the compute device."""

    version: int
    params: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]
    nbytes: int = 0
    nonce: str | None = None  # the commit that wrote this version (see StepTxn.commit)


class TensorCache:
    """A per-process LRU of sessions' tensors, bounded in bytes, keyed by session id."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._items: OrderedDict[str, Loaded] = OrderedDict()
        self._bytes = 0
        self._mutex = threading.Lock()

    def put(self, sid: str, item: Loaded) -> None:
        with self._mutex:
            self._remove(sid)
            if item.nbytes > self.limit:
                return
            self._items[sid] = item
            self._bytes += item.nbytes
            while self._bytes > self.limit and self._items:
                oldest = next(iter(self._items))
                self._remove(oldest)

    def take(self, sid: str, version: int, nonce: str | None) -> Loaded | None:
        """Remove and return the entry: the caller owns those tensors until it puts them back."""
        with self._mutex:
            item = self._items.get(sid)
            if item is None:
                return None
            self._remove(sid)
            return item if (item.version, item.nonce) == (version, nonce) else None

    def drop(self, sid: str) -> None:
        with self._mutex:
            self._remove(sid)

    def _remove(self, sid: str) -> None:
        item = self._items.pop(sid, None)
        if item is not None:
            self._bytes -= item.nbytes


Body = list[bytes | memoryview]


@dataclass
class StepOutcome:
    version: int
    body: Body | None
    replayed: bool = False
    stats: dict[str, float | None] = field(default_factory=dict)
    # Called once the response is sent: gives the step's tensors back to the cache (the
    # body may point into them, so no other step may touch them before).
    after_send: Callable[[], None] | None = None


def _numel(t: WireTensor | torch.Tensor) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else t.numel


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_ACCUMULATOR = {"rmsprop": "square_avg", "adagrad": "sum"}


def _accumulators_finite(opt: optim.OptimizerDef, loaded: Loaded, names: list[str]) -> bool:
    """Whether square_avg / AdaGrad's sum stayed finite. An overflow there makes the update
    0, not inf, so the update norm cannot see it. They are >= 0, so a finite sum proves it:
    one read-only reduction (a sum that overflows sends the caller to the exact check)."""
    key = _ACCUMULATOR.get(opt.name)
    if key is None:
        return True
    for n in names:
        t = loaded.state.get(n, {}).get(key)
        if t is not None and t.numel() and not math.isfinite(float(t.sum())):
            return False
    return True


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    """The 2-norm over several tensors; float32 sums, float64 only when those overflow."""
    ts = [t for t in tensors if t.numel()]
    total = math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in ts))
    if math.isinf(total):
        total = math.sqrt(sum(
            float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in ts))
    return total


def check_tensors(
    declared: Mapping[str, Mapping[str, Any]],
    given: Mapping[str, WireTensor],
    *,
    what: str,
    require_all: bool,
    dtypes: tuple[str, ...],
) -> None:
    """422s for names, shapes and dtypes that do not fit the session, naming the tensor."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise Problem(422, "unknown_tensor", f"unknown {what} name(s) {unknown}; the session has "
                      f"{sorted(declared)}", tensors=unknown)
    if require_all:
        missing = sorted(set(declared) - set(given))
        if missing:
            raise Problem(422, "missing_tensor", f"missing {what}(s) {missing}", tensors=missing)
    for name, t in given.items():
        want = declared[name]
        if list(t.shape) != list(want["shape"]):
            raise Problem(422, "shape_mismatch", f"{what} {name!r} has shape {list(t.shape)}, "
                          f"the parameter has {list(want['shape'])}", tensor=name,
                          expected=list(want["shape"]), got=list(t.shape))
        if t.dtype not in dtypes:
            raise Problem(422, "dtype_mismatch", f"{what} {name!r} is {t.dtype}; accepted: "
                          f"{list(dtypes)}", tensor=name, got=t.dtype)


def check_param_body(declared: Mapping[str, Mapping[str, Any]] | None,
                     given: Mapping[str, WireTensor]) -> None:
    """Parameters: float32/float64, and once defined, the same names, shapes and dtypes."""
    for name, t in given.items():
        if t.dtype not in PARAM_DTYPES:
            raise Problem(422, "dtype_mismatch", f"parameter {name!r} is {t.dtype}; parameters "
                          f"are {list(PARAM_DTYPES)}", tensor=name, got=t.dtype)
        if not name or name.strip() != name:
            raise Problem(422, "invalid_name", f"parameter name {name!r} is empty or padded")
    if declared is None:
        if not given:
            raise Problem(422, "missing_tensor", "a session needs at least one parameter")
        return
    check_tensors(declared, given, what="parameter", require_all=True, dtypes=PARAM_DTYPES)
    for name, t in given.items():
        if t.dtype != declared[name]["dtype"]:
            raise Problem(422, "dtype_mismatch", f"parameter {name!r} is {t.dtype}, the session "
                          f"holds {declared[name]['dtype']}", tensor=name, got=t.dtype,
                          expected=declared[name]["dtype"])


def check_finite(given: Mapping[str, WireTensor], device: str, what: str) -> None:
    for name, w in given.items():
        t = from_bytes(w.data, w.dtype, w.shape, device, writable=False)
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise Problem(422, f"non_finite_{what}", f"{what} {name!r} has NaN or infinite "
                          "values", tensor=name)


def locked_session(txn: StepTxn) -> tuple[dict[str, Any], int | None]:
    """The session document and version as read under the lock (404 if deleted since)."""
    if txn.meta is None:
        raise Problem(404, "session_not_found", f"session {txn.sid} was deleted")
    return txn.meta, txn.version


def check_version(version: int | None, if_match: int | None) -> int:
    """A step's first checks, in the contract's order: If-Match (412), then parameters (409)."""
    if if_match is not None and if_match != version:
        raise Problem(412, "version_mismatch", f"If-Match names version {if_match}, the "
                      f"session is at {version}", current_version=version)
    if version is None:
        raise Problem(409, "no_params", "the session has no parameters yet; PUT them first",
                      current_version=None)
    return version


def check_finite_as_params(given: Mapping[str, WireTensor],
                           declared: Mapping[str, Mapping[str, Any]]) -> None:
    """Gradients must be finite in their parameter's dtype too (1e300 is not a float32)."""
    for name, w in given.items():
        t = from_bytes(w.data, w.dtype, w.shape, writable=False)
        target = DTYPES[declared[name]["dtype"]]
        if t.dtype != target:
            t = t.to(target)
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise Problem(422, "non_finite_gradient", f"gradient {name!r} has NaN or infinite "
                          f"values (as {declared[name]['dtype']})", tensor=name)


class Engine:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.device = settings.torch_device()
        self.kernel: optim.KernelName = settings.kernel
        self.cache = TensorCache(settings.cache_bytes)
        self._warmed: set[tuple[Any, ...]] = set()

    def warm(self, meta: Mapping[str, Any]) -> None:
        """Compile the session's kernel in the background, off the first step's path."""
        if self.kernel != "compiled":
            return
        from .optim import fused

        dtypes = {spec["dtype"] for spec in meta["tensors"].values()
                  if math.prod(spec["shape"]) >= fused.FUSED_MIN_NUMEL}
        if not dtypes:
            return
        opt = optim.get_optimizer(meta["optimizer"])
        hp = opt.hyperparams.model_validate(meta["hyperparams"])
        for dtype in dtypes:
            key = (opt.name, opt.fused_flags(hp), dtype)
            if key in self._warmed:
                continue
            self._warmed.add(key)
            threading.Thread(target=optim.warmup, args=(opt, hp, getattr(torch, dtype),
                                                        self.device),
                             name="optserve-warmup", daemon=True).start()

    # ------------------------------------------------------------------ loading

    def materialize(self, meta: Mapping[str, Any], version: int,
                    fields: Mapping[str, bytes]) -> Loaded:
        declared = meta["tensors"]
        params: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        nbytes = 0
        for fname, raw in fields.items():
            parsed = keys.parse_field(fname)
            if parsed is None:
                continue
            kind, name, key = parsed
            if name not in declared:
                continue
            spec = declared[name]
            if kind == "p":
                t = from_bytes(raw, spec["dtype"], tuple(spec["shape"]), self.device)
                params[name] = t
            else:
                assert key is not None
                if key == "step":
                    t = from_bytes(raw, "float32", (), self.device)
                else:
                    t = from_bytes(raw, spec["dtype"], tuple(spec["shape"]), self.device)
                state.setdefault(name, {})[key] = t
            nbytes += _nbytes(t)
        return Loaded(version, params, state, nbytes)

    async def load(self, meta: Mapping[str, Any], version: int, txn: StepTxn) -> Loaded:
        """The session's tensors at `version`: this process's cached copy if it is that very
        commit, else read on the transaction's connection (the WATCH guards the snapshot)."""
        sid = meta["id"]
        cached = self.cache.take(sid, version, txn.nonce)
        if cached is not None:
            return cached
        raw = await txn.call("HGETALL", keys.tensors(sid))
        fields = {k.decode(): v for k, v in raw.items()}
        stored = fields.get(keys.VERSION)
        if stored is None or int(stored) != version:
            raise StoreConflict(f"session {sid} moved from {version} to {stored}")
        loaded = await self._offload(self.materialize, meta, version, fields,
                                     numel=sum(len(v) for v in fields.values()) // 4)
        loaded.nonce = txn.nonce
        return loaded

    async def _offload(self, fn: Callable[..., Any], *args: Any, numel: int) -> Any:
        """Large tensor work runs in a worker thread so the event loop keeps serving."""
        if numel > self.settings.offload_numel:
            return await anyio.to_thread.run_sync(lambda: fn(*args))
        return fn(*args)

    # ------------------------------------------------------------------ step

    async def step(
        self,
        meta: dict[str, Any],
        grads: dict[str, WireTensor],
        *,
        idempotency_key: str | None,
        base_version: int | None,
        if_match: int | None,
        encode: Callable[[Mapping[str, Any]], Body] | None,
        bad_header: Problem | None = None,
    ) -> StepOutcome:
        sid = meta["id"]
        if idempotency_key is not None:
            replay = await self._replay(meta, idempotency_key, encode)
            if replay is not None:
                return replay
        # SessionBusy / StoreConflict become 503 session_busy in the app's handlers.
        async with self.store.step_txn(sid) as txn:
            meta, version = locked_session(txn)  # a PATCH may have changed meta since
            if idempotency_key is not None:
                # Another process may have finished this key while we waited for the lock.
                raw_record = await txn.call("GET", keys.idempotency(sid, idempotency_key))
                record = json.loads(raw_record) if raw_record else None
                if record is not None:
                    await txn.finish()
                    return await self._replay(meta, idempotency_key, encode) or StepOutcome(
                        int(record["version"]), None, replayed=True)
            version = self._preconditions(meta, version, base_version, if_match)
            if bad_header is not None:  # a 422, after the 412/409 checks
                raise bad_header
            check_tensors(meta["tensors"], grads, what="gradient", require_all=False,
                          dtypes=FLOAT_DTYPES)
            try:
                return await self._step_locked(txn, meta, version, grads, idempotency_key,
                                               encode)
            except BaseException:
                self.cache.drop(sid)
                raise

    def _preconditions(self, meta: Mapping[str, Any], version: int | None,
                       base_version: int | None, if_match: int | None) -> int:
        version = check_version(version, if_match)
        if base_version is not None:
            if base_version > version:
                raise Problem(409, "future_version", f"base version {base_version} is newer "
                              f"than the session's {version}", current_version=version)
            s = meta.get("max_staleness")
            if s is not None and base_version < version - s:
                raise Problem(409, "stale_gradient", f"gradient computed on version "
                              f"{base_version}, more than max_staleness={s} behind {version}",
                              current_version=version)
        return version

    async def _replay(self, meta: Mapping[str, Any], key: str,
                      encode: Callable[[Mapping[str, Any]], Body] | None) -> StepOutcome | None:
        record = await self.store.get_idempotency(meta["id"], key)
        if record is None:
            return None
        body = None
        if encode is not None:
            _, body = await self.encode_params(meta, encode)
        return StepOutcome(int(record["version"]), body, replayed=True)

    async def encode_params(self, meta: Mapping[str, Any],
                            encode: Callable[[Mapping[str, Any]], Body]
                            ) -> tuple[int | None, Body]:
        """The current parameters and their version, straight from Redis bytes to the wire."""
        declared = meta["tensors"]
        fields = [keys.param_field(n) for n in declared]
        version, raw = await self.store.load(meta["id"], fields)
        if version is None:
            raise Problem(409, "no_params", "the session has no parameters yet",
                          current_version=None)
        tensors = {
            n: WireTensor(declared[n]["dtype"], tuple(declared[n]["shape"]),
                          memoryview(raw[keys.param_field(n)]))
            for n in declared
        }
        body = await self._offload(encode, tensors, numel=sum(len(b) for b in raw.values()) // 4)
        return version, body

    async def _step_locked(self, txn: StepTxn, meta: dict[str, Any], version: int,
                           grads: Mapping[str, WireTensor | torch.Tensor],
                           idempotency_key: str | None,
                           encode: Callable[[Mapping[str, Any]], Body] | None,
                           *, extra_idempotency_keys: Iterable[str] = (),
                           extra: Callable[[Loaded], list[Any]] | None = None) -> StepOutcome:
        """Apply one step to the locked session and commit it (with `extra` commands)."""
        sid = meta["id"]
        opt = optim.get_optimizer(meta["optimizer"])
        hp = opt.hyperparams.model_validate(meta["hyperparams"])
        loaded = await self.load(meta, version, txn)
        numel = sum(_numel(w) for w in grads.values())
        touched, stats = await self._offload(self._apply, opt, hp, loaded, grads, numel=numel)
        fields: dict[str, memoryview] = {}
        for name in touched:
            fields[keys.param_field(name)] = to_bytes(loaded.params[name])
            for key, t in loaded.state.get(name, {}).items():
                fields[keys.state_field(name, key)] = to_bytes(t)
        new_version = version + 1
        record = {"status": 200, "version": new_version}
        more = [("SET", keys.idempotency(sid, k), json.dumps(record), "EX",
                 self.settings.idempotency_ttl_s) for k in extra_idempotency_keys]
        loaded.version = new_version
        loaded.nbytes = sum(_nbytes(t) for t in loaded.params.values()) + sum(
            _nbytes(t) for s in loaded.state.values() for t in s.values()
        )
        await txn.commit(
            new_version, fields, stats=stats,
            idempotency=(idempotency_key, record) if idempotency_key else None,
            extra=more + (extra(loaded) if extra is not None else []),
        )
        loaded.nonce = txn.nonce
        body = None
        if encode is not None:
            body = await self._offload(encode, loaded.params, numel=numel)
        # `loaded` was taken out of the cache for this step; it goes back after the send.
        return StepOutcome(new_version, body, stats=stats,
                           after_send=lambda: self.cache.put(sid, loaded))

    def _apply(self, opt: optim.OptimizerDef, hp: Any, loaded: Loaded,
               grads: Mapping[str, WireTensor | torch.Tensor]
               ) -> tuple[list[str], dict[str, float | None]]:
        tgrads = {
            n: w.to(self.device) if isinstance(w, torch.Tensor)
            else from_bytes(w.data, w.dtype, w.shape, self.device, writable=False)
            for n, w in grads.items()
        }
        touched = sorted(tgrads)
        with torch.no_grad():
            grad_norm = _norm(tgrads.values())
            update_sq = optim.step(opt, loaded.params, tgrads, loaded.state, hp,
                                   kernel=self.kernel, track_update=True)
            # The old parameters are finite, so a finite update norm proves the new ones are:
            # the norm (from the compiled kernel's own pass) serves as the check.
            update_norm: float | None = math.sqrt(sum(update_sq.values()))
            if not math.isfinite(update_norm) or not _accumulators_finite(opt, loaded, touched):
                self._refuse_non_finite(loaded, tgrads, touched)  # exact; this path is rare
                if not math.isfinite(update_norm):
                    update_norm = None  # a float32 sum overflowed; the tensors are finite
        stats = {keys.LAST_GRAD_NORM: grad_norm, keys.LAST_UPDATE_NORM: update_norm}
        # None (unknown) clears the stored value rather than leaving the last step's.
        return touched, {k: v if v is not None and math.isfinite(v) else None
                         for k, v in stats.items()}

    @staticmethod
    def _refuse_non_finite(loaded: Loaded, grads: Mapping[str, torch.Tensor],
                           touched: list[str]) -> None:
        """422 when the step made parameters or optimizer state NaN or infinite."""
        params_ok = optim.all_finite(loaded.params[n] for n in touched)
        state_ok = optim.all_finite(t for n in touched for t in loaded.state.get(n, {}).values())
        if params_ok and state_ok:
            return
        for n in touched:
            g = grads[n]
            if g.numel() and not bool(torch.isfinite(g).all()):
                raise Problem(422, "non_finite_gradient", f"gradient {n!r} has NaN or "
                              "infinite values; nothing was applied", tensor=n)
        what = "parameters" if not params_ok else "optimizer state (e.g. square_avg overflowed)"
        raise Problem(422, "non_finite_result", f"this step would make the {what} NaN or "
                      "infinite; nothing was applied", current_version=loaded.version)
