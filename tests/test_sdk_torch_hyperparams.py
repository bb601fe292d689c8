"""RemoteOptimizer's hyperparameters: one request per step with an LR scheduler, bitwise equal
to torch; torch's kernel options and argument checks, refused or accepted as torch does."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch

from optserve_client import Client, RawRequest, RawResponse, Timeout, Urllib3Transport
from optserve_client.torch import RemoteAdagrad, RemoteOptimizer, RemoteRMSprop, RemoteSGD


class CountingTransport(Urllib3Transport):
    """The default transport, counting what it sends (method, path)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:
        self.sent.append((request.method, request.url.split("?")[0].rsplit("/", 1)[-1]))
        return super().send(request, timeout)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def regression_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    steps: int) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True).sin()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_one_request_per_step_with_one_cycle_lr(live_server: str) -> None:
    local, remote = mlp(), mlp()
    lopt = torch.optim.RMSprop(local.parameters(), lr=0.01)
    transport = CountingTransport()
    client = Client(live_server, transport=transport)
    ropt = RemoteRMSprop(remote.named_parameters(), lr=0.01, client=client)
    assert transport.sent == [("POST", "sessions")]  # the create, parameters inline
    transport.sent.clear()
    lsched = torch.optim.lr_scheduler.OneCycleLR(lopt, max_lr=0.05, total_steps=20)
    rsched = torch.optim.lr_scheduler.OneCycleLR(ropt, max_lr=0.05, total_steps=20)
    want = regression_loop(local, lopt, lsched, 20)
    got = regression_loop(remote, ropt, rsched, 20)
    assert got == want  # bitwise
    assert transport.sent == [("POST", "step")] * 20  # lr and momentum rode with each step
    doc = client.get_session(ropt.session_ids[0])
    last = {k: lopt.param_groups[0][k] for k in ("lr", "momentum")}
    assert {k: doc.hyperparams[k] for k in last} != last  # the sent ones: the 20th step's
    client.close()


class TinyLSTM(torch.nn.Module):
    """A few hundred parameters: next-value prediction on a fixed family of waves."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(1, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


def lstm_data() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.linspace(0, 6.0, 25)
    phase = torch.linspace(0, 3.0, 16).unsqueeze(1)
    waves = (torch.sin(t + phase) * torch.cos(0.5 * t)).unsqueeze(-1)  # (16, 25, 1)
    return waves[:, :-1], waves[:, 1:]


def test_lstm_200_steps_remote_rmsprop_one_cycle_bitwise(live_server: str) -> None:
    x, y = lstm_data()
    torch.manual_seed(3)
    local = TinyLSTM()
    remote = TinyLSTM()
    remote.load_state_dict(local.state_dict())
    assert sum(p.numel() for p in local.parameters()) < 500
    lopt = torch.optim.RMSprop(local.parameters(), lr=0.01, alpha=0.9)
    ropt = RemoteRMSprop(remote.named_parameters(), lr=0.01, alpha=0.9, url=live_server)
    losses: dict[str, list[float]] = {}
    for name, model, opt in (("local", local, lopt), ("remote", remote, ropt)):
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=200)
        run = []
        for _ in range(200):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            run.append(loss.item())
        losses[name] = run
    assert losses["remote"] == losses["local"]
    assert losses["local"][-1] < losses["local"][0] * 0.5
    assert ropt.versions == [200]
    ropt.close(delete=True)


# --------------------------------------------------------------------------- torch's checks

PAIRS = {"rmsprop": (torch.optim.RMSprop, RemoteRMSprop),
         "adagrad": (torch.optim.Adagrad, RemoteAdagrad),
         "sgd": (torch.optim.SGD, RemoteSGD)}


def outcome(fn: Any) -> tuple[type, str] | None:
    """(exception class, message) of a call, or None when it went through."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except (TypeError, ValueError, RuntimeError) as exc:
        return type(exc), str(exc)
    return None


TORCH_REFUSES = [
    ("rmsprop", {"fused": True}), ("rmsprop", {"fused": None}), ("rmsprop", {"fused": False}),
    ("adagrad", {"capturable": False}), ("sgd", {"capturable": True}),
    ("adagrad", {"fused": True, "foreach": True}), ("sgd", {"fused": True, "foreach": True}),
    ("rmsprop", {"lr": torch.tensor([0.1, 0.2])}), ("sgd", {"lr": torch.tensor([0.1, 0.2])}),
]


@pytest.mark.parametrize(("opt", "kw"), TORCH_REFUSES, ids=str)
def test_refused_with_torchs_own_words(opt: str, kw: dict) -> None:
    local_cls, remote_cls = PAIRS[opt]
    p = torch.nn.Parameter(torch.zeros(2))
    want = outcome(lambda: local_cls([p], **kw))
    assert want is not None
    # no server: a refusal comes before any request
    got = outcome(lambda: remote_cls([p], url="http://127.0.0.1:9", **kw))
    assert got == (want[0], want[1].replace(local_cls.__name__ + ".", remote_cls.__name__ + "."))


@pytest.mark.parametrize(("opt", "kw"), [
    ("rmsprop", {"capturable": True}), ("adagrad", {"differentiable": True}),
    ("rmsprop", {"differentiable": True}),
], ids=str)
def test_options_a_remote_step_cannot_honour_are_refused(opt: str, kw: dict) -> None:
    # torch takes these, then needs a CUDA graph or autograd through its step
    local_cls, remote_cls = PAIRS[opt]
    p = torch.nn.Parameter(torch.zeros(2))
    assert outcome(lambda: local_cls([p], **kw)) is None
    got = outcome(lambda: remote_cls([p], url="http://127.0.0.1:9", **kw))
    assert got is not None and got[0] is ValueError and next(iter(kw)) in got[1]


def test_parameters_twice_refused(live_server: str) -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.ones(2))
    across = [{"params": [a]}, {"params": [a, b]}]
    want = outcome(lambda: torch.optim.RMSprop(across))
    assert want == (ValueError, "some parameters appear in more than one parameter group")
    assert outcome(lambda: RemoteRMSprop(across, url=live_server)) == want
    # torch warns (then steps it twice); a session keeps one state per name: refused
    with pytest.warns(UserWarning) as record:
        torch.optim.RMSprop([a, b, a])
    said = str(record[0].message).split(";")[0]
    with pytest.raises(ValueError, match="^" + re.escape(said) + ";"):
        RemoteRMSprop([a, b, a], url=live_server)


def test_accepted_kernel_options_are_kept_and_change_nothing(live_server: str) -> None:
    for opt, kw in [("rmsprop", {"foreach": True, "capturable": False,
                                 "differentiable": False}),
                    ("adagrad", {"fused": True}), ("sgd", {"foreach": False, "fused": None})]:
        local_cls, remote_cls = PAIRS[opt]
        local, remote = mlp(), mlp()
        lopt = local_cls(local.named_parameters(), lr=0.05, **kw)
        ropt = remote_cls(remote.named_parameters(), lr=0.05, url=live_server, **kw)
        for o in (lopt, ropt):
            o.zero_grad()
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        for m, o in ((local, lopt), (remote, ropt)):
            m(x).square().mean().backward()
            o.step()
        for pl, pr in zip(local.parameters(), remote.parameters(), strict=True):
            # foreach/fused kernels may round differently: torch's own paths agree closely
            torch.testing.assert_close(pr, pl, rtol=1e-6, atol=1e-7)
        assert ropt.state_dict()["param_groups"] == lopt.state_dict()["param_groups"]
        ropt.close(delete=True)


def test_tensor_lr_in_client_and_remote_optimizer(live_server: str) -> None:
    g = torch.tensor([0.5, -0.3, 0.2])
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = torch.optim.RMSprop([w], lr=torch.tensor(0.02))
    want = []
    for lr in (None, torch.tensor(0.05)):
        if lr is not None:
            opt.param_groups[0]["lr"] = lr
        w.grad = g.clone()
        opt.step()
        want.append(w.detach().clone())
    with Client(live_server) as c:
        s = c.create_session("rmsprop", {"lr": torch.tensor(0.02)},
                             {"w": torch.tensor([1.0, -2.0, 0.5])})
        assert torch.equal(c.step(s.id, {"w": g}).params["w"], want[0])
        r = c.step(s.id, {"w": g}, hyperparams={"lr": torch.tensor(0.05)})
        assert torch.equal(r.params["w"], want[1])
        with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element$"):
            c.step(s.id, {"w": g}, hyperparams={"lr": torch.tensor([0.1, 0.2])})
        with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element$"):
            c.create_session("rmsprop", {"lr": torch.tensor([0.1, 0.2])})
        assert c.get_session(s.id).version == 2
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    ropt = RemoteOptimizer([p], "rmsprop", lr=torch.tensor(0.02), url=live_server)
    p.grad = g.clone()
    ropt.step()
    assert torch.equal(p.detach(), want[0])
    ropt.close(delete=True)
