"""The checks a request's tensors, versions and hyperparameters must pass, as domain errors.

Shared by steps, sync rounds, PATCH and the PUTs, so each refusal has one wording and one
place. The order in which callers run them is the contract's (API.md): 412, 409, then 422.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from optserve_client.spec import (
    HYPERPARAMS_META_KEY,
    KERNEL_OPTIONS,
    kernel_options_refusal,
)
from optserve_client.state import TORCH_CLASSES
from optserve_client.wire import MAX_NAME_CHARS, WireTensor, clip

from . import optim
from .errors import DomainError
from .session import SessionMeta, TensorSpec
from .store import keys
from .store.redis_store import StepTxn
from .tensors import DTYPES, PARAM_DTYPES, from_bytes

IfMatch = int | Literal["*"] | None
"""A parsed If-Match: a version (-1 names none), ``*`` (any), or absent."""


def check_names(given: Mapping[str, WireTensor], what: str) -> None:
    """Names a session can hold and a response can repeat: not empty or padded, at most
    MAX_NAME_CHARS characters, valid Unicode (no lone surrogates)."""
    for name in given:
        if len(name) > MAX_NAME_CHARS:
            raise DomainError("invalid_name", f"{what} name {clip(name)!r} is {len(name)} "
                              f"characters; at most {MAX_NAME_CHARS}")
        if not name or name.strip() != name:
            raise DomainError("invalid_name", f"{what} name {clip(name)!r} is empty or padded")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise DomainError("invalid_name", f"{what} name {clip(name)!r} is not valid "
                              "Unicode (a lone surrogate)") from None


def check_tensors(declared: Mapping[str, TensorSpec], given: Mapping[str, WireTensor], *,
                  what: str, require_all: bool, dtypes: tuple[str, ...]) -> None:
    """Names, shapes and dtypes that do not fit the session, naming the tensor; a body
    must carry at least one tensor (an empty step would bump the version for nothing)."""
    check_names(given, what)
    if not given:
        raise DomainError("missing_tensor", f"the body carries no {what}; send at least one",
                          tensors=[])
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise DomainError("unknown_tensor", f"unknown {what} name(s) {unknown}; the session "
                          f"has {sorted(declared)}", tensors=unknown)
    if require_all:
        missing = sorted(set(declared) - set(given))
        if missing:
            raise DomainError("missing_tensor", f"missing {what}(s) {missing}", tensors=missing)
    for name, t in given.items():
        want = list(declared[name].shape)
        if list(t.shape) != want:
            raise DomainError("shape_mismatch", f"{what} {name!r} has shape {list(t.shape)}, "
                              f"the parameter has {want}", tensor=name, expected=want,
                              got=list(t.shape))
        if t.dtype not in dtypes:
            raise DomainError("dtype_mismatch", f"{what} {name!r} is {t.dtype}; accepted: "
                              f"{list(dtypes)}", tensor=name, got=t.dtype)


def check_tensor_count(given: Mapping[str, Any], limit: int) -> None:
    """A session's parameters are bounded in number: each one is per-tensor Python work in
    every step, which no byte limit bounds (20,000 one-element tensors are 6 s of it)."""
    if len(given) > limit:
        raise DomainError("too_many_tensors", f"{len(given)} parameters; a session may have at "
                          f"most {limit}", limit=limit, got=len(given))


def check_param_body(declared: Mapping[str, TensorSpec] | None,
                     given: Mapping[str, WireTensor]) -> None:
    """Parameters: float32/float64, and once defined, the same names, shapes and dtypes."""
    check_names(given, "parameter")
    for name, t in given.items():
        if t.dtype not in PARAM_DTYPES:
            raise DomainError("dtype_mismatch", f"parameter {name!r} is {t.dtype}; parameters "
                              f"are {list(PARAM_DTYPES)}", tensor=name, got=t.dtype)
    if declared is None:
        if not given:
            raise DomainError("missing_tensor", "a session needs at least one parameter")
        return
    check_tensors(declared, given, what="parameter", require_all=True, dtypes=PARAM_DTYPES)
    for name, t in given.items():
        if t.dtype != declared[name].dtype:
            raise DomainError("dtype_mismatch", f"parameter {name!r} is {t.dtype}, the session "
                              f"holds {declared[name].dtype}", tensor=name, got=t.dtype,
                              expected=declared[name].dtype)


def check_finite(given: Mapping[str, WireTensor], device: str, what: str) -> None:
    for name, w in given.items():
        t = from_bytes(w.data, w.dtype, w.shape, device, writable=False)
        if not optim.finite(t):
            raise DomainError(f"non_finite_{what}", f"{what} {name!r} has NaN or infinite "
                              "values", tensor=name)


_NUMPY_FLOATS = {"float32": np.float32, "float64": np.float64}


def _finite_as_is(w: WireTensor) -> bool | None:
    """`optim.finite` for a float32/float64 wire tensor, by numpy over its bytes (a third
    of the cost of making a torch tensor first, for a contribution's check); None for
    other dtypes."""
    kind = _NUMPY_FLOATS.get(w.dtype)
    if kind is None:
        return None
    a = np.frombuffer(w.data, dtype=kind)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are the answer here
        return math.isfinite(a.sum()) or bool(np.isfinite(a).all())


def check_finite_as_params(given: Mapping[str, WireTensor],
                           declared: Mapping[str, TensorSpec]) -> None:
    """Gradients must be finite in their parameter's dtype too (1e300 is not a float32)."""
    for name, w in given.items():
        ok = _finite_as_is(w) if w.dtype == declared[name].dtype else None
        if ok is None:
            t = from_bytes(w.data, w.dtype, w.shape, writable=False)
            target = DTYPES[declared[name].dtype]
            if t.dtype != target:
                t = t.to(target)
            ok = optim.finite(t)
        if not ok:
            raise DomainError("non_finite_gradient", f"gradient {name!r} has NaN or infinite "
                              f"values (as {declared[name].dtype})", tensor=name)


def check_same_request(remembered: str | None, digest: str | None) -> None:
    """An Idempotency-Key replays only the request it was first sent with (IETF
    idempotency-key draft; Stripe): another body or headers under it is refused."""
    if remembered is not None and digest is not None and remembered != digest:
        raise DomainError("idempotency_key_mismatch", "this Idempotency-Key was first used "
                          "with a different request; use a new key for a new request")


def locked_session(txn: StepTxn) -> tuple[SessionMeta, int | None]:
    """The session document and version as read under the lock (deleted since: not found)."""
    if txn.meta is None:
        raise DomainError("session_not_found", f"session {txn.sid} was deleted")
    return txn.meta, txn.version


def check_version(version: int | None, if_match: int | None) -> int:
    """A step's first checks, in the contract's order: If-Match, then parameters exist."""
    if if_match is not None and if_match != version:
        raise DomainError("version_mismatch", f"If-Match names version {if_match}, the "
                          f"session is at {version}", current_version=version)
    if version is None:
        raise DomainError("no_params", "the session has no parameters yet; PUT them first",
                          current_version=None)
    return version


def check_staleness(meta: SessionMeta, version: int, base_version: int | None) -> None:
    """An async step's gradient: not from the future, not more than max_staleness behind."""
    if base_version is None:
        return
    if base_version > version:
        raise DomainError("future_version", f"base version {base_version} is newer than the "
                          f"session's {version}", current_version=version)
    s = meta.max_staleness
    if s is not None and base_version < version - s:
        raise DomainError("stale_gradient", f"gradient computed on version {base_version}, "
                          f"more than max_staleness={s} behind {version}",
                          current_version=version)


def require_if_match(version: int | None, if_match: IfMatch, what: str) -> None:
    """Replacing tensors after version 0 needs If-Match naming the current version."""
    if version is None:
        return
    if if_match is None:
        raise DomainError("precondition_required", f"replacing {what} needs "
                          f'If-Match: "{version}"', current_version=version)
    wanted = version if if_match == "*" else if_match
    if wanted != version:
        raise DomainError("version_mismatch", f"If-Match names version {wanted}, the "
                          f"session is at {version}", current_version=version)


def validate_hyperparams(optimizer: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Torch's defaults filled in; a refusal naming each bad field and its allowed range.

    torch's kernel options (``foreach``, ...) are checked as torch checks them, then
    dropped: they choose how torch computes, not what, so they are not stored."""
    values = dict(values)
    options = {k: values.pop(k) for k in KERNEL_OPTIONS if k in values}
    owner = f"torch.optim.{TORCH_CLASSES.get(optimizer, optimizer)}"
    refusal = kernel_options_refusal(optimizer, options, owner) if options else None
    if refusal is not None:
        name, exc = refusal
        raise DomainError("invalid_hyperparams", f"invalid {optimizer} hyperparameters: "
                          f"{name}: {exc}", errors=[{"field": name, "msg": str(exc)}])
    try:
        hp = optim.get_optimizer(optimizer).hyperparams.model_validate(values)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'hyperparams'}: {e['msg']}" for e in errors)
        raise DomainError("invalid_hyperparams", f"invalid {optimizer} hyperparameters: "
                          f"{detail}", errors=errors) from None
    return hp.model_dump(mode="json")


def parse_step_hyperparams(metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    """A step body's hyperparameters: ``__metadata__["optserve"]`` = ``{"hyperparams": {..}}``
    (a JSON body's top-level ``hyperparams`` arrives in the same form). Structure is 400."""
    raw = (metadata or {}).get(HYPERPARAMS_META_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise DomainError("malformed_body", f"__metadata__[{HYPERPARAMS_META_KEY!r}] is not "
                          f"valid JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"hyperparams"} \
            or not isinstance(doc.get("hyperparams", {}), dict):
        raise DomainError("malformed_body", f"__metadata__[{HYPERPARAMS_META_KEY!r}] of a step "
                          'must be {"hyperparams": {name: value}}')
    return doc.get("hyperparams")


def without_kernel_options(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in KERNEL_OPTIONS}


async def step_hyperparams(txn: StepTxn, meta: SessionMeta, requested: Mapping[str, Any]
                           ) -> dict[str, Any]:
    """The session's hyperparameters with a step's changes merged in, checked as PATCH
    checks them: the optimizer is the session's, ``centered`` is fixed once stepped."""
    hp = validate_hyperparams(meta.optimizer, {**meta.hyperparams, **requested})
    if hp.get("centered", False) != meta.hyperparams.get("centered", False):
        steps = await txn.call("HGET", keys.tensors(meta.id), keys.STEPS)
        if steps and int(steps):
            raise DomainError("immutable_hyperparam", "`centered` cannot change once a step "
                              "has been applied", field="centered")
    return hp
