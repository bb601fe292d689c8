"""Launcher conventions: a process's rank and world size, and one session shared by the ranks.

torchrun (``torch.distributed.run``) and other launchers tell each process ``RANK`` and
``WORLD_SIZE``; a session id cannot be known before the run, so the ranks agree on a
*name* (an argument, or ``$OPTSERVE_SESSION``): rank 0 creates the session if none has that
name, the other ranks wait until it exists and attach. A name that already names a session
(a restarted launch) is attached by every rank, so the run continues. Standard library
only; no torch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from ._results import Session
from .client import Client
from .errors import SessionNotFoundError

__all__ = ["SESSION_ENV", "find_session", "launch_rank_world", "shared_session"]

log = logging.getLogger("optserve_client")

#: The environment variable naming the session the ranks of a launch share.
SESSION_ENV = "OPTSERVE_SESSION"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def launch_rank_world(rank: int | None = None, world_size: int | None = None
                      ) -> tuple[int | None, int | None]:
    """``(rank, world_size)``: the arguments where given, else ``$RANK``/``$WORLD_SIZE``
    (set by torchrun and torch.distributed's other launchers), else None."""
    return (_env_int("RANK") if rank is None else rank,
            _env_int("WORLD_SIZE") if world_size is None else world_size)


def find_session(client: Client, key: str) -> Session | None:
    """The session whose id is ``key`` or, failing that, the one named ``key``."""
    try:
        return client.get_session(key)
    except SessionNotFoundError:
        pass
    found = [s for s in client.list_sessions() if s.name == key]
    if len(found) > 1:
        raise ValueError(f"{len(found)} sessions are named {key!r}; pass an id")
    return found[0] if found else None


def shared_session(client: Client, key: str, *, rank: int | None,
                   create: Callable[[str], Session], wait_s: float = 120.0,
                   poll_s: float = 0.2) -> Session:
    """The session ``key`` (an id or a name) that all ranks share.

    If it exists, every rank attaches to it. Otherwise rank 0 (or a process with no rank)
    calls ``create(key)``, and the other ranks poll for up to ``wait_s`` seconds until a
    session named ``key`` exists and holds parameters.
    """
    doc = find_session(client, key)
    if doc is not None and doc.tensors:
        return doc
    if doc is None and rank in (0, None):
        doc = create(key)
        log.info("rank %s: created session %s (%s)", rank, doc.id, key)
        return doc
    deadline = time.monotonic() + wait_s
    while doc is None or not doc.tensors:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: no session {key!r} after {wait_s:.0f}s "
                               "(rank 0 creates it)")
        time.sleep(poll_s)
        doc = find_session(client, key)
    return doc
