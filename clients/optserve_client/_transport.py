"""The HTTP layer: the request/response records, the `Transport` protocol, per-origin facts
parsed once (`Origins`), and the urllib3 transport (over http.client, bodies read into one
buffer without copies; `https://`, see `_socket_transport` for the default)."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import urllib3

from .errors import APIConnectionError, APITimeoutError

T = TypeVar("T")


@dataclass(frozen=True)
class Timeout:
    """Connect and read timeouts in seconds (None: wait forever)."""

    connect: float | None = 10.0
    read: float | None = 60.0

    @classmethod
    def of(cls, value: float | tuple[float | None, float | None] | Timeout | None) -> Timeout:
        if isinstance(value, Timeout):
            return value
        if value is None:
            return cls(None, None)
        if isinstance(value, tuple):
            return cls(*value)
        return cls(min(float(value), 10.0), float(value))


Body = bytes | list[bytes | memoryview]


@dataclass
class RawRequest:
    """One HTTP request. A list ``body`` is sent part by part (tensor memory, uncopied) and
    carries its Content-Length header; it can be iterated again for a retry."""

    method: str
    url: str
    headers: dict[str, str]
    body: Body | None = None


@dataclass
class RawResponse:
    """A whole response; ``headers`` keys are lower case, ``body`` is writable when possible."""

    status: int
    headers: dict[str, str]
    body: bytes | bytearray | memoryview


class Transport(Protocol):
    """Sends one request, no retries. Raises `APIConnectionError`/`APITimeoutError`."""

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse: ...

    def close(self) -> None: ...


class Urllib3Transport:
    """urllib3's pool over http.client, bodies read without copies (`https://`, and the
    default before `SocketTransport`).

    httpx (through h11) moves large bodies several times slower than http.client. urllib3
    hands each body part to ``sendall`` (a list body: the tensors' own memory, no join)
    and, for a response with a Content-Length, we ``readinto`` one uninitialised buffer:
    no chunk list, no join, no zero-fill, and the arrays decoded from it are writable.
    Thread-safe. Pickles as its settings: the copy opens its own pool (for Ray, multiprocessing).
    """

    def __init__(self, *, max_connections: int = 32, **pool_kwargs: Any) -> None:
        self._settings: dict[str, Any] = {"max_connections": max_connections, **pool_kwargs}
        # block=False: a burst beyond max_connections opens extra connections, not a queue
        self._pool = urllib3.PoolManager(num_pools=8, maxsize=max_connections, block=False,
                                         retries=False, **pool_kwargs)
        self._origins = Origins(_pool_key)

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:
        exc_mod = urllib3.exceptions
        try:
            # The host's own pool, the path alone: PoolManager.urlopen would parse the whole
            # URL again for every request (~30 us here, more than the rest of its work).
            pool, path = self._route(request.url)
            resp = pool.urlopen(
                request.method, path, body=request.body, headers=request.headers,
                retries=False, redirect=False, preload_content=False, assert_same_host=False,
                timeout=urllib3.Timeout(connect=timeout.connect, read=timeout.read),
            )
        except exc_mod.NewConnectionError as exc:  # before ConnectTimeoutError: a subclass
            raise APIConnectionError(f"cannot connect to {request.url}: {exc}",
                                     request_sent=False, cause=exc) from exc
        except exc_mod.ConnectTimeoutError as exc:
            raise APITimeoutError(f"connect timeout: {request.url}", request_sent=False,
                                  cause=exc) from exc
        except exc_mod.ReadTimeoutError as exc:
            raise APITimeoutError(f"read timeout: {request.method} {request.url}",
                                  request_sent=True, cause=exc) from exc
        except (exc_mod.HTTPError, OSError, http.client.HTTPException) as exc:
            raise APIConnectionError(f"connection error: {request.method} {request.url}: {exc}",
                                     request_sent=None, cause=exc) from exc
        try:
            body = _read_body(resp, request.method)
        except (TimeoutError, exc_mod.ReadTimeoutError) as exc:
            resp.close()
            raise APITimeoutError(f"read timeout: {request.method} {request.url}",
                                  request_sent=True, cause=exc) from exc
        except (exc_mod.HTTPError, OSError, http.client.HTTPException) as exc:
            resp.close()
            raise APIConnectionError(f"connection broke reading {request.url}: {exc}",
                                     request_sent=True, cause=exc) from exc
        finally:
            resp.release_conn()
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return RawResponse(resp.status, headers, body)

    def _route(self, url: str) -> tuple[Any, str]:
        """The connection pool of `url`'s origin, and its path and query."""
        (host, port, scheme), path = self._origins.split(url)
        return self._pool.connection_from_host(host, port=port, scheme=scheme), path

    def close(self) -> None:
        self._pool.clear()

    def __getstate__(self) -> dict[str, Any]:
        return self._settings  # a pool (locks, sockets) does not pickle: rebuilt on load

    def __setstate__(self, settings: dict[str, Any]) -> None:
        self.__init__(**settings)  # type: ignore[misc]


class Origins(Generic[T]):
    """What a transport needs to know of each origin, parsed once: `split(url)` gives it for
    the URL's origin (scheme and authority) and the URL's path and query."""

    def __init__(self, parse: Callable[[str], T], keep: int = 64) -> None:
        self._parse = parse
        self._keep = keep
        self._known: dict[str, T] = {}

    def split(self, url: str) -> tuple[T, str]:
        start = url.find("/", url.find("://") + 3) if "://" in url else -1
        origin, path = (url, "/") if start < 0 else (url[:start], url[start:])
        try:
            return self._known[origin], path
        except KeyError:
            value = self._known[origin] = self._parse(origin)
            if len(self._known) > self._keep:  # many hosts: keep the newest
                self._known.pop(next(iter(self._known)))
            return value, path


def _pool_key(origin: str) -> tuple[str | None, int | None, str]:
    parsed = urllib3.util.parse_url(origin)
    return parsed.host, parsed.port, parsed.scheme or "http"


def _read_body(resp: Any, method: str) -> bytes | memoryview:
    """Read a urllib3 response whole: into one writable buffer when the length is known.

    (``np.empty``, not ``bytearray(n)``: the latter zero-fills, a full extra pass over the
    memory that costs as much as the copy we avoid.)"""
    fp = getattr(resp, "_fp", None)
    length = resp.headers.get("content-length")
    if (method != "HEAD" and isinstance(fp, http.client.HTTPResponse) and length
            and length.isdigit() and not resp.headers.get("content-encoding")):
        n = int(length)
        view = memoryview(np.empty(n, dtype=np.uint8))
        got = 0
        while got < n:
            k = fp.readinto(view[got:])
            if not k:
                raise http.client.IncompleteRead(bytes(view[:got]), n - got)
            got += k
        return view
    return resp.read()

