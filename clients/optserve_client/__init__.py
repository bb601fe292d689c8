"""Python SDK of optserve: RMSprop (and AdaGrad, SGD) as an HTTP service.

Imports with the base dependencies only (numpy, safetensors, urllib3); torch is imported by
`optserve_client.torch` (``RemoteRMSprop`` and friends, also reachable lazily from here)
and when torch tensors are asked for.
"""

from __future__ import annotations

from typing import Any

from ._base import DEFAULT_BASE_URL, __version__
from ._results import Session, StepResult
from ._retry import RetryPolicy
from ._socket_transport import SocketTransport
from ._transport import RawRequest, RawResponse, Timeout, Transport, Urllib3Transport
from .async_client import AsyncClient, AsyncTransport, ThreadedAsyncTransport
from .client import Client
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .numpy_optim import PRESETS, SGD, AdaGrad, RMSprop
from .spec import TORCH_DEFAULTS
from .state import (
    export_torch_state_dict,
    from_torch_state_dict,
    session_from_torch,
    to_torch_state_dict,
)

_TORCH_NAMES = ("RemoteOptimizer", "RemoteRMSprop", "RemoteAdagrad", "RemoteSGD")


def __getattr__(name: str) -> Any:
    """``optserve_client.RemoteRMSprop`` imports torch only when asked for."""
    if name in _TORCH_NAMES:
        from . import torch as _torch_mod

        return getattr(_torch_mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Client", "AsyncClient", "Session", "StepResult", "Timeout", "RetryPolicy",
    "Transport", "AsyncTransport", "SocketTransport", "Urllib3Transport", "ThreadedAsyncTransport",
    "RawRequest", "RawResponse", "RMSprop", "AdaGrad", "SGD", "PRESETS", "TORCH_DEFAULTS",
    "DEFAULT_BASE_URL", "export_torch_state_dict", "from_torch_state_dict",
    "session_from_torch", "to_torch_state_dict", "__version__",
    *_TORCH_NAMES, *_errors_all,
]
