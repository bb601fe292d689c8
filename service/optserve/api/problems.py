"""RFC 9457 problem details: every error the API returns is one of these.

The one place that knows HTTP statuses: a domain error's ``code`` is looked up in
``optserve_client.spec.PROBLEMS``; framework errors (routing, validation, Redis down) are
mapped here too.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from optserve_client.spec import status_of
from optserve_client.wire import ECHO_CHARS, clip

from .. import metrics
from ..errors import DomainError
from ..store.faults import classify

log = logging.getLogger("optserve")

PROBLEM_TYPE = "application/problem+json"
TYPE_BASE = "https://optserve.dev/problems/"

TITLES = {
    400: "Malformed body",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    408: "Request timeout",
    409: "Conflict",
    412: "Precondition failed",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    428: "Precondition required",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
    507: "Insufficient storage",
}
DETAIL_CHARS = 2000  # a detail quotes inputs (clipped each) and lists of names
LIST_ITEMS = 100
CLIENT_CLOSED = 499  # nginx's status for "the client went away first": metrics only


class Problem(Exception):
    """An error answered as application/problem+json with a stable machine-readable `code`."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        # The contract's status for the code (KeyError for an unknown code); only an
        # ``http_error`` carries the status of the HTTP error it stands for.
        contract_status = status_of(code)
        self.status = contract_status if status is None else status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    @classmethod
    def of(cls, exc: DomainError) -> Problem:
        """The HTTP form of a domain error: same code, detail and fields."""
        headers = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
        return cls(exc.code, exc.detail, headers=headers, **exc.fields)

    def body(self, instance: str | None = None) -> dict[str, Any]:
        """The document; whatever in it came from the client is clipped and made encodable,
        so a 20 MB tensor name or a lone surrogate cannot make the error itself fail."""
        doc: dict[str, Any] = {
            "type": TYPE_BASE + self.code,
            "title": TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": clip(self.detail, DETAIL_CHARS),
            "code": self.code,
        }
        if instance:
            doc["instance"] = clip(instance)
        doc.update({k: _tame(v) for k, v in self.extra.items()})
        return doc

    def response(self, instance: str | None = None) -> JSONResponse:
        metrics.problem(self.code)
        return JSONResponse(
            self.body(instance),
            status_code=self.status,
            headers=self.headers,
            media_type=PROBLEM_TYPE,
        )


def _tame(value: Any) -> Any:
    """A problem field as it can be sent: strings clipped, long lists cut short."""
    if isinstance(value, str):
        return clip(value, ECHO_CHARS)
    if isinstance(value, (list, tuple)):
        return [_tame(v) for v in value[:LIST_ITEMS]]
    if isinstance(value, dict):
        return {clip(str(k)): _tame(v) for k, v in list(value.items())[:LIST_ITEMS]}
    return value


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """Every method some route takes on this path (Starlette names only the first route's
    methods); asked of the routers, so included routers' routes count too."""
    routes = request.app.router.routes
    return ", ".join(m for m in _METHODS if any(
        r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes))


class ErrorBoundary:
    """What no handler took: one log line with the traceback, and the 500 problem.

    Starlette's own last-resort handler answers and then re-raises, so the server logs the
    traceback a second time; this sits inside it and does not re-raise.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await internal_error().response(scope.get("path"))(scope, receive, send)


def internal_error() -> Problem:
    return Problem("internal_error", "an unexpected error; nothing was applied unless the "
                   "response said so")


def store_unavailable(exc: BaseException) -> Problem:
    return Problem(
        "store_unavailable",
        f"the state store is unreachable ({type(exc).__name__}); retry shortly",
        headers={"Retry-After": "1"},
    )


def _status_code(status: int) -> str:
    return {
        401: "unauthorized",
        404: "not_found",
        405: "method_not_allowed",
        406: "not_acceptable",
        413: "body_too_large",
        415: "unsupported_media_type",
    }.get(status, "http_error")


def install(app: FastAPI) -> None:
    """Route every error path (ours, FastAPI's validation, Starlette's HTTP, Redis) to problems."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        if exc.code in ("store_full", "store_unavailable"):  # classified on the way up
            metrics.store_error(exc.code)
        return Problem.of(exc).response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        is_json_error = any(e["type"] == "json_invalid" for e in errors)
        if is_json_error:
            problem = Problem("malformed_body", "the body is not valid JSON", errors=errors)
        else:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors
            )
            problem = Problem("invalid_request", detail or "invalid request", errors=errors)
        return problem.response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        problem = Problem(
            _status_code(exc.status_code),
            str(exc.detail),
            status=exc.status_code,
            headers=headers,
        )
        return problem.response(request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody reads this response; its status is what the metrics count (not a 500).
        log.info("client went away during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED)

    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("state store unreachable: %s", exc)
        metrics.store_error("store_unavailable")
        return store_unavailable(exc).response(request.url.path)

    async def _redis_refused(request: Request, exc: Exception) -> JSONResponse:
        """Redis out of memory, read-only, moved or down: a problem of its own, not a 500."""
        domain = classify(exc)
        metrics.store_error(domain.code if domain is not None else "other")
        if domain is None:
            raise exc  # a bug: the ErrorBoundary logs it once and answers 500
        log.warning("state store refused %s %s: %s", request.method, request.url.path, exc)
        return Problem.of(domain).response(request.url.path)

    app.add_exception_handler(RedisError, _redis_refused)
    app.add_middleware(ErrorBoundary)  # innermost middleware: others see its 500
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(ConnectionError, _redis_down)
    app.add_exception_handler(TimeoutError, _redis_down)
