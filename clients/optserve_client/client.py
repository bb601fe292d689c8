"""The synchronous client: every endpoint of the API, with retries and typed errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from ._base import (
    ArrayKind,
    BaseClient,
    Call,
    Format,
    RawResponse,
    RetryPolicy,
    Session,
    StepResult,
    Timeout,
    Transport,
    Urllib3Transport,
    check_format,
)
from .errors import APIConnectionError, OptserveError, error_from_response

log = logging.getLogger("optserve_client")
T = TypeVar("T")
_UNSET: Any = object()


class Client(BaseClient):
    """Talks to one optserve server. Thread-safe; use as a context manager or call close().

    ``base_url`` defaults to ``$OPTSERVE_URL`` (then http://127.0.0.1:8000), ``api_key`` to
    ``$OPTSERVE_API_KEY``. ``timeout`` is seconds (or ``(connect, read)``); a sync-mode step
    waits for its round, so give it more than the round's ``timeout_s``. ``transport`` is
    any object with ``send(RawRequest, Timeout) -> RawResponse`` and ``close()`` (tests
    inject faults there); the default is `Urllib3Transport`.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | tuple[float | None, float | None] | Timeout | None = 60.0,
                 max_retries: int = 3, format: Format = "safetensors", *,
                 transport: Transport | None = None, max_connections: int = 32,
                 default_headers: Mapping[str, str] | None = None,
                 retry_policy: RetryPolicy | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, format,
                         default_headers=default_headers, retry_policy=retry_policy)
        self._transport: Transport = transport or Urllib3Transport(
            max_connections=max_connections)
        self._owns_transport = transport is None
        self._sleep: Callable[[float], None] = time.sleep

    # ------------------------------------------------------------------ lifecycle

    def with_options(self, *, timeout: Any = _UNSET, max_retries: int | None = None,
                     format: Format | None = None) -> Client:
        """A copy with other options that shares this client's connection pool."""
        other = Client.__new__(Client)
        other.__dict__.update(self.__dict__)
        other._owns_transport = False
        if timeout is not _UNSET:
            other.timeout = Timeout.of(timeout)
        if max_retries is not None:
            other.retry_policy = replace(self.retry_policy, max_retries=max_retries)
        if format is not None:
            other.format = check_format(format)
        return other

    def close(self) -> None:
        if self._owns_transport:
            self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the send loop

    def _run(self, call: Call[T], idempotency_key: str | None = None) -> T:
        """Send a call, retrying per the policy with the same request (and key) every try."""
        request = self._prepare(call, idempotency_key)
        policy = self.retry_policy
        if call.max_retries is not None:
            policy = replace(policy, max_retries=call.max_retries)
        attempt = 0
        ambiguous = False
        while True:
            try:
                resp: RawResponse = self._transport.send(request, self.timeout)
            except APIConnectionError as exc:
                delay = policy.delay_for_exception(exc, call.idempotent, attempt,
                                                   self._sleep_rng)
                if delay is None:
                    raise
                ambiguous = ambiguous or exc.request_sent is not False
                log.info("%s %s: %s; retry %d in %.2fs", call.method, call.path, exc,
                         attempt + 1, delay)
                self._sleep(delay)
                attempt += 1
                continue
            if resp.status < 400 or (resp.status == 404 and ambiguous
                                     and call.absent_ok_on_retry):
                return call.parse(resp, attempt + 1)
            delay = policy.delay_for_status(resp.status, resp.headers, attempt,
                                            self._sleep_rng)
            if delay is None:
                raise error_from_response(resp.status, resp.body, resp.headers,
                                          method=call.method, url=request.url)
            log.info("%s %s: HTTP %d; retry %d in %.2fs", call.method, call.path,
                     resp.status, attempt + 1, delay)
            self._sleep(delay)
            attempt += 1

    # ------------------------------------------------------------------ sessions

    def create_session(self, optimizer: str = "rmsprop",
                       hyperparams: Mapping[str, Any] | None = None,
                       params: Mapping[str, Any] | None = None, *, mode: str = "async",
                       max_staleness: int | None = None, sync: Mapping[str, Any] | None = None,
                       name: str | None = None, preset: str | None = None) -> Session:
        """Create a session. Small ``params`` go inline; large ones follow by a binary PUT
        (the session is deleted again if that upload fails). ``preset`` ("standard", "rnn",
        "momentum") fills RMSprop hyperparameters that ``hyperparams`` does not set."""
        inline = self._inline(params)
        session = self._run(self._create_session_call(
            optimizer, hyperparams, params if inline else None, mode, max_staleness, sync,
            name, preset), self._new_idempotency_key())
        if not inline and params is not None:
            try:
                session = self.put_params(session.id, params)
            except BaseException:
                try:
                    self.delete_session(session.id)
                except Exception:
                    log.warning("could not delete half-created session %s", session.id)
                raise
        return session

    def list_sessions(self) -> list[Session]:
        return self._run(self._list_sessions_call())

    def get_session(self, session_id: str | Session) -> Session:
        return self._run(self._get_session_call(session_id))

    def update_session(self, session_id: str | Session,
                       hyperparams: Mapping[str, Any] | None = None, **fields: Any) -> Session:
        """PATCH the session: ``hyperparams`` (merged by the server) and any other fields."""
        return self._run(self._update_session_call(session_id, hyperparams, fields))

    def delete_session(self, session_id: str | Session) -> None:
        self._run(self._delete_session_call(session_id))

    # ------------------------------------------------------------------ tensors

    def get_params(self, session_id: str | Session, *, as_: ArrayKind = "numpy"
                   ) -> tuple[dict[str, Any], int]:
        """The current parameters and their version."""
        return self._run(self._get_params_call(session_id, as_))

    def put_params(self, session_id: str | Session, params: Mapping[str, Any],
                   if_match: int | str | None = None) -> Session:
        """Upload every parameter; after version 0 the server wants ``if_match``."""
        return self._run(self._put_params_call(session_id, params, if_match))

    def step(self, session_id: str | Session, grads: Mapping[str, Any], *,
             base_version: int | None = None, weight: float | None = None,
             if_match: int | str | None = None, idempotency_key: str | None = None,
             return_params: bool = True, grad_dtype: str | None = None,
             as_: ArrayKind | None = None) -> StepResult:
        """Push gradients (None entries are left out: the parameter is not touched).

        Every try of this one logical step carries the same Idempotency-Key (generated
        unless given), so a retry after a lost response is never applied twice.
        ``grad_dtype="bfloat16"|"float16"`` halves the upload. The returned params are
        torch tensors if the gradients were, else NumPy arrays (``as_`` overrides).
        """
        call = self._step_call(session_id, grads, base_version=base_version, weight=weight,
                               if_match=if_match, return_params=return_params,
                               grad_dtype=grad_dtype, as_=as_)
        return self._run(call, idempotency_key or self._new_idempotency_key())

    def get_state(self, session_id: str | Session, *, as_: ArrayKind = "numpy"
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The whole state: tensors (``param.<name>``, ``state.<name>.<key>``) and the
        metadata {optimizer, hyperparams, version}."""
        return self._run(self._get_state_call(session_id, as_))

    def put_state(self, session_id: str | Session, tensors: Mapping[str, Any],
                  meta: Mapping[str, Any], if_match: int | str | None = None
                  ) -> Session | None:
        """Import a state in the form `get_state` returns."""
        return self._run(self._put_state_call(session_id, tensors, meta, if_match))

    # ------------------------------------------------------------------ operations

    def stats(self, session_id: str | Session) -> dict[str, Any]:
        return self._run(self._stats_call(session_id))

    def ready(self) -> bool:
        """Whether the server and its state store answer (no retries)."""
        return self._probe("/readyz")

    def live(self) -> bool:
        return self._probe("/livez")

    def _probe(self, path: str) -> bool:
        try:
            return self._run(self._probe_call(path))
        except OptserveError:
            return False

    def metrics(self) -> str:
        return self._run(self._metrics_call())
