"""State helpers: a session as a torch optimizer state_dict, and a session from a local one."""

from __future__ import annotations

import pytest
import torch

from optserve_client import (
    Client,
    export_torch_state_dict,
    from_torch_state_dict,
    session_from_torch,
    to_torch_state_dict,
)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_pure_conversion_round_trip() -> None:
    model = _model()
    opt = torch.optim.RMSprop(model.named_parameters(), lr=0.02, momentum=0.9, centered=True)
    _train(model, opt, 3, 0)
    sd = opt.state_dict()
    tensors, meta = from_torch_state_dict(sd, model.named_parameters())
    assert meta == {"optimizer": "rmsprop", "version": 0, "hyperparams": {
        "lr": 0.02, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0, "momentum": 0.9,
        "centered": True, "maximize": False}}
    assert set(tensors) >= {"param.0.weight", "state.0.weight.step",
                            "state.2.bias.grad_avg", "state.2.bias.momentum_buffer"}
    assert tensors["state.0.weight.step"].shape == ()
    back = to_torch_state_dict(tensors, meta, [n for n, _ in model.named_parameters()])
    assert back["param_groups"] == sd["param_groups"]
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][idx][key], value)


def test_groups_need_a_choice_when_hyperparams_differ() -> None:
    model = _model()
    opt = torch.optim.RMSprop([{"params": model[0].parameters(), "lr": 0.1},
                               {"params": model[2].parameters()}])
    with pytest.raises(ValueError, match="group="):
        from_torch_state_dict(opt.state_dict(), model.parameters())
    tensors, meta = from_torch_state_dict(opt.state_dict(), model.parameters(), group=1)
    assert sorted(tensors) == ["param.2", "param.3"] and meta["hyperparams"]["lr"] == 0.01


@pytest.mark.parametrize(("cls", "hp"), [
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
])
def test_session_from_local_optimizer_continues_bitwise(live_server: str, cls: type,
                                                        hp: dict) -> None:
    model = _model()
    opt = cls(model.named_parameters(), **hp)
    _train(model, opt, 5, 0)
    with Client(live_server) as c:
        session = session_from_torch(c, opt, model.named_parameters(), name="resumed")
        assert session.version == 0 and session.name == "resumed"
        # the same 5 next steps, locally and through the session
        g = torch.Generator().manual_seed(1)
        for i in range(5):
            x = torch.randn(16, 6, generator=g)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            res = c.step(session.id, grads)
            opt.step()
            assert res.version == i + 1
            for n, p in model.named_parameters():
                assert torch.equal(res.params[n], p.detach()), n
        # and the session exports back into torch's format, equal to the local optimizer's
        sd, params = export_torch_state_dict(c, session.id)
        names = sd["param_groups"][0]["param_names"]
        local = opt.state_dict()
        assert names == local["param_groups"][0]["param_names"]
        for idx, entry in local["state"].items():
            for key, value in entry.items():
                assert torch.equal(sd["state"][idx][key], value), (idx, key)
        fresh = cls([params[n] for n in names])
        fresh.load_state_dict(sd)
        c.delete_session(session.id)
