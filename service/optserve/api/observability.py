"""The request middleware: request id, metrics, one log line and one server span per request.

Plain ASGI (no per-request task). The request id is the caller's ``X-Request-ID`` when it is
a sane token (1-128 printable ASCII characters, no spaces), else a fresh one; either way it is
echoed in the response's ``X-Request-ID`` and carried by every log line of the request.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics, tracing
from ..logs import REQUEST, RequestContext
from ..settings import Settings
from .deps import DEFAULT_TENANT

access = logging.getLogger("optserve.access")

REQUEST_ID = "x-request-id"


def request_id(raw: str | None) -> str:
    if raw and 0 < len(raw) <= 128 and raw.isascii() and raw.isprintable() and " " not in raw:
        return raw
    return secrets.token_hex(8)


def tenant_of(settings: Settings, headers: Mapping[str, str]) -> str | None:
    """The tenant the bearer key names (None: no or an unknown key): for logs, and for
    `hot_route` to choose its requests (the stack's `deps.tenant` answers the 401s)."""
    if not settings.keys:
        return DEFAULT_TENANT
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return settings.tenant_for(key.strip()) if scheme.lower() == "bearer" else None


class ObservabilityMiddleware:
    """Counts, latency, in-flight requests and body bytes per route template; the access log
    line; the server span; the request id."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope.get("method", "")
        ctx = RequestContext(request_id(headers.get(REQUEST_ID)), method,
                             tenant_of(self.settings, headers), scope)
        token = REQUEST.set(ctx)
        received = [0]
        out = CountedSend(send, ctx.request_id)

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                received[0] += n
                metrics.IN_FLIGHT_BYTES.inc(n)
            return message

        metrics.IN_FLIGHT.inc()
        try:
            with tracing.server_span(method, scope.get("path", ""), headers) as span:
                try:
                    await self.app(scope, counting_receive, out)
                finally:
                    tracing.finish_server_span(span, method, ctx.route, out.status,
                                               failed=out.status >= 500)
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.IN_FLIGHT_BYTES.dec(received[0])
            record(method, ctx.route or "unmatched", out.status, time.perf_counter() - start,
                   received[0], out.sent)
            REQUEST.reset(token)


class CountedSend:
    """`send` with the request id added to the response's headers; the status and the body
    bytes that went out are kept for the request's metrics (also `hot_route`'s)."""

    def __init__(self, send: Send, rid: str) -> None:
        self.send = send
        self.rid = (REQUEST_ID.encode(), rid.encode())
        self.status = 500
        self.sent = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = {**message, "headers": [*message.get("headers", []), self.rid]}
        elif message["type"] == "http.response.body":
            self.sent += len(message.get("body", b""))
        await self.send(message)


def record(method: str, path: str, status: int, elapsed: float, received: int,
           sent: int) -> None:
    """A finished request's metrics and access-log line (also `hot_route`'s)."""
    metrics.child(metrics.REQUESTS, method, path, str(status)).inc()
    metrics.child(metrics.LATENCY, method, path).observe(elapsed)
    metrics.child(metrics.BYTES_IN, path).inc(received)
    metrics.child(metrics.BYTES_OUT, path).inc(sent)
    if access.isEnabledFor(logging.INFO):
        access.info("%s %s %d %.1f ms", method, path, status, elapsed * 1000,
                    extra={"method": method, "status": status,
                           "duration_ms": round(elapsed * 1000, 3),
                           "bytes_in": received, "bytes_out": sent})
