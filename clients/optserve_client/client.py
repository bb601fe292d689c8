"""The synchronous client: every endpoint of the API, with retries and typed errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, TypeVar

from ._base import BaseClient
from ._codec import ArrayKind
from ._requests import Call
from ._results import Session, StepResult
from ._socket_transport import SocketTransport
from ._transport import RawRequest, RawResponse
from .errors import APIConnectionError, OptserveError

log = logging.getLogger("optserve_client")
T = TypeVar("T")


class Client(BaseClient):
    """Talks to one optserve server. Thread-safe; use as a context manager or call close().

    ``base_url`` defaults to ``$OPTSERVE_URL`` (then http://127.0.0.1:8000), ``api_key`` to
    ``$OPTSERVE_API_KEY``. ``timeout`` is seconds (or ``(connect, read)``); a sync-mode step
    waits for its round, so give it more than the round's ``timeout_s``. ``transport`` is
    any object with ``send(RawRequest, Timeout) -> RawResponse`` and ``close()`` (tests
    inject faults there); the default is `SocketTransport` (``https://`` through
    `Urllib3Transport`).

    A client pickles (Ray tasks and actors, multiprocessing) and deep-copies: the copy keeps
    the configuration and opens its own connections; a custom transport must pickle too.
    """

    _default_transport = SocketTransport
    _sleep_in = time

    # ------------------------------------------------------------------ lifecycle

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
        tries = self._tries(call, idempotency_key)
        while (delay := tries.judge(self._send(tries.request))) is not None:
            self._sleep(delay)
        return tries.result

    # ------------------------------------------------------------------ sessions

    def create_session(self, optimizer: str = "rmsprop",
                       hyperparams: Mapping[str, Any] | None = None,
                       params: Mapping[str, Any] | None = None, *, mode: str = "async",
                       max_staleness: int | None = None, sync: Mapping[str, Any] | None = None,
                       name: str | None = None, preset: str | None = None) -> Session:
        """Create a session. Small ``params`` go inline; large ones follow by a binary PUT
        (the session is deleted again if that upload fails). ``preset`` ("standard", "rnn",
        "momentum") fills RMSprop hyperparameters that ``hyperparams`` does not set."""
        call, upload = self._create_session_call(optimizer, hyperparams, params, mode,
                                                 max_staleness, sync, name, preset)
        session = self._run(call, self._new_idempotency_key())
        if upload is None:
            return session
        try:
            return self.put_params(session.id, upload)
        except BaseException:
            try:
                self.delete_session(session.id)
            except Exception:
                log.warning("could not delete half-created session %s", session.id)
            raise

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
             as_: ArrayKind | None = None,
             hyperparams: Mapping[str, Any] | None = None) -> StepResult:
        """Push gradients (None entries are left out: the parameter is not touched).

        Every try of this one logical step carries the same Idempotency-Key (generated
        unless given), so a retry after a lost response is never applied twice.
        ``grad_dtype="bfloat16"|"float16"`` halves the upload. The returned params are
        torch tensors if the gradients were, else NumPy arrays (``as_`` overrides).
        ``hyperparams`` (changes, merged as PATCH merges them; tensors such as a scheduler's
        ``lr`` are fine) apply to this step and are stored with it, in the same request.
        """
        call = self._step_call(session_id, grads, base_version=base_version, weight=weight,
                               if_match=if_match, return_params=return_params,
                               grad_dtype=grad_dtype, as_=as_, hyperparams=hyperparams)
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

    def _send(self, request: RawRequest) -> RawResponse | APIConnectionError:
        try:
            return self._transport.send(request, self.timeout)
        except APIConnectionError as exc:
            return exc

    def _probe(self, path: str) -> bool:
        try:
            return self._run(self._probe_call(path))
        except OptserveError:
            return False

    def metrics(self) -> str:
        return self._run(self._metrics_call())
