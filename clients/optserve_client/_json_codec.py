"""The JSON tensor body (`{"tensors": {name: {dtype, shape, data}}}`): decoding and encoding.
Re-exported by `optserve_client.wire`, which dispatches on the content type."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._wire_tensor import (
    _JSON_CARRIES,
    _NUMPY_DTYPES,
    ITEMSIZE,
    WireTensor,
    _raw,
    float32_to_bfloat16_bits,
    to_numpy,
)
from .limits import WireError, check_shape, clip, load_json
from .limits import quote as _q


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


# Shown, documented and pickled as `optserve_client.wire.X`, where they have always lived.
for _obj in (decode_json, encode_json):
    _obj.__module__ = "optserve_client.wire"
