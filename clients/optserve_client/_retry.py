"""When to resend a request: the retry policy, and the one decision both clients' send loops
ask after every try (`decide`, driven per call by `Tries`).

The loops themselves only send and wait (`Client._run` blocks, `AsyncClient._run` awaits);
everything else (retry or not, after how long, Retry-After, jittered backoff, one
Idempotency-Key for every try) lives here once.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._transport import RawRequest, RawResponse
from .errors import APIConnectionError, error_from_response

if TYPE_CHECKING:
    from ._requests import Call

log = logging.getLogger("optserve_client")
T = TypeVar("T")
Outcome = RawResponse | APIConnectionError
"""What one try gives: a response (any status), or the connection error it raised."""


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before resending (exponential backoff with jitter).

    Retried: connection errors (those that may have reached the server only when the call is
    safe to resend: every call but session creation, steps included since each logical step
    keeps one Idempotency-Key), and the statuses in ``statuses``. A ``Retry-After`` up to
    ``max_retry_after`` is honoured (plus up to 10 % jitter); a longer one is not waited out
    (the error is raised with ``retry_after`` set).
    """

    max_retries: int = 3
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = frozenset({408, 429, 502, 503, 504})
    final_codes: frozenset[str] = frozenset({"quota_exceeded"})
    """Problem codes never resent under a retried status: waiting does not lift a quota."""

    def backoff(self, attempt: int, retry_after: float | None = None,
                rng: Callable[[], float] = random.random) -> float:
        """Delay before retry number ``attempt + 1`` (attempt counts from 0)."""
        if retry_after is not None:
            return retry_after * (1.0 + 0.1 * rng())
        base = min(self.initial_delay * (2.0 ** attempt), self.max_delay)
        return base * (0.5 + 0.5 * rng())

    def delay_for_status(self, status: int, headers: Mapping[str, str], attempt: int,
                         rng: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait before resending after this status, or None to give up."""
        if attempt >= self.max_retries or status not in self.statuses:
            return None
        ra = parse_retry_after(headers)
        if ra is not None and ra > self.max_retry_after:
            return None
        return self.backoff(attempt, ra, rng)

    def delay_for_exception(self, exc: APIConnectionError, idempotent: bool, attempt: int,
                            rng: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait before resending after a connection error, or None to give up."""
        if attempt >= self.max_retries or not (idempotent or exc.request_sent is False):
            return None
        return self.backoff(attempt, None, rng)


def _problem_code(response: RawResponse) -> str | None:
    """The problem+json ``code`` of an error response, if it has one."""
    try:
        doc = json.loads(bytes(response.body)) if response.body else None
    except (UnicodeDecodeError, ValueError):
        return None
    code = doc.get("code") if isinstance(doc, dict) else None
    return code if isinstance(code, str) else None


def decide(policy: RetryPolicy, attempt: int, outcome: Outcome, *, idempotent: bool,
           rng: Callable[[], float] = random.random) -> float | None:
    """Seconds to wait before try ``attempt + 1`` after this failed try, or None to give up.

    A connection error is resent when the call is idempotent or the request certainly never
    left; a status when it is in ``policy.statuses`` and any Retry-After is short enough.
    """
    if isinstance(outcome, APIConnectionError):
        return policy.delay_for_exception(outcome, idempotent, attempt, rng)
    if outcome.status in policy.statuses and _problem_code(outcome) in policy.final_codes:
        return None
    return policy.delay_for_status(outcome.status, outcome.headers, attempt, rng)


class Tries(Generic[T]):
    """One logical call's tries: the one request every try resends, and after each try
    whether the call is done (``result``), failed (raises) or waits ``delay`` seconds."""

    def __init__(self, call: Call[T], request: RawRequest, policy: RetryPolicy,
                 rng: Callable[[], float]) -> None:
        self.call = call
        self.request = request
        self.policy = policy
        self.rng = rng
        self.attempt = 0
        self.ambiguous = False  # an earlier try may have reached the server
        self.result: Any = None

    def judge(self, outcome: Outcome) -> float | None:
        """Seconds to wait before resending, or None when ``result`` holds the answer.

        Raises the connection error, or the typed error of the response, once the policy
        gives up."""
        call = self.call
        if isinstance(outcome, RawResponse) and (outcome.status < 400 or (
                outcome.status == 404 and self.ambiguous and call.absent_ok_on_retry)):
            self.result = call.parse(outcome, self.attempt + 1)
            return None
        delay = decide(self.policy, self.attempt, outcome, idempotent=call.idempotent,
                       rng=self.rng)
        if delay is None:
            if isinstance(outcome, APIConnectionError):
                raise outcome
            raise error_from_response(outcome.status, outcome.body, outcome.headers,
                                      method=call.method, url=self.request.url)
        if isinstance(outcome, APIConnectionError):
            self.ambiguous = self.ambiguous or outcome.request_sent is not False
            why: Any = outcome
        else:
            why = f"HTTP {outcome.status}"
        log.info("%s %s: %s; retry %d in %.2fs", call.method, call.path, why,
                 self.attempt + 1, delay)
        self.attempt += 1
        return delay
