"""The retry policy with a scripted transport: what is retried, how long it waits, and that
every try of one call is the same request (one Idempotency-Key)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

import numpy as np
import pytest

from optserve_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Client,
    InternalServerError,
    QuotaExceededError,
    RateLimitError,
    RawRequest,
    RawResponse,
    RetryPolicy,
    ServiceUnavailableError,
    SessionBusyError,
    Timeout,
    wire,
)
from optserve_client._base import parse_retry_after

Reply = RawResponse | BaseException


def ok_step(version: int = 1) -> RawResponse:
    body = wire.encode_safetensors({"x": np.zeros(2, np.float32)})
    return RawResponse(200, {"content-type": wire.SAFETENSORS_TYPE,
                             "x-optserve-version": str(version), "etag": f'"{version}"'},
                       body)


def problem(status: int, code: str, **headers: str) -> RawResponse:
    body = json.dumps({"type": "x", "title": "t", "status": status, "detail": "d",
                       "code": code}).encode()
    return RawResponse(status, {"content-type": "application/problem+json", **headers}, body)


SESSION_DOC = RawResponse(201, {"content-type": "application/json"}, json.dumps({
    "id": "s1", "name": None, "optimizer": "rmsprop", "hyperparams": {}, "mode": "async",
    "max_staleness": None, "sync": None, "version": None, "tensors": {},
    "created_at": "t", "updated_at": "t"}).encode())


class Scripted:
    """Answers requests from a list: a RawResponse, or an exception to raise."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[RawRequest] = []

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self) -> None:
        pass


def client(replies: list[Reply], **kw: Any) -> tuple[Client, Scripted, list[float]]:
    transport = Scripted(replies)
    c = Client("http://optserve.test", transport=transport, **kw)
    sleeps: list[float] = []
    c._sleep = sleeps.append
    return c, transport, sleeps


def lost() -> APIConnectionError:
    return APIConnectionError("reset", request_sent=None)


def test_step_retries_lost_responses_with_one_key() -> None:
    c, t, sleeps = client([lost(), APITimeoutError(request_sent=True), ok_step(7)])
    res = c.step("s1", {"x": np.ones(2, np.float32)})
    assert res.version == 7 and res.attempts == 3
    keys = {r.headers["Idempotency-Key"] for r in t.requests}
    assert len(keys) == 1 and next(iter(keys)).startswith("optserve-")
    assert len({id(r) for r in t.requests}) == 1  # the very same prepared request
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0


def test_each_logical_step_gets_its_own_key_or_the_callers() -> None:
    c, t, _ = client([ok_step(), ok_step(2), ok_step(3)])
    c.step("s1", {"x": np.ones(2)})
    c.step("s1", {"x": np.ones(2)})
    c.step("s1", {"x": np.ones(2)}, idempotency_key="mine")
    keys = [r.headers["Idempotency-Key"] for r in t.requests]
    assert len(set(keys)) == 3 and keys[2] == "mine"


@pytest.mark.parametrize("status", [429, 503, 502, 504, 408])
def test_retryable_statuses_honour_retry_after(status: int) -> None:
    c, _t, sleeps = client([problem(status, "x", **{"retry-after": "2"}), ok_step()])
    assert c.step("s1", {"x": np.ones(2)}).attempts == 2
    assert 2.0 <= sleeps[0] <= 2.2  # at least what the server asked, jitter on top


def test_retry_after_http_date_and_ms() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after({"retry-after": when}) <= 30  # type: ignore[operator]
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_a_long_retry_after_is_not_waited_out() -> None:
    c, _t, sleeps = client([problem(503, "store_unavailable", **{"retry-after": "600"})])
    with pytest.raises(ServiceUnavailableError) as exc:
        c.step("s1", {"x": np.ones(2)})
    assert exc.value.retry_after == 600 and sleeps == []


def test_gives_up_after_max_retries_with_the_last_error() -> None:
    c, t, sleeps = client([problem(503, "session_busy")] * 4, max_retries=3)
    with pytest.raises(SessionBusyError):
        c.step("s1", {"x": np.ones(2)})
    assert len(t.requests) == 4
    for slept, base in zip(sleeps, [0.5, 1.0, 2.0], strict=True):
        assert 0.5 * base <= slept <= base


def test_backoff_is_capped_and_jittered() -> None:
    p = RetryPolicy(initial_delay=0.5, max_delay=8.0)
    assert p.backoff(10, rng=lambda: 1.0) == 8.0
    assert p.backoff(10, rng=lambda: 0.0) == 4.0
    assert p.backoff(0, rng=lambda: 0.0) == 0.25
    assert p.backoff(0, retry_after=3.0, rng=lambda: 1.0) == pytest.approx(3.3)


def test_no_retry_on_500_or_client_errors() -> None:
    for reply in (problem(500, "boom"), problem(409, "stale_gradient")):
        c, t, sleeps = client([reply, ok_step()])
        with pytest.raises(InternalServerError if reply.status == 500 else Exception):
            c.step("s1", {"x": np.ones(2)})
        assert len(t.requests) == 1 and sleeps == []


def test_quota_exceeded_is_not_retried() -> None:
    """Waiting does not lift a quota: a 429 quota_exceeded is raised at once."""
    c, t, sleeps = client([problem(429, "quota_exceeded"), ok_step()])
    with pytest.raises(QuotaExceededError) as info:
        c.step("s1", {"x": np.ones(2)})
    assert isinstance(info.value, RateLimitError)
    assert len(t.requests) == 1 and sleeps == []


def test_max_retries_zero() -> None:
    c, _t, _ = client([problem(429, "rate_limited"), ok_step()], max_retries=0)
    with pytest.raises(RateLimitError):
        c.step("s1", {"x": np.ones(2)})
    c2 = Client("http://x", transport=Scripted([problem(429, "x"), ok_step()]))
    c2._sleep = lambda s: None
    assert c2.with_options(max_retries=0).max_retries == 0 and c2.max_retries == 3


def test_create_is_resent_with_one_idempotency_key() -> None:
    """The server dedupes creates by Idempotency-Key, so an ambiguous failure is retried."""
    c, t, _ = client([lost(), SESSION_DOC])
    assert c.create_session().id == "s1"
    assert len(t.requests) == 2
    keys = {r.headers["Idempotency-Key"] for r in t.requests}
    assert len(keys) == 1 and next(iter(keys)).startswith("optserve-create-")
    c, t, _ = client([APIConnectionError("refused", request_sent=False),
                      problem(503, "store_unavailable", **{"retry-after": "0"}), SESSION_DOC])
    assert c.create_session().id == "s1"
    assert len(t.requests) == 3


def test_delete_after_an_ambiguous_failure_treats_404_as_done() -> None:
    c, t, _ = client([lost(), problem(404, "session_not_found")])
    c.delete_session("s1")
    assert len(t.requests) == 2
    c, _t, _ = client([problem(404, "session_not_found")])
    with pytest.raises(Exception, match="404"):
        c.delete_session("s1")


def test_probes_do_not_retry_and_say_false() -> None:
    c, t, _ = client([problem(503, "store_unavailable", **{"retry-after": "1"})])
    assert c.ready() is False and len(t.requests) == 1
    c, t, _ = client([lost()])
    assert c.live() is False


class AsyncScripted(Scripted):
    async def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:  # type: ignore[override]
        return Scripted.send(self, request, timeout)

    async def aclose(self) -> None:
        pass


def test_async_client_same_policy() -> None:
    t = AsyncScripted([lost(), problem(503, "session_busy", **{"retry-after": "1"}),
                       ok_step(4)])
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async def main() -> Any:
        async with AsyncClient("http://optserve.test", transport=t) as c:
            c._sleep = fake_sleep
            return await c.step("s1", {"x": np.ones(2)})

    res = asyncio.run(main())
    assert res.version == 4 and res.attempts == 3
    assert len({r.headers["Idempotency-Key"] for r in t.requests}) == 1
    assert 0.25 <= sleeps[0] <= 0.5 and 1.0 <= sleeps[1] <= 1.1


def test_real_sleep_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    c = Client("http://x", transport=Scripted([problem(429, "x", **{"retry-after": "0"}),
                                                ok_step()]))
    c.step("s", {"x": np.ones(2)})
    assert slept == [0.0]

