"""Commands packed into the Redis protocol (RESP) for `run_batch`.

redis-py's packer builds each argument with a chain of joins; for the step's batches
(a dozen small commands around a few large gradient buffers) that was a visible part of a
small step's CPU (README, "Where the microseconds go"). Here the small arguments are packed
by hiredis's C packer (`hiredis.pack_command`, ~3x faster than the Python loop this module
had) and large buffers are passed through untouched (memoryviews of the request body or a
tensor's memory: the gradient reaches the socket without a copy). Arguments are encoded as
redis-py encodes them: bytes-like as is, str as UTF-8, int and float by `repr`; anything
else (bool, None) is refused, as redis-py refuses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

try:
    from hiredis import pack_command as _c_pack
except ImportError:  # pragma: no cover - redis[hiredis] brings it; the Python path remains
    _c_pack = None

# Buffers at least this large go to the socket as they are (no copy into the batch).
LARGE = 16 * 1024

Chunk = bytes | bytearray | memoryview


def pack(commands: Iterable[Sequence[Any]]) -> list[Chunk]:
    """The commands as RESP arrays, ready for `writelines`."""
    out: list[Chunk] = []
    buf = bytearray()
    for cmd in commands:
        args: Sequence[Any] = cmd
        head = cmd[0]
        if type(head) is str and " " in head:  # "CONFIG GET": separate words
            args = (*head.split(), *cmd[1:])
        buf += b"*%d\r\n" % len(args)
        start = 0
        for i, arg in enumerate(args):
            kind = type(arg)
            if kind is str or kind is int or kind is float:
                continue
            if kind is bytes or kind is bytearray or kind is memoryview:
                size = arg.nbytes if kind is memoryview else len(arg)
                if size < LARGE:
                    continue
            else:
                continue  # checked (and refused, or encoded) with the small ones
            _small(buf, args[start:i])
            buf += b"$%d\r\n" % size
            out.append(buf)
            out.append(arg.cast("B") if kind is memoryview else arg)
            buf = bytearray(b"\r\n")
            start = i + 1
        _small(buf, args[start:])
    if buf:
        out.append(buf)
    return out


def _small(buf: bytearray, args: Sequence[Any]) -> None:
    """Append `args` (no large buffers among them) to `buf`, without an array header."""
    if not args:
        return
    if _c_pack is not None:
        try:
            packed = _c_pack(tuple(args))
        except TypeError:
            packed = None  # a bytearray, a bytes subclass ...: checked one by one below
        if packed is not None:
            buf += memoryview(packed)[packed.index(b"\n") + 1:]
            return
    for arg in args:
        data = _encoded(arg)
        size = data.nbytes if type(data) is memoryview else len(data)
        buf += b"$%d\r\n%b\r\n" % (size, data)


def _encoded(arg: Any) -> bytes | bytearray | memoryview:
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return repr(arg).encode()
    raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
