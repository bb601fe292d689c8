"""uvicorn's HTTP protocols, told to report any unsent response bytes as back-pressure.

A step's answer is sent from the tensors' own memory (no copy), and once the last body
message is sent the tensors go back to the session cache, where the next step of that
session changes them in place. uvloop keeps bytes the socket did not take yet by reference,
so with a large answer (or a slow reader) the client could receive part of the *next*
version's parameters under this version's header. With a write-buffer high-water mark of 0,
any unsent byte pauses the protocol, and uvicorn waits for the transport to be empty before
it takes the next message; `TensorResponse` ends with an empty message, which so returns
only once every byte is with the kernel, and until then the tensors are marked lent (the
next step waits for them, `Loaded.settled`). Small answers are joined into one buffer first
(`api/tensors.py`), which also saves a send per answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools missing: `optserve serve` uses h11
    HttpToolsProtocol = None  # type: ignore[assignment,misc]
from uvicorn.protocols.http.h11_impl import H11Protocol


def _no_write_buffer(transport: asyncio.BaseTransport) -> None:
    set_limits = getattr(transport, "set_write_buffer_limits", None)
    if set_limits is not None:
        set_limits(high=0, low=0)


if HttpToolsProtocol is not None:
    class HttpToolsNoBuffer(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol; every unsent byte is back-pressure."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            _no_write_buffer(transport)


class H11NoBuffer(H11Protocol):
    """uvicorn's h11 protocol; every unsent byte is back-pressure."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _no_write_buffer(transport)


def protocol_class(parser: str) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http`` setting (a class: uvicorn 0.30, the floor,
    takes no import path there)."""
    if parser == "httptools" and HttpToolsProtocol is not None:
        return HttpToolsNoBuffer
    return H11NoBuffer
