"""The SDK's default transport (`SocketTransport`) against scripted raw-socket servers:
the HTTP/1.1 framing cases urllib3 handled for us, and what it hands to urllib3."""

from __future__ import annotations

import contextlib
import pickle
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

import optserve_client as oc

Handler = Callable[[socket.socket], None]


def _read_request(conn: socket.socket) -> bytes:
    """The head and a Content-Length body (as far as it arrives)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


@pytest.fixture
def scripted() -> Iterator[Callable[[Handler], str]]:
    """Start a server whose connections, one at a time, are served by `handler(conn)`."""
    servers: list[socket.socket] = []

    def start(handler: Handler) -> str:
        srv = socket.create_server(("127.0.0.1", 0))
        servers.append(srv)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn, contextlib.suppress(OSError):
                    handler(conn)

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{srv.getsockname()[1]}"

    yield start
    for s in servers:
        s.close()


def post(url: str, body: object = b"abc", **headers: str) -> oc.RawRequest:
    return oc.RawRequest("POST", url, {"Content-Type": "application/octet-stream", **headers},
                         body)


def test_an_early_answer_to_a_large_body_is_read_not_lost(scripted) -> None:
    def handler(conn: socket.socket) -> None:
        conn.recv(1024)  # the head, not the 64 MB behind it
        conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n"
                     b"Connection: close\r\n\r\nbig!")
        conn.shutdown(socket.SHUT_RDWR)

    url = scripted(handler)
    t = oc.SocketTransport()
    resp = t.send(post(url + "/x", b"\0" * (64 << 20)), oc.Timeout(5, 5))
    assert resp.status == 413 and bytes(resp.body) == b"big!"


def test_bodies_to_the_close_interim_answers_and_old_versions(scripted) -> None:
    answers = iter([
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
        b"X-A: 1\r\nx-a: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ])

    def handler(conn: socket.socket) -> None:
        while True:
            if not _read_request(conn):
                return
            answer = next(answers)
            conn.sendall(answer)
            if answer.startswith(b"HTTP/1.0"):
                return  # closing is the body's end

    url = scripted(handler)
    t = oc.SocketTransport()
    first = t.send(post(url + "/a"), oc.Timeout(5, 5))
    assert (first.status, bytes(first.body), first.headers["x-a"]) == (200, b"ok", "1, 2")
    second = t.send(post(url + "/b"), oc.Timeout(5, 5))
    assert (second.status, bytes(second.body)) == (200, b"until close")
    third = t.send(post(url + "/c"), oc.Timeout(5, 5))  # a new connection: 1.0 closed
    assert (third.status, bytes(third.body)) == (204, b"")


@pytest.mark.parametrize("answer", [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"])
def test_a_broken_answer_is_a_connection_error(scripted, answer: bytes) -> None:
    def handler(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(answer)

    url = scripted(handler)
    with pytest.raises(oc.APIConnectionError) as exc:
        oc.SocketTransport().send(post(url + "/x"), oc.Timeout(5, 5))
    assert not isinstance(exc.value, oc.APITimeoutError)


def test_framing_characters_never_reach_the_wire(scripted) -> None:
    heads: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        while True:
            got = _read_request(conn)
            if not got:
                return
            heads.append(got.partition(b"\r\n\r\n")[0])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    url = scripted(handler)
    t = oc.SocketTransport()
    with pytest.raises(ValueError):  # urllib3 (http.client) refuses it, as before
        t.send(post(url + "/x", **{"Idempotency-Key": "k\r\nX-Evil: 1"}), oc.Timeout(5, 5))
    ok = t.send(post(url + "/a b?c=d e"), oc.Timeout(5, 5))  # urllib3 encodes the spaces
    assert ok.status == 200
    assert t.send(post(url + "/é"), oc.Timeout(5, 5)).status == 200  # and non-ASCII
    assert not any(b"X-Evil" in h for h in heads)
    assert heads[-2].split(b"\r\n")[0] == b"POST /a%20b?c=d%20e HTTP/1.1"
    assert heads[-1].split(b"\r\n")[0] == b"POST /%C3%A9 HTTP/1.1"


def test_https_goes_to_urllib3_and_the_transport_pickles(monkeypatch) -> None:
    sent: list[str] = []

    def fake(self: oc.Urllib3Transport, request: oc.RawRequest, timeout: oc.Timeout
             ) -> oc.RawResponse:
        sent.append(request.url)
        return oc.RawResponse(200, {}, b"")

    monkeypatch.setattr(oc.Urllib3Transport, "send", fake)
    t = pickle.loads(pickle.dumps(oc.SocketTransport(max_connections=3)))
    assert t.send(post("https://example.invalid/v1/x"), oc.Timeout(1, 1)).status == 200
    assert sent == ["https://example.invalid/v1/x"]
    t.close()


def test_idle_connections_are_bounded_and_reused(scripted) -> None:
    accepted: list[int] = []

    def handler(conn: socket.socket) -> None:
        accepted.append(1)
        while got := _read_request(conn):
            answer = b"ok" if got.endswith(b"\r\n\r\nabc") else b"no"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + answer)

    url = scripted(handler)
    t = oc.SocketTransport(max_connections=1)
    bodies = [b"abc", bytearray(b"abc"), memoryview(b"abc"), [b"a", memoryview(b"bc")]]
    for i in range(20):
        assert bytes(t.send(post(url + "/x", bodies[i % 4]), oc.Timeout(5, 5)).body) == b"ok"
    assert len(accepted) == 1
    t.close()
