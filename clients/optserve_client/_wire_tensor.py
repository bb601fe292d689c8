"""What both wire codecs decode into and encode from: `WireTensor`, the dtype tables, and the
byte views of NumPy arrays and torch tensors (bfloat16 included). Public names are re-exported
by `optserve_client.wire`, their documented home."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# safetensors dtype codes <-> our names (torch's names). Every code safetensors defines is
# accepted by the decoder, so a well-formed body of, say, int32 is a 422, not a 400.
_CODE_TO_NAME = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "C64": "complex64",
}
_NAME_TO_CODE = {v: k for k, v in _CODE_TO_NAME.items()}
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "complex64": 8,
}
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
_NUMPY_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64,
    "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint64": np.uint64,
    "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64,
}
_JSON_CARRIES = frozenset(_NUMPY_DTYPES) - {"complex64"} | {"bfloat16"}



@dataclass(frozen=True)
class WireTensor:
    """One decoded tensor: raw little-endian bytes in row-major order, not yet copied."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# --------------------------------------------------------------------------- bfloat16


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest-even, as torch does); returns the uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- conversions


def to_numpy(t: WireTensor) -> np.ndarray:
    """A NumPy view of the bytes (read-only if the body was); bfloat16 widens to float32."""
    if t.dtype == "bfloat16":
        bits = np.frombuffer(t.data, dtype="<u2", count=t.numel)
        return bfloat16_bits_to_float32(bits).reshape(t.shape)
    if t.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"NumPy has no {t.dtype}")
    return np.frombuffer(t.data, dtype=np.dtype(_NUMPY_DTYPES[t.dtype]).newbyteorder("<"),
                         count=t.numel).reshape(t.shape)


def to_torch(t: WireTensor, *, copy: bool = False) -> Any:
    """A torch tensor over the body's bytes (zero copy unless `copy` or misaligned)."""
    import torch

    dtype = getattr(torch, t.dtype)
    if t.numel == 0:
        return torch.empty(t.shape, dtype=dtype)
    itemsize = ITEMSIZE[t.dtype]
    aligned = np.frombuffer(t.data, dtype=np.uint8).ctypes.data % itemsize == 0
    if copy or not aligned or t.data.readonly:
        # torch.frombuffer over read-only memory warns and would let writes corrupt the body;
        # a read-only body is only ever read, so we silence that warning instead of copying.
        if copy or not aligned:
            return torch.frombuffer(bytearray(t.data), dtype=dtype).reshape(t.shape)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(t.data, dtype=dtype).reshape(t.shape)
    return torch.frombuffer(t.data, dtype=dtype).reshape(t.shape)



def _raw(value: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """dtype name, shape and a byte view of a numpy array, torch tensor or WireTensor."""
    if isinstance(value, WireTensor):
        return value.dtype, value.shape, value.data
    if type(value).__module__.startswith("torch"):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _NAME_TO_CODE:
            raise TypeError(f"cannot send a tensor of {t.dtype}")
        shape = tuple(t.shape)
        flat = t.reshape(-1)
        if flat.numel() == 0:
            return name, shape, memoryview(b"")
        import torch

        return name, shape, memoryview(flat.view(torch.uint8).numpy()).cast("B")
    arr = np.asarray(value)
    shape = tuple(arr.shape)  # before ascontiguousarray, which makes 0-dim arrays 1-dim
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    name = arr.dtype.name
    if name not in _NAME_TO_CODE:
        raise TypeError(f"cannot send an array of {arr.dtype}")
    return name, shape, memoryview(arr.reshape(-1).view(np.uint8)).cast("B")


# Shown, documented and pickled as `optserve_client.wire.X`, where they have always lived.
for _obj in (WireTensor, float32_to_bfloat16_bits, bfloat16_bits_to_float32, to_numpy, to_torch):
    _obj.__module__ = "optserve_client.wire"
