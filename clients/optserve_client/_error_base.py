"""The base exceptions of `optserve_client.errors` (their public home, which re-exports
them), and the code/status registry every `APIStatusError` subclass fills as it is defined."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from .spec import PROBLEMS

_BY_CODE: dict[str, type[APIStatusError]] = {}
_BY_STATUS: dict[int, type[APIStatusError]] = {}


def _problem_field(*keys: str) -> Any:
    """A read-only attribute: the first of ``keys`` the problem document has, else None."""
    return property(lambda self: next((self.problem[k] for k in keys if k in self.problem),
                                      None), doc=f"The problem's ``{keys[0]}``.")


class OptserveError(Exception):
    """Base class of everything the SDK raises on purpose."""


class APIConnectionError(OptserveError):
    """No HTTP response: the connection failed, broke or timed out. ``request_sent`` is
    False when the request certainly never reached the server (a failed connect), None when
    it may have (a reset mid-way), True when it did (a read timeout)."""

    default_message: ClassVar[str] = "connection error"

    def __init__(self, message: str | None = None, *, request_sent: bool | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(self.default_message if message is None else message)
        self.request_sent = request_sent
        self.__cause__ = cause


class APITimeoutError(APIConnectionError):
    """The connect or read timeout expired."""

    default_message = "request timed out"


class APIResponseValidationError(OptserveError):
    """A 2xx response the SDK could not read (bad tensor body, missing version header)."""


class APIStatusError(OptserveError):
    """An HTTP error response; ``problem`` is its problem+json document (or {})."""

    status_code: ClassVar[int | None] = None
    codes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register the class for its own codes, the first of its status for the status."""
        super().__init_subclass__(**kwargs)
        if cls.status_code is not None:
            _BY_STATUS.setdefault(cls.status_code, cls)
        for code in cls.__dict__.get("codes", ()):
            _BY_CODE.setdefault(code, cls)
        if cls.__doc__ is None and cls.codes:
            cls.__doc__ = "; ".join(PROBLEMS[c][1] for c in cls.codes if c in PROBLEMS) + "."

    def __init__(self, message: str, *, status: int, problem: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, method: str = "", url: str = ""
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.problem: dict[str, Any] = dict(problem or {})
        self.headers: dict[str, str] = dict(headers or {})
        self.method = method
        self.url = url

    code: str | None = _problem_field("code")
    title: str | None = _problem_field("title")
    detail: str | None = _problem_field("detail")

    @property
    def current_version(self) -> int | None:
        """The session's version when the server said so (409, 412 and others)."""
        v = self.problem.get("current_version")
        v = self.headers.get("x-optserve-version") if v is None else v
        try:
            return int(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def retry_after(self) -> float | None:
        from ._retry import parse_retry_after
        return parse_retry_after(self.headers)


# Shown, documented and pickled as `optserve_client.errors.X`, where they have always lived.
for _cls in (OptserveError, APIConnectionError, APITimeoutError, APIResponseValidationError,
             APIStatusError):
    _cls.__module__ = "optserve_client.errors"
