"""A response's tensor memory is changed only after the transport took every byte.

`TensorResponse` sends tensors from their own memory, then hands them back (`after_send`,
with an event the next step waits for before changing them, `Loaded.settled`). uvloop keeps
unsent bytes by reference, so `optserve serve` runs uvicorn's protocol with no write buffer
(`api/http_protocol.py`) and the event is set when the response's closing message returns:
when the transport holds none of the bytes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from optserve.api.http_protocol import protocol_class
from optserve.api.tensors import JOIN_BELOW, TensorResponse
from optserve.store.embedded import free_port

SIZE = 16 << 20
memory = bytearray(SIZE)
tasks: set[asyncio.Future[None]] = set()


async def app(scope: dict, receive: object, send: object) -> None:
    if scope["type"] != "http":
        return
    n = SIZE if scope["path"] == "/big" else 1000
    memory[:n] = b"A" * n

    def next_step(sending: asyncio.Event | None = None) -> None:
        """The tensors go back to the cache: the next step changes them once no response
        holds their bytes (`Loaded.settled`)."""
        async def step() -> None:
            if sending is not None:
                await sending.wait()
            memory[:n] = b"B" * n

        tasks.add(asyncio.ensure_future(step()))

    parts = [b"head", memoryview(memory)[:n]]
    await TensorResponse(parts, "application/octet-stream", {}, after_send=next_step)(
        scope, receive, send)


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            http=protocol_class(request.param), lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(5)


def _get(addr: str, path: str, pause: float) -> bytes:
    host, port = addr.split(":")
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        time.sleep(pause)  # a slow reader: the server cannot hand everything to the kernel
        data = bytearray()
        while chunk := s.recv(1 << 20):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return body


def test_a_large_answer_is_sent_whole_before_its_memory_changes(server: str) -> None:
    body = _get(server, "/big", pause=0.5)
    assert len(body) == 4 + SIZE
    assert body[4:].count(b"B") == 0  # nothing of the "next step" reached the client
    assert body[:4] == b"head"


def test_a_small_answer_is_joined_and_intact(server: str) -> None:
    assert JOIN_BELOW >= 1004
    assert _get(server, "/small", pause=0.0) == b"head" + b"A" * 1000


def test_a_step_waits_briefly_for_lent_tensors_then_leaves_them_to_the_reader() -> None:
    from optserve.cache import Loaded

    async def main() -> tuple[bool, bool, bool]:
        item = Loaded(version=1, params={}, state={})
        assert await item.settled(0.01)  # never lent
        item.sending = asyncio.Event()
        slow = await item.settled(0.05)  # a reader that never takes the bytes
        item.sending = asyncio.Event()
        asyncio.get_running_loop().call_later(0.02, item.sending.set)
        drained = await item.settled(1.0)  # the transport lets go in time
        return slow, drained, item.sending is None

    assert asyncio.run(main()) == (False, True, True)
