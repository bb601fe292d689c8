"""`RemoteOptimizer`: a ``torch.optim.Optimizer`` whose state and update live in the service.

Swap ``torch.optim.RMSprop(model.parameters(), lr=...)`` for
``RemoteRMSprop(model.named_parameters(), lr=..., url=...)`` and the training loop stays the
same: ``step()`` pushes the ``.grad``s and writes the returned parameters into the model's
tensors in place. Each param group is one session (a session holds one set of
hyperparameters); a group's hyperparameters changed since its last step (by hand or by an LR
scheduler) ride with its next step: one request per group per ``step()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._base import round_read_timeout
from ._codec import dense_grad
from ._requests import Format
from ._results import Session
from ._transport import Timeout
from .client import Client
from .errors import StaleGradientError
from .spec import KERNEL_OPTIONS, TORCH_DEFAULTS, kernel_options_refusal
from .state import (
    from_torch_state_dict,
    plain_hyperparams,
    to_torch_state_dict,
    torch_group,
)

__all__ = ["RemoteOptimizer"]




@dataclass
class _GroupSession:
    id: str
    names: list[str]
    version: int
    hyperparams: dict[str, Any] = field(default_factory=dict)  # as last sent or seen
    created: bool = False


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch optimizer backed by optserve sessions, one per param group.

    ``params``: tensors (named "0", "1", ... by their index, as in torch's state_dict),
    ``(name, tensor)`` pairs such as ``model.named_parameters()``, or param-group dicts of
    either. ``optimizer``: "rmsprop" | "adagrad" | "sgd"; further keyword arguments are its
    hyperparameters (torch's names and defaults) and torch's kernel options: those torch
    takes that cannot change the math (``foreach``, ``fused`` where torch has it,
    ``capturable=False``, ``differentiable=False``) are kept in the groups and ignored, the
    rest refused as torch refuses them. ``session``: the id (or ids, one per
    group) of an existing session to attach to as a further worker: the local parameters
    and the group hyperparameters are then taken from the session. ``grad_dtype``:
    "bfloat16"/"float16" to send gradients in half precision. ``on_stale``: "raise" (a
    `StaleGradientError`) or "skip" (drop the gradient, pull the current parameters).
    """

    def __init__(self, params: Iterable[Any], optimizer: str = "rmsprop", *,
                 url: str | None = None, api_key: str | None = None,
                 client: Client | None = None,
                 session: str | Session | Sequence[str | Session] | None = None,
                 mode: str = "async", max_staleness: int | None = None,
                 sync: Mapping[str, Any] | None = None, name: str | None = None,
                 grad_dtype: str | None = None, on_stale: str = "raise",
                 format: Format = "safetensors",
                 timeout: float | tuple[float | None, float | None] | Timeout | None = 60.0,
                 max_retries: int = 3, **hyperparams: Any) -> None:
        optimizer = optimizer.lower()
        if optimizer not in TORCH_DEFAULTS:
            raise ValueError(f"optimizer must be one of {sorted(TORCH_DEFAULTS)}")
        options = {k: hyperparams.pop(k) for k in KERNEL_OPTIONS if k in hyperparams}
        refusal = kernel_options_refusal(optimizer, options, type(self).__name__)
        if refusal is not None:
            raise refusal[1]
        unknown = set(hyperparams) - set(TORCH_DEFAULTS[optimizer])
        if unknown:
            raise TypeError(f"unknown {optimizer} hyperparameters: {sorted(unknown)}")
        if on_stale not in ("raise", "skip"):
            raise ValueError("on_stale must be 'raise' or 'skip'")
        self._optserve_optimizer = optimizer
        self._hp_keys = list(TORCH_DEFAULTS[optimizer])
        super().__init__(params, {**TORCH_DEFAULTS[optimizer], **hyperparams, **options})
        for gi in range(len(self.param_groups)):
            self._hyperparams(gi)  # a bad tensor lr is refused before any session is made
        self._root_client = client or Client(url, api_key, timeout=timeout,
                                             max_retries=max_retries, format=format)
        self._client = self._root_client
        self._owns_client = client is None
        self.grad_dtype = grad_dtype
        self.on_stale = on_stale
        self._create_kwargs = {"mode": mode, "max_staleness": max_staleness, "sync": sync,
                               "name": name}
        if session is None:
            attach: list[str | Session | None] = []
        elif isinstance(session, (str, Session)):
            attach = [session]
        else:
            attach = list(session)
        if attach and len(attach) != len(self.param_groups):
            raise ValueError(f"{len(attach)} sessions given for {len(self.param_groups)} "
                             "param groups")
        self._sessions: list[_GroupSession] = []
        for gi in range(len(self.param_groups)):
            self._ensure(gi, attach[gi] if attach else None)

    # ------------------------------------------------------------------ sessions

    @property
    def client(self) -> Client:
        return self._client

    @property
    def session_ids(self) -> list[str]:
        """The session of each param group, in order."""
        return [self._ensure(gi).id for gi in range(len(self.param_groups))]

    @property
    def versions(self) -> list[int]:
        """The session version each group's local parameters are at."""
        return [self._ensure(gi).version for gi in range(len(self.param_groups))]

    def _names(self, gi: int) -> list[str]:
        group = self.param_groups[gi]
        if "param_names" in group:
            return list(group["param_names"])
        offset = sum(len(g["params"]) for g in self.param_groups[:gi])
        return [str(offset + i) for i in range(len(group["params"]))]

    def _hyperparams(self, gi: int) -> dict[str, Any]:
        group = self.param_groups[gi]
        return plain_hyperparams({k: group[k] for k in self._hp_keys})  # LR schedulers: tensors

    def _ensure(self, gi: int, attach: str | Session | None = None) -> _GroupSession:
        """The group's session, created (or attached to) on first use."""
        if gi < len(self._sessions):
            return self._sessions[gi]
        names = self._names(gi)
        tensors = dict(zip(names, self.param_groups[gi]["params"], strict=True))
        if attach is None:
            hp = self._hyperparams(gi)
            kwargs = dict(self._create_kwargs)
            if kwargs["name"] is not None and len(self.param_groups) > 1:
                kwargs["name"] = f"{kwargs['name']}[{gi}]"  # one session per group
            with torch.no_grad():
                doc = self._client.create_session(
                    self._optserve_optimizer, hp, {n: t.detach() for n, t in tensors.items()},
                    **kwargs)
            gs = _GroupSession(doc.id, names, doc.version or 0, hp, created=True)
            self._fit_timeout(doc)
        else:
            doc = self._client.get_session(attach)
            self._fit_timeout(doc)
            if doc.optimizer != self._optserve_optimizer:
                raise ValueError(f"session {doc.id} runs {doc.optimizer}, "
                                 f"not {self._optserve_optimizer}")
            if doc.tensors and set(doc.tensors) != set(names):
                raise ValueError(f"session {doc.id} holds {sorted(doc.tensors)}, this group "
                                 f"{sorted(names)}")
            group = self.param_groups[gi]
            for k in self._hp_keys:
                if k in doc.hyperparams:
                    group[k] = doc.hyperparams[k]
            gs = _GroupSession(doc.id, names, doc.version or 0, self._hyperparams(gi))
            self._sessions.append(gs)
            if doc.tensors:
                self._pull(gi)
            else:
                gs.version = self._client.put_params(
                    doc.id, {n: t.detach() for n, t in tensors.items()}).version or 0
            return gs
        self._sessions.append(gs)
        return gs

    def _fit_timeout(self, doc: Session) -> None:
        """A sync-mode step waits for its round: read for longer than the round may last."""
        if doc.mode != "sync" or not doc.sync:
            return
        self._client = self._client.with_read_timeout(round_read_timeout(doc.sync))

    @torch.no_grad()
    def _pull(self, gi: int) -> None:
        """Overwrite the group's local parameters with the session's."""
        gs = self._sessions[gi]
        params, version = self._client.get_params(gs.id, as_="torch")
        self._write(gi, params)
        gs.version = version

    @torch.no_grad()
    def _write(self, gi: int, params: Mapping[str, torch.Tensor]) -> None:
        gs = self._sessions[gi]
        for name, p in zip(gs.names, self.param_groups[gi]["params"], strict=True):
            if name in params:
                p.copy_(params[name])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, but a parameter twice in one group is refused (torch warns, then steps
        it twice; a session keeps one state per parameter, so it cannot)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with "
                                    "duplicate parameters")
            super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len(params) != len(set(params)):
            self.param_groups.pop()
            raise ValueError("optimizer contains a parameter group with duplicate parameters; "
                             "torch steps such a parameter once per appearance, a session "
                             "cannot: pass each parameter once")

    def _changed_hyperparams(self, gi: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The group's hyperparameters, and those changed since last sent (for its step)."""
        gs = self._sessions[gi]
        current = self._hyperparams(gi)
        return current, {k: v for k, v in current.items() if gs.hyperparams.get(k) != v}

    # ------------------------------------------------------------------ torch API

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *,  # type: ignore[override]
             weight: float | None = None) -> Any:
        """Push every group's gradients; write the returned parameters in place.

        ``weight`` (sync-mode sessions) weighs this worker's gradients in the round's mean,
        e.g. its batch size; `distributed.DataParallelOptimizer` also handles late and
        failed rounds.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            gs = self._ensure(gi)
            grads: dict[str, torch.Tensor] = {}
            for name, p in zip(gs.names, group["params"], strict=True):
                if p.grad is None:
                    continue
                grads[name] = dense_grad(p.grad)
            if not grads:
                continue
            current, changed = self._changed_hyperparams(gi)
            try:
                result = self._client.step(gs.id, grads, base_version=gs.version,
                                           weight=weight, grad_dtype=self.grad_dtype,
                                           as_="torch", hyperparams=changed or None)
            except StaleGradientError:
                if self.on_stale == "raise":
                    raise
                self._pull(gi)
                continue
            if result.params is not None:
                self._write(gi, result.params)
            gs.version = result.version
            gs.hyperparams = current
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The sessions' state in torch's format (state on the parameters' devices)."""
        state: dict[int, dict[str, Any]] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for gi, group in enumerate(self.param_groups):
            gs = self._ensure(gi)
            tensors, meta = self._client.get_state(gs.id, as_="torch")
            sd = to_torch_state_dict(tensors, meta, gs.names, index_offset=offset,
                                     param_names="param_names" in group)
            for idx, entry in sd["state"].items():
                p = group["params"][idx - offset]
                state[idx] = {k: (v if k == "step" else v.to(p.device, copy=True))
                              for k, v in entry.items()}
            packed = {k: v for k, v in group.items() if k != "params"}
            for k, v in torch_group(self._optserve_optimizer, {}).items():
                packed.setdefault(k, v)
            packed["params"] = sd["param_groups"][0]["params"]
            groups.append(packed)
            offset += len(group["params"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a torch-format state into the sessions (and the groups' hyperparameters).

        Each group's session gets the local parameters, the saved state and the saved
        hyperparameters (a PUT of its state, If-Match the session's current version).
        """
        saved = list(state_dict["param_groups"])
        if len(saved) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, s in zip(self.param_groups, saved, strict=True):
            if len(g["params"]) != len(s["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
        for gi, (group, sgroup) in enumerate(zip(self.param_groups, saved, strict=True)):
            gs = self._ensure(gi)
            for k, v in sgroup.items():
                if k not in ("params", "param_names"):
                    group[k] = v
            one = {"state": {i: state_dict.get("state", {}).get(idx, {})
                             for i, idx in enumerate(sgroup["params"])},
                   "param_groups": [{**sgroup, "params": list(range(len(sgroup["params"]))),
                                     "param_names": gs.names}]}
            tensors, meta = from_torch_state_dict(
                one, dict(zip(gs.names, group["params"], strict=True)),
                self._optserve_optimizer)
            current = self._client.get_session(gs.id).version
            meta["version"] = current
            doc = self._client.put_state(gs.id, tensors, meta, if_match=current)
            if doc is None:
                doc = self._client.get_session(gs.id)
            gs.version = doc.version if doc.version is not None else current
            gs.hyperparams = {k: v for k, v in doc.hyperparams.items() if k in self._hp_keys}

    # ------------------------------------------------------------------ cleanup

    def close(self, *, delete: bool = False) -> None:
        """Close the client (if this optimizer made it); ``delete`` drops the sessions it
        created (attached sessions are left alone)."""
        if delete:
            for gs in self._sessions:
                if gs.created:
                    self._client.delete_session(gs.id)
        if self._owns_client:
            self._root_client.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
