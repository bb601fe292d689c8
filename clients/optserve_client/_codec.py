"""Tensors between the caller's arrays and the wire: NumPy/torch conversion, gradient
compression (bfloat16/float16 packing), and the body helpers the request builders use."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from . import wire
from ._transport import RawResponse
from .errors import APIResponseValidationError

ArrayKind = Literal["numpy", "torch"]
GRAD_DTYPES = wire.FLOAT_DTYPES
"""The dtypes a gradient may travel in (``grad_dtype``)."""


def is_torch(value: Any) -> bool:
    """A torch tensor, told without importing torch."""
    return type(value).__module__.startswith("torch")


def convert_tensors(tensors: Mapping[str, wire.WireTensor], as_: ArrayKind
                    ) -> dict[str, Any]:
    """Wire tensors -> NumPy arrays or torch tensors, sharing the response's memory."""
    if as_ == "torch":
        return {k: wire.to_torch(t) for k, t in tensors.items()}
    if as_ != "numpy":
        raise ValueError(f"as_ must be 'numpy' or 'torch', not {as_!r}")
    return {k: wire.to_numpy(t) for k, t in tensors.items()}


def decode_tensors(resp: RawResponse, as_: ArrayKind
                   ) -> tuple[dict[str, Any], dict[str, str] | None]:
    ctype = resp.headers.get("content-type", wire.SAFETENSORS_TYPE)
    try:
        tensors, metadata = wire.decode(resp.body, ctype)
    except wire.WireError as exc:
        raise APIResponseValidationError(f"cannot decode the tensor body: {exc}") from None
    return convert_tensors(tensors, as_), metadata


def check_grad_dtype(grad_dtype: str | None) -> None:
    if grad_dtype is not None and grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype must be one of {GRAD_DTYPES}, not {grad_dtype!r}")


def compress(value: Any, grad_dtype: str | None) -> Any:
    """Cast one gradient to ``grad_dtype`` for the wire (bfloat16/float16: half the bytes)."""
    if grad_dtype is None or value is None:
        return value
    check_grad_dtype(grad_dtype)
    if is_torch(value):
        torch = sys.modules["torch"]
        return value.detach().to(getattr(torch, grad_dtype))
    if isinstance(value, wire.WireTensor):
        return value
    arr = np.asarray(value)
    if grad_dtype == "bfloat16":
        bits = wire.float32_to_bfloat16_bits(arr.astype(np.float32, copy=False))
        return wire.WireTensor("bfloat16", tuple(arr.shape),
                               memoryview(bits.reshape(-1)).cast("B"))
    return arr.astype(grad_dtype, copy=False)


def dense_grad(grad: Any) -> Any:
    """The service takes dense gradients only: a sparse torch gradient is refused here."""
    if grad.is_sparse:
        raise RuntimeError("optserve does not take sparse gradients")
    return grad


def plain_hyperparams(hp: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as JSON values: a 1-element tensor (an LR scheduler's, or a tensor
    ``lr`` as torch takes it) becomes its number; a larger one is refused as torch does."""
    out: dict[str, Any] = {}
    for k, v in hp.items():
        if is_torch(v) or isinstance(v, (np.ndarray, np.generic)):
            size = v.numel() if is_torch(v) else v.size
            if size != 1:
                raise ValueError(f"Tensor {k} must be 1-element")
            v = v.item()
        out[k] = v
    return out


def wire_ready(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Drop None entries (a parameter without a gradient is simply not sent)."""
    return {name: value for name, value in tensors.items() if value is not None}


def safetensors_parts(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                      ) -> list[bytes | memoryview]:
    """The body as the header plus the tensors' own bytes: sent as a list, never joined."""
    return wire.encode_safetensors_parts(wire_ready(tensors), metadata)


def nbytes(value: Any) -> int:
    if isinstance(value, wire.WireTensor):
        return len(value.data)
    if is_torch(value):
        return value.numel() * value.element_size()
    return np.asarray(value).nbytes


def named(tensors: Any) -> dict[str, Any]:
    """A dict from a mapping, (name, tensor) pairs (e.g. ``model.named_parameters()``) or a
    torch module (its named parameters)."""
    if hasattr(tensors, "named_parameters"):
        tensors = tensors.named_parameters()
    return dict(tensors.items() if isinstance(tensors, Mapping) else tensors)


def params_of(params: Any) -> dict[str, Any]:
    """`named`, with torch tensors detached: a session's initial parameters."""
    return {k: (v.detach() if hasattr(v, "detach") else v) for k, v in named(params).items()}
