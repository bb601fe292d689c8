"""`optserve_client.spec` is the one home of the shared facts: the SDK's exception classes,
the torch and NumPy optimizers' signatures and the server's hyperparameter models are
compared with it as sets and dicts."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest

from optserve_client import errors, numpy_optim, spec

# Codes the SDK knows beyond the service's: a proxy's 429, and 412's generic name.
SDK_ONLY_CODES = {"rate_limited", "precondition_failed"}


def _status_classes() -> list[type[errors.APIStatusError]]:
    return [c for c in vars(errors).values()
            if isinstance(c, type) and issubclass(c, errors.APIStatusError)]


def test_every_problem_code_has_its_class_with_its_status() -> None:
    by_code = {code: cls for cls in _status_classes() for code in cls.__dict__.get("codes", ())}
    assert set(by_code) - SDK_ONLY_CODES == set(spec.PROBLEMS) - {"http_error"}
    assert {code: cls.status_code for code, cls in by_code.items() if code in spec.PROBLEMS} \
        == {code: status for code, (status, _) in spec.PROBLEMS.items() if code != "http_error"}


@pytest.mark.parametrize("code", sorted(spec.PROBLEMS))
def test_error_from_response_picks_the_class_of_each_spec_code(code: str) -> None:
    status = spec.status_of(code)
    body = json.dumps({"status": status, "code": code, "title": "t"}).encode()
    e = errors.error_from_response(status, body, {})
    assert type(e).status_code == status and e.status == status and e.code == code
    if code != "http_error":
        assert code in type(e).codes


@pytest.mark.parametrize("status", [400, 404, 405, 413, 503])
def test_http_error_takes_the_class_of_its_status(status: int) -> None:
    body = json.dumps({"status": status, "code": "http_error"}).encode()
    assert type(errors.error_from_response(status, body, {})).status_code == status


def _defaults(func: Any, skip: set[str]) -> dict[str, Any]:
    params = inspect.signature(func).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in skip}


def _typed(d: dict[str, Any]) -> dict[str, tuple[type, Any]]:
    return {k: (type(v), v) for k, v in d.items()}


def test_remote_optimizers_take_torch_defaults() -> None:
    pytest.importorskip("torch")
    from optserve_client.torch import RemoteAdagrad, RemoteRMSprop, RemoteSGD

    for cls, name in ((RemoteRMSprop, "rmsprop"), (RemoteAdagrad, "adagrad"),
                      (RemoteSGD, "sgd")):
        got = _defaults(cls.__init__, {"self", "params"})
        assert _typed(got) == _typed(spec.TORCH_DEFAULTS[name]), name


def test_numpy_optimizers_defaults_are_torchs_but_for_the_documents() -> None:
    names = {"learning_rate": "lr", "rho": "alpha", "epsilon": "eps"}
    for cls, name in ((numpy_optim.RMSprop, "rmsprop"), (numpy_optim.AdaGrad, "adagrad"),
                      (numpy_optim.SGD, "sgd")):
        expected = {**spec.TORCH_DEFAULTS[name], **numpy_optim.DOCUMENT_DEFAULTS[name]}
        assert set(numpy_optim.DOCUMENT_DEFAULTS[name]) <= set(spec.TORCH_DEFAULTS[name])
        opt = cls(url="http://127.0.0.1:9")  # no request until the first update
        sent = opt._hyperparams()
        assert sent == {k: expected[k] for k in sent}, name
        declared = {names.get(k, k): v for k, v in _defaults(cls.__init__, {"self"}).items()
                    if v is not None and k != "url"}
        assert declared == {k: expected[k] for k in declared}, name


def test_numpy_presets_are_the_specs_rmsprop_presets() -> None:
    assert {n: ("rmsprop", hp) for n, hp in numpy_optim.PRESETS.items()} == spec.PRESETS
    for name, (_, hp) in spec.PRESETS.items():
        opt = numpy_optim.RMSprop(preset=name, url="http://127.0.0.1:9")
        sent = opt._hyperparams()
        assert {k: sent[k] for k in hp} == hp


def test_server_models_and_presets_are_the_specs() -> None:
    optim = pytest.importorskip("optserve.optim")
    assert set(optim.OPTIMIZERS) == set(spec.OPTIMIZERS)
    for name, opt in optim.OPTIMIZERS.items():
        fields = opt.hyperparams.model_fields
        assert _typed({k: f.default for k, f in fields.items()}) \
            == _typed(spec.TORCH_DEFAULTS[name]), name
        assert set(opt.state_keys) == set(spec.STATE_KEYS[name]), name
    assert optim.PRESETS == spec.PRESETS
