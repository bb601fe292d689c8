"""Content negotiation: which tensor format a response is sent in (server only; the SDK
names its format in Accept and never negotiates)."""

from __future__ import annotations

from optserve_client.wire import TENSOR_TYPES


def negotiate(accept: str | None, default: str) -> str | None:
    """Pick the response format from an Accept header; None if it names none we produce."""
    if not accept or not accept.strip():
        return default
    best: tuple[float, int, str] | None = None
    for i, item in enumerate(accept.split(",")):
        parts = [p.strip() for p in item.split(";")]
        media = parts[0].lower()
        q = 1.0
        for p in parts[1:]:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        if media in ("*/*", "application/*"):
            candidate = default
        elif media in TENSOR_TYPES:
            candidate = media
        else:
            continue
        key = (q, -i, candidate)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None
