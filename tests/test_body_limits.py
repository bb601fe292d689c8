"""Request bodies in bounded memory and time, against real server processes and raw sockets.

Slow clients that declare 64 MiB hold only what they sent; a body must arrive within the
body timeout (408); the bytes of all bodies in flight are bounded per process (503 with
Retry-After); a never-ending chunked body is cut off without growing the server.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch

from conftest import ThreadServer, start_thread_server
from helpers import ST, create, decode, snapshot, st_body, step
from rawhttp import chunk, connect, read_response, readable, rss_bytes

MIB = 1024 * 1024
PROBLEM = "application/problem+json"


def _problem(status: int, headers: dict[str, str], doc: dict[str, Any], code: str) -> None:
    assert status == doc["status"] and doc["code"] == code, doc
    assert headers["content-type"].startswith(PROBLEM)
    assert {"type", "title", "detail"} <= set(doc)


def _step_head(sid: str, length: int | None, key: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": ST}
    if length is None:
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Content-Length"] = str(length)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def test_slow_clients_declaring_64_mib_hold_only_what_they_sent(make_server: Any) -> None:
    """40 connections declare 64 MiB each and trickle bytes: the server grows by what
    arrived (not 2.5 GiB), another tenant's small steps stay fast, and each slow request
    ends with 408 when the body timeout passes."""
    srv = make_server(api_keys="slow:ks,fast:kf", body_timeout_s=5)
    with httpx.Client(base_url=srv.url, headers={"authorization": "Bearer ks"}) as slow, \
            httpx.Client(base_url=srv.url, headers={"authorization": "Bearer kf"}) as fast:
        target = create(slow, {"w": torch.zeros(16)})
        before = snapshot(slow, target["id"])
        mine = create(fast, {"w": torch.zeros(64)})
        for _ in range(5):  # warm up the step path before measuring memory
            assert step(fast, mine["id"], {"w": torch.ones(64)}).status_code == 200
        base_rss = rss_bytes(srv.proc.pid)

        path = f"/v1/sessions/{target['id']}/step"
        socks = [connect(srv.url, "POST", path, _step_head(target["id"], 64 * MIB, "ks"))
                 for _ in range(40)]
        peak = [base_rss]
        stop = threading.Event()

        def trickle() -> None:  # 16 KiB per connection every 0.1 s, for 3 s (~19 MiB)
            piece = b"\0" * (16 * 1024)
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                for s in socks:
                    s.sendall(piece)
                peak[0] = max(peak[0], rss_bytes(srv.proc.pid))
                time.sleep(0.1)
            stop.set()

        t = threading.Thread(target=trickle)
        t.start()
        latencies = []
        while not stop.is_set():
            t0 = time.perf_counter()
            r = step(fast, mine["id"], {"w": torch.ones(64)})
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            peak[0] = max(peak[0], rss_bytes(srv.proc.pid))
        t.join()

        grown = peak[0] - base_rss
        assert grown < 150 * MIB, f"server grew by {grown / MIB:.0f} MiB"
        assert len(latencies) >= 5 and statistics.median(latencies) < 0.2, latencies

        statuses = []
        for s in socks:
            with s:
                resp = read_response(s, timeout=15)
                statuses.append(resp.status)
                _problem(resp.status, resp.headers, resp.json(), "request_timeout")
        assert statuses == [408] * 40
        assert snapshot(slow, target["id"]) == before
        assert step(slow, target["id"], {"w": torch.ones(16)}).status_code == 200


@pytest.fixture
def thread_server(redis_url: str) -> Iterator[Callable[..., ThreadServer]]:
    """Servers in this process (no start-up cost) for what needs no RSS of its own."""
    started: list[ThreadServer] = []

    def start(**settings: Any) -> ThreadServer:
        started.append(start_thread_server(redis_url=redis_url, fused="off", **settings))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


def test_body_timeout_is_408_and_changes_nothing(thread_server: Any) -> None:
    srv = thread_server(body_timeout_s=1)
    with httpx.Client(base_url=srv.url) as c:
        s = create(c, {"w": torch.zeros(100)})
        before = snapshot(c, s["id"])
        body = st_body({"w": torch.ones(100)})
        with connect(srv.url, "POST", f"/v1/sessions/{s['id']}/step",
                     _step_head(s["id"], len(body))) as sock:
            sock.sendall(body[: len(body) // 2])  # then nothing
            t0 = time.monotonic()
            resp = read_response(sock, timeout=10)
            waited = time.monotonic() - t0
        _problem(resp.status, resp.headers, resp.json(), "request_timeout")
        assert resp.status == 408 and 0.5 < waited < 5
        assert snapshot(c, s["id"]) == before
        assert step(c, s["id"], {"w": torch.ones(100)}).status_code == 200  # all else works


def test_never_ending_chunked_body_is_cut_off_without_growing(make_server: Any) -> None:
    srv = make_server(body_timeout_s=2)
    with httpx.Client(base_url=srv.url) as c:
        s = create(c, {"w": torch.zeros(10)})
        before = snapshot(c, s["id"])
        base_rss = rss_bytes(srv.proc.pid)
        peak = base_rss
        piece = chunk(b"\0" * 65536)
        with connect(srv.url, "POST", f"/v1/sessions/{s['id']}/step",
                     _step_head(s["id"], None)) as sock:
            end = time.monotonic() + 8
            while time.monotonic() < end and not readable(sock):
                try:
                    sock.sendall(piece)  # ~64 KiB every 5 ms, for as long as it is read
                except OSError:
                    break
                peak = max(peak, rss_bytes(srv.proc.pid))
                time.sleep(0.005)
            assert time.monotonic() < end, "the server read a body forever"
            resp = read_response(sock, timeout=10)
        assert resp.status in (408, 413)
        _problem(resp.status, resp.headers, resp.json(),
                 "request_timeout" if resp.status == 408 else "body_too_large")
        assert peak - base_rss < 150 * MIB, f"server grew by {(peak - base_rss) / MIB:.0f} MiB"
        assert snapshot(c, s["id"]) == before


def test_full_body_budget_is_503_with_retry_after(thread_server: Any) -> None:
    """One client holds most of a 1 MB budget: others get 503 server_busy + Retry-After,
    whether their declared length cannot fit or their chunks pass it as they arrive; a body
    larger than the whole budget is a 413; once the holder goes, steps work again."""
    srv = thread_server(max_inflight_body_bytes=1_000_000, body_timeout_s=30)
    with httpx.Client(base_url=srv.url) as c:
        s = create(c, {"w": torch.zeros(50_000)})  # a step body is ~200 KB
        before = snapshot(c, s["id"])
        path = f"/v1/sessions/{s['id']}/step"
        holder = connect(srv.url, "POST", path, _step_head(s["id"], 900_000))
        try:
            holder.sendall(b"\0" * 850_000)
            deadline = time.monotonic() + 10
            # Until the server has read (and charged) those bytes; probing meanwhile would
            # race the holder (whichever crosses the budget first is refused).
            while _bytes_in_flight(c) < 850_000 and time.monotonic() < deadline:
                time.sleep(0.02)
            # A step that got through would be refused by If-Match (412): nothing changes.
            r = step(c, s["id"], {"w": torch.ones(50_000)}, headers={"if-match": '"99"'})
            assert r.status_code == 503, r.text
            _problem(503, dict(r.headers), r.json(), "server_busy")
            assert int(r.headers["retry-after"]) >= 1

            # No Content-Length: refused as its chunks pass the budget.
            with connect(srv.url, "POST", path, _step_head(s["id"], None)) as sock:
                try:
                    for _ in range(4):
                        sock.sendall(chunk(b"\0" * 100_000))
                except OSError:
                    pass
                resp = read_response(sock)
            _problem(resp.status, resp.headers, resp.json(), "server_busy")
            assert resp.status == 503 and "retry-after" in resp.headers

            # Larger than the whole budget: it could never fit, so 413, at once.
            with connect(srv.url, "POST", path, _step_head(s["id"], 2_000_000)) as sock:
                resp = read_response(sock)
            _problem(resp.status, resp.headers, resp.json(), "body_too_large")
            assert resp.status == 413 and resp.json()["limit"] == 1_000_000
            assert snapshot(c, s["id"]) == before
        finally:
            holder.close()
        deadline = time.monotonic() + 10
        while (r := step(c, s["id"], {"w": torch.ones(50_000)})).status_code == 503:
            assert time.monotonic() < deadline, "the budget was never given back"
            time.sleep(0.1)
        assert r.status_code == 200, r.text


def _bytes_in_flight(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("optserve_request_body_bytes_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no optserve_request_body_bytes_in_flight in /metrics")


def test_large_body_arrives_whole(thread_server: Any) -> None:
    """A 40 MB step body, read as it arrives (in many chunks, with and without a
    Content-Length), steps exactly as torch does."""
    srv = thread_server()
    n = 10_000_000
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        s = create(c)
        r = c.put(f"/v1/sessions/{s['id']}/params", content=st_body({"w": torch.zeros(n)}),
                  headers={"content-type": ST})
        assert r.status_code == 200, r.text
        grads = torch.linspace(-1, 1, n)
        body = st_body({"w": grads})
        r = step(c, s["id"], {"w": grads}, params={"return": "none"})
        assert r.status_code == 200, r.text
        r = c.post(f"/v1/sessions/{s['id']}/step",
                   content=(body[i:i + 1_000_000] for i in range(0, len(body), 1_000_000)),
                   headers={"content-type": ST})
        assert r.status_code == 200, r.text
        w = torch.zeros(n, requires_grad=True)
        ref = torch.optim.RMSprop([w])
        for _ in range(2):
            w.grad = grads.clone()
            ref.step()
        assert torch.equal(decode(r)["w"], w.detach())
