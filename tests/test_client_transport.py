"""The default transports against a tiny local HTTP server (no optserve needed)."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import optserve_client as oc
from optserve_client import wire


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections = 0

    def setup(self) -> None:
        super().setup()
        type(self).connections += 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        if self.path.startswith("/close"):
            self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", self.headers.get("Content-Type", ""))
        self.send_header("X-Optserve-Version", "1")
        if self.path.startswith("/chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 1000):
                part = body[i:i + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[str]:
    Echo.connections = 0
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(params=["socket", "urllib3"])
def transport(request: pytest.FixtureRequest) -> Iterator[oc.Transport]:
    """Each blocking transport the SDK ships: the default, and urllib3's (https://)."""
    t = oc.SocketTransport() if request.param == "socket" else oc.Urllib3Transport()
    yield t
    t.close()


def req(url: str, body: bytes) -> oc.RawRequest:
    return oc.RawRequest("POST", url, {"Content-Type": "application/octet-stream"}, body)


def test_large_body_round_trip_into_a_writable_buffer(echo: str, transport: oc.Transport
                                                      ) -> None:
    t = transport
    body = np.random.default_rng(0).bytes(8 << 20)
    resp = t.send(req(echo + "/echo", body), oc.Timeout(5, 5))
    assert resp.status == 200 and not memoryview(resp.body).readonly
    assert resp.body == body
    assert resp.headers["x-optserve-version"] == "1"  # header names lower-cased


def test_connections_are_reused(echo: str, transport: oc.Transport) -> None:
    t = transport
    for _ in range(5):
        assert t.send(req(echo + "/echo", b"abc"), oc.Timeout(5, 5)).body == b"abc"
    assert Echo.connections == 1
    # a connection the server closed is noticed and replaced, not failed on
    t.send(req(echo + "/close", b"x"), oc.Timeout(5, 5))
    assert t.send(req(echo + "/echo", b"y"), oc.Timeout(5, 5)).body == b"y"
    assert Echo.connections == 2


def test_chunked_responses(echo: str, transport: oc.Transport) -> None:
    t = transport
    body = bytes(range(256)) * 50
    assert t.send(req(echo + "/chunked", body), oc.Timeout(5, 5)).body == body


def test_connection_refused_is_never_sent(transport: oc.Transport) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(oc.APIConnectionError) as exc:
        transport.send(req(f"http://127.0.0.1:{port}/x", b""), oc.Timeout(1, 1))
    assert exc.value.request_sent is False
    assert not isinstance(exc.value, oc.APITimeoutError)


def test_read_timeout(echo: str, transport: oc.Transport) -> None:
    with pytest.raises(oc.APITimeoutError) as exc:
        transport.send(req(echo + "/slow", b"x"), oc.Timeout(1, 0.2))
    assert exc.value.request_sent is True


def test_client_over_the_echo(echo: str) -> None:
    """A step's body comes back as its 'parameters': the codec and transport end to end."""
    grads = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(1, np.float64)}
    with oc.Client(echo) as c:
        res = c.step("s", grads)
    assert res.version == 1
    for k, v in grads.items():
        assert res.params[k].dtype == v.dtype
        np.testing.assert_array_equal(res.params[k], v)

    async def main() -> oc.StepResult:
        async with oc.AsyncClient(echo, format="json") as ac:
            return await ac.step("s", grads)

    res = asyncio.run(main())
    np.testing.assert_array_equal(res.params["a"], grads["a"])


def test_wire_ready_keeps_zero_dim() -> None:
    from optserve_client._base import wire_ready

    body = wire.encode_safetensors(wire_ready({"s": np.array(3.0, np.float32),
                                               "g": np.float64(2.0), "n": None}))
    tensors, _ = wire.decode_safetensors(body)
    assert tensors["s"].shape == () and tensors["g"].shape == () and "n" not in tensors
    assert float(wire.to_numpy(tensors["s"])) == 3.0


def test_a_header_seen_before_decodes_alike_and_is_still_checked() -> None:
    """Decoding remembers headers it has checked (by their bytes); a remembered header
    gives the same tensors over the new body, and a body whose data does not fit it is
    still refused."""
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.array([1.5, -2.0], dtype=np.float32)}
    body = wire.encode_safetensors(tensors, {"k": "v"})
    first, meta1 = wire.decode_safetensors(bytearray(body))
    again_body = bytearray(body)
    again, meta2 = wire.decode_safetensors(again_body)
    assert list(first) == list(again) == ["w", "b"] and meta1 == meta2 == {"k": "v"}
    for name, arr in tensors.items():
        assert np.array_equal(wire.to_numpy(again[name]), arr)
        assert again[name].data.obj is again_body  # a view over the new body, not the old
    meta2["k"] = "changed"  # the caller's copy: the remembered one is untouched
    assert wire.decode_safetensors(bytearray(body))[1] == {"k": "v"}
    for bad in (bytearray(body) + b"\0\0\0\0", bytearray(body)[:-4]):
        with pytest.raises(wire.WireError):
            wire.decode_safetensors(bad)


def test_a_remembered_encode_header_matches_the_layout_it_was_made_for() -> None:
    """Encoding remembers headers by names, dtypes, shapes, sizes and metadata: the same
    layout encodes to what a fresh encode gives; any change of one of them changes it."""
    try:  # an independent reader, where the test extra is installed
        import safetensors.numpy as st_numpy
    except ImportError:
        st_numpy = None

    def fresh(tensors: dict, meta: dict | None = None) -> bytes:
        wire._HEADS.clear()
        return wire.encode_safetensors(tensors, meta)

    base = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(2, np.float64)}
    variants = [
        (base, None), (base, {"k": "v"}), (base, {"k": "w"}),
        ({"w": base["w"].reshape(4, 3), "b": base["b"]}, None),
        ({"w": base["w"].astype(np.float64), "b": base["b"]}, None),
        ({"b": base["b"], "w": base["w"]}, None),
        ({"w": base["w"], "c": base["b"]}, None),
        ({"w": np.arange(6, dtype=np.float32), "b": base["b"]}, None),
    ]
    expected = [fresh(t, m) for t, m in variants]
    assert len(set(expected)) == len(variants)
    for _ in range(2):  # the second round is served from the remembered headers
        for (tensors, meta), want in zip(variants, expected, strict=True):
            got = wire.encode_safetensors(tensors, meta)
            assert got == want
            ours, _ = wire.decode_safetensors(bytearray(got))
            assert all(np.array_equal(wire.to_numpy(ours[n]), a) for n, a in tensors.items())
            if st_numpy is not None:
                loaded = st_numpy.load(got)
                assert all(np.array_equal(loaded[n], a) for n, a in tensors.items())


def test_requests_go_to_their_origins_pool_with_the_path_and_query() -> None:
    from optserve_client._transport import Urllib3Transport

    t = Urllib3Transport()
    pool, path = t._route("http://127.0.0.1:8123/base/v1/sessions/ab/step?return=none")
    assert (pool.host, pool.port, pool.scheme) == ("127.0.0.1", 8123, "http")
    assert path == "/base/v1/sessions/ab/step?return=none"
    again, _ = t._route("http://127.0.0.1:8123/v1/sessions")
    assert again is pool  # one pool per origin, as PoolManager keeps it
    other, path = t._route("https://[::1]:9000")
    assert other is not pool and path == "/" and other.scheme == "https"
    t.close()
