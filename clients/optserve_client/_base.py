"""`BaseClient`: what the sync and async clients share beyond the request builders: the
configuration, the request every try of a call sends, its `Tries`, and option copies.

The pieces live by concern: `_transport` (HTTP), `_retry` (when to resend), `_requests`
(the endpoint builders, sans I/O), `_results` (what calls return), `_codec` (arrays <->
wire). The clients themselves only send and wait.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import urlencode

from ._codec import safetensors_parts as safetensors_parts
from ._codec import wire_ready as wire_ready
from ._requests import Call, Format, RequestBuilder, check_format, session_of
from ._retry import RetryPolicy, Tries
from ._retry import parse_retry_after as parse_retry_after
from ._transport import RawRequest, Timeout
from .spec import SESSION_HEADER

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
ENV_URL = "OPTSERVE_URL"
ENV_API_KEY = "OPTSERVE_API_KEY"
ROUND_READ_SLACK_S = 30.0
"""How much longer than a sync round's deadline a push may wait for the round's answer."""

C = TypeVar("C", bound="BaseClient")
T = TypeVar("T")
_UNSET: Any = object()


def round_read_timeout(sync: Mapping[str, Any] | None) -> float:
    """The read timeout a sync-mode push needs: its round's ``timeout_s`` plus slack."""
    return float((sync or {}).get("timeout_s", 60.0)) + ROUND_READ_SLACK_S


class BaseClient(RequestBuilder):
    """Configuration, the request builders of every endpoint, and the per-call `Tries`.

    A subclass names its default transport class and the module whose ``sleep`` it waits
    with; it sends (`_run`) and waits, nothing else."""

    _default_transport: Callable[..., Any]
    _sleep_in: Any  # a module with sleep(seconds): time, or asyncio

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | tuple[float | None, float | None] | Timeout | None = 60.0,
                 max_retries: int = 3, format: Format = "safetensors", *,
                 transport: Any = None, max_connections: int = 32,
                 default_headers: Mapping[str, str] | None = None,
                 retry_policy: RetryPolicy | None = None) -> None:
        url = base_url or os.environ.get(ENV_URL) or DEFAULT_BASE_URL
        if "://" not in url:
            url = "http://" + url
        self.base_url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or None)
        self.timeout = Timeout.of(timeout)
        self.format: Format = check_format(format)
        self.retry_policy = replace(retry_policy or RetryPolicy(), max_retries=max_retries)
        self.default_headers = dict(default_headers or {})
        self._sleep_rng: Callable[[], float] = random.random
        self._transport = transport or self._default_transport(max_connections=max_connections)
        self._owns_transport = transport is None
        self._sleep = self._sleep_in.sleep  # looked up per client: tests patch time.sleep

    @property
    def max_retries(self) -> int:
        return self.retry_policy.max_retries

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, format={self.format!r})"

    # ------------------------------------------------------------------ copies

    def with_options(self: C, *, timeout: Any = _UNSET, max_retries: int | None = None,
                     format: Format | None = None) -> C:
        """A copy with other options that shares this client's connection pool."""
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._owns_transport = False
        if timeout is not _UNSET:
            other.timeout = Timeout.of(timeout)
        if max_retries is not None:
            other.retry_policy = replace(self.retry_policy, max_retries=max_retries)
        if format is not None:
            other.format = check_format(format)
        return other

    def with_read_timeout(self: C, at_least: float) -> C:
        """This client, or a copy (same pool) whose read timeout is ``at_least`` seconds when
        its own is shorter: a sync-mode push waits for its round (`round_read_timeout`)."""
        read = self.timeout.read
        if read is None or read >= at_least:
            return self
        return self.with_options(timeout=Timeout(self.timeout.connect, at_least))

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        """Everything but what belongs to this process: the transport pickles as its settings
        (a connection pool holds locks and sockets), sleep and jitter are looked up anew."""
        state = self.__dict__.copy()
        del state["_sleep"]
        if state["_sleep_rng"] is random.random:  # else a copy of the global RNG's state
            del state["_sleep_rng"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_sleep_rng", random.random)
        self._sleep = self._sleep_in.sleep
        self._owns_transport = True  # a fresh copy that no other client shares

    def __copy__(self: C) -> C:
        """A shallow copy shares the connection pool (and does not close it): `with_options`."""
        return self.with_options()

    # ------------------------------------------------------------------ one call's tries

    def _prepare(self, call: Call[Any], idempotency_key: str | None) -> RawRequest:
        url = self.base_url + call.path
        if call.query:
            url += "?" + urlencode(call.query)
        headers = {"User-Agent": f"optserve-python/{__version__}", **self.default_headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        sid = session_of(call.path)
        if sid is not None:
            headers[SESSION_HEADER] = sid
        headers.update(call.headers)
        if isinstance(call.body, list):
            headers["Content-Length"] = str(sum(len(p) for p in call.body))
        return RawRequest(call.method, url, headers, call.body)

    def _tries(self, call: Call[T], idempotency_key: str | None = None) -> Tries[T]:
        """The request every try of ``call`` sends (one Idempotency-Key) and its policy."""
        policy = self.retry_policy
        if call.max_retries is not None:
            policy = replace(policy, max_retries=call.max_retries)
        return Tries(call, self._prepare(call, idempotency_key), policy, self._sleep_rng)

    @staticmethod
    def _new_idempotency_key() -> str:
        return f"optserve-{uuid.uuid4().hex}"
