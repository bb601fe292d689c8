"""Retries against a real server through a fault-injecting transport.

The transport forwards each request to the server and then, for chosen requests, throws
the response away and reports a broken connection: the server has applied the step, the
client does not know. The client must retry with the same Idempotency-Key so that the
session's version shows exactly one application per logical step.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
import torch

from optserve_client import (
    APIConnectionError,
    AsyncClient,
    Client,
    RawRequest,
    RawResponse,
    RetryPolicy,
    Timeout,
    Urllib3Transport,
)
from optserve_client.async_client import ThreadedAsyncTransport
from optserve_client.torch import RemoteRMSprop

FAST = RetryPolicy(initial_delay=0.001, max_delay=0.01)


class DropAfterApply:
    """Forwards to the server, then loses the first ``drops`` responses of each step."""

    def __init__(self, drops: int = 1, inject_503: bool = False) -> None:
        self.inner = Urllib3Transport()
        self.drops = drops
        self.inject_503 = inject_503
        self.seen: dict[str, int] = {}
        self.requests: list[RawRequest] = []
        self.lock = threading.Lock()

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:
        is_step = "/step" in request.url
        key = request.headers.get("Idempotency-Key", "")
        with self.lock:
            self.requests.append(request)
            n = self.seen.get(key, 0) if is_step else 0
            if is_step:
                self.seen[key] = n + 1
        if is_step and self.inject_503 and n == 0:
            # refused before reaching the service, as a proxy would
            return RawResponse(503, {"retry-after": "0", "content-type":
                                     "application/problem+json"},
                               b'{"status":503,"code":"store_unavailable","detail":"x"}')
        resp = self.inner.send(request, timeout)
        if is_step and n - int(self.inject_503) < self.drops:
            raise APIConnectionError("injected: response lost after the server applied it",
                                     request_sent=True)
        return resp

    def close(self) -> None:
        self.inner.close()


def _params() -> dict[str, np.ndarray]:
    return {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
            "b": np.zeros(4, np.float32)}


@pytest.mark.parametrize("drops", [1, 2])
def test_lost_responses_apply_each_step_once(live_server: str, drops: int) -> None:
    faulty = DropAfterApply(drops=drops)
    with Client(live_server, transport=faulty, retry_policy=FAST) as c, \
            Client(live_server) as clean:
        s = c.create_session("rmsprop", {"lr": 0.01}, _params())
        ref = clean.create_session("rmsprop", {"lr": 0.01}, _params())
        rng = np.random.default_rng(0)
        for i in range(10):
            grads = {"w": rng.standard_normal((3, 4)).astype(np.float32),
                     "b": rng.standard_normal(4).astype(np.float32)}
            res = c.step(s.id, grads)
            want = clean.step(ref.id, grads)
            assert res.version == want.version == i + 1
            assert res.attempts == drops + 1 and res.replayed
            for k in grads:
                np.testing.assert_array_equal(res.params[k], want.params[k])
        assert c.get_session(s.id).version == 10
        assert c.stats(s.id)["version"] == 10
        state, meta = c.get_state(s.id)
        assert float(state["state.w.step"]) == 10.0 and meta["version"] == 10
    # every try of one logical step carried the one key
    keys = [r.headers["Idempotency-Key"] for r in faulty.requests if "/step" in r.url]
    assert len(keys) == 10 * (drops + 1) and len(set(keys)) == 10


def test_503_then_lost_response(live_server: str) -> None:
    faulty = DropAfterApply(drops=1, inject_503=True)
    with Client(live_server, transport=faulty, retry_policy=FAST) as c:
        s = c.create_session("sgd", {"lr": 0.5}, {"x": np.array([1.0, 2.0])})
        res = c.step(s.id, {"x": np.array([1.0, 1.0])})
        assert res.attempts == 3 and res.version == 1
        np.testing.assert_array_equal(res.params["x"], [0.5, 1.5])


def test_remote_rmsprop_over_a_lossy_link_matches_torch(live_server: str) -> None:
    torch.manual_seed(0)
    local = torch.nn.Linear(8, 2)
    remote = torch.nn.Linear(8, 2)
    remote.load_state_dict(local.state_dict())
    lopt = torch.optim.RMSprop(local.parameters(), lr=0.05, momentum=0.5)
    client = Client(live_server, transport=DropAfterApply(drops=1), retry_policy=FAST)
    ropt = RemoteRMSprop(remote.named_parameters(), lr=0.05, momentum=0.5, client=client)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    for model, opt in ((local, lopt), (remote, ropt)):
        for _ in range(15):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for p, q in zip(local.parameters(), remote.parameters(), strict=True):
        assert torch.equal(p, q)
    assert ropt.versions == [15]
    assert client.get_session(ropt.session_ids[0]).version == 15


def test_async_client_retries_with_one_key(live_server: str) -> None:
    faulty = DropAfterApply(drops=1)

    async def main() -> list[Any]:
        async with AsyncClient(live_server, transport=ThreadedAsyncTransport(faulty),
                               retry_policy=FAST) as c:
            s = await c.create_session("sgd", {"lr": 1.0}, {"x": np.zeros(3)})
            results = await asyncio.gather(*[
                c.step(s.id, {"x": np.ones(3)}, return_params=False) for _ in range(8)])
            params, version = await c.get_params(s.id)
            assert version == 8
            np.testing.assert_array_equal(params["x"], -8 * np.ones(3))
            return results

    results = asyncio.run(main())
    assert sorted(r.version for r in results) == list(range(1, 9))
    assert all(r.attempts == 2 and r.params is None for r in results)
