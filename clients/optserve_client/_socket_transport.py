"""The default transport for ``http://``: HTTP/1.1 on kept-alive sockets, parsed by hand.

A small step is mostly HTTP bookkeeping on the client: through urllib3 over http.client,
~0.45 ms of the SDK's ~0.5 ms of CPU per 1e4-element step here went to URL re-encoding,
header objects and http.client's header parsing (the standard library's e-mail parser).
The requests this SDK sends are simple (a method, a path, a few headers, a body of known
length) and the answers come from optserve (or a proxy in front of it), so this transport
writes the request itself and reads the status line and headers with a few string
operations; bodies are read into one writable buffer (Content-Length) or de-chunked.
``https://`` URLs, and anything else unusual, go to `Urllib3Transport`.

Connections are per origin, kept while idle (at most ``max_connections``), and checked
before reuse: one the server closed (its keep-alive timer) is replaced, never written to.
Errors map as urllib3's do: no connection -> `APIConnectionError` with
``request_sent=False``; a timeout while reading -> `APITimeoutError`, ``request_sent=True``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Any

import numpy as np

from ._transport import Origins, RawRequest, RawResponse, Timeout, Urllib3Transport
from .errors import APIConnectionError, APITimeoutError

MAX_HEAD = 64 * 1024  # status line and headers
_JOIN_BELOW = 64 * 1024  # body parts joined with the head into one send below this


class _Broken(Exception):
    """The response was not well-formed HTTP/1.1 (or the peer closed mid-way)."""


class _Conn:
    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()  # bytes read past the last response

    def usable(self) -> bool:
        """Idle and still open: nothing to read (an EOF or stray bytes mean it is not)."""
        if self.buf:
            return False
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(self.sock, select.POLLIN)
                return not poller.poll(0)
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class SocketTransport:
    """HTTP/1.1 keep-alive over plain sockets for ``http://``; urllib3 for the rest.
    Thread-safe. Pickles as its settings."""

    def __init__(self, *, max_connections: int = 32, **pool_kwargs: Any) -> None:
        self._settings: dict[str, Any] = {"max_connections": max_connections, **pool_kwargs}
        self._max = max_connections
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._lock = threading.Lock()
        self._fallback: Urllib3Transport | None = None
        # (host, port, Host header) of plain-http origins; None: urllib3 serves it
        self._origins = Origins(_parse_origin)

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:
        where, path = self._origins.split(request.url)
        if where is None or _unsafe(path, request.headers):
            return self._other().send(request, timeout)  # it encodes or refuses them
        host, port, host_header = where
        conn = self._take((host, port))
        if conn is None:
            conn = self._connect(host, port, timeout, request.url)
        try:
            conn.sock.settimeout(timeout.read)
            try:
                self._write(conn.sock, request, path, host_header)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The server may answer (413, 401) and close before taking the whole
                # body: read that answer, as urllib3 does; without one, this error stands.
                try:
                    status, headers, body, _ = _read_response(conn, request.method)
                except (OSError, _Broken):
                    raise exc from None
                conn.close()
                return RawResponse(status, headers, body)
            status, headers, body, keep = _read_response(conn, request.method)
        except TimeoutError as exc:
            conn.close()
            raise APITimeoutError(f"read timeout: {request.method} {request.url}",
                                  request_sent=True, cause=exc) from exc
        except (OSError, _Broken) as exc:
            conn.close()
            raise APIConnectionError(f"connection error: {request.method} {request.url}: "
                                     f"{exc or type(exc).__name__}", request_sent=None,
                                     cause=exc) from exc
        except BaseException:
            conn.close()
            raise
        if keep:
            self._give((host, port), conn)
        else:
            conn.close()
        return RawResponse(status, headers, body)

    def _other(self) -> Urllib3Transport:
        if self._fallback is None:
            self._fallback = Urllib3Transport(**self._settings)
        return self._fallback

    # ----------------------------------------------------------------------- connections
    def _take(self, key: tuple[str, int]) -> _Conn | None:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is None or conn.usable():
                return conn
            conn.close()

    def _give(self, key: tuple[str, int], conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max:
                idle.append(conn)
                return
        conn.close()

    @staticmethod
    def _connect(host: str, port: int, timeout: Timeout, url: str) -> _Conn:
        try:
            sock = socket.create_connection((host, port), timeout=timeout.connect)
        except TimeoutError as exc:
            raise APITimeoutError(f"connect timeout: {url}", request_sent=False,
                                  cause=exc) from exc
        except OSError as exc:
            raise APIConnectionError(f"cannot connect to {url}: {exc}", request_sent=False,
                                     cause=exc) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock)

    @staticmethod
    def _write(sock: socket.socket, request: RawRequest, path: str, host: str) -> None:
        body = request.body
        parts: list[bytes | memoryview] = (
            [] if body is None else
            [memoryview(body).cast("B")] if isinstance(body, (bytes, bytearray, memoryview))
            else [memoryview(p).cast("B") for p in body])
        size = sum(len(p) for p in parts)
        lines = [f"{request.method} {path} HTTP/1.1", f"Host: {host}"]
        for name, value in request.headers.items():
            if name.lower() not in ("host", "content-length", "transfer-encoding"):
                lines.append(f"{name}: {value}")
        if body is not None or request.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {size}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if size < _JOIN_BELOW:
            sock.sendall(b"".join([head, *parts]))
            return
        sock.sendall(head)
        for p in parts:
            sock.sendall(p)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()
        if self._fallback is not None:
            self._fallback.close()

    def __getstate__(self) -> dict[str, Any]:
        return self._settings  # sockets and locks do not pickle: rebuilt on load

    def __setstate__(self, settings: dict[str, Any]) -> None:
        self.__init__(**settings)  # type: ignore[misc]


def _parse_origin(origin: str) -> tuple[str, int, str] | None:
    """(host, port, Host header) of a plain-http origin, else None."""
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme.lower() != "http" or not rest or "@" in rest:
        return None
    host, port = rest, 80
    if rest.startswith("["):  # [v6]:port
        end = rest.find("]")
        if end < 0:
            return None
        host, tail = rest[1:end], rest[end + 1:]
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                return None
            port = int(tail[1:])
    elif ":" in rest:
        host, _, p = rest.rpartition(":")
        if not p.isdigit():
            return None
        port = int(p)
    if not host:
        return None
    return host, port, rest


def _unsafe(path: str, headers: dict[str, str]) -> bool:
    """Whether the path or a header holds what would break the request's framing."""
    if not path.isascii() or any(c in path for c in " \t\r\n"):
        return True  # urllib3 percent-encodes such a path
    return any("\r" in s or "\n" in s for kv in headers.items() for s in kv)


def _fill(conn: _Conn, need: int) -> None:
    """Read until `conn.buf` holds at least `need` bytes."""
    while len(conn.buf) < need:
        chunk = conn.sock.recv(max(65536, need - len(conn.buf)))
        if not chunk:
            raise _Broken("the server closed the connection before the response ended")
        conn.buf += chunk


def _read_response(conn: _Conn, method: str
                   ) -> tuple[int, dict[str, str], bytes | memoryview, bool]:
    while True:  # 1xx interim responses are skipped
        end = conn.buf.find(b"\r\n\r\n")
        while end < 0:
            if len(conn.buf) > MAX_HEAD:
                raise _Broken(f"response headers longer than {MAX_HEAD} bytes")
            _fill(conn, len(conn.buf) + 1)
            end = conn.buf.find(b"\r\n\r\n")
        lines = conn.buf[:end].decode("latin-1").split("\r\n")
        del conn.buf[:end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise _Broken(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(code)
        if 100 <= status < 200 and status != 101:
            continue
        break
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _Broken(f"malformed response header line {line[:80]!r}")
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    keep = version != "HTTP/1.0" and "close" not in headers.get("connection", "").lower()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return status, headers, _chunked(conn), keep
    length = headers.get("content-length")
    if length is None:  # until the server closes
        while True:
            chunk = conn.sock.recv(65536)
            if not chunk:
                break
            conn.buf += chunk
        body, conn.buf = bytes(conn.buf), bytearray()
        return status, headers, body, False
    if not length.isdigit():
        raise _Broken(f"bad Content-Length {length!r}")
    return status, headers, _exactly(conn, int(length)), keep


def _exactly(conn: _Conn, n: int) -> memoryview:
    """`n` body bytes into one writable buffer (``np.empty``: no zero-fill pass)."""
    view = memoryview(np.empty(n, dtype=np.uint8))
    have = min(n, len(conn.buf))
    view[:have] = conn.buf[:have]
    del conn.buf[:have]
    while have < n:
        k = conn.sock.recv_into(view[have:])
        if not k:
            raise _Broken(f"the server closed the connection {n - have} bytes before the "
                          "body's end")
        have += k
    return view


def _chunked(conn: _Conn) -> bytes:
    out = bytearray()
    while True:
        end = conn.buf.find(b"\r\n")
        while end < 0:
            _fill(conn, len(conn.buf) + 1)
            end = conn.buf.find(b"\r\n")
        size_text = bytes(conn.buf[:end]).split(b";")[0].strip()
        del conn.buf[:end + 2]
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Broken(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:  # trailers, then the blank line
            while True:
                end = conn.buf.find(b"\r\n")
                while end < 0:
                    _fill(conn, len(conn.buf) + 1)
                    end = conn.buf.find(b"\r\n")
                line = conn.buf[:end]
                del conn.buf[:end + 2]
                if not line:
                    return bytes(out)
        _fill(conn, size + 2)
        out += conn.buf[:size]
        del conn.buf[:size + 2]
