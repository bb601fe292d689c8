"""Session operations below the HTTP layer: create, change, replace, import, read, delete.

Each takes what a route parsed and does the whole job: the checks (as domain errors), the
locked transaction, the cache and the fused-kernel warm-up. The routes only translate.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from optserve_client import wire
from optserve_client.spec import PRESETS

from . import optim, state_io
from .checkpoint import all_fields
from .checks import (
    IfMatch,
    check_finite,
    check_param_body,
    check_same_request,
    check_tensor_count,
    locked_session,
    require_if_match,
    validate_hyperparams,
)
from .engine import Engine
from .errors import DomainError, QuotaExceeded
from .session import SessionHead, SessionMeta, describe
from .store import keys, quotas, wal
from .store import rounds as stored
from .store.redis_store import StepTxn, now
from .sync_settings import sync_settings


@dataclass(frozen=True)
class View:
    """A session and the small numbers of its tensor hash, as a response shows them."""

    meta: SessionMeta
    head: SessionHead
    replayed: bool = False


class Sessions:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self.settings = engine.settings
        self.limits = quotas.Limits(self.settings.tenant_max_sessions,
                                    self.settings.tenant_max_bytes)

    async def view(self, meta: SessionMeta) -> View:
        return View(meta, await self.store.head(meta.id))

    async def listing(self, tenant: str) -> list[View]:
        metas = await self.store.get_metas(await self.store.list_ids(tenant))
        live = [m for m in metas if m is not None and m.tenant == tenant]
        heads = await self.store.heads([m.id for m in live])
        return [View(m, h) for m, h in zip(live, heads, strict=True)]

    async def create(self, tenant: str, *, optimizer: str | None, preset: str | None,
                     hyperparams: Mapping[str, Any], params: dict[str, wire.WireTensor] | None,
                     mode: str, max_staleness: int | None, sync: Mapping[str, Any] | None,
                     name: str | None, idempotency_key: str | None,
                     request_digest: str | None = None) -> View:
        """A new session; a retried create (same key) gets the session the first try made."""
        hyper = dict(hyperparams)
        if preset is not None:
            if preset not in PRESETS:
                raise DomainError("invalid_hyperparams", f"unknown preset {preset!r}; "
                                  f"known: {sorted(PRESETS)}")
            preset_opt, preset_hp = PRESETS[preset]
            if optimizer not in (None, preset_opt):
                raise DomainError("invalid_hyperparams", f"preset {preset!r} is for "
                                  f"{preset_opt}, not {optimizer}")
            optimizer, hyper = preset_opt, {**preset_hp, **hyper}
        optimizer = optimizer or "rmsprop"
        hp = validate_hyperparams(optimizer, hyper)
        if mode == "sync" and sync is None:
            raise DomainError("invalid_request", "sync mode needs `sync.contributions` or "
                              "`sync.target_weight`")
        sync_spec = sync_settings(sync) if sync is not None else None
        fields = None
        if params is not None:
            await self._check_params(None, params)
            fields = {keys.param_field(n): t.data for n, t in params.items()}
        meta = SessionMeta(
            id=secrets.token_urlsafe(18), tenant=tenant, name=name, optimizer=optimizer,
            hyperparams=hp, mode=mode, max_staleness=max_staleness, sync=sync_spec,
            tensors=describe(params) if params is not None else {}, created_at=now())
        if idempotency_key is not None and (replay := await self._replay(
                tenant, idempotency_key, request_digest)) is not None:
            return replay
        run = self.store.redis.execute_command
        try:
            await quotas.charge(run, tenant, meta.id, quotas.stored_bytes(params or {}),
                                self.limits, new=True)
        except QuotaExceeded:  # a retry of a create that took the last slot: its session
            if idempotency_key is not None and (replay := await self._replay(
                    tenant, idempotency_key, request_digest)) is not None:
                return replay
            raise
        try:
            await self.store.create(meta, fields)
        except BaseException:
            await quotas.release(run, tenant, meta.id)
            raise
        if idempotency_key is not None:
            first, first_digest = await self.store.claim_create(
                tenant, idempotency_key, meta.id, self.settings.idempotency_ttl_s,
                request_digest)
            if first != meta.id:  # a retry: drop this one, answer with the first
                await self.store.delete(meta.id, tenant)
                replay = await self._replay(tenant, idempotency_key, request_digest,
                                            (first, first_digest))
                if replay is not None:
                    return replay
                raise DomainError("idempotency_key_reused", "this Idempotency-Key created a "
                                  "session that has since been deleted; use a new key",
                                  current_version=None)
        self.engine.warm(meta)
        return View(meta, SessionHead(0 if fields is not None else None, None, 0, None, None))

    async def _replay(self, tenant: str, key: str, request_digest: str | None,
                      recorded: tuple[str, str | None] | None = None) -> View | None:
        """The session an earlier create with this key made (`recorded`: its id and request
        digest, else as stored); the same key with another request is refused."""
        if recorded is None:
            raw = await self.store.redis.get(keys.create_idempotency(tenant, key))
            if raw is None:
                return None
            sid, _, digest = raw.decode().partition(" ")
            recorded = (sid, digest or None)
        first, first_digest = recorded
        check_same_request(first_digest, request_digest)
        existing = await self.store.get_meta(first)
        if existing is not None and existing.tenant == tenant:
            return View(existing, await self.store.head(first), replayed=True)
        return None

    @asynccontextmanager
    async def _charging(self, txn: StepTxn, meta: SessionMeta, params: Mapping[str, Any]
                        ) -> AsyncIterator[None]:
        """Charge the session for `params` (the quota checked) before the commit inside;
        undo the charge when the commit fails (nothing was written then). The charge runs
        on the transaction's own connection: no second pooled one is held."""
        tenant = meta.tenant or ""
        previous = await quotas.charge(txn.call, tenant, meta.id, quotas.stored_bytes(params),
                                       self.limits, new=False)
        try:
            yield
        except BaseException:
            await quotas.restore(self.store.redis.execute_command, tenant, meta.id, previous)
            raise
    async def _check_params(self, declared: Mapping[str, Any] | None,
                            params: Mapping[str, wire.WireTensor]) -> None:
        """New parameters' count (when they define the session), dtypes, names and values."""
        if declared is None:
            check_tensor_count(params, self.settings.max_tensors_per_session)

        def check() -> None:
            check_param_body(declared, params)
            check_finite(params, "cpu", "parameter")

        await self.engine.offload(check, count=len(params), nbytes=_wire_bytes(params))

    async def patch(self, meta: SessionMeta, *, optimizer: str | None,
                    hyperparams: Mapping[str, Any] | None, changes: Mapping[str, Any],
                    sync: Mapping[str, Any] | None = None) -> View:
        """New hyperparameters (merged), optimizer, name, max_staleness or sync settings.

        The optimizer and ``centered`` are fixed once a step was applied; momentum switched
        on later starts from a fresh buffer, not one left from an earlier stretch with it.
        Sync settings apply from the next round: an open round keeps the ones it opened with.
        """
        sid = meta.id
        async with self.store.step_txn(sid) as txn:
            old, _ = locked_session(txn)
            steps = await txn.call("HGET", keys.tensors(sid), keys.STEPS)
            stepped = bool(steps and int(steps))
            optimizer = optimizer or old.optimizer
            if optimizer != old.optimizer:
                if stepped:
                    raise DomainError("immutable_hyperparam", "`optimizer` cannot change once "
                                      "a step has been applied", field="optimizer")
                merged = dict(hyperparams or {})
            else:
                merged = {**old.hyperparams, **(hyperparams or {})}
            hp = validate_hyperparams(optimizer, merged)
            if stepped and hp.get("centered", False) != old.hyperparams.get("centered", False):
                raise DomainError("immutable_hyperparam", "`centered` cannot change once a "
                                  "step has been applied", field="centered")
            if sync is not None:
                if not old.is_sync or old.sync is None:
                    raise DomainError("invalid_request", "`sync` settings are for sync-mode "
                                      "sessions", field="sync")
                changes = {**changes, "sync": sync_settings(sync, old.sync)}
            meta = old.replace(optimizer=optimizer, hyperparams=hp, **changes)
            cmds: list[Any] = [("SET", keys.meta(sid), meta.to_json())]
            fresh = old.hyperparams.get("momentum", 0) == 0 and hp.get("momentum", 0) != 0
            version = txn.version
            if version is not None and (fresh or txn.log_steps):
                # A checkpoint at this version: the log's steps keep the hyperparameters
                # they ran with, and momentum switched on drops today's buffers.
                loaded = await self.engine.load(old, version, txn)
                for st in loaded.state.values():
                    if fresh:
                        st.pop("momentum_buffer", None)
                cmds += wal.full_checkpoint_cmds(sid, version, all_fields(loaded))
            await txn.execute(cmds)
        self.engine.cache.drop(sid)
        self.engine.warm(meta)
        return await self.view(meta)

    async def replace_params(self, meta: SessionMeta, tensors: dict[str, wire.WireTensor],
                             if_match: IfMatch) -> View:
        """New parameters (the first ones define the session's tensors); state is kept."""
        sid = meta.id
        async with self.store.step_txn(sid) as txn:
            meta, version = locked_session(txn)
            declared = meta.tensors or None
            require_if_match(version, if_match, "parameters")
            await self._check_params(declared, tensors)
            fields: dict[str, Any] = {}
            if version is not None:  # the state is kept: as of now (the log replayed)
                fields.update(all_fields(await self.engine.load(meta, version, txn),
                                         state_only=True))
            fields.update({keys.param_field(n): t.data for n, t in tensors.items()})
            new_meta = meta.replace(tensors=describe(tensors)) if declared is None else None
            self.engine.cache.drop(sid)
            abandon = await stored.abandon_cmds(txn, meta)
            async with self._charging(txn, meta, tensors):
                await txn.commit(0 if version is None else version + 1, fields,
                                 count_step=False, meta=new_meta, extra=abandon)
            meta = new_meta or meta
        self.engine.warm(meta)
        return await self.view(meta)

    async def import_state(self, meta: SessionMeta, tensors: dict[str, wire.WireTensor],
                           metadata: Mapping[str, str] | None, if_match: IfMatch) -> View:
        """Replace parameters, optimizer state and hyperparameters from a state file."""
        sid = meta.id
        async with self.store.step_txn(sid) as txn:
            meta, version = locked_session(txn)
            require_if_match(version, if_match, "the state")
            new = await self.engine.offload(state_io.parse_import, meta, tensors, metadata,
                                            count=len(tensors), nbytes=_wire_bytes(tensors))
            check_tensor_count(new.params, self.settings.max_tensors_per_session)
            new_meta = meta.replace(optimizer=new.optimizer, hyperparams=new.hyperparams,
                                    tensors=describe(new.params))
            self.engine.cache.drop(sid)
            abandon = await stored.abandon_cmds(txn, meta)
            async with self._charging(txn, meta, new.params):
                await txn.commit(0 if version is None else version + 1, new.fields,
                                 count_step=False, meta=new_meta,
                                 extra=[("HSET", keys.tensors(sid), keys.STEPS, new.steps),
                                        *abandon])
        self.engine.warm(new_meta)
        return await self.view(new_meta)

    async def export_state(self, meta: SessionMeta
                           ) -> tuple[int | None, dict[str, wire.WireTensor], dict[str, Any]]:
        """The state file's tensors and its ``optserve`` metadata."""
        version, fields = await self.engine.checkpoints.read(meta)
        info = {"optimizer": meta.optimizer, "hyperparams": meta.hyperparams,
                "version": version}
        exported = await self.engine.offload(state_io.export, meta, fields, count=len(fields),
                                             nbytes=lambda: sum(map(len, fields.values())))
        return version, exported, info

    async def stats(self, meta: SessionMeta) -> dict[str, Any]:
        """Steps, last norms and each tensor's step count and effective learning rates."""
        version, fields = await self.engine.checkpoints.read(meta)
        head = await self.store.head(meta.id)
        opt = optim.get_optimizer(meta.optimizer)
        hp = opt.hyperparams.model_validate(meta.hyperparams)
        tensors: dict[str, Any] = {}
        if version is not None:
            tensors = await self.engine.offload(
                self._tensor_stats, meta, version, fields, opt, hp, count=len(fields),
                nbytes=lambda: sum(map(len, fields.values())))
        return {
            "version": version,
            "steps_applied": head.steps,
            "last_grad_norm": head.last_grad_norm,
            "last_update_norm": head.last_update_norm,
            "optimizer": meta.optimizer,
            "hyperparams": meta.hyperparams,
            "tensors": tensors,
        }

    def _tensor_stats(self, meta: SessionMeta, version: int, fields: Mapping[str, bytes],
                      opt: optim.OptimizerDef, hp: Any) -> dict[str, Any]:
        """Each tensor's step count and effective learning rates (per-tensor torch work)."""
        loaded = self.engine.materialize(meta, version, {
            f: b for f, b in fields.items() if f.startswith("s.")})
        tensors: dict[str, Any] = {}
        for name in meta.tensors:
            st = loaded.state.get(name, {})
            entry: dict[str, Any] = {"step": int(st["step"].item()) if "step" in st else 0}
            eff = optim.effective_lr(opt, hp, st) if st else None
            if eff is not None and eff.numel():
                flat = eff.reshape(-1).double()
                entry["effective_lr"] = {"min": float(flat.min()),
                                         "median": float(flat.median()),
                                         "max": float(flat.max())}
            else:
                entry["effective_lr"] = None
            tensors[name] = entry
        return tensors

    async def delete(self, meta: SessionMeta) -> None:
        """Delete the session once a step in flight (holding its lock) is done; this works
        when Redis is out of memory too (see `Store.delete`), and frees the tenant's quota."""
        await self.store.delete(meta.id, meta.tenant or "")
        self.engine.cache.drop(meta.id)


def _wire_bytes(tensors: Mapping[str, wire.WireTensor]) -> Any:
    """Their bytes, counted only if the tensor count does not already decide."""
    return lambda: sum(t.data.nbytes for t in tensors.values())
