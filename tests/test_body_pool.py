"""Pooled request-body buffers: bytes exact, reused only when nothing points into them, and
a body's memory grows with what arrived (not with what it declared)."""

from __future__ import annotations

import numpy as np

from optserve.api.body_pool import MIN_POOLED, BodyPool, BodyReader


def _read(pool: BodyPool, data: bytes, declared: int, chunk: int = 65536) -> BodyReader:
    reader = BodyReader(pool, declared)
    for i in range(0, len(data), chunk):
        reader.add(data[i:i + chunk])
    return reader


def test_bytes_exact_and_buffer_reused_once_free() -> None:
    pool = BodyPool(64 << 20)
    data = np.random.default_rng(0).bytes(3_000_000)
    first = _read(pool, data, len(data))
    body = first.body()
    assert body == data
    address = np.frombuffer(body, np.uint8).ctypes.data
    del body
    first.release()
    again = _read(pool, data[::-1], len(data))
    body = again.body()
    assert body == data[::-1]
    assert np.frombuffer(body, np.uint8).ctypes.data == address  # the same mapped pages


def test_a_buffer_still_viewed_is_never_reused() -> None:
    pool = BodyPool(64 << 20)
    data = b"a" * 1_000_000
    reader = _read(pool, data, len(data))
    view = np.frombuffer(reader.body(), np.uint8)  # e.g. a gradient still held somewhere
    reader.release()
    other = _read(pool, b"b" * 1_000_000, 1_000_000).body()
    assert other == b"b" * 1_000_000
    assert bytes(view[:10]) == b"a" * 10 and view.ctypes.data != np.frombuffer(
        other, np.uint8).ctypes.data


def test_memory_follows_what_arrived() -> None:
    pool = BodyPool(64 << 20)
    reader = BodyReader(pool, 64 << 20)  # declares 64 MiB, sends 100 kB
    reader.add(b"x" * 100_000)
    assert reader.buf is not None and len(reader.buf) <= 2 * max(MIN_POOLED, 100_000)
    assert pool.kept == 0
