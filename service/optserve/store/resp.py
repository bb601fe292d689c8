"""Commands packed into the Redis protocol (RESP) for `run_batch`.

redis-py's packer builds each argument with a chain of joins; for the step's batches
(a dozen small commands around a few large gradient buffers) that was a visible part of a
small step's CPU (README, "Where the microseconds go"). This packer writes every small
part into one growing bytearray and passes large buffers through untouched (memoryviews of
the request body or a tensor's memory: the gradient reaches the socket without a copy).
Arguments are encoded as redis-py encodes them: bytes-like as is, str as UTF-8, int and
float by `repr`; anything else (bool, None) is refused, as redis-py refuses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Buffers at least this large go to the socket as they are (no copy into the batch).
LARGE = 16 * 1024


def pack(commands: Iterable[Sequence[Any]]) -> list[bytes | bytearray | memoryview]:
    """The commands as RESP arrays, ready for `writelines`."""
    out: list[bytes | bytearray | memoryview] = []
    buf = bytearray()
    for cmd in commands:
        args: Sequence[Any] = cmd
        head = cmd[0]
        if isinstance(head, str) and " " in head:  # "CONFIG GET": separate words
            args = (*head.split(), *cmd[1:])
        buf += b"*%d\r\n" % len(args)
        for arg in args:
            kind = type(arg)
            if kind is str:  # the common cases first, by exact type
                data: bytes | bytearray | memoryview = arg.encode()
            elif kind is bytes or kind is bytearray:
                data = arg
            else:
                data = _other(arg)
            size = data.nbytes if type(data) is memoryview else len(data)
            if size >= LARGE:
                buf += b"$%d\r\n" % size
                out.append(buf)
                out.append(data if type(data) is not memoryview else data.cast("B"))
                buf = bytearray(b"\r\n")
            else:
                buf += b"$%d\r\n%b\r\n" % (size, data)
    if buf:
        out.append(buf)
    return out


def _other(arg: Any) -> bytes | bytearray | memoryview:
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return repr(arg).encode()
    raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
