"""Limits on what a client may send, and the JSON loader that keeps to them.

Shared by the wire codec (server and SDK) and the server's checks: a body past a limit is
a refusal (the API's 400 or 422), never an exception the server did not expect.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_RANK = 32
"""Most dimensions a tensor may have (torch's kernels cap theirs too; 100 is not a tensor)."""
MAX_NAME_CHARS = 1024
"""Longest tensor name the service takes (longer: 422 ``invalid_name``)."""
ECHO_CHARS = 200
"""How much of any client-sent string an error message repeats."""
_MAX_EXTENT = 2**63  # the product of a shape's non-zero dims: torch's strides are int64


class WireError(ValueError):
    """The body is not a well-formed tensor body (the API's 400)."""


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` as an error message may repeat it: at most `limit` characters (then an
    ellipsis), and encodable (a lone surrogate becomes its escape)."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def quote(name: str) -> str:
    """A tensor name quoted for a message, clipped."""
    return repr(clip(name))


def load_json(raw: bytes | str, what: str) -> Any:
    """json.loads that refuses duplicate keys, and turns every parse failure (nesting past
    the parser's depth, a 5,000-digit integer, bytes that are not UTF-8) into a WireError."""
    try:
        return json.loads(raw, object_pairs_hook=_unique)
    except _Duplicate as exc:
        raise WireError(f"{what} has a {exc}") from None
    except RecursionError:
        raise WireError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise WireError(f"{what} is not valid JSON: {clip(str(exc))}") from None


class _Duplicate(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(f"duplicate key {quote(key)}")
            seen.add(key)
    return out


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """Non-negative integers, at most MAX_RANK of them, whose non-zero product (the extent
    torch's int64 strides must span) is below 2**63: `[0, 10**30]` holds no data but
    cannot be allocated."""
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise WireError(f"tensor {quote(name)}: shape must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise WireError(f"tensor {quote(name)}: {len(shape)} dimensions; at most {MAX_RANK}")
    if math.prod(max(d, 1) for d in shape) >= _MAX_EXTENT:
        raise WireError(f"tensor {quote(name)}: shape {clip(str(shape))} is too large "
                        "(its dimensions multiply past 2**63)")
    return tuple(shape)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
