"""Round-trip cost of a large body: the SDK's transport against the standard library.

A local echo server (its own process, so it does not share the client's GIL) answers each
POST with the body it received. We time one round trip of a ``--mb`` MB body (default 40,
about one step of a 10M-parameter float32 model) through:

- ``http.client``        one persistent HTTPConnection: the baseline
- ``sdk transport``      ``optserve_client.SocketTransport.send`` (what Client uses)
- ``urllib3 transport``  ``optserve_client.Urllib3Transport.send`` (https://, and before)
- ``sdk async``          ``AsyncClient``'s default transport (the same, in a thread pool)
- ``sdk Client.step``    the whole step: safetensors encode + transport + decode
- ``httpx``              ``httpx.Client().post`` for reference (if installed)

Rounds are interleaved across transports; the median and the best round are reported
with their ratios to http.client's (GB/s counts both directions). ``--check`` exits 1 if
the SDK transport costs more than 1.5x http.client.

    python benchmarks/bench_transport.py [--mb 40] [--rounds 15] [--check] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SERVER = r"""
import http.server, sys
class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", self.headers.get("Content-Type", "text/plain"))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Optserve-Version", "1")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def runners(url: str, body: bytes, with_httpx: bool = True) -> dict[str, Callable[[], Any]]:
    """One zero-argument round trip per transport, each on its own warm connection."""
    import optserve_client as oc

    host, port = url.removeprefix("http://").split(":")
    headers = {"Content-Type": "application/octet-stream"}
    conn = http.client.HTTPConnection(host, int(port))

    def stdlib() -> None:
        conn.request("POST", "/echo", body=body, headers=headers)
        resp = conn.getresponse()
        assert len(resp.read()) == len(body)

    transport = oc.SocketTransport()
    request = oc.RawRequest("POST", url + "/echo", headers, body)
    timeout = oc.Timeout(10, 60)

    def sdk() -> None:
        assert len(transport.send(request, timeout).body) == len(body)

    u3 = oc.Urllib3Transport()

    def sdk_urllib3() -> None:
        assert len(u3.send(request, timeout).body) == len(body)

    atransport = oc.ThreadedAsyncTransport()
    loop = asyncio.new_event_loop()

    def sdk_async() -> None:
        resp = loop.run_until_complete(atransport.send(request, timeout))
        assert len(resp.body) == len(body)

    client = oc.Client(url)
    grads = {"w": np.frombuffer(body, dtype=np.float32)}

    def sdk_step() -> None:
        res = client.step("bench", grads)
        assert res.params is not None and res.params["w"].nbytes == len(body)

    out: dict[str, Callable[[], Any]] = {"http.client": stdlib, "sdk transport": sdk,
                                         "urllib3 transport": sdk_urllib3,
                                         "sdk async": sdk_async, "sdk Client.step": sdk_step}
    if with_httpx:
        try:
            import httpx
        except ImportError:
            return out
        hx = httpx.Client(timeout=60)

        def via_httpx() -> None:
            assert len(hx.post(url + "/echo", content=body, headers=headers).content) == \
                len(body)

        out["httpx"] = via_httpx
    return out


def measure(url: str, mb: float, rounds: int, with_httpx: bool = True
            ) -> dict[str, list[float]]:
    body = os.urandom(int(mb * 1e6) // 4 * 4)
    fns = runners(url, body, with_httpx)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: connections, pages, thread pool
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], mb: float) -> dict[str, dict[str, float]]:
    base = statistics.median(times["http.client"])
    rows = {}
    print(f"{mb:g} MB POST echo round trip (request + response), median of "
          f"{len(times['http.client'])} rounds")
    best = min(times["http.client"])
    print(f"{'transport':<18}{'median ms':>11}{'min ms':>9}{'GB/s':>7}{'median ratio':>14}"
          f"{'min ratio':>11}")
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        rows[name] = {"median_s": med, "min_s": low, "ratio": med / base,
                      "min_ratio": low / best, "gb_per_s": 2 * mb / 1e3 / med}
        print(f"{name:<18}{med * 1e3:>11.1f}{low * 1e3:>9.1f}{2 * mb / 1e3 / med:>7.2f}"
              f"{med / base:>13.2f}x{low / best:>10.2f}x")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=40.0)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--url", help="an echo server to use instead of starting one")
    ap.add_argument("--no-httpx", action="store_true")
    ap.add_argument("--check", action="store_true", help="fail above 1.5x http.client")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server()
    try:
        rows = report(measure(url, args.mb, args.rounds, not args.no_httpx), args.mb)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mb": args.mb, "rounds": args.rounds, "results": rows}, f, indent=2)
    ratio = rows["sdk transport"]["ratio"]
    if args.check and ratio > 1.5:
        print(f"FAIL: the SDK transport costs {ratio:.2f}x http.client (limit 1.5x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
