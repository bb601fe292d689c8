"""Session affinity across replicas: the SDK names the session in ``X-Optserve-Session`` and
deploy/Caddyfile hashes it, so all requests of one session reach one replica; requests
without it still work (correctness never depends on affinity). Real caddy, two real server
processes on one Redis."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from optserve.store.embedded import free_port
from optserve_client import Client
from optserve_client.spec import SESSION_HEADER

CADDYFILE = Path(__file__).resolve().parents[1] / "deploy" / "Caddyfile"
_DYNAMIC = re.compile(r"\n\t\tdynamic a \{.*?\n\t\t\}\n", re.S)


def test_caddyfile_hashes_the_session_header() -> None:
    assert f"lb_policy header {SESSION_HEADER}" in CADDYFILE.read_text()


def _steps(url: str) -> float:
    """Steps this replica applied (its own process's counter)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("optserve_steps_applied_total{"))


@contextlib.contextmanager
def _caddy(upstreams: list[str], tmp: Path) -> Iterator[str]:
    """deploy/Caddyfile with its DNS upstreams replaced by `upstreams` (all else as is)."""
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.skip("caddy not installed (apt-get install caddy)")
    text, n = _DYNAMIC.subn("\n\t\tto " + " ".join(u.removeprefix("http://") for u in upstreams)
                            + "\n", CADDYFILE.read_text())
    assert n == 1, "deploy/Caddyfile's `dynamic a` block moved"
    conf = tmp / "Caddyfile"
    conf.write_text(text)
    port = free_port()
    env = {**os.environ, "HOME": str(tmp), "XDG_DATA_HOME": str(tmp / "data"),
           "XDG_CONFIG_HOME": str(tmp / "config"), "SITE_ADDRESS": f"http://127.0.0.1:{port}"}
    log = open(tmp / "caddy.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([caddy, "run", "--config", str(conf), "--adapter", "caddyfile"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp / "caddy.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, (tmp / "caddy.log").read_text()[-3000:]
            time.sleep(0.2)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()


def test_a_session_stays_on_one_replica(make_server: Any, tmp_path: Path) -> None:
    replicas = [make_server().url, make_server().url]
    with _caddy(replicas, tmp_path) as base:
        client = Client(base)
        served: list[int] = []
        for _ in range(12):
            session = client.create_session(optimizer="rmsprop", hyperparams={"lr": 0.01})
            client.put_params(session, {"w": np.zeros(4, np.float32)})
            before = [_steps(u) for u in replicas]
            for _ in range(4):
                client.step(session, {"w": np.ones(4, np.float32)})
            delta = [_steps(u) - b for u, b in zip(replicas, before, strict=True)]
            assert sorted(delta) == [0, 4], f"one session's steps were split: {delta}"
            served.append(delta.index(4))
        # Different sessions spread (all 12 on one replica: probability 2 / 2**12).
        assert set(served) == {0, 1}, served
        # Without the header any replica serves it: affinity is about speed only.
        sid = session.id
        for _ in range(4):
            resp = httpx.post(f"{base}/v1/sessions/{sid}/step?return=none",
                              json={"tensors": {"w": {"dtype": "float32", "shape": [4],
                                                      "data": [1, 1, 1, 1]}}}, timeout=30)
            assert resp.status_code == 200, resp.text
        assert client.get_session(sid).version == 8
        client.close()
