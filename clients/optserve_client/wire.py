"""The tensor wire formats: safetensors bodies and JSON bodies, one codec for server and SDK.

Decoding never copies tensor bytes: a decoded tensor is a memoryview into the request body,
so the server can hand it to ``torch.frombuffer``. Nothing here unpickles anything. The
safetensors codec lives here; `WireTensor` and the dtype tables in `_wire_tensor`, the JSON
codec in `_json_codec` (both re-exported here, their public home).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

from ._json_codec import _decode_json as _decode_json
from ._json_codec import decode_json as decode_json
from ._json_codec import encode_json as encode_json
from ._wire_tensor import _CODE_TO_NAME, _NAME_TO_CODE, _raw
from ._wire_tensor import FLOAT_DTYPES as FLOAT_DTYPES
from ._wire_tensor import ITEMSIZE as ITEMSIZE
from ._wire_tensor import WireTensor as WireTensor
from ._wire_tensor import bfloat16_bits_to_float32 as bfloat16_bits_to_float32
from ._wire_tensor import float32_to_bfloat16_bits as float32_to_bfloat16_bits
from ._wire_tensor import to_numpy as to_numpy
from ._wire_tensor import to_torch as to_torch
from .limits import ECHO_CHARS as ECHO_CHARS
from .limits import MAX_NAME_CHARS as MAX_NAME_CHARS
from .limits import MAX_RANK as MAX_RANK
from .limits import WireError as WireError
from .limits import check_shape, is_int
from .limits import clip as clip
from .limits import load_json as load_json
from .limits import quote as _q

SAFETENSORS_TYPE = "application/octet-stream"
JSON_TYPE = "application/json"
TENSOR_TYPES = (SAFETENSORS_TYPE, JSON_TYPE)

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_COALESCE = 64 * 1024


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
    raw = bytes(view[8 : 8 + n])
    data = view[8 + n :]
    known = _LAYOUTS.get(raw)
    if known is not None and known[2] == len(data):  # a header seen (and checked) before
        layout, meta, _ = known
        return ({name: WireTensor(dtype, shape, data[begin:end])
                 for name, dtype, shape, begin, end in layout},
                None if meta is None else dict(meta))
    try:
        text = raw.decode("utf-8")
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
    spans: list[tuple[int, int, str]] = []
    layout: list[tuple[str, str, tuple[int, ...], int, int]] = []
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
        layout.append((name, dtype, shape_t, begin, end))
        tensors[name] = WireTensor(dtype, shape_t, data[begin:end])
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise WireError(f"tensor {_q(name)}: data_offsets overlap or leave a gap")
        pos = end
    if pos != len(data):
        raise WireError(f"safetensors data is {len(data)} bytes but the header covers {pos}")
    if n <= _LAYOUT_HEADER:
        if len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.clear()
        _LAYOUTS[raw] = (layout, None if metadata is None else dict(metadata), len(data))
    return tensors, metadata


# Headers already parsed and checked, by their bytes: the same client sends the same header
# with every step, and parsing it again (JSON, shapes, offsets) costs more than the rest of
# the decode. Small headers only; cleared when full.
_LAYOUT_HEADER = 4096
_LAYOUTS_KEPT = 512
_LAYOUTS: dict[bytes, tuple[list[tuple[str, str, tuple[int, ...], int, int]],
                            dict[str, str] | None, int]] = {}


# --------------------------------------------------------------------------- encoding


def encode_safetensors(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                       ) -> bytes:
    """Serialize to safetensors with one copy of each tensor's bytes (into the result)."""
    return b"".join(encode_safetensors_parts(tensors, metadata))


def encode_safetensors_parts(tensors: Mapping[str, Any],
                             metadata: Mapping[str, str] | None = None
                             ) -> list[bytes | memoryview]:
    """The safetensors file as pieces (header, then each tensor's own memory), for writers
    that send a list of buffers and so need no joined copy."""
    specs: list[tuple[str, str, tuple[int, ...], int]] = []
    parts: list[memoryview] = []
    for name, value in tensors.items():
        dtype, shape, data = _raw(value)
        specs.append((name, dtype, tuple(shape), len(data)))
        parts.append(data)
    key = (tuple(specs), tuple(metadata.items()) if metadata else None)
    prefix = _HEADS.get(key)
    if prefix is None:
        prefix = _safetensors_head(specs, metadata)
        if len(prefix) <= _LAYOUT_HEADER:
            if len(_HEADS) >= _LAYOUTS_KEPT:
                _HEADS.clear()
            _HEADS[key] = prefix
    # Small neighbours are coalesced (one join: one copy), so a body of many small tensors
    # is not many tiny sends.
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = [prefix]
    for view in parts:
        if len(view) < _COALESCE:
            run.append(view)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(view)
    if run:
        out.append(b"".join(run))
    return out


def _safetensors_head(specs: list[tuple[str, str, tuple[int, ...], int]],
                      metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and JSON header for tensors of these names, dtypes, shapes, sizes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, size in specs:
        header[name] = {"dtype": _NAME_TO_CODE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head


# Encoded headers by the tensors' names, dtypes, shapes and sizes (and the metadata): a
# session's parameters have the same header at every step.
_HEADS: dict[tuple[Any, ...], bytes] = {}


def encode(tensors: Mapping[str, Any], content_type: str,
           metadata: Mapping[str, str] | None = None) -> bytes:
    kind = base_type(content_type)
    if kind == SAFETENSORS_TYPE:
        return encode_safetensors(tensors, metadata)
    if kind == JSON_TYPE:
        return encode_json(tensors)
    raise ValueError(f"unsupported content type {content_type!r}")
