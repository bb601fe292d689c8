"""A sync-mode session's round settings, checked as a create or a PATCH gives them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import DomainError
from .session import SyncSpec


def sync_settings(given: Mapping[str, Any], old: SyncSpec | None = None) -> SyncSpec:
    """Checked sync settings: ``given`` over ``old`` (a PATCH; a null field removes it).

    A minimum left out defaults to its target (a round not full at its deadline fails); on
    a PATCH it keeps its value if that was below its old target, else follows the new one.
    """
    def pick(name: str) -> Any:
        return given[name] if name in given else getattr(old, name, None)

    def least(name: str, of: str, target: float | None) -> Any:
        if given.get(name) is not None:
            if target is None:
                raise DomainError("invalid_request", f"sync.{name} needs sync.{of}",
                                  field=f"sync.{name}")
            value = given[name]
        elif old is not None and name not in given and getattr(old, name) is not None \
                and getattr(old, name) != getattr(old, of):
            value = getattr(old, name)  # set below its target earlier: kept
        else:
            value = None
        if target is None:
            return None
        if value is not None and value > target:
            raise DomainError("invalid_request", f"sync.{name} cannot exceed sync.{of}",
                              field=f"sync.{name}")
        return target if value is None else value

    contributions, target = pick("contributions"), pick("target_weight")
    if contributions is None and target is None:
        raise DomainError("invalid_request", "sync needs `contributions`, `target_weight` or "
                          "both", field="sync")
    return SyncSpec(contributions, least("min_contributions", "contributions", contributions),
                    float(pick("timeout_s") or 60.0), target,
                    least("min_weight", "target_weight", target))
