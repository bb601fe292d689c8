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


def test_a_body_as_large_as_the_pool_is_read_into_its_kept_buffer_next_time() -> None:
    """The small classes a body grows through are given back on its way; they must not
    crowd out the buffer that holds the whole body (next time: no growth, no new pages)."""
    pool = BodyPool(1 << 20)
    data = bytes(range(256)) * 3000  # 768,000 bytes: the 1 MiB class, the whole pool
    first = _read(pool, data, len(data))
    assert bytes(first.body()) == data
    whole = id(first.buf)  # not a reference: a held buffer is never kept
    first.release()
    assert pool.kept == 1 << 20 and [id(b) for b in pool.free[1 << 20]] == [whole]
    second = BodyReader(pool, len(data))
    assert id(second.buf) == whole  # taken at once, for the declared length
    for i in range(0, len(data), 65536):
        second.add(data[i:i + 65536])
    assert id(second.buf) == whole and bytes(second.body()) == data
