"""Clients pickle and deep-copy (Ray tasks and actors, multiprocessing): the copy keeps the
configuration, opens its own connections, and steps against the real server."""

from __future__ import annotations

import asyncio
import copy
import pickle
from typing import Any

import numpy as np
import torch

from optserve_client import (
    APIConnectionError,
    AsyncClient,
    Client,
    RawRequest,
    RawResponse,
    RetryPolicy,
    Timeout,
)
from optserve_client._transport import Urllib3Transport

QUICK = RetryPolicy(initial_delay=0.01, max_delay=0.02)


class LosesFirstResponses:
    """A picklable transport that sends every request but loses the first ``lose``
    responses (the step is applied, the client sees a broken connection), and records the
    headers it sent."""

    def __init__(self, lose: int) -> None:
        self.inner = Urllib3Transport(max_connections=2)
        self.lose = lose
        self.sent: list[dict[str, str]] = []

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:
        self.sent.append(dict(request.headers))
        response = self.inner.send(request, timeout)
        if self.lose > 0:
            self.lose -= 1
            raise APIConnectionError("response lost", request_sent=True)
        return response

    def close(self) -> None:
        self.inner.close()


def torch_rmsprop(x0: np.ndarray, grads: list[np.ndarray], lr: float) -> np.ndarray:
    p = torch.nn.Parameter(torch.from_numpy(x0.copy()))
    opt = torch.optim.RMSprop([p], lr=lr)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    return p.detach().numpy()


def config(c: Any) -> tuple:
    return (type(c), c.base_url, c.api_key, c.timeout, c.retry_policy, c.default_headers,
            c.format)


def test_pickled_client_keeps_its_configuration_and_steps(live_server: str) -> None:
    x0 = np.linspace(-1, 1, 6).astype(np.float32)
    g = np.arange(6, dtype=np.float32) / 3
    original = Client(live_server, api_key=None, timeout=(5.0, 30.0), max_retries=7,
                      format="json", default_headers={"X-Run": "pickle"}, max_connections=4)
    with original:
        s = original.create_session("rmsprop", {"lr": 0.01}, {"x": x0})
        blob = pickle.dumps(original)
    # the original's pool is closed: the copy must not share it
    copied = pickle.loads(blob)
    assert config(copied) == config(original)
    assert copied.max_retries == 7 and copied._transport is not original._transport
    assert copied._transport._settings == {"max_connections": 4}
    with copied:
        r = copied.step(s.id, {"x": g})
        assert r.version == 1
        np.testing.assert_array_equal(r.params["x"], torch_rmsprop(x0, [g], 0.01))
        twice = pickle.loads(pickle.dumps(copied))  # a copy of a copy
        assert twice.step(s.id, {"x": g}).version == 2
        twice.close()
        copied.delete_session(s.id)


def test_deepcopy_and_option_copies(live_server: str) -> None:
    with Client(live_server, max_retries=2) as c:
        deep = copy.deepcopy(c)
        shallow = copy.copy(c)
        fast = c.with_options(format="json")
        assert config(deep) == config(c) and deep._transport is not c._transport
        assert deep._owns_transport
        # a shallow copy is `with_options()`: it shares the pool and never closes it
        assert shallow._transport is c._transport and not shallow._owns_transport
        # an option copy (not an owner) pickles into an owner of a fresh pool
        loaded = pickle.loads(pickle.dumps(fast))
        assert loaded.format == "json" and loaded._owns_transport
        assert loaded._transport is not c._transport
        s = deep.create_session("sgd", {"lr": 0.5}, {"x": np.ones(3)})
        for client in (deep, shallow, loaded):
            client.step(s.id, {"x": np.ones(3)})
        np.testing.assert_array_equal(c.get_params(s.id)[0]["x"], np.full(3, -0.5))
        shallow.close()  # not the owner: c's pool stays usable
        assert c.get_params(s.id)[1] == 3
        deep.delete_session(s.id)
        deep.close()
        loaded.close()


def test_pickled_client_retries_a_lost_step_once(live_server: str) -> None:
    """The retry policy, the headers and the one-key-per-step rule survive the pickle: a
    step whose response is lost is resent with the same Idempotency-Key, applied once."""
    x0 = np.array([0.5, -0.25], np.float32)
    g = np.array([1.0, 2.0], np.float32)
    c = Client(live_server, retry_policy=QUICK, max_retries=3,
               default_headers={"X-Run": "lost"}, transport=LosesFirstResponses(lose=0))
    s = c.create_session("rmsprop", {"lr": 0.1}, {"x": x0})
    c._transport.sent.clear()
    c._transport.lose = 1
    copied = pickle.loads(pickle.dumps(c))
    assert copied.retry_policy == c.retry_policy and copied._transport.lose == 1
    r = copied.step(s.id, {"x": g})
    sent = copied._transport.sent
    assert len(sent) == 2 and sent[0]["X-Run"] == "lost"
    assert sent[0]["Idempotency-Key"] == sent[1]["Idempotency-Key"]
    assert r.version == 1
    np.testing.assert_array_equal(r.params["x"], torch_rmsprop(x0, [g], 0.1))
    assert c._transport.sent == []  # the original's transport saw none of it
    copied.delete_session(s.id)
    copied.close()


def test_async_client_pickles_and_deep_copies(live_server: str) -> None:
    x0 = np.zeros(4, np.float32)
    g = np.full(4, 0.5, np.float32)
    original = AsyncClient(live_server, timeout=12.0, max_retries=1, format="json")
    copies = [pickle.loads(pickle.dumps(original)), copy.deepcopy(original)]
    for c in copies:
        assert config(c) == config(original)
        assert c._transport is not original._transport
        assert c._transport._executor is not original._transport._executor

    async def main() -> list[np.ndarray]:
        s = await copies[0].create_session("rmsprop", {"lr": 0.01}, {"x": x0})
        out = []
        for c in copies:
            out.append((await c.step(s.id, {"x": g})).params["x"])
            await c.close()
        await original.close()
        return out

    first, second = asyncio.run(main())
    np.testing.assert_array_equal(first, torch_rmsprop(x0, [g], 0.01))
    np.testing.assert_array_equal(second, torch_rmsprop(x0, [g, g], 0.01))
