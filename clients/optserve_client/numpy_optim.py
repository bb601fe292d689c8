"""The RMSprop document's NumPy interface, ``opt.update(params, grads) -> new params``,
backed by a service session.

The first ``update`` creates the session with the given parameters (their dtype is kept:
float64 stays float64); later updates push the gradients and return the session's new
parameters. If the caller passes parameters other than the ones last returned (the
document's interface allows that), they are uploaded first, so the result is always the
document's "update these params with these grads".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._results import Session
from .client import Client
from .spec import PRESETS as _SPEC_PRESETS
from .spec import TORCH_DEFAULTS

PRESETS: dict[str, dict[str, Any]] = {
    name: hp for name, (optimizer, hp) in _SPEC_PRESETS.items() if optimizer == "rmsprop"}
"""The RMSprop presets (`spec.PRESETS`) as name -> hyperparameters, for ``preset=``."""

DOCUMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    # Where the RMSprop document's NumPy interface defaults differ from torch's (it writes
    # RMSprop(learning_rate=0.001, rho=0.9, epsilon=1e-8), AdaGrad(0.01, 1e-8), SGD(0.01)).
    "rmsprop": {"lr": 1e-3, "alpha": 0.9},
    "adagrad": {"eps": 1e-8},
    "sgd": {"lr": 0.01},
}
DEFAULTS: dict[str, dict[str, Any]] = {
    name: {**TORCH_DEFAULTS[name], **DOCUMENT_DEFAULTS[name]} for name in DOCUMENT_DEFAULTS}
"""These optimizers' defaults, in the service's names: torch's but for the document's."""
_ADA, _SGD = DEFAULTS["adagrad"], DEFAULTS["sgd"]

__all__ = ["SGD", "AdaGrad", "RMSprop"]


class _RemoteNumpyOptimizer:
    """The shared machinery; subclasses say which optimizer and how their names map."""

    _optimizer = "rmsprop"
    _cache_key: str | None = None  # the state tensor the document calls ``cache``

    def __init__(self, *, url: str | None, api_key: str | None, client: Client | None,
                 session: str | Session | None, name: str | None,
                 mode: str = "async") -> None:
        self._client = client or Client(url, api_key)
        self._owns_client = client is None
        self._session_id = session.id if isinstance(session, Session) else session
        self._name = name
        self._mode = mode
        self._version: int | None = None
        self._last: dict[str, np.ndarray] | None = None
        self._sent_hp: dict[str, Any] | None = None
        if self._session_id is not None:
            self._attach()

    # subclasses map their attribute names to the service's hyperparameters
    def _hyperparams(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def client(self) -> Client:
        return self._client

    @property
    def session_id(self) -> str | None:
        """The session behind this optimizer (None until the first update)."""
        return self._session_id

    @property
    def version(self) -> int | None:
        return self._version

    def _attach(self) -> None:
        assert self._session_id is not None
        doc = self._client.get_session(self._session_id)
        if doc.optimizer != self._optimizer:
            raise ValueError(f"session {doc.id} runs {doc.optimizer}, not {self._optimizer}")
        self._sent_hp = {k: v for k, v in doc.hyperparams.items()
                         if k in self._hyperparams()}
        if doc.tensors:
            self._last, self._version = self._client.get_params(self._session_id)

    def update(self, params: Mapping[str, Any], grads: Mapping[str, Any]) -> dict[str, Any]:
        """One step: returns the updated parameters (new arrays; the inputs are not changed).

        A key of ``params`` with no gradient keeps its value, like a None grad in torch.
        """
        arrays = {k: np.asarray(v) for k, v in params.items()}
        arrays = {k: v if v.dtype.kind == "f" else v.astype(np.float64)
                  for k, v in arrays.items()}
        hp = self._hyperparams()
        changed: dict[str, Any] = {}
        if self._session_id is None:
            doc = self._client.create_session(self._optimizer, hp, arrays, mode=self._mode,
                                              name=self._name)
            self._session_id, self._version, self._sent_hp = doc.id, doc.version or 0, hp
        else:
            # changed hyperparameters ride with the step: no request of their own
            changed = {k: v for k, v in hp.items() if (self._sent_hp or {}).get(k) != v}
            if not self._same_as_last(arrays):
                doc = self._client.put_params(self._session_id, arrays, if_match=self._version)
                self._version = doc.version
        result = self._client.step(self._session_id,
                                   {k: grads[k] for k in arrays if grads.get(k) is not None},
                                   base_version=self._version, as_="numpy",
                                   hyperparams=changed or None)
        assert result.params is not None
        self._last, self._version, self._sent_hp = result.params, result.version, hp
        return {k: result.params[k] for k in arrays}

    def _same_as_last(self, arrays: Mapping[str, np.ndarray]) -> bool:
        last = self._last
        if last is None or set(last) != set(arrays):
            return False
        return all(a is last[k] or (a.dtype == last[k].dtype and a.shape == last[k].shape
                                    and np.array_equal(a, last[k]))
                   for k, a in arrays.items())

    @property
    def cache(self) -> dict[str, np.ndarray]:
        """The document's ``cache`` (RMSprop's moving average, AdaGrad's sum of squares),
        read from the session: {} before the first update."""
        if self._session_id is None or self._cache_key is None:
            return {}
        tensors, _ = self._client.get_state(self._session_id)
        suffix = "." + self._cache_key
        return {k[len("state."):-len(suffix)]: v for k, v in tensors.items()
                if k.startswith("state.") and k.endswith(suffix)}

    def close(self, *, delete: bool = True) -> None:
        """Delete the session (unless ``delete=False``) and close the client if owned."""
        if delete and self._session_id is not None:
            self._client.delete_session(self._session_id)
            self._session_id = None
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RMSprop(_RemoteNumpyOptimizer):
    """``RMSprop(learning_rate=0.001, rho=0.9, epsilon=1e-8)`` of the RMSprop document.

    Session hyperparameters: lr=learning_rate, alpha=rho, eps=epsilon (plus ``momentum``,
    ``centered``, ``weight_decay`` if given). ``preset`` ("standard", "rnn", "momentum")
    supplies the values not passed explicitly. Changing ``learning_rate`` etc. between
    updates takes effect on the next update.
    """

    _optimizer = "rmsprop"
    _cache_key = "square_avg"

    def __init__(self, learning_rate: float | None = None, rho: float | None = None,
                 epsilon: float | None = None, url: str | None = None, *,
                 preset: str | None = None, momentum: float | None = None,
                 centered: bool | None = None, weight_decay: float | None = None,
                 api_key: str | None = None, client: Client | None = None,
                 session: str | Session | None = None, name: str | None = None,
                 mode: str = "async") -> None:
        base = dict(DEFAULTS["rmsprop"])
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
            base.update(PRESETS[preset])
        self.learning_rate = float(base["lr"] if learning_rate is None else learning_rate)
        self.rho = float(base["alpha"] if rho is None else rho)
        self.epsilon = float(base["eps"] if epsilon is None else epsilon)
        self.momentum = float(base["momentum"] if momentum is None else momentum)
        self.centered = bool(base["centered"] if centered is None else centered)
        self.weight_decay = float(base["weight_decay"] if weight_decay is None else weight_decay)
        super().__init__(url=url, api_key=api_key, client=client, session=session, name=name,
                         mode=mode)

    def _hyperparams(self) -> dict[str, Any]:
        return {"lr": self.learning_rate, "alpha": self.rho, "eps": self.epsilon,
                "momentum": self.momentum, "centered": self.centered,
                "weight_decay": self.weight_decay}


class AdaGrad(_RemoteNumpyOptimizer):
    """``AdaGrad(learning_rate=0.01, epsilon=1e-8)``: cache += g², θ -= lr·g/(√cache + ε)."""

    _optimizer = "adagrad"
    _cache_key = "sum"

    def __init__(self, learning_rate: float = _ADA["lr"], epsilon: float = _ADA["eps"],
                 url: str | None = None, *, api_key: str | None = None,
                 client: Client | None = None, session: str | Session | None = None,
                 name: str | None = None, mode: str = "async") -> None:
        self.learning_rate = float(learning_rate)
        self.epsilon = float(epsilon)
        super().__init__(url=url, api_key=api_key, client=client, session=session, name=name,
                         mode=mode)

    def _hyperparams(self) -> dict[str, Any]:
        return {"lr": self.learning_rate, "eps": self.epsilon}


class SGD(_RemoteNumpyOptimizer):
    """``SGD(learning_rate=0.01)``: θ -= lr·g (``momentum`` optional, torch's form)."""

    _optimizer = "sgd"
    _cache_key = "momentum_buffer"

    def __init__(self, learning_rate: float = _SGD["lr"], url: str | None = None, *,
                 momentum: float = _SGD["momentum"], api_key: str | None = None,
                 client: Client | None = None, session: str | Session | None = None,
                 name: str | None = None, mode: str = "async") -> None:
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        super().__init__(url=url, api_key=api_key, client=client, session=session, name=name,
                         mode=mode)

    def _hyperparams(self) -> dict[str, Any]:
        return {"lr": self.learning_rate, "momentum": self.momentum}
