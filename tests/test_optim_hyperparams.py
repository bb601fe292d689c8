"""Hyperparameter models: torch's names and defaults, strict types, ranges that name the field."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from optserve import optim

NAMES = ["rmsprop", "adagrad", "sgd"]
TORCH_ONLY = {"foreach", "capturable", "differentiable", "fused", "params"}


def _errors(name: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        optim.get_optimizer(name).hyperparams.model_validate(values)
    return info.value.errors(include_url=False)


@pytest.mark.parametrize("name", NAMES)
def test_names_and_defaults_are_torchs(name: str) -> None:
    """Same names and defaults as the installed torch's constructor (e.g. SGD lr=1e-3)."""
    opt = optim.get_optimizer(name)
    sig = inspect.signature(opt.torch_class.__init__)
    torch_defaults = {k: p.default for k, p in sig.parameters.items()
                      if k not in TORCH_ONLY and k != "self"}
    ours = opt.hyperparams().model_dump()
    assert ours == torch_defaults
    # and torch accepts exactly these keyword arguments
    opt.torch_class([torch.zeros(2)], **opt.hyperparams().torch_kwargs())


def test_registry() -> None:
    assert set(optim.OPTIMIZERS) == set(NAMES)
    assert optim.get_optimizer("RMSprop") is optim.OPTIMIZERS["rmsprop"]
    for exc in (KeyError, ValueError):
        with pytest.raises(exc, match="allowed: rmsprop, adagrad, sgd"):
            optim.get_optimizer("adam")


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("rmsprop", {"lr": -0.1}, "lr"),
    ("rmsprop", {"lr": "abc"}, "lr"),
    ("rmsprop", {"lr": True}, "lr"),
    ("rmsprop", {"lr": "0.1"}, "lr"),
    ("rmsprop", {"lr": float("nan")}, "lr"),
    ("rmsprop", {"lr": float("inf")}, "lr"),
    ("rmsprop", {"alpha": 1.0}, "alpha"),
    ("rmsprop", {"alpha": -0.01}, "alpha"),
    ("rmsprop", {"eps": -1e-8}, "eps"),
    ("rmsprop", {"weight_decay": -1}, "weight_decay"),
    ("rmsprop", {"momentum": -0.9}, "momentum"),
    ("rmsprop", {"centered": "yes"}, "centered"),
    ("rmsprop", {"centered": 1}, "centered"),
    ("rmsprop", {"maximize": None}, "maximize"),
    ("rmsprop", {"betas": [0.9, 0.99]}, "betas"),
    ("rmsprop", {"foreach": True}, "foreach"),
    ("adagrad", {"lr_decay": -1}, "lr_decay"),
    ("adagrad", {"initial_accumulator_value": -0.1}, "initial_accumulator_value"),
    ("adagrad", {"eps": float("-inf")}, "eps"),
    ("adagrad", {"weight_decay": -0.1}, "weight_decay"),
    ("adagrad", {"alpha": 0.9}, "alpha"),
    ("sgd", {"dampening": -0.1}, "dampening"),
    ("sgd", {"momentum": -0.1}, "momentum"),
    ("sgd", {"nesterov": True}, "nesterov"),
    ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
    ("sgd", {"lr": [0.1]}, "lr"),
]


@pytest.mark.parametrize(("name", "values", "field"), BAD,
                         ids=[f"{n}-{next(iter(v))}-{i}" for i, (n, v, _) in enumerate(BAD)])
def test_bad_values_name_the_field(name: str, values: dict[str, Any], field: str) -> None:
    errors = _errors(name, values)
    assert [e["loc"] for e in errors] == [(field,)]
    assert errors[0]["msg"]


def test_range_messages_say_the_range() -> None:
    assert "greater than or equal to 0" in _errors("rmsprop", {"lr": -1})[0]["msg"]
    assert "less than 1" in _errors("rmsprop", {"alpha": 1})[0]["msg"]
    assert "momentum > 0" in _errors("sgd", {"nesterov": True})[0]["msg"]
    assert "dampening == 0" in _errors(
        "sgd", {"nesterov": True, "momentum": 0.5, "dampening": 0.5})[0]["msg"]


GOOD: list[tuple[str, dict[str, Any]]] = [
    ("rmsprop", {"lr": 0, "alpha": 0, "eps": 0, "momentum": 0}),
    ("rmsprop", {"lr": 1, "alpha": 0.999999, "centered": True, "maximize": True}),
    ("adagrad", {"lr_decay": 0.5, "initial_accumulator_value": 0.1, "eps": 1e-10}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-4}),
]


@pytest.mark.parametrize(("name", "values"), GOOD)
def test_good_values(name: str, values: dict[str, Any]) -> None:
    opt = optim.get_optimizer(name)
    hp = opt.hyperparams.model_validate(values)
    for k, v in values.items():
        assert getattr(hp, k) == v
        assert type(getattr(hp, k)) is type(opt.hyperparams.model_fields[k].default)
    assert opt.hyperparams.model_validate_json(hp.model_dump_json()) == hp
    opt.torch_class([torch.zeros(1)], **hp.torch_kwargs())  # torch agrees


def test_frozen_and_hashable() -> None:
    hp = optim.RMSpropHyperparams(lr=0.1)
    with pytest.raises(ValidationError):
        hp.lr = 0.2  # type: ignore[misc]
    assert hash(hp) == hash(optim.RMSpropHyperparams(lr=0.1))


def test_json_strictness() -> None:
    model = optim.RMSpropHyperparams
    assert model.model_validate_json('{"lr": 1, "momentum": 0}').lr == 1.0
    for body in ('{"lr": true}', '{"lr": "0.1"}', '{"centered": "true"}', '{"lr": 1e400}'):
        with pytest.raises(ValidationError):
            model.model_validate_json(body)


def test_presets() -> None:
    """The RMSprop document's common configurations."""
    assert optim.PRESETS == {
        "standard": ("rmsprop", {"lr": 0.001, "alpha": 0.99}),
        "rnn": ("rmsprop", {"lr": 0.0001, "alpha": 0.9}),
        "momentum": ("rmsprop", {"lr": 0.001, "alpha": 0.99, "momentum": 0.9}),
    }
    for name, values in optim.PRESETS.values():
        optim.get_optimizer(name).hyperparams.model_validate(values)
