"""The session document, typed: parsed once from its Redis JSON, written back byte-compatible.

``SessionMeta.to_json()`` writes the same keys in the same order as every earlier version of
the service, so documents already in Redis read, and documents written now read in them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .store import keys


@dataclass(frozen=True)
class TensorSpec:
    """One parameter's dtype and shape (its state tensors share them, but for ``step``)."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


#: Accumulated weights are float sums: a round "reaches" a weight within this rounding.
WEIGHT_RTOL = 1e-9


@dataclass(frozen=True)
class SyncSpec:
    """A sync session's round: what closes it at once (a contribution count, an accumulated
    weight, or whichever of the two comes first) and what still steps at its deadline.

    A minimum belongs to its closing rule (``min_contributions`` to ``contributions``,
    ``min_weight`` to ``target_weight``); at the deadline a round steps if it meets any.
    """

    contributions: int | None
    min_contributions: int | None
    timeout_s: float
    target_weight: float | None = None
    min_weight: float | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SyncSpec:
        return cls(**doc)

    def full(self, n: int, weight: float) -> bool:
        """Whether a round with ``n`` contributions of total ``weight`` closes now."""
        return _reached(n, self.contributions) or _reached(weight, self.target_weight)

    def enough(self, n: int, weight: float) -> bool:
        """Whether a round that is not full steps at its deadline (else it fails)."""
        return _reached(n, self.min_contributions) or _reached(weight, self.min_weight)

    def needs(self) -> str:
        """The deadline's minimums, as an error message names them."""
        parts = [f"min_contributions={self.min_contributions}"
                 if self.min_contributions is not None else "",
                 f"min_weight={self.min_weight:g}" if self.min_weight is not None else ""]
        return " or ".join(p for p in parts if p)

    def to_json(self) -> dict[str, Any]:
        # A count-only round writes the three keys it always wrote (older readers read it).
        doc: dict[str, Any] = {"contributions": self.contributions,
                               "min_contributions": self.min_contributions,
                               "timeout_s": self.timeout_s}
        if self.target_weight is not None:
            doc |= {"target_weight": self.target_weight, "min_weight": self.min_weight}
        return doc


def _reached(value: float, threshold: float | None) -> bool:
    return threshold is not None and value >= threshold * (1 - WEIGHT_RTOL)


Tensors = Mapping[str, TensorSpec]


def describe(tensors: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """The specs of wire tensors (anything with ``dtype`` and ``shape``)."""
    return {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in tensors.items()}


@dataclass(frozen=True)
class SessionMeta:
    """A session's document. Treat ``hyperparams`` and ``tensors`` as read-only: change a
    session with ``replace(...)``."""

    id: str
    tenant: str | None
    name: str | None
    optimizer: str
    hyperparams: Mapping[str, Any]
    mode: str
    max_staleness: int | None
    sync: SyncSpec | None
    tensors: Mapping[str, TensorSpec]
    created_at: float

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionMeta:
        doc = json.loads(raw)
        sync = doc.get("sync")
        return cls(
            id=doc["id"], tenant=doc.get("tenant"), name=doc.get("name"),
            optimizer=doc["optimizer"], hyperparams=doc["hyperparams"],
            mode=doc.get("mode", "async"), max_staleness=doc.get("max_staleness"),
            sync=SyncSpec.from_json(sync) if sync is not None else None,
            tensors={n: TensorSpec(s["dtype"], tuple(s["shape"]))
                     for n, s in doc["tensors"].items()},
            created_at=doc["created_at"],
        )

    def to_json(self) -> str:
        return json.dumps({
            "id": self.id, "tenant": self.tenant, "name": self.name,
            "optimizer": self.optimizer, "hyperparams": dict(self.hyperparams),
            "mode": self.mode, "max_staleness": self.max_staleness,
            "sync": self.sync.to_json() if self.sync is not None else None,
            "tensors": self.tensors_json(), "created_at": self.created_at,
        })

    def tensors_json(self) -> dict[str, dict[str, Any]]:
        return {n: s.to_json() for n, s in self.tensors.items()}

    def replace(self, **changes: Any) -> SessionMeta:
        return dataclasses.replace(self, **changes)

    @property
    def is_sync(self) -> bool:
        return self.mode == "sync"


@dataclass(frozen=True)
class SessionHead:
    """The small numbers of the tensor hash: version, last write, steps, last norms."""

    version: int | None
    updated_at: float | None
    steps: int
    last_grad_norm: float | None
    last_update_norm: float | None

    @classmethod
    def from_values(cls, values: Mapping[str, float | None]) -> SessionHead:
        v = values.get(keys.VERSION)
        return cls(version=int(v) if v is not None else None,
                   updated_at=values.get(keys.UPDATED),
                   steps=int(values.get(keys.STEPS) or 0),
                   last_grad_norm=values.get(keys.LAST_GRAD_NORM),
                   last_update_norm=values.get(keys.LAST_UPDATE_NORM))
