"""Facts the server and the SDK share: optimizers, torch's defaults, presets, state keys,
and every problem ``code`` with its HTTP status.

This is the one home of these facts. The server's hyperparameter models, state validation
and error mapping, and the SDK's signatures and exception classes are checked against it by
tests (set comparisons). Pure data: no imports beyond the standard library, so both sides
(and generated clients' tooling) can read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

OPTIMIZERS: Final = ("rmsprop", "adagrad", "sgd")

TORCH_DEFAULTS: Final[dict[str, dict[str, Any]]] = {
    # torch.optim's defaults for the hyperparameters that change the math.
    "rmsprop": {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False, "maximize": False},
    "adagrad": {"lr": 0.01, "lr_decay": 0.0, "weight_decay": 0.0,
                "initial_accumulator_value": 0.0, "eps": 1e-10, "maximize": False},
    "sgd": {"lr": 0.001, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
            "nesterov": False, "maximize": False},
}

KERNEL_OPTIONS: Final = ("foreach", "fused", "capturable", "differentiable")
"""torch's implementation-selection options: they choose how torch computes, not what."""

SESSION_HEADER: Final = "X-Optserve-Session"
"""Sent by the SDK on every request about one session (its id): a proxy may hash it to keep
a session on one replica (deploy/Caddyfile does). The server never needs it."""

TORCH_KERNEL_OPTIONS: Final[dict[str, tuple[str, ...]]] = {
    # The kernel options each torch.optim constructor takes (torch 2.13's signatures).
    "rmsprop": ("foreach", "capturable", "differentiable"),
    "adagrad": ("foreach", "fused", "differentiable"),
    "sgd": ("foreach", "fused", "differentiable"),
}

HYPERPARAMS_META_KEY: Final = "optserve"
"""The safetensors ``__metadata__`` key of a step's ``{"hyperparams": {...}}`` (as JSON), the
same key the state export uses."""

PRESETS: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    # The RMSprop document's "common configurations": name -> (optimizer, hyperparams).
    "standard": ("rmsprop", {"lr": 1e-3, "alpha": 0.99}),
    "rnn": ("rmsprop", {"lr": 1e-4, "alpha": 0.9}),
    "momentum": ("rmsprop", {"lr": 1e-3, "alpha": 0.99, "momentum": 0.9}),
}

STATE_KEYS: Final[dict[str, tuple[str, ...]]] = {
    # torch's per-parameter state names.
    "rmsprop": ("step", "square_avg", "momentum_buffer", "grad_avg"),
    "adagrad": ("step", "sum"),
    "sgd": ("momentum_buffer",),
}

ACCUMULATORS: Final[dict[str, str]] = {"rmsprop": "square_avg", "adagrad": "sum"}
"""Each optimizer's running sum of squares: never negative, and an overflow there makes the
update 0 rather than inf, so it is checked on its own."""

STEP_KEY: Final = "step"
"""The 0-dim float32 step counter's state name."""

PROBLEMS: Final = MappingProxyType({
    # code: (HTTP status, what it means)
    "malformed_body": (400, "the body cannot be parsed (JSON, safetensors, Content-Length)"),
    "unauthorized": (401, "no or an unknown API key"),
    "session_not_found": (404, "no such session for this tenant"),
    "not_found": (404, "no such route"),
    "method_not_allowed": (405, "the route does not take this method"),
    "not_acceptable": (406, "Accept names no format the route produces"),
    "no_params": (409, "the session has no parameters yet"),
    "future_version": (409, "X-Optserve-Base-Version is newer than the session"),
    "stale_gradient": (409, "the gradient is older than max_staleness allows"),
    "round_closed": (409, "the sync round this contribution was for has closed"),
    "round_failed": (409, "the sync round failed (too few contributions by its deadline)"),
    "hyperparams_conflict": (409, "a sync contribution's hyperparameters differ from its "
                            "round's"),
    "idempotency_key_reused": (409, "the create key's session has been deleted"),
    "request_timeout": (408, "the body did not arrive within the body timeout"),
    "version_mismatch": (412, "If-Match names another version"),
    "body_too_large": (413, "the body is over the size limit"),
    "unsupported_media_type": (415, "Content-Type is not accepted here"),
    "idempotency_key_mismatch": (422, "the Idempotency-Key was first sent with another "
                                 "request"),
    "invalid_request": (422, "the body does not match the request schema"),
    "invalid_hyperparams": (422, "a hyperparameter is unknown or out of range"),
    "immutable_hyperparam": (422, "this hyperparameter cannot change after the first step"),
    "invalid_header": (422, "a header's value is malformed"),
    "invalid_name": (422, "a tensor name is empty, padded, too long or not Unicode"),
    "too_many_tensors": (422, "more tensors than a session may have"),
    "invalid_state": (422, "an imported optimizer state does not fit the session"),
    "unknown_tensor": (422, "a tensor name the session does not have"),
    "missing_tensor": (422, "a tensor the request must carry is absent"),
    "shape_mismatch": (422, "a tensor's shape differs from its parameter's"),
    "dtype_mismatch": (422, "a tensor's dtype is not accepted here"),
    "non_finite_gradient": (422, "a gradient has NaN or infinite values"),
    "non_finite_parameter": (422, "a parameter has NaN or infinite values"),
    "non_finite_result": (422, "the step would make parameters or state non-finite"),
    "precondition_required": (428, "replacing tensors needs If-Match"),
    "quota_exceeded": (429, "a tenant limit (sessions or stored bytes) would be exceeded"),
    "http_error": (400, "another HTTP-level error (status as sent)"),
    "internal_error": (500, "an unexpected server error"),
    "session_busy": (503, "the session's lock could not be had in time"),
    "round_expired": (503, "a sync round's result expired before it was read"),
    "store_unavailable": (503, "the state store cannot be reached or cannot take writes"),
    "server_busy": (503, "the server holds as many request bodies as it may; retry"),
    "store_full": (507, "the state store is out of memory; deleting sessions frees space"),
})
"""Every problem ``code`` the service sends, with its status. ``http_error`` carries the
status of the HTTP error it stands for."""


def status_of(code: str) -> int:
    """The HTTP status of a problem code (KeyError for a code that is not in the table)."""
    return PROBLEMS[code][0]


def kernel_options_refusal(optimizer: str, options: Mapping[str, Any], owner: str
                           ) -> tuple[str, Exception] | None:
    """The option and the error torch's constructor raises for these kernel options
    (``owner`` names the class in a TypeError), or for one a step computed elsewhere cannot
    honour (``capturable``, ``differentiable``); None when all are accepted (and ignored:
    they cannot change the math)."""
    for name, value in options.items():
        if name not in TORCH_KERNEL_OPTIONS[optimizer]:
            return name, TypeError(f"{owner}.__init__() got an unexpected keyword argument "
                                   f"'{name}'")
        if value is not None and not isinstance(value, bool):
            return name, TypeError(f"{name} must be True, False or None, not {value!r}")
    if options.get("fused") and options.get("foreach"):
        return "fused", RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if options.get("capturable"):
        return "capturable", ValueError("capturable=True is not supported: the step runs in "
                                        "the service, outside any CUDA graph")
    if options.get("differentiable"):
        return "differentiable", ValueError("differentiable=True is not supported: autograd "
                                            "cannot run through a step computed in the service")
    return None
