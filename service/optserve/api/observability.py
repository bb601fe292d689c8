"""The request middleware: request id, metrics, one log line and one server span per request.

Plain ASGI (no per-request task). The request id is the caller's ``X-Request-ID`` when it is
a sane token (1-128 printable ASCII characters, no spaces), else a fresh one; either way it is
echoed in the response's ``X-Request-ID`` and carried by every log line of the request.
"""

from __future__ import annotations

import logging
import secrets
import time

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


def _tenant(settings: Settings, headers: dict[str, str]) -> str | None:
    """The tenant the bearer key names (None: no or an unknown key), for logs only."""
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
                             _tenant(self.settings, headers), scope)
        token = REQUEST.set(ctx)
        status = [500]
        sent = [0]
        received = [0]
        rid_header = (b"x-request-id", ctx.request_id.encode())

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                received[0] += n
                metrics.IN_FLIGHT_BYTES.inc(n)
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            with tracing.server_span(method, scope.get("path", ""), headers) as span:
                try:
                    await self.app(scope, counting_receive, counting_send)
                finally:
                    tracing.finish_server_span(span, method, ctx.route, status[0],
                                               failed=status[0] >= 500)
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.IN_FLIGHT_BYTES.dec(received[0])
            record(method, ctx.route or "unmatched", status[0], time.perf_counter() - start,
                   received[0], sent[0])
            REQUEST.reset(token)


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
