"""What a demo returns: one record per iteration, the table's columns, measured notes.

Iteration ``i`` counts as in the document: the record for ``i`` holds the values after the
(i+1)-th update, so "iteration 100" of a 100-iteration run is ``i = 99``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Column", "DemoResult", "Record"]

Record = dict[str, float]


@dataclass
class Column:
    """One table column: record key, header, format spec and width."""

    key: str
    header: str
    fmt: str = ".6f"
    width: int = 12


@dataclass
class DemoResult:
    """A demo's data: what it ran (``config``), where it started, one record per iteration,
    how to tabulate it, and measured conclusions."""

    name: str
    title: str
    objective: str
    config: dict[str, Any]
    start: Record
    records: list[Record]
    columns: list[Column]
    every: int
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    table_iterations: int | None = None  # rows past this are "beyond the document's run"

    def column(self, key: str) -> np.ndarray:
        """One record field over all iterations, as an array."""
        return np.array([r[key] for r in self.records], dtype=np.float64)
