"""A gradient is refused as non-finite exactly when torch, in the parameter's dtype, finds
NaN or +-inf in it (the numpy shortcut for same-dtype float32/float64 agrees)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optserve.checks import check_finite_as_params
from optserve.errors import DomainError
from optserve.session import TensorSpec
from optserve_client.wire import WireTensor

CASES = [
    [1.0, 2.0], [3e38, 3e38], [-3e38, -3e38, 1.0], [float("nan"), 1.0],
    [float("inf"), -float("inf")], [1e300, 1.0], [1e30, -1e30], [5e-324, 0.0], [],
]


@pytest.mark.parametrize("values", CASES)
@pytest.mark.parametrize("wire_dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("param_dtype", ["float32", "float64"])
def test_refused_exactly_when_torch_sees_non_finite_values(values: list[float], wire_dtype: str,
                                                          param_dtype: str) -> None:
    t = torch.tensor(values, dtype=getattr(torch, wire_dtype))
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    wire = {"g": WireTensor(wire_dtype, (t.numel(),), memoryview(raw))}
    expected = bool(torch.isfinite(t.to(getattr(torch, param_dtype))).all())
    declared = {"g": TensorSpec(dtype=param_dtype, shape=[t.numel()])}
    with np.errstate(all="raise"):  # the check must not warn (nor raise) on inf or NaN
        if expected:
            check_finite_as_params(wire, declared)
        else:
            with pytest.raises(DomainError) as exc:
                check_finite_as_params(wire, declared)
            assert exc.value.code == "non_finite_gradient"
