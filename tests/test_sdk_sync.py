"""Sync mode through the SDK: a round of contributions becomes one weighted-mean step."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import torch

from optserve_client import AsyncClient, Client
from optserve_client.torch import RemoteRMSprop, RemoteSGD


def test_async_client_round_is_a_weighted_mean(live_server: str) -> None:
    grads = [np.array([1.0, 0.0]), np.array([0.0, 3.0]), np.array([3.0, 3.0])]
    weights = [1.0, 2.0, 3.0]

    async def main() -> list:
        async with AsyncClient(live_server) as c:
            s = await c.create_session("sgd", {"lr": 0.5}, {"x": np.zeros(2)}, mode="sync",
                                       sync={"contributions": 3, "timeout_s": 30})
            assert s.mode == "sync" and s.sync["contributions"] == 3
            return await asyncio.gather(*[
                c.step(s.id, {"x": g}, weight=w, base_version=0)
                for g, w in zip(grads, weights, strict=True)])

    results = asyncio.run(main())
    mean = sum(w * g for g, w in zip(grads, weights, strict=True)) / sum(weights)
    for r in results:
        assert r.version == 1
        np.testing.assert_allclose(r.params["x"], -0.5 * mean, rtol=1e-15)


def test_two_remote_workers_train_in_lockstep(live_server: str) -> None:
    """Two workers, half a batch each, one sync session: the same parameters every step."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randn(64, 1)
    models = [torch.nn.Linear(5, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    first = RemoteRMSprop(models[0].named_parameters(), lr=0.01, url=live_server,
                          mode="sync", sync={"contributions": 2, "timeout_s": 30})
    second = RemoteRMSprop(models[1].named_parameters(), url=live_server,
                           session=first.session_ids)
    history: list[list[torch.Tensor]] = [[], []]

    def work(rank: int, opt: RemoteRMSprop) -> None:
        xb, yb = x[rank::2], y[rank::2]
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(models[rank](xb), yb).backward()
            opt.step()
            history[rank].append(models[rank].weight.detach().clone())

    threads = [threading.Thread(target=work, args=(r, o)) for r, o in
               enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert first.versions == second.versions == [5]
    for a, b in zip(*history, strict=True):
        assert torch.equal(a, b)
    with Client(live_server) as c:
        assert c.get_session(first.session_ids[0]).version == 5


def test_remote_optimizer_weighs_its_contribution(live_server: str) -> None:
    """step(weight=...) on a sync session: the round's gradient is the weighted mean."""
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    first = RemoteSGD([("w", params[0])], lr=1.0, url=live_server, mode="sync",
                      sync={"contributions": 2, "timeout_s": 30})
    second = RemoteSGD([("w", params[1])], url=live_server, session=first.session_ids)

    def work(opt: RemoteSGD, p: torch.nn.Parameter, g: float, weight: float) -> None:
        p.grad = torch.full((2,), g)
        opt.step(weight=weight)

    threads = [threading.Thread(target=work, args=a) for a in
               ((first, params[0], 1.0, 3.0), (second, params[1], 3.0, 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = torch.full((2,), -(1.0 * 3 + 3.0 * 1) / 4)
    assert torch.equal(params[0].detach(), expected)
    assert torch.equal(params[1].detach(), expected)
