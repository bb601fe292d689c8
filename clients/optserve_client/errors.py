"""Typed exceptions: one class per problem ``code`` of the API, all under `OptserveError`.

Every error response of the service is RFC 9457 problem+json with a stable ``code``; the
SDK raises the class registered for that code, or (for a code it does not know yet) the
class of the HTTP status, so ``except ConflictError`` keeps working when the server grows a
new 409 code. The problem's extra fields (``current_version``, ``tensor``, ...) are kept in
``problem`` and surfaced as attributes where they mean something.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "DtypeMismatchError",
    "FutureVersionError",
    "IdempotencyKeyReusedError",
    "ImmutableHyperparameterError",
    "InternalServerError",
    "InvalidHeaderError",
    "InvalidHyperparametersError",
    "InvalidNameError",
    "InvalidRequestError",
    "InvalidStateError",
    "MalformedBodyError",
    "MethodNotAllowedError",
    "MissingTensorError",
    "NoParamsError",
    "NonFiniteGradientError",
    "NonFiniteResultError",
    "NotAcceptableError",
    "NotFoundError",
    "OptserveError",
    "PayloadTooLargeError",
    "PreconditionFailedError",
    "PreconditionRequiredError",
    "RateLimitError",
    "RoundClosedError",
    "RoundExpiredError",
    "RoundFailedError",
    "ServiceUnavailableError",
    "SessionBusyError",
    "SessionNotFoundError",
    "ShapeMismatchError",
    "StaleGradientError",
    "StoreUnavailableError",
    "UnknownTensorError",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
    "error_from_response",
    "register_code",
]


class OptserveError(Exception):
    """Base class of everything the SDK raises on purpose."""


class APIConnectionError(OptserveError):
    """No HTTP response: the connection failed, broke or timed out.

    ``request_sent`` is False when the request certainly never reached the server (a failed
    connect), None when it may have (a reset mid-way), True when it did (a read timeout).
    """

    def __init__(self, message: str = "connection error", *, request_sent: bool | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.request_sent = request_sent
        self.__cause__ = cause


class APITimeoutError(APIConnectionError):
    """The connect or read timeout expired."""

    def __init__(self, message: str = "request timed out", *, request_sent: bool | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message, request_sent=request_sent, cause=cause)


class APIResponseValidationError(OptserveError):
    """A 2xx response the SDK could not read (bad tensor body, missing version header)."""


class APIStatusError(OptserveError):
    """An HTTP error response; ``problem`` is its problem+json document (or {})."""

    status_code: ClassVar[int | None] = None
    codes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str, *, status: int, problem: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, method: str = "", url: str = ""
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.problem: dict[str, Any] = dict(problem or {})
        self.headers: dict[str, str] = dict(headers or {})
        self.method = method
        self.url = url

    @property
    def code(self) -> str | None:
        return self.problem.get("code")

    @property
    def title(self) -> str | None:
        return self.problem.get("title")

    @property
    def detail(self) -> str | None:
        return self.problem.get("detail")

    @property
    def current_version(self) -> int | None:
        """The session's version when the server said so (409, 412 and others)."""
        v = self.problem.get("current_version")
        if v is None:
            v = self.headers.get("x-optserve-version")
        try:
            return int(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def retry_after(self) -> float | None:
        from ._retry import parse_retry_after

        return parse_retry_after(self.headers)


# ---------------------------------------------------------------- one class per status


class BadRequestError(APIStatusError):
    status_code = 400


class MalformedBodyError(BadRequestError):
    """The body is not a well-formed tensor or JSON body."""

    codes = ("malformed_body",)


class AuthenticationError(APIStatusError):
    status_code = 401
    codes = ("unauthorized",)


class NotFoundError(APIStatusError):
    status_code = 404


class SessionNotFoundError(NotFoundError):
    """No such session, or one of another tenant."""

    codes = ("session_not_found",)


class MethodNotAllowedError(APIStatusError):
    status_code = 405
    codes = ("method_not_allowed",)


class NotAcceptableError(APIStatusError):
    status_code = 406
    codes = ("not_acceptable",)


class ConflictError(APIStatusError):
    """409: the step does not fit the session's version; ``current_version`` says where it is."""

    status_code = 409


class StaleGradientError(ConflictError):
    """The gradient's base version is older than ``max_staleness`` allows."""

    codes = ("stale_gradient",)


class FutureVersionError(ConflictError):
    codes = ("future_version",)


class RoundClosedError(ConflictError):
    codes = ("round_closed",)


class RoundFailedError(ConflictError):
    codes = ("round_failed",)


class IdempotencyKeyReusedError(ConflictError):
    """The create's Idempotency-Key made a session that was deleted since: use a new key."""

    codes = ("idempotency_key_reused",)


class NoParamsError(ConflictError):
    """The session has no parameters yet (PUT them first)."""

    codes = ("no_params",)


class PreconditionFailedError(APIStatusError):
    """412: ``If-Match`` named another version than the session's."""

    status_code = 412
    codes = ("version_mismatch", "precondition_failed")


class PayloadTooLargeError(APIStatusError):
    status_code = 413
    codes = ("body_too_large",)

    @property
    def limit(self) -> int | None:
        return self.problem.get("limit")


class UnsupportedMediaTypeError(APIStatusError):
    status_code = 415
    codes = ("unsupported_media_type",)


class UnprocessableEntityError(APIStatusError):
    """422: well-formed but does not fit the session (names, shapes, values)."""

    status_code = 422

    @property
    def tensor(self) -> str | None:
        """The tensor the problem is about, where the server names one."""
        for key in ("tensor", "name", "param"):
            if isinstance(self.problem.get(key), str):
                return self.problem[key]
        return None

    @property
    def tensors(self) -> list[str]:
        """All tensors named by the problem (``tensors`` list, or the one ``tensor``)."""
        names = self.problem.get("tensors")
        if isinstance(names, list):
            return [str(n) for n in names]
        return [self.tensor] if self.tensor else []


class UnknownTensorError(UnprocessableEntityError):
    codes = ("unknown_tensor",)


class MissingTensorError(UnprocessableEntityError):
    codes = ("missing_tensor",)


class ShapeMismatchError(UnprocessableEntityError):
    """A tensor's shape differs from the session's; ``tensor``, ``expected``, ``got``."""

    codes = ("shape_mismatch",)

    @property
    def expected(self) -> Any:
        return self.problem.get("expected", self.problem.get("expected_shape"))

    @property
    def got(self) -> Any:
        return self.problem.get("got", self.problem.get("shape", self.problem.get("actual")))


class DtypeMismatchError(UnprocessableEntityError):
    codes = ("dtype_mismatch",)


class NonFiniteGradientError(UnprocessableEntityError):
    codes = ("non_finite_gradient", "non_finite_parameter")


class NonFiniteResultError(UnprocessableEntityError):
    """The step would have produced inf/NaN parameters; nothing was applied."""

    codes = ("non_finite_result",)


class InvalidHyperparametersError(UnprocessableEntityError):
    """A hyperparameter is unknown or out of range; ``field`` names it."""

    codes = ("invalid_hyperparams",)

    @property
    def field(self) -> str | None:
        return self.fields[0] if self.fields else None

    @property
    def fields(self) -> list[str]:
        """Every field the server rejected (from ``field`` or the ``errors`` list)."""
        if isinstance(self.problem.get("field"), str):
            return [self.problem["field"]]
        out = []
        for err in self.problem.get("errors") or []:
            if isinstance(err, dict) and err.get("field"):
                out.append(str(err["field"]))
            elif isinstance(err, dict) and isinstance(err.get("loc"), list):
                out.append(".".join(str(x) for x in err["loc"]))
        return out


class ImmutableHyperparameterError(UnprocessableEntityError):
    """``optimizer`` or ``centered`` cannot change once a step has been applied."""

    codes = ("immutable_hyperparam",)

    @property
    def field(self) -> str | None:
        return self.problem.get("field")


class InvalidRequestError(UnprocessableEntityError):
    """The JSON body does not fit the request's schema (``errors`` lists the fields)."""

    codes = ("invalid_request",)


class InvalidHeaderError(UnprocessableEntityError):
    """A header (Idempotency-Key, If-Match, X-Optserve-*) has an invalid value."""

    codes = ("invalid_header",)

    @property
    def header(self) -> str | None:
        return self.problem.get("header")


class InvalidNameError(UnprocessableEntityError):
    codes = ("invalid_name",)


class InvalidStateError(UnprocessableEntityError):
    """A state import that does not fit (unknown state key, wrong shape, bad metadata)."""

    codes = ("invalid_state",)


class PreconditionRequiredError(APIStatusError):
    """428: a PUT after version 0 needs ``If-Match``."""

    status_code = 428
    codes = ("precondition_required",)


class RateLimitError(APIStatusError):
    status_code = 429
    codes = ("rate_limited",)


class InternalServerError(APIStatusError):
    status_code = 500
    codes = ("internal_error",)


class ServiceUnavailableError(InternalServerError):
    """503: retried by the SDK, honouring Retry-After; raised once retries run out."""

    status_code = 503


class StoreUnavailableError(ServiceUnavailableError):
    """The state store is unreachable."""

    codes = ("store_unavailable",)


class SessionBusyError(ServiceUnavailableError):
    """The session's lock could not be had in time (another step holds it)."""

    codes = ("session_busy",)


class RoundExpiredError(ServiceUnavailableError):
    """A sync round's result expired before it was read; GET the session's params."""

    codes = ("round_expired",)


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[APIStatusError]] = {}
_BY_STATUS: dict[int, type[APIStatusError]] = {}
for _cls in _all_subclasses(APIStatusError):
    for _code in _cls.codes:
        _BY_CODE.setdefault(_code, _cls)
    if _cls.status_code is not None and _cls.status_code not in _BY_STATUS:
        _BY_STATUS[_cls.status_code] = _cls


def register_code(code: str, cls: type[APIStatusError]) -> None:
    """Map a further problem ``code`` to an exception class."""
    _BY_CODE[code] = cls


def _status_class(status: int) -> type[APIStatusError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return InternalServerError
    return APIStatusError


def error_from_response(status: int, body: bytes | bytearray | memoryview,
                        headers: Mapping[str, str], *, method: str = "", url: str = ""
                        ) -> APIStatusError:
    """The exception for an error response: by problem ``code``, else by status.

    A code registered under another status than the response's (a server quirk) falls back
    to the status class, so ``e.status`` and the class never disagree.
    """
    problem: dict[str, Any] = {}
    try:
        doc = json.loads(bytes(body)) if body else {}
        if isinstance(doc, dict):
            problem = doc
    except (UnicodeDecodeError, ValueError):
        problem = {"detail": bytes(body[:500]).decode("utf-8", "replace")}
    code = problem.get("code")
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None or (cls.status_code is not None and cls.status_code != status
                       and not (status >= 500 and issubclass(cls, InternalServerError))):
        cls = _status_class(status)
    title = problem.get("title") or ""
    detail = problem.get("detail") or ""
    text = ": ".join(x for x in (title, detail) if x) or "(no detail)"
    message = f"{method} {url} -> {status}" + (f" [{code}]" if code else "") + f": {text}"
    return cls(message, status=status, problem=problem, headers=headers, method=method, url=url)
