"""Flower strategies whose server optimizer is an optserve session (RMSprop, AdaGrad, SGD).

Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad, FedAvgM) keeps the server
optimizer's state in the ServerApp's memory: a restarted ServerApp starts over. Here the
state lives in an optserve session, so a ServerApp that restarts with the same ``session``
name attaches to it and continues from its parameters and optimizer state. Switching is
one line::

    strategy = OptservRMSprop(url="http://optserve:8000", session="my-run")  # was FedAdam()
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)

FedOpt's convention (Reddi et al., 2020, as in ``flwr.serverapp.strategy.FedOpt``): each
round the clients train from the global arrays ``x``; the server's pseudo-gradient is
``x - mean(x_client)``, the clients weighted by ``weighted_by_key`` ("num-examples"), and
the session takes one optimizer step with it. The weighted mean is summed in float64 in
node-id order, so a run is reproducible. Every floating array of the ArrayRecord is
optimized (float32 or float64, as the session holds them); integer arrays are refused.

The strategies subclass the Message API's ``flwr.serverapp.strategy.FedAvg`` (every
FedAvg argument passes through: ``fraction_train``, ``min_available_nodes`` ...); the
deprecated ``flwr.server.strategy`` API is not covered, but `ServerOptimizer` holds all
that a strategy of it would need. Importing this module needs ``flwr`` (``pip install
'optserve[flower]'``); ``optserve_client`` does not import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .client import Client
from .federated import SERVER_HYPERPARAMS
from .spec import OPTIMIZERS

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg, Result
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("optserve_client.flower needs Flower: pip install 'optserve[flower]'"
                      ) from exc

__all__ = [
    "OptservAdagrad",
    "OptservRMSprop",
    "OptservSGD",
    "OptservStrategy",
    "ServerOptimizer",
    "pseudo_gradient",
]

log = logging.getLogger("optserve_client")

Arrays = dict[str, np.ndarray]

#: The strategies' default hyperparameters, FedOpt's in torch's terms. RMSprop: the SDK's
#: federated defaults (FedAdam-like). AdaGrad: FedAdagrad's eta = 0.1 and tau = 1e-3 (with
#: no initial accumulator torch's Adagrad is FedAdagrad). SGD: lr 1 is FedAvg, momentum > 0
#: is FedAvgM.
DEFAULT_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "rmsprop": dict(SERVER_HYPERPARAMS),
    "adagrad": {"lr": 0.1, "eps": 1e-3},
    "sgd": {"lr": 1.0},
}


def pseudo_gradient(current: Mapping[str, np.ndarray],
                    updates: Sequence[tuple[float, Mapping[str, np.ndarray]]]) -> Arrays:
    """FedOpt's pseudo-gradient ``x - sum_i w_i x_i / sum_i w_i``, summed in float64 and
    cast to each array's dtype. An array missing from an update is averaged over the updates
    that carry it."""
    out: Arrays = {}
    for name, x in current.items():
        acc = np.zeros(x.shape, np.float64)
        total = 0.0
        for weight, arrays in updates:
            if name in arrays:
                acc += float(weight) * (x.astype(np.float64) - arrays[name].astype(np.float64))
                total += float(weight)
        if total > 0:
            out[name] = (acc / total).astype(x.dtype)
    return out


class ServerOptimizer:
    """The session a strategy steps: found by id or name, or created from the first arrays.

    Framework-free (NumPy in, NumPy out), shared by the Message-API and legacy strategies.
    ``session``: a session id or name. An existing session is attached (its parameters and
    state win over the arrays the app starts with; hyperparameters that differ from the
    requested ones are updated); otherwise a new session is created with that name (or
    unnamed if ``session`` is None: see `session_id`).
    """

    def __init__(self, client: Client, session: str | None, optimizer: str,
                 hyperparams: Mapping[str, Any]) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
        self.client = client
        self.session = session
        self.optimizer = optimizer
        self.hyperparams = dict(hyperparams)
        self.session_id: str | None = None
        #: the global arrays and their session version (what the next round trains from)
        self.params: Arrays | None = None
        self.version: int = 0
        self._order: list[str] = []

    def _find(self) -> Any:
        if self.session is None:
            return None
        found = [s for s in self.client.list_sessions()
                 if self.session in (s.id, s.name)]
        if len(found) > 1:
            raise ValueError(f"{len(found)} sessions are named {self.session!r}; pass an id")
        return found[0] if found else None

    def attach(self, initial: Mapping[str, np.ndarray] | None) -> Arrays:
        """The global arrays: the session's (attaching or creating it on the first call)."""
        if self.params is not None:
            return self.params
        doc = self._find()
        if initial is not None:
            initial = {k: np.asarray(v) for k, v in initial.items()}
            self._order = list(initial)
            bad = [k for k, v in initial.items() if v.dtype not in (np.float32, np.float64)]
            if bad:
                raise ValueError(f"optserve optimizes float32/float64 arrays; leave {bad} "
                                 "out of the ArrayRecord")
        if doc is None:
            if initial is None:
                raise ValueError(f"no session {self.session!r} and no arrays to create it")
            doc = self.client.create_session(self.optimizer, self.hyperparams, initial,
                                             mode="async", name=self.session)
            log.info("flower: created %s session %s (%s)", self.optimizer, doc.id, doc.name)
        else:
            if doc.optimizer != self.optimizer:
                raise ValueError(f"session {doc.id} runs {doc.optimizer}, not {self.optimizer}")
            changed = {k: v for k, v in self.hyperparams.items() if doc.hyperparams.get(k) != v}
            if changed:
                log.info("flower: updating %s of session %s", changed, doc.id)
                self.client.update_session(doc.id, changed)
            if initial is not None and set(doc.tensors) != set(initial):
                raise ValueError(f"session {doc.id} holds {sorted(doc.tensors)}, the app's "
                                 f"arrays are {sorted(initial)}")
            log.info("flower: resuming session %s at version %s", doc.id, doc.version)
        self.session_id = doc.id
        params, self.version = self.client.get_params(doc.id)
        self._set(params)
        assert self.params is not None
        return self.params

    def _set(self, params: Mapping[str, np.ndarray]) -> None:
        order = self._order or list(params)
        self.params = {k: params[k] for k in order}

    def step(self, updates: Sequence[tuple[float, Mapping[str, np.ndarray]]]) -> Arrays:
        """One server step on the clients' weighted updates; the new global arrays.

        ``If-Match`` the version the clients trained from: a second ServerApp stepping the
        same session makes this one fail (412) rather than mix two runs.
        """
        if self.params is None or self.session_id is None:
            raise RuntimeError("attach() before step()")
        grads = pseudo_gradient(self.params, updates)
        res = self.client.step(self.session_id, grads, if_match=self.version, as_="numpy")
        if res.params is None or res.replayed:
            params, self.version = self.client.get_params(self.session_id)
        else:
            params, self.version = res.params, res.version
        self._set(params)
        return self.params  # type: ignore[return-value]


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _numpy(record: ArrayRecord) -> Arrays:
    return {k: a.numpy() for k, a in record.items()}


class OptservStrategy(FedAvg):
    """FedAvg's sampling and metrics, with an optserve session as the server optimizer.

    ``url``/``api_key``: the optserve server (default ``$OPTSERVE_URL``,
    ``$OPTSERVE_API_KEY``), or pass a ready ``client``. ``session``: the id or name that
    makes the run resumable (see `ServerOptimizer`); ``optimizer``: "rmsprop", "adagrad"
    or "sgd"; ``hyperparams``: over `DEFAULT_HYPERPARAMS`. Other keywords go to FedAvg.

    The session is the global model: `start` and `configure_train` send its current
    parameters (the arrays given to them only create the session when it does not exist
    yet). ``num_rounds`` in `start` counts the rounds of this run; the rounds keep counting
    across restarts: `start` on a session at version ``v`` numbers its rounds ``v + 1, v +
    2 ...`` (the clients' "server-round" config and the ``server_round`` the evaluate
    function gets), so round-dependent client code continues as if there had been no
    restart. Each round's train MetricRecord gains "optserve-version".
    """

    def __init__(self, url: str | None = None, *, session: str | None = None,
                 optimizer: str = "rmsprop", hyperparams: Mapping[str, Any] | None = None,
                 client: Client | None = None, api_key: str | None = None,
                 **fedavg: Any) -> None:
        super().__init__(**fedavg)
        if optimizer not in DEFAULT_HYPERPARAMS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
        hp = {**DEFAULT_HYPERPARAMS[optimizer], **(hyperparams or {})}
        self.server = ServerOptimizer(client or Client(url, api_key), session, optimizer, hp)
        #: server steps taken before this run's `start` (added to its round numbers)
        self.round_offset = 0

    @property
    def session_id(self) -> str | None:
        """The session's id, once attached (pass it, or the name, to resume a run)."""
        return self.server.session_id

    def current_arrays(self, initial: ArrayRecord | None = None) -> ArrayRecord:
        """The global model as the session holds it (attaching on the first call)."""
        return _record(self.server.attach(None if initial is None else _numpy(initial)))

    def summary(self) -> None:
        log.info("optserve server optimizer: %s %s, session %s", self.server.optimizer,
                 self.server.hyperparams, self.server.session or self.session_id)
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              ) -> Result:
        """FedAvg's round loop, starting from the session's parameters and round count."""
        arrays = self.current_arrays(initial_arrays)
        self.round_offset = self.server.version
        if evaluate_fn is not None:
            inner = evaluate_fn

            def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                return inner(server_round + self.round_offset, arrays)

        return super().start(grid, arrays, num_rounds, timeout, train_config,
                             evaluate_config, evaluate_fn)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return super().configure_train(server_round + self.round_offset,
                                       self.current_arrays(arrays), config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config,
                                          grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and aggregate the metrics as FedAvg does; step the session with the
        pseudo-gradient of the replies."""
        replies = list(replies)
        _, metrics = super().aggregate_train(server_round, replies)
        valid = sorted((m for m in replies if not m.has_error()),
                       key=lambda m: m.metadata.src_node_id)
        if not valid:
            return None, metrics
        updates = []
        for msg in valid:
            content = msg.content
            weight = next(iter(content.metric_records.values()))[self.weighted_by_key]
            arrays: Arrays = {}
            for record in content.array_records.values():
                arrays.update(_numpy(record))
            updates.append((float(weight), arrays))  # type: ignore[arg-type]
        new = self.server.step(updates)
        if metrics is not None:
            metrics["optserve-version"] = self.server.version
        return _record(new), metrics


class OptservRMSprop(OptservStrategy):
    """RMSprop as the server optimizer (defaults: FedAdam-like, see `DEFAULT_HYPERPARAMS`)."""

    def __init__(self, url: str | None = None, *, session: str | None = None,
                 lr: float = SERVER_HYPERPARAMS["lr"], alpha: float = SERVER_HYPERPARAMS["alpha"],
                 eps: float = SERVER_HYPERPARAMS["eps"],
                 momentum: float = SERVER_HYPERPARAMS["momentum"], weight_decay: float = 0.0,
                 centered: bool = False, **kwargs: Any) -> None:
        hp = {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum,
              "weight_decay": weight_decay, "centered": centered}
        super().__init__(url, session=session, optimizer="rmsprop", hyperparams=hp, **kwargs)


class OptservAdagrad(OptservStrategy):
    """AdaGrad as the server optimizer; the defaults are FedAdagrad's (eta 0.1, tau 1e-3)."""

    def __init__(self, url: str | None = None, *, session: str | None = None,
                 lr: float = 0.1, eps: float = 1e-3, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 **kwargs: Any) -> None:
        hp = {"lr": lr, "eps": eps, "lr_decay": lr_decay, "weight_decay": weight_decay,
              "initial_accumulator_value": initial_accumulator_value}
        super().__init__(url, session=session, optimizer="adagrad", hyperparams=hp, **kwargs)


class OptservSGD(OptservStrategy):
    """SGD as the server optimizer: lr 1 is FedAvg, ``momentum`` > 0 is FedAvgM."""

    def __init__(self, url: str | None = None, *, session: str | None = None,
                 lr: float = 1.0, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, **kwargs: Any) -> None:
        hp = {"lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
              "weight_decay": weight_decay}
        super().__init__(url, session=session, optimizer="sgd", hyperparams=hp, **kwargs)
