"""Moving tensors between wire bodies, Redis bytes and torch, with as few copies as possible."""

from __future__ import annotations

import math
import warnings

import torch

from optserve_client.wire import ITEMSIZE

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
PARAM_DTYPES = ("float32", "float64")


def from_bytes(raw: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...],
               device: str = "cpu", *, writable: bool = True) -> torch.Tensor:
    """A tensor over Redis/wire bytes: one copy when it must be writable, none otherwise."""
    tdtype = getattr(torch, dtype)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=tdtype, device=device)
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if len(raw) != expected:
        raise ValueError(f"stored tensor has {len(raw)} bytes, expected {expected}")
    if writable and device == "cpu" and not isinstance(raw, bytearray):
        raw = bytearray(raw)
    if isinstance(raw, bytearray) or (isinstance(raw, memoryview) and not raw.readonly):
        t = torch.frombuffer(raw, dtype=tdtype).reshape(shape)  # writable: torch is silent
    else:
        with warnings.catch_warnings():
            # Read-only buffers are only ever read (or copied to the device) below.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(raw, dtype=tdtype).reshape(shape)
    if device != "cpu":
        t = t.to(device)
    return t


def to_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (CPU, contiguous); what Redis and encoders take."""
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")

