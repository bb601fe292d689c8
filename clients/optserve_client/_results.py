"""What API calls return: the session document and a step's outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import APIResponseValidationError


@dataclass
class Session:
    """A session document. Attribute access for the known fields, ``doc["x"]`` for any field."""

    id: str
    version: int | None = None
    name: str | None = None
    optimizer: str = "rmsprop"
    hyperparams: dict[str, Any] = field(default_factory=dict)
    mode: str = "async"
    max_staleness: int | None = None
    sync: dict[str, Any] | None = None
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: str | None = None
    updated_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Session:
        if not isinstance(doc, Mapping) or "id" not in doc:
            raise APIResponseValidationError(f"not a session document: {doc!r:.200}")
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc and k != "raw"}
        for key in ("hyperparams", "tensors"):
            if known.get(key) is None:
                known.pop(key, None)
        return cls(**known, raw=dict(doc))

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


@dataclass
class StepResult:
    """A step's outcome: the session's version after it and (unless return_params=False) the
    new parameters. ``attempts`` counts the HTTP tries it took (1 without retries);
    ``replayed`` says the step had already been applied by an earlier try."""

    version: int
    params: dict[str, Any] | None = None
    attempts: int = 1
    replayed: bool = False  # the server answered from its idempotency record
