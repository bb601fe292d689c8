"""Typed exceptions: one class per problem ``code`` of the API, all under `OptserveError`.

An error response (problem+json) raises the class of its ``code`` (`spec.PROBLEMS`, whose
meanings are the docstrings of classes without one), else of its HTTP status, so ``except
ConflictError`` keeps working when the server grows a 409 code. The problem's fields are
kept in ``problem``, some as attributes. The base classes and the registry the classes
fill are in `_error_base` (re-exported here, their public home)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._error_base import _BY_CODE, _BY_STATUS, _problem_field
from ._error_base import APIConnectionError as APIConnectionError
from ._error_base import APIResponseValidationError as APIResponseValidationError
from ._error_base import APIStatusError as APIStatusError
from ._error_base import APITimeoutError as APITimeoutError
from ._error_base import OptserveError as OptserveError
from .spec import PROBLEMS


class BadRequestError(APIStatusError):
    status_code = 400


class MalformedBodyError(BadRequestError):
    codes = ("malformed_body",)


class AuthenticationError(APIStatusError):
    status_code = 401
    codes = ("unauthorized",)


class NotFoundError(APIStatusError):
    status_code = 404
    codes = ("not_found",)


class SessionNotFoundError(NotFoundError):
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
    codes = ("stale_gradient",)


class FutureVersionError(ConflictError):
    codes = ("future_version",)


class RoundClosedError(ConflictError):
    codes = ("round_closed",)


class RoundFailedError(ConflictError):
    codes = ("round_failed",)


class HyperparamsConflictError(ConflictError):
    codes = ("hyperparams_conflict",)


class IdempotencyKeyReusedError(ConflictError):
    codes = ("idempotency_key_reused",)


class NoParamsError(ConflictError):
    codes = ("no_params",)


class RequestTimeoutError(APIStatusError):
    """408: the body did not arrive in time; nothing was applied (retried by the SDK)."""

    status_code = 408
    codes = ("request_timeout",)


class PreconditionFailedError(APIStatusError):
    status_code = 412
    codes = ("version_mismatch", "precondition_failed")


class PayloadTooLargeError(APIStatusError):
    status_code = 413
    codes = ("body_too_large",)

    limit: int | None = _problem_field("limit")


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

    expected: Any = _problem_field("expected", "expected_shape")
    got: Any = _problem_field("got", "shape", "actual")


class DtypeMismatchError(UnprocessableEntityError):
    codes = ("dtype_mismatch",)


class NonFiniteGradientError(UnprocessableEntityError):
    codes = ("non_finite_gradient", "non_finite_parameter")


class NonFiniteResultError(UnprocessableEntityError):
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

    field: str | None = _problem_field("field")


class InvalidRequestError(UnprocessableEntityError):
    codes = ("invalid_request",)


class InvalidHeaderError(UnprocessableEntityError):
    codes = ("invalid_header",)

    header: str | None = _problem_field("header")


class InvalidNameError(UnprocessableEntityError):
    codes = ("invalid_name",)


class IdempotencyKeyMismatchError(UnprocessableEntityError):
    codes = ("idempotency_key_mismatch",)
class TooManyTensorsError(UnprocessableEntityError):
    """More tensors than a session may have; ``limit`` says how many."""

    codes = ("too_many_tensors",)

    limit: int | None = _problem_field("limit")


class InvalidStateError(UnprocessableEntityError):
    codes = ("invalid_state",)


class PreconditionRequiredError(APIStatusError):
    status_code = 428
    codes = ("precondition_required",)


class RateLimitError(APIStatusError):
    status_code = 429
    codes = ("rate_limited",)


class QuotaExceededError(RateLimitError):
    """A tenant limit would be exceeded: ``quota`` (``sessions`` or ``bytes``), ``usage``
    and ``limit`` say which and how far; not retried (delete sessions first)."""

    codes = ("quota_exceeded",)

    quota: str | None = _problem_field("quota")
    usage: int | None = _problem_field("usage")
    limit: int | None = _problem_field("limit")


class InternalServerError(APIStatusError):
    status_code = 500
    codes = ("internal_error",)


class ServiceUnavailableError(InternalServerError):
    """503: retried by the SDK, honouring Retry-After; raised once retries run out."""

    status_code = 503


class StoreUnavailableError(ServiceUnavailableError):
    codes = ("store_unavailable",)


class SessionBusyError(ServiceUnavailableError):
    codes = ("session_busy",)


class InsufficientStorageError(InternalServerError):
    """507: the server cannot store what the request would add."""

    status_code = 507


class StoreFullError(InsufficientStorageError):
    codes = ("store_full",)
class ServerBusyError(ServiceUnavailableError):
    """The server holds as many request bodies as it may; retried after Retry-After."""

    codes = ("server_busy",)


class RoundExpiredError(ServiceUnavailableError):
    """A sync round's result expired before it was read; GET the session's params."""

    codes = ("round_expired",)


for _code, (_status, _) in PROBLEMS.items():  # a spec code without its own class: its
    _BY_CODE.setdefault(_code, _BY_STATUS.get(_status, APIStatusError))  # status's class


def register_code(code: str, cls: type[APIStatusError]) -> None:
    """Map a further problem ``code`` to an exception class."""
    _BY_CODE[code] = cls


def error_from_response(status: int, body: bytes | bytearray | memoryview,
                        headers: Mapping[str, str], *, method: str = "", url: str = ""
                        ) -> APIStatusError:
    """The exception for an error response: by problem ``code``, else by status (also for a
    code whose class has another status: the class and ``e.status`` never disagree)."""
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
        cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500
                                         else APIStatusError)
    text = ": ".join(x for x in (problem.get("title"), problem.get("detail")) if x) \
        or "(no detail)"
    message = f"{method} {url} -> {status}" + (f" [{code}]" if code else "") + f": {text}"
    return cls(message, status=status, problem=problem, headers=headers, method=method, url=url)


__all__ = sorted([_name for _name, _obj in list(globals().items())
                  if isinstance(_obj, type) and issubclass(_obj, OptserveError)]
                 + ["error_from_response", "register_code"])
