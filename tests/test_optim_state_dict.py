"""torch state_dict conversion: a run moves torch -> optserve -> torch and stays bitwise equal."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from optserve import optim
from optserve.optim import fused as fused_mod
from optserve_client.state import split_state

SHAPES: dict[str, tuple[int, ...]] = {"w": (3, 4), "b": (5,), "idle": (2,)}
# Every structural flag on: the fused variants share kernels with the conformance tests.
HP: dict[str, dict[str, Any]] = {
    "rmsprop": {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.1,
                "maximize": True},
    "adagrad": {"lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.1,
                "maximize": True},
    "sgd": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "maximize": True},
}


def _grads(seed: int, steps: int) -> list[dict[str, Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, Tensor | None]] = []
    for _ in range(steps):
        g: dict[str, Tensor | None] = {
            n: torch.randn(s, generator=gen) * 10.0 ** torch.randint(-3, 3, s, generator=gen)
            for n, s in SHAPES.items()
        }
        g["idle"] = None  # never gets a gradient: tests state for stateless params
        out.append(g)
    return out


def _export(params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]
            ) -> dict[str, Tensor]:
    """The service's state export form: ``param.<name>`` and ``state.<name>.<key>``."""
    out = {f"param.{n}": t for n, t in params.items()}
    out.update({f"state.{n}.{k}": t for n, st in state.items() for k, t in st.items()})
    return out


def _meta(name: str, hp: Any) -> dict[str, Any]:
    return {"optimizer": name, "hyperparams": hp.model_dump()}


def _torch_steps(topt: torch.optim.Optimizer, ps: dict[str, torch.nn.Parameter],
                 grads: list[dict[str, Tensor | None]]) -> None:
    for g in grads:
        for n, p in ps.items():
            p.grad = g[n]
        topt.step()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", list(HP))
def test_torch_optserve_torch_round_trip(name: str, fused: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: torch runs 30 steps. Candidate: torch 10, optserve 10, torch 10 again."""
    monkeypatch.setattr(fused_mod, "FUSED_MIN_NUMEL", 2)  # fuse even our tiny tensors
    opt = optim.get_optimizer(name)
    hp = HP[name]
    names = list(SHAPES)
    gen = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    grads = _grads(1, 30)

    ref = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    ref_opt = opt.torch_class([ref[n] for n in names], **hp)
    _torch_steps(ref_opt, ref, grads)

    a = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    a_opt = opt.torch_class([a[n] for n in names], **hp)
    _torch_steps(a_opt, a, grads[:10])

    tensors, meta = optim.from_torch_state_dict(a_opt.state_dict(), a, name)
    model = opt.hyperparams.model_validate(meta["hyperparams"])
    _, state = split_state(tensors)
    assert model == opt.hyperparams.model_validate(hp)
    params = {n: p.detach().clone() for n, p in a.items()}
    for g in grads[10:20]:
        optim.step(opt, params, g, state, model, fused=fused)

    sd = optim.to_torch_state_dict(_export(params, state), _meta(name, model), names,
                                   param_names=False)
    b = {n: torch.nn.Parameter(params[n].clone()) for n in names}
    b_opt = opt.torch_class([b[n] for n in names], **hp)
    b_opt.load_state_dict(sd)
    _torch_steps(b_opt, b, grads[20:])

    tol: dict[str, float] = {"rtol": 1e-5, "atol": 1e-6} if fused else {"rtol": 0, "atol": 0}
    for n in names:
        torch.testing.assert_close(b[n].detach(), ref[n].detach(), **tol)
    for n in names:
        st_b, st_ref = b_opt.state[b[n]], ref_opt.state[ref[n]]
        assert st_b.keys() == st_ref.keys(), n
        for k in st_ref:
            torch.testing.assert_close(st_b[k], st_ref[k], **(tol if k != "step" else {
                "rtol": 0, "atol": 0}))


@pytest.mark.parametrize("name", list(HP))
def test_state_dict_equals_torchs(name: str) -> None:
    """Same keys, group entries and tensors as the torch optimizer's own state_dict()."""
    opt = optim.get_optimizer(name)
    hp = HP[name]
    names = list(SHAPES)
    gen = torch.Generator().manual_seed(2)
    init = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    grads = _grads(3, 5)

    ps = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    topt = opt.torch_class([ps[n] for n in names], **hp)
    _torch_steps(topt, ps, grads)
    expected = topt.state_dict()

    params = {n: t.clone() for n, t in init.items()}
    state: dict[str, dict[str, Tensor]] = {}
    model = opt.hyperparams.model_validate(hp)
    for g in grads:
        optim.step(opt, params, g, state, model)
    got = optim.to_torch_state_dict(_export(params, state), _meta(name, model), names,
                                    param_names=False)

    assert got["param_groups"] == expected["param_groups"]
    assert list(got["param_groups"][0]) == list(expected["param_groups"][0])
    assert got["state"].keys() == expected["state"].keys()
    for i, st in expected["state"].items():
        assert list(got["state"][i]) == list(st)  # same keys, same order
        for k, t in st.items():
            assert torch.equal(got["state"][i][k], t), (i, k)
            assert got["state"][i][k].dtype == t.dtype


def test_group_keys_cover_torch_flags() -> None:
    opt = optim.get_optimizer("rmsprop")
    sd = optim.to_torch_state_dict({}, _meta("rmsprop", opt.hyperparams()), ["a"])
    group = sd["param_groups"][0]
    for key in ("foreach", "capturable", "differentiable", "maximize", "centered", "params"):
        assert key in group
    assert sd["state"] == {} and group["params"] == [0]


def test_adagrad_needs_params_for_stateless() -> None:
    opt = optim.get_optimizer("adagrad")
    with pytest.raises(ValueError, match="params="):
        optim.to_torch_state_dict({}, _meta("adagrad", opt.hyperparams()), ["a"])
    sd = optim.to_torch_state_dict({}, _meta("adagrad", opt.hyperparams(
        initial_accumulator_value=0.5)), ["a"], params={"a": torch.zeros(3)})
    assert torch.equal(sd["state"][0]["sum"], torch.full((3,), 0.5))
    assert torch.equal(sd["state"][0]["step"], torch.tensor(0.0))


def test_from_torch_rejects_mismatches() -> None:
    opt = optim.get_optimizer("rmsprop")
    ps = [torch.nn.Parameter(torch.ones(2)) for _ in range(2)]
    sd = torch.optim.RMSprop(ps).state_dict()
    named = {"a": ps[0], "b": ps[1]}
    with pytest.raises(ValueError, match="names"):
        optim.from_torch_state_dict(sd, {"only_one": ps[0]})
    two_groups = torch.optim.RMSprop([{"params": [ps[0]], "lr": 0.1}, {"params": [ps[1]]}])
    with pytest.raises(ValueError, match="different hyperparameters"):
        optim.from_torch_state_dict(two_groups.state_dict(), named)
    same_groups = torch.optim.RMSprop([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=0.1)
    tensors, meta = optim.from_torch_state_dict(same_groups.state_dict(), named)
    hp, (_, state) = opt.hyperparams.model_validate(meta["hyperparams"]), split_state(tensors)
    assert hp.lr == 0.1 and state == {}
    with pytest.raises(ValueError, match="unknown state entry"):
        optim.from_torch_state_dict(
            {"param_groups": sd["param_groups"], "state": {0: {"exp_avg": ps[0]}}}, named)
