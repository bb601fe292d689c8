"""The asyncio client: `Client`'s API with ``async def``, the same requests and retry policy.

The default transport runs the blocking transport (`SocketTransport`) in a private thread
pool instead of using an asyncio HTTP stack: the pure-Python async stacks (httpx/h11, asyncio
streams) move large tensor bodies several times slower, while a blocking
``sendall``/``recv_into`` releases the GIL and runs at socket speed. One thread per in-flight
request, ``max_connections`` at most. A cancelled call stops waiting at once; its request
still finishes in its thread (a cancelled step may therefore be applied, exactly as a step
whose response was lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from ._base import BaseClient
from ._codec import ArrayKind
from ._requests import Call
from ._results import Session, StepResult
from ._socket_transport import SocketTransport
from ._transport import RawRequest, RawResponse, Timeout, Transport
from .errors import APIConnectionError, OptserveError

log = logging.getLogger("optserve_client")
T = TypeVar("T")


class AsyncTransport(Protocol):
    async def send(self, request: RawRequest, timeout: Timeout) -> RawResponse: ...

    async def aclose(self) -> None: ...


class ThreadedAsyncTransport:
    """Runs a blocking `Transport` in its own thread pool. Pickles as its settings and its
    blocking transport; the copy starts its own threads."""

    def __init__(self, transport: Transport | None = None, *, max_connections: int = 32
                 ) -> None:
        self._max_connections = max_connections
        self._transport = transport or SocketTransport(max_connections=max_connections)
        self._executor = ThreadPoolExecutor(max_workers=max_connections,
                                            thread_name_prefix="optserve-http")

    async def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transport.send, request,
                                          timeout)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"transport": self._transport, "max_connections": self._max_connections}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


class AsyncClient(BaseClient):
    """`Client` for asyncio: same constructor, same methods, awaited.

    ``transport`` is an object with ``async send(RawRequest, Timeout)`` and
    ``async aclose()``; the default is `ThreadedAsyncTransport`.
    """

    _default_transport = ThreadedAsyncTransport
    _sleep_in = asyncio

    async def close(self) -> None:
        if self._owns_transport:
            await self._transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, call: Call[T], idempotency_key: str | None = None) -> T:
        """`Client._run`, awaiting instead of blocking."""
        tries = self._tries(call, idempotency_key)
        if isinstance(tries.request.body, list):
            # A snapshot: the send runs in another thread, and a cancelled call's send
            # outlives it; the caller may reuse its arrays as soon as it stops awaiting.
            tries.request.body = b"".join(tries.request.body)
        while (delay := tries.judge(await self._send(tries.request))) is not None:
            await self._sleep(delay)
        return tries.result

    async def create_session(self, optimizer: str = "rmsprop",
                             hyperparams: Mapping[str, Any] | None = None,
                             params: Mapping[str, Any] | None = None, *, mode: str = "async",
                             max_staleness: int | None = None,
                             sync: Mapping[str, Any] | None = None, name: str | None = None,
                             preset: str | None = None) -> Session:
        """See `Client.create_session`."""
        call, upload = self._create_session_call(optimizer, hyperparams, params, mode,
                                                 max_staleness, sync, name, preset)
        session = await self._run(call, self._new_idempotency_key())
        if upload is None:
            return session
        try:
            return await self.put_params(session.id, upload)
        except BaseException:
            try:
                await self.delete_session(session.id)
            except Exception:
                log.warning("could not delete half-created session %s", session.id)
            raise

    async def list_sessions(self) -> list[Session]:
        return await self._run(self._list_sessions_call())

    async def get_session(self, session_id: str | Session) -> Session:
        return await self._run(self._get_session_call(session_id))

    async def update_session(self, session_id: str | Session,
                             hyperparams: Mapping[str, Any] | None = None, **fields: Any
                             ) -> Session:
        return await self._run(self._update_session_call(session_id, hyperparams, fields))

    async def delete_session(self, session_id: str | Session) -> None:
        await self._run(self._delete_session_call(session_id))

    async def get_params(self, session_id: str | Session, *, as_: ArrayKind = "numpy"
                         ) -> tuple[dict[str, Any], int]:
        return await self._run(self._get_params_call(session_id, as_))

    async def put_params(self, session_id: str | Session, params: Mapping[str, Any],
                         if_match: int | str | None = None) -> Session:
        return await self._run(self._put_params_call(session_id, params, if_match))

    async def step(self, session_id: str | Session, grads: Mapping[str, Any], *,
                   base_version: int | None = None, weight: float | None = None,
                   if_match: int | str | None = None, idempotency_key: str | None = None,
                   return_params: bool = True, grad_dtype: str | None = None,
                   as_: ArrayKind | None = None,
                   hyperparams: Mapping[str, Any] | None = None) -> StepResult:
        """See `Client.step`."""
        call = self._step_call(session_id, grads, base_version=base_version, weight=weight,
                               if_match=if_match, return_params=return_params,
                               grad_dtype=grad_dtype, as_=as_, hyperparams=hyperparams)
        return await self._run(call, idempotency_key or self._new_idempotency_key())

    async def get_state(self, session_id: str | Session, *, as_: ArrayKind = "numpy"
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
        return await self._run(self._get_state_call(session_id, as_))

    async def put_state(self, session_id: str | Session, tensors: Mapping[str, Any],
                        meta: Mapping[str, Any], if_match: int | str | None = None
                        ) -> Session | None:
        return await self._run(self._put_state_call(session_id, tensors, meta, if_match))

    async def stats(self, session_id: str | Session) -> dict[str, Any]:
        return await self._run(self._stats_call(session_id))

    async def ready(self) -> bool:
        return await self._probe("/readyz")

    async def live(self) -> bool:
        return await self._probe("/livez")

    async def _send(self, request: RawRequest) -> RawResponse | APIConnectionError:
        try:
            return await self._transport.send(request, self.timeout)
        except APIConnectionError as exc:
            return exc

    async def _probe(self, path: str) -> bool:
        try:
            return await self._run(self._probe_call(path))
        except OptserveError:
            return False

    async def metrics(self) -> str:
        return await self._run(self._metrics_call())
