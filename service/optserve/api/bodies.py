"""Request bodies in bounded memory and time: a per-process byte budget and a deadline.

`BodyLimits` (plain ASGI middleware) watches every request body as the route reads it:

* **Budget.** The bytes of all request bodies held at once in this process are counted as
  they *arrive* and given back when the request is over; a chunk that would push the total
  over ``OPTSERVE_MAX_INFLIGHT_BODY_BYTES`` ends its request with 503 ``server_busy`` and
  ``Retry-After``. A declared ``Content-Length`` is not reserved up front (a slow client that
  declares 64 MiB and sends nothing would hold budget it never uses, blocking everyone); it
  only refuses a body at once when it cannot fit in what is free right now.
* **Deadline.** The whole body must arrive within ``OPTSERVE_BODY_TIMEOUT_S`` of the route
  starting to read it (time the server spends before that is not the client's), else 408
  ``request_timeout``. One total deadline, not a minimum rate: it
  bounds how long any client, however it paces its bytes, holds budget and a connection.

Together with `read_body` (which allocates only what arrived) a process holds at most about
the budget in request bodies, however many clients declare however much.
"""

from __future__ import annotations

import math
import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import DomainError

BODY_READER = "optserve.body_reader"  # set by `deps.read_body` for a pooled body

RETRY_AFTER_S = 1


class BodyBudget:
    """Request body bytes held at once by this process (one event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def free(self) -> int:
        return self.limit - self.used

    def charge(self, n: int) -> None:
        if self.used + n > self.limit:
            raise DomainError("server_busy", f"the server already holds {self.used} bytes of "
                              f"request bodies (limit {self.limit}); retry shortly",
                              retry_after=RETRY_AFTER_S)
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n


class BodyLimits:
    """Charges body bytes to the budget as they arrive and enforces the body deadline."""

    def __init__(self, app: ASGIApp, budget: BodyBudget, timeout_s: float) -> None:
        self.app = app
        self.budget = budget
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        budget = self.budget
        deadline = math.inf
        declared = _content_length(scope)
        held = 0
        started = done = False

        async def limited_receive() -> Message:
            nonlocal held, started, done, deadline
            if done:  # the body is complete: later reads only wait for a disconnect
                return await receive()
            if not started:
                started = True
                deadline = time.monotonic() + self.timeout_s
                if declared is not None and declared > budget.free():
                    budget.charge(declared)  # refuses: it cannot fit now
            try:  # past the deadline, bytes that have already arrived are still taken
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise timeout_error(self.timeout_s) from None
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                if n:
                    budget.charge(n)
                    held += n
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            budget.release(held)
            reader = scope.pop(BODY_READER, None)
            if reader is not None:  # the response is sent: the body's buffer can go back
                reader.release()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # read_body answers 400
    return None


def timeout_error(timeout_s: float) -> DomainError:
    return DomainError("request_timeout", f"the request body did not arrive within "
                       f"{_seconds(timeout_s)} s; nothing was applied",
                       timeout_s=timeout_s)


def _seconds(x: float) -> str:
    return str(int(x)) if math.isclose(x, round(x)) else f"{x:g}"
