"""RemoteRMSprop/RemoteOptimizer against a real server: the same training as torch.optim.

A small MLP on scikit-learn's bundled digits (no download) is trained twice from the same
initial weights on the same batches: once with the local torch optimizer, once through the
service. On the plain server path the loss sequences are bitwise equal; on the fused
(torch.compile) path within 1e-5 relative.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from optserve_client import Client, StaleGradientError
from optserve_client.torch import RemoteAdagrad, RemoteOptimizer, RemoteRMSprop, RemoteSGD

STEPS = 100
BATCH = 128


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    # a test extra: skipped in .ci/lowest.sh's environment, which has the server's only
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 10))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data: tuple[Any, Any],
          steps: int = STEPS, scheduler: Any = None, start: int = 0) -> list[float]:
    """A plain training loop; the batches depend only on the step number."""
    x, y = data
    losses = []
    for i in range(start, start + steps):
        lo = (i * BATCH) % (len(x) - BATCH)
        xb, yb = x[lo:lo + BATCH], y[lo:lo + BATCH]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def run_pair(data: Any, local_cls: Callable[..., torch.optim.Optimizer],
             remote_cls: Callable[..., RemoteOptimizer], url: str, steps: int = STEPS,
             **hp: Any) -> tuple[list[float], list[float], torch.nn.Module, RemoteOptimizer]:
    local, remote = make_model(), make_model()
    lopt = local_cls(local.parameters(), **hp)
    ropt = remote_cls(remote.named_parameters(), url=url, **hp)
    return train(local, lopt, data, steps), train(remote, ropt, data, steps), remote, ropt


CONFIGS = {
    "plain": {"lr": 0.01},
    "centered+momentum": {"lr": 0.005, "alpha": 0.9, "momentum": 0.9, "centered": True,
                          "weight_decay": 1e-4},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_remote_rmsprop_matches_torch_bitwise(live_server: str, digits: Any, config: str
                                              ) -> None:
    want, got, _, ropt = run_pair(digits, torch.optim.RMSprop, RemoteRMSprop, live_server,
                                  **CONFIGS[config])
    assert got == want  # bitwise: the plain path runs torch's own arithmetic
    assert want[-1] < want[0] * 0.5
    assert ropt.versions == [STEPS]


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_remote_rmsprop_fused_within_1e5(fused_server: str, digits: Any, config: str) -> None:
    want, got, _, _ = run_pair(digits, torch.optim.RMSprop, RemoteRMSprop, fused_server,
                               **CONFIGS[config])
    for w, g in zip(want, got, strict=True):
        assert abs(g - w) <= 1e-5 * abs(w), (w, g)


@pytest.mark.parametrize(("local_cls", "remote_cls", "hp"), [
    (torch.optim.Adagrad, RemoteAdagrad, {"lr": 0.05, "lr_decay": 1e-3}),
    (torch.optim.SGD, RemoteSGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
])
def test_other_optimizers_match_torch(live_server: str, digits: Any, local_cls: Any,
                                      remote_cls: Any, hp: dict) -> None:
    want, got, _, _ = run_pair(digits, local_cls, remote_cls, live_server, steps=30, **hp)
    assert got == want


def test_lr_scheduler_changes_remote_run_like_local(live_server: str, digits: Any) -> None:
    local, remote = make_model(), make_model()
    lopt = torch.optim.RMSprop(local.parameters(), lr=0.02)
    ropt = RemoteRMSprop(remote.named_parameters(), lr=0.02, url=live_server)
    lsched = torch.optim.lr_scheduler.StepLR(lopt, step_size=10, gamma=0.5)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, step_size=10, gamma=0.5)
    want = train(local, lopt, digits, 40, lsched)
    got = train(remote, ropt, digits, 40, rsched)
    assert got == want
    with Client(live_server) as c:
        assert c.get_session(ropt.session_ids[0]).hyperparams["lr"] == 0.02 * 0.5 ** 3
    # a hand-set lr takes effect on the next step, as in torch
    for opt in (lopt, ropt):
        opt.param_groups[0]["lr"] = 0.001
    assert train(remote, ropt, digits, 5, start=40) == train(local, lopt, digits, 5, start=40)


def test_state_dict_round_trips_in_torch_format(live_server: str, digits: Any) -> None:
    hp = {"lr": 0.01, "momentum": 0.5, "centered": True}
    local, remote = make_model(), make_model()
    lopt = torch.optim.RMSprop(local.named_parameters(), **hp)
    ropt = RemoteRMSprop(remote.named_parameters(), url=live_server, **hp)
    train(local, lopt, digits, 10)
    train(remote, ropt, digits, 10)
    lsd, rsd = lopt.state_dict(), ropt.state_dict()
    assert rsd["param_groups"] == lsd["param_groups"]
    assert rsd["state"].keys() == lsd["state"].keys()
    for idx, entry in lsd["state"].items():
        assert rsd["state"][idx].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(rsd["state"][idx][key], value), (idx, key)
    # the remote state_dict loads into a local torch optimizer, which continues identically
    clone = copy.deepcopy(remote)
    copt = torch.optim.RMSprop(clone.named_parameters(), **hp)
    copt.load_state_dict(rsd)
    want = train(local, lopt, digits, 10, start=10)
    assert train(clone, copt, digits, 10, start=10) == want
    # and a local state_dict loads into a fresh remote optimizer (a new session)
    fresh = copy.deepcopy(local)
    fopt = RemoteRMSprop(fresh.named_parameters(), url=live_server, lr=0.5)
    fopt.load_state_dict(lopt.state_dict())
    assert fopt.param_groups[0]["lr"] == hp["lr"]
    assert train(fresh, fopt, digits, 10, start=20) == train(local, lopt, digits, 10, start=20)


def test_plain_tensors_are_named_by_index_and_groups_get_sessions(live_server: str,
                                                                  digits: Any) -> None:
    local, remote = make_model(), make_model()

    def groups(m: torch.nn.Module) -> list[dict]:
        return [{"params": list(m[0].parameters()), "lr": 0.02},
                {"params": list(m[2].parameters()), "lr": 0.005, "momentum": 0.9}]

    lopt = torch.optim.RMSprop(groups(local))
    ropt = RemoteRMSprop(groups(remote), url=live_server)
    assert train(remote, ropt, digits, 20) == train(local, lopt, digits, 20)
    ids = ropt.session_ids
    assert len(set(ids)) == 2
    with Client(live_server) as c:
        assert sorted(c.get_session(ids[0]).tensors) == ["0", "1"]
        assert sorted(c.get_session(ids[1]).tensors) == ["2", "3"]
        assert c.get_session(ids[1]).hyperparams["momentum"] == 0.9
    rsd, lsd = ropt.state_dict(), lopt.state_dict()
    assert rsd["param_groups"] == lsd["param_groups"]
    for idx in lsd["state"]:
        for key in lsd["state"][idx]:
            assert torch.equal(rsd["state"][idx][key], lsd["state"][idx][key])
    ropt.close(delete=True)
    with Client(live_server) as c:
        assert ids[0] not in {s.id for s in c.list_sessions()}


def test_second_worker_attaches_to_session(live_server: str, digits: Any) -> None:
    a, b = make_model(0), make_model(1)
    opt_a = RemoteRMSprop(a.named_parameters(), lr=0.01, url=live_server, max_staleness=0)
    opt_b = RemoteRMSprop(b.named_parameters(), url=live_server, session=opt_a.session_ids[0],
                          on_stale="skip")
    assert opt_b.param_groups[0]["lr"] == 0.01  # the session's hyperparameters win
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # b starts from the session's parameters
    train(a, opt_a, digits, 3)
    train(b, opt_b, digits, 3)  # b is 3 versions behind on its first push: skipped
    assert opt_b.versions == [3 + 2]
    b_params = dict(b.named_parameters())
    with Client(live_server) as c:
        params, version = c.get_params(opt_a.session_ids[0], as_="torch")
    assert version == 5
    for name, value in params.items():
        assert torch.equal(b_params[name], value)
    with pytest.raises(StaleGradientError) as exc:
        train(a, opt_a, digits, 1)  # a is behind b now
    assert exc.value.current_version == 5


def test_grad_dtype_bfloat16_halves_the_upload(live_server: str, digits: Any) -> None:
    want, _, _, _ = run_pair(digits, torch.optim.RMSprop, RemoteRMSprop, live_server,
                             steps=20, lr=0.01)
    remote = make_model()
    ropt = RemoteRMSprop(remote.named_parameters(), url=live_server, lr=0.01,
                         grad_dtype="bfloat16")
    got = train(remote, ropt, digits, 20)
    assert got != want  # really sent in bfloat16
    assert got[-1] == pytest.approx(want[-1], rel=0.05)


def test_closure_returns_loss(live_server: str, digits: Any) -> None:
    model = make_model()
    opt = RemoteRMSprop(model.parameters(), url=live_server)
    x, y = digits

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[:64]), y[:64])
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert isinstance(first, torch.Tensor) and second.item() < first.item()
