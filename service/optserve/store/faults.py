"""Redis refusals that are not bugs, as domain errors: full, read-only, moved, loading.

Redis answers such refusals with an error reply whose first word says why (``OOM``,
``READONLY``, ``MOVED``...); redis-py turns most into `ResponseError` subclasses, but an
error raised inside a Lua script arrives as a plain `ResponseError` carrying the word in its
text, and a refused command inside MULTI makes EXEC answer only ``EXECABORT``. `classify`
reads all three forms, so every path (pipelines, scripts, the step transaction) maps alike.
"""

from __future__ import annotations

import re

from redis import exceptions as rx

from ..errors import DomainError, StoreFull, StoreUnavailable

_UNAVAILABLE = (rx.ReadOnlyError, rx.AskError, rx.TryAgainError, rx.ClusterDownError,
                rx.BusyLoadingError)  # MovedError < AskError, MasterDownError < ClusterDown
_WORDS = re.compile(r"(?:^|-|: )(OOM|READONLY|MOVED|ASK|CLUSTERDOWN|TRYAGAIN|LOADING|"
                    r"MASTERDOWN)\b")


def classify(exc: BaseException) -> DomainError | None:
    """The domain error a Redis refusal stands for, or None (a bug, or not Redis's)."""
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, rx.OutOfMemoryError):
        return StoreFull(f"Redis: OOM {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"Redis: {_word(exc)} {exc}".strip())
    if isinstance(exc, rx.ResponseError):  # a Lua script's error carries the word inside
        m = _WORDS.search(str(exc))
        if m is not None:
            reason = f"Redis: {str(exc)[m.start(1):]}"
            return StoreFull(reason) if m.group(1) == "OOM" else StoreUnavailable(reason)
    return None


def _word(exc: BaseException) -> str:
    """The reply's first word (redis-py keeps it as ``status_code`` on some versions)."""
    word = getattr(exc, "status_code", None)
    return word if isinstance(word, str) else type(exc).__name__


def first_refusal(replies: list[object]) -> BaseException | None:
    """In a MULTI batch's replies, the refusal that made EXEC abort (as a domain error when
    it is one), else None."""
    for reply in replies:
        if isinstance(reply, BaseException) and not isinstance(reply, rx.ExecAbortError):
            return classify(reply) or reply
    return None


def raise_classified(exc: BaseException) -> None:
    """Raise ``exc`` as its domain error when it has one, else as is."""
    domain = classify(exc)
    if domain is not None and domain is not exc:
        raise domain from exc
    raise exc
