"""The data directory's guards: one owner at a time, never a server older than its data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_embedded_redis import _versioned_binary

from optserve.store.data_dir import (
    DataDirLocked,
    DataWrittenByNewer,
    lock_data_dir,
    written_by,
)
from optserve.store.embedded import EmbeddedRedis


def test_a_locked_data_dir_is_refused_until_released(tmp_path: Path) -> None:
    first = EmbeddedRedis(data_dir=tmp_path)
    first.start()
    try:
        second = EmbeddedRedis(data_dir=tmp_path)
        with pytest.raises(DataDirLocked) as info:
            second.start()
        assert info.value.pid == os.getpid()
        assert second.process is None
    finally:
        first.stop()
    second.start()  # released by stop()
    try:
        assert second.client().ping()
    finally:
        second.stop()


def test_data_of_a_newer_server_is_refused(tmp_path: Path) -> None:
    (tmp_path / "appendonlydir").mkdir()  # 7.0's multi-part AOF, no version file
    server = EmbeddedRedis(data_dir=tmp_path, binary=str(_versioned_binary(tmp_path / "b",
                                                                            "6.2.0")))
    with pytest.raises(DataWrittenByNewer, match=r"written by redis-server 7\.0\.0"):
        server.start()
    assert server.process is None
    os.close(lock_data_dir(tmp_path))  # the lock was released: it can be taken again
    assert written_by(tmp_path) == (7, 0, 0)
