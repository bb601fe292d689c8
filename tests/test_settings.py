"""Configuration: OPTSERVE_* variables, API keys from the variable and from a file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from optserve.settings import Settings


def test_keys_from_variable_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# tenant key\ncarol kc\n\ndave   kd\n")
    monkeypatch.setenv("OPTSERVE_API_KEYS", "alice:ka, bob:kb")
    monkeypatch.setenv("OPTSERVE_API_KEYS_FILE", str(keys_file))
    s = Settings()
    assert s.keys == {"ka": "alice", "kb": "bob", "kc": "carol", "kd": "dave"}
    assert s.tenant_for("kc") == "carol"
    assert s.tenant_for("k") is None and s.tenant_for("kcx") is None


def test_malformed_keys_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tenant:key"):
        _ = Settings(api_keys="alice").keys
    bad = tmp_path / "keys"
    bad.write_text("carol\n")
    with pytest.raises(ValueError, match="line 1"):
        _ = Settings(api_keys_file=bad).keys


def test_environment_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTSERVE_MAX_BODY_BYTES", "1024")
    monkeypatch.setenv("OPTSERVE_DEVICE", "cpu")
    s = Settings()
    assert s.max_body_bytes == 1024 and s.torch_device() == "cpu" and s.keys == {}
    with pytest.raises(ValidationError):
        Settings(device="tpu")
    with pytest.raises(ValidationError):
        Settings(log_level="chatty")


def test_cluster_nodes_or_sentinels_name_a_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the nodes (as deploy/docker-compose.cluster.yml sets them): the server starts
    on them, and `optserve serve` starts no Redis of its own."""
    for name in ("REDIS_URL", "REDIS_CLUSTER_NODES", "REDIS_SENTINELS"):
        monkeypatch.delenv(f"OPTSERVE_{name}", raising=False)
    assert not Settings().redis_given
    assert Settings(redis_cluster_nodes="redis-1:6379").redis_given
    assert Settings(redis_sentinels="s:26379", redis_sentinel_master="m").redis_given
    assert Settings(redis_url="redis://r:6379/0").redis_given
