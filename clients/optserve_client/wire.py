"""The tensor wire formats: safetensors bodies and JSON bodies, one codec for server and SDK.

Decoding never copies tensor bytes: a decoded tensor is a memoryview into the request body,
so the server can hand it to ``torch.frombuffer``. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .limits import ECHO_CHARS as ECHO_CHARS
from .limits import MAX_NAME_CHARS as MAX_NAME_CHARS
from .limits import MAX_RANK as MAX_RANK
from .limits import WireError as WireError
from .limits import check_shape, is_int, load_json
from .limits import clip as clip
from .limits import quote as _q

SAFETENSORS_TYPE = "application/octet-stream"
JSON_TYPE = "application/json"
TENSOR_TYPES = (SAFETENSORS_TYPE, JSON_TYPE)

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
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_COALESCE = 64 * 1024


@dataclass(frozen=True)
class WireTensor:
    """One decoded tensor: raw little-endian bytes in row-major order, not yet copied."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def base_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------- decoding


def decode(body: bytes | bytearray | memoryview, content_type: str
           ) -> tuple[dict[str, WireTensor], dict[str, str] | None]:
    """Decode a tensor body; returns the tensors and the safetensors metadata (JSON: a
    step's ``hyperparams`` in that form, else None)."""
    kind = base_type(content_type)
    if kind == SAFETENSORS_TYPE:
        return decode_safetensors(body)
    if kind == JSON_TYPE:
        return _decode_json(body)
    raise WireError(f"unsupported content type {content_type!r}; use one of {TENSOR_TYPES}")


def decode_safetensors(body: bytes | bytearray | memoryview
                       ) -> tuple[dict[str, WireTensor], dict[str, str] | None]:
    """Parse safetensors framing with the format's own validity rules, without copying."""
    view = memoryview(body).cast("B")
    if len(view) < 8:
        raise WireError("safetensors body shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > _MAX_HEADER or 8 + n > len(view):
        raise WireError(f"safetensors header length {n} exceeds the body ({len(view)} bytes)")
    try:
        text = bytes(view[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"safetensors header is not UTF-8: {exc}") from None
    header = load_json(text, "safetensors header")
    if not isinstance(header, dict):
        raise WireError("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise WireError("safetensors __metadata__ must map strings to strings")
    data = view[8 + n :]
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, WireTensor] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"tensor {_q(name)}: entry needs exactly dtype, shape, data_offsets")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in _CODE_TO_NAME:
            raise WireError(f"tensor {_q(name)}: unknown safetensors dtype "
                            f"{clip(str(code))!r}")
        shape_t = check_shape(name, shape)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise WireError(f"tensor {_q(name)}: data_offsets must be [begin, end] with "
                            "begin <= end")
        dtype = _CODE_TO_NAME[code]
        begin, end = offsets
        if end - begin != math.prod(shape_t) * ITEMSIZE[dtype]:
            raise WireError(
                f"tensor {_q(name)}: {end - begin} bytes do not hold shape {list(shape_t)} "
                f"of {dtype}"
            )
        spans.append((begin, end, name))
        tensors[name] = WireTensor(dtype, shape_t, data[begin:end])
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise WireError(f"tensor {_q(name)}: data_offsets overlap or leave a gap")
        pos = end
    if pos != len(data):
        raise WireError(f"safetensors data is {len(data)} bytes but the header covers {pos}")
    return tensors, metadata


def decode_json(body: bytes | bytearray | memoryview | str) -> dict[str, WireTensor]:
    """Parse `{"tensors": {name: {dtype, shape, data}}}` (and a step's `"hyperparams"`)."""
    return _decode_json(body)[0]


def _decode_json(body: bytes | bytearray | memoryview | str
                 ) -> tuple[dict[str, WireTensor], dict[str, str] | None]:
    """The tensors, and a step's `"hyperparams": {...}` in the safetensors metadata form
    (``{"optserve": '{"hyperparams": {...}}'}``), so both formats carry them alike."""
    doc = load_json(body if isinstance(body, str) else bytes(body), "body")
    if not isinstance(doc, dict) or not {"tensors"} <= set(doc) <= {"tensors", "hyperparams"} \
            or not isinstance(doc["tensors"], dict):
        raise WireError('JSON tensor body must be {"tensors": {name: {dtype, shape, data}}} '
                        '(a step may add "hyperparams": {...})')
    metadata = None
    if "hyperparams" in doc:
        if not isinstance(doc["hyperparams"], dict):
            raise WireError('"hyperparams" must be a JSON object')
        metadata = {"optserve": json.dumps({"hyperparams": doc["hyperparams"]})}
    out: dict[str, WireTensor] = {}
    for name, info in doc["tensors"].items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data"}:
            raise WireError(f"tensor {_q(name)}: needs exactly dtype, shape and data")
        dtype, data = info["dtype"], info["data"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise WireError(f"tensor {_q(name)}: unknown dtype {clip(str(dtype))!r}")
        shape = check_shape(name, info["shape"])
        if not isinstance(data, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in data
        ):
            raise WireError(f"tensor {_q(name)}: data must be a flat list of numbers")
        if len(data) != math.prod(shape):
            raise WireError(
                f"tensor {_q(name)}: {len(data)} values do not fill shape {list(shape)}"
            )
        if dtype not in _JSON_CARRIES:
            # A dtype JSON cannot carry (float8, complex): well-formed, so its refusal is
            # the receiver's 422, not a 400; it arrives without data (never stepped).
            out[name] = WireTensor(dtype, shape, memoryview(b""))
            continue
        try:
            raw = _from_float64(np.asarray(data, dtype=np.float64), dtype)
        except (OverflowError, ValueError) as exc:
            raise WireError(f"tensor {_q(name)}: {clip(str(exc))}") from None
        out[name] = WireTensor(dtype, shape, memoryview(raw.reshape(-1)).cast("B"))
    return out, metadata


def _from_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(values.astype(np.float32))
    if dtype in _NUMPY_DTYPES:
        return values.astype(_NUMPY_DTYPES[dtype])
    raise ValueError(f"JSON bodies cannot carry {dtype}")


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


# --------------------------------------------------------------------------- encoding


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


def encode_safetensors(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                       ) -> bytes:
    """Serialize to safetensors with one copy of each tensor's bytes (into the result)."""
    return b"".join(encode_safetensors_parts(tensors, metadata))


def encode_safetensors_parts(tensors: Mapping[str, Any],
                             metadata: Mapping[str, str] | None = None
                             ) -> list[bytes | memoryview]:
    """The safetensors file as pieces (header, then each tensor's own memory), for writers
    that send a list of buffers and so need no joined copy."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    parts: list[memoryview] = []
    offset = 0
    for name, value in tensors.items():
        dtype, shape, data = _raw(value)
        header[name] = {
            "dtype": _NAME_TO_CODE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        parts.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    # Small neighbours are coalesced, so a body of many small tensors is not many tiny sends.
    out: list[bytes | memoryview] = []
    small = bytearray(struct.pack("<Q", len(head)) + head)
    for view in parts:
        if len(view) < _COALESCE:
            small += view
            continue
        if small:
            out.append(bytes(small))
            small = bytearray()
        out.append(view)
    if small:
        out.append(bytes(small))
    return out


def encode_json(tensors: Mapping[str, Any],
                hyperparams: Mapping[str, Any] | None = None) -> bytes:
    """The JSON body; a step's ``hyperparams`` ride next to its tensors."""
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        dtype, shape, data = _raw(value)
        arr = to_numpy(WireTensor(dtype, shape, data))
        out[name] = {"dtype": dtype, "shape": list(shape), "data": arr.reshape(-1).tolist()}
    doc: dict[str, Any] = {"tensors": out}
    if hyperparams is not None:
        doc["hyperparams"] = dict(hyperparams)
    return json.dumps(doc).encode()


def encode(tensors: Mapping[str, Any], content_type: str,
           metadata: Mapping[str, str] | None = None) -> bytes:
    kind = base_type(content_type)
    if kind == SAFETENSORS_TYPE:
        return encode_safetensors(tensors, metadata)
    if kind == JSON_TYPE:
        return encode_json(tensors)
    raise ValueError(f"unsupported content type {content_type!r}")
