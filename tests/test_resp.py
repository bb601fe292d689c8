"""The step's RESP packer sends exactly the bytes redis-py's packer sends."""

from __future__ import annotations

import pytest
import torch
from redis.asyncio.connection import Connection

from optserve.store import resp


def _joined(chunks: list) -> bytes:
    return b"".join(bytes(c) for c in chunks)


@pytest.fixture(params=["hiredis", "python"])
def packer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of packing the small arguments: hiredis's C packer and the Python loop."""
    if request.param == "python":
        monkeypatch.setattr(resp, "_c_pack", None)
    elif resp._c_pack is None:
        pytest.skip("hiredis is not installed")
    return request.param


def test_same_bytes_as_redis_py_for_small_and_large_arguments(packer: str) -> None:
    big = torch.arange(50_000, dtype=torch.float32)
    view = memoryview(big.numpy()).cast("B")
    commands = [
        ("MULTI",),
        ("XADD", "os:{s}:wal", "3-0", "h", '{"hp": {"lr": 0.01}}', "g0", view),
        ("HSET", "os:{s}:t", "v", "3", "u", repr(1.5), "n", 7, "x", 0.25, b"raw\r\nbytes"),
        ("SET", "k", "é", "EX", 86400),
        ("SET", bytearray(b"ba"), memoryview(b"small"), -(2**70), float("inf"), view, view),
        ("CONFIG GET", "maxmemory"),
        ("EXEC",),
    ]
    ours = resp.pack(commands)
    assert _joined(ours) == _joined(Connection().pack_commands(commands))
    # The large buffer is passed through, not copied into the batch.
    assert any(isinstance(c, memoryview) and c.obj is view.obj for c in ours)


def test_a_typed_memoryview_is_sent_by_its_bytes(packer: str) -> None:
    floats = memoryview(torch.ones(5000).numpy())  # format "f": len() counts elements
    out = _joined(resp.pack([("SET", "k", floats)]))
    assert out.startswith(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$20000\r\n")
    assert out.endswith(b"\r\n") and len(out) == 28 + 20000 + 2
    small = memoryview(torch.ones(3).numpy())
    assert _joined(resp.pack([("SET", "k", small)])) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$12\r\n" + bytes(small) + b"\r\n")


@pytest.mark.parametrize("bad", [True, None, object()])
def test_values_redis_py_refuses_are_refused(bad: object, packer: str) -> None:
    with pytest.raises(TypeError):
        resp.pack([("SET", "k", bad)])
