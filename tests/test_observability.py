"""Operator signals: metrics across worker processes, the metrics key and port, JSON logs
with request ids, and OpenTelemetry spans (real servers, real Redis)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from optserve.store.embedded import free_port

from conftest import ROOT, start_thread_server, wait_until_live
from helpers import create, step


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text page (labels matched exactly)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    return None


class Serve:
    """`optserve serve` in a subprocess, stderr collected line by line."""

    def __init__(self, redis_url: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        full.update(OPTSERVE_REDIS_URL=redis_url, OPTSERVE_KERNEL="exact", **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "optserve.cli", "serve", "--port", str(self.port)],
            env=full, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_until_live(self.url, timeout=120, proc=self.proc)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def two_workers(redis_url: str) -> Iterator[Serve]:
    """Two uvicorn workers, JSON logs at info, metrics on their own port behind a key."""
    mport = free_port()
    srv = Serve(redis_url, OPTSERVE_WORKERS="2", OPTSERVE_LOG_FORMAT="json",
                OPTSERVE_LOG_LEVEL="info", OPTSERVE_METRICS_PORT=str(mport),
                OPTSERVE_METRICS_KEY="mk", OPTSERVE_API_KEYS="obs:ko")
    srv.metrics_url = f"http://127.0.0.1:{mport}/metrics"  # type: ignore[attr-defined]
    yield srv
    srv.stop()


@pytest.mark.slow
def test_two_workers_count_every_step_in_every_scrape(two_workers: Serve) -> None:
    n = 7
    auth = {"authorization": "Bearer ko"}
    # No keep-alive: each request is a new connection, which either worker may accept.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=two_workers.url, headers=auth, timeout=60,
                      limits=limits) as c:
        sid = create(c, {"w": torch.ones(4)}, optimizer="rmsprop")["id"]
        for _ in range(n):
            assert step(c, sid, {"w": torch.full((4,), 0.1)}).status_code == 200
    murl = two_workers.metrics_url  # type: ignore[attr-defined]
    with httpx.Client(timeout=60, limits=limits) as m:
        assert m.get(murl).status_code == 401  # the key is needed
        assert m.get(murl, headers={"authorization": "Bearer nope"}).status_code == 401
        pids: set[str] = set()
        for _ in range(6):
            page = m.get(murl, headers={"authorization": "Bearer mk"})
            assert page.status_code == 200
            assert _sample(page.text, "optserve_steps_applied_total", optimizer="rmsprop") == n
            assert _sample(page.text, "optserve_tenant_sessions", tenant="obs") == 1
            assert _sample(page.text, "optserve_tenant_stored_bytes", tenant="obs") > 0
            assert _sample(page.text, "optserve_step_seconds_count", mode="async") == n
            pids |= set(re.findall(r'process_resident_memory_bytes\{pid="(\d+)"\}', page.text))
        # both workers' process metrics (a worker that uvicorn replaced, e.g. after a missed
        # health check on a loaded machine, may still be listed beside them)
        assert len(pids) >= 2
        # the API's own port does not serve them when the metrics port does
        assert m.get(f"{two_workers.url}/metrics").status_code == 404


@pytest.mark.slow
def test_one_worker_keeps_its_values_in_memory_on_both_ports(redis_url: str) -> None:
    """One worker needs no shared files: its values stay in memory (no `pid` label on its
    process metrics), and both the API's /metrics and a separate metrics port count every
    step (the port's server runs in the same process as the one worker)."""
    n = 5
    mport = free_port()
    srv = Serve(redis_url, OPTSERVE_METRICS_PORT=str(mport))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            sid = create(c, {"w": torch.ones(4)}, optimizer="rmsprop")["id"]
            for _ in range(n):
                assert step(c, sid, {"w": torch.full((4,), 0.1)}).status_code == 200
            page = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=60)
            assert page.status_code == 200
            assert _sample(page.text, "optserve_steps_applied_total", optimizer="rmsprop") == n
            assert _sample(page.text, "optserve_hot_steps_total", result="committed") >= n - 2
            assert _sample(page.text, "process_resident_memory_bytes") is not None
            assert "process_resident_memory_bytes{pid=" not in page.text
    finally:
        srv.stop()


@pytest.mark.slow
def test_json_access_lines_carry_the_request(two_workers: Serve) -> None:
    with httpx.Client(base_url=two_workers.url, timeout=60,
                      headers={"authorization": "Bearer ko"}) as c:
        sid = create(c, {"w": torch.ones(2)})["id"]
        r = step(c, sid, {"w": torch.ones(2)}, headers={"x-request-id": "req-abc-123"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc-123"
        fresh = c.get(f"/v1/sessions/{sid}").headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", fresh)  # none sent: one is made
        bad = c.get("/livez", headers={"x-request-id": "has space"}).headers["x-request-id"]
        assert bad != "has space"

    def find() -> dict[str, Any] | None:
        for line in list(two_workers.lines):
            if line.startswith("{"):
                doc = json.loads(line)
                if doc.get("request_id") == "req-abc-123" and doc["logger"] == "optserve.access":
                    return doc
        return None

    for _ in range(50):
        doc = find()
        if doc is not None:
            break
        threading.Event().wait(0.1)
    assert doc is not None, "".join(two_workers.lines)[-3000:]
    assert doc["level"] == "info" and doc["ts"].endswith("Z")
    assert doc["tenant"] == "obs" and doc["session"] == sid
    assert doc["route"] == "/v1/sessions/{session_id}/step"
    assert doc["method"] == "POST" and doc["status"] == 200
    assert doc["bytes_in"] > 0 and doc["bytes_out"] > 0 and doc["duration_ms"] > 0
    # every line is JSON, uvicorn's own included
    lines = [ln for ln in two_workers.lines if ln.strip()]
    other = [ln for ln in lines if not ln.startswith("{") and not ln.startswith("optserve: ")]
    assert not other, other
    assert any(json.loads(ln)["logger"].startswith("uvicorn") for ln in lines
               if ln.startswith("{"))


def test_metrics_key_on_the_api_port(redis_url: str) -> None:
    srv = start_thread_server(redis_url=redis_url, kernel="exact", metrics_key="s3cret")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.get("/metrics")
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            ok = c.get("/metrics", headers={"authorization": "Bearer s3cret"})
            assert ok.status_code == 200
            assert _sample(ok.text, "optserve_tenant_usage_up") == 1
            assert "optserve_requests_in_flight" in ok.text
    finally:
        srv.stop()


# -- tracing ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spans() -> Any:
    pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_traceparent_is_the_server_span_parent_and_a_step_has_its_spans(
        spans: Any, live_server: str) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    with httpx.Client(base_url=live_server, timeout=30) as c:
        sid = create(c, {"w": torch.ones(3)})["id"]
        spans.clear()
        r = step(c, sid, {"w": torch.ones(3)},
                 headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert r.status_code == 200
    got = [s for s in spans.get_finished_spans()
           if format(s.context.trace_id, "032x") == trace_id]
    server = [s for s in got if s.name == "POST /v1/sessions/{session_id}/step"]
    assert len(server) == 1, [s.name for s in got]
    assert format(server[0].parent.span_id, "016x") == parent_id
    assert server[0].attributes["http.response.status_code"] == 200
    redis_spans = [s for s in got if s.name.startswith("redis ")]
    update = [s for s in got if s.name == "optimizer.update"]
    assert redis_spans and len(update) == 1
    within = {s.context.span_id for s in got}
    assert all(s.parent is not None and s.parent.span_id in within
               for s in [*redis_spans, *update])
