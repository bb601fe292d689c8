"""The document's tables, printed from a demo's records."""

from __future__ import annotations

import sys
from typing import TextIO

from .result import DemoResult, Record

__all__ = ["print_result"]


def print_result(res: DemoResult, file: TextIO | None = None) -> None:
    """The document's table: every ``every`` iterations, the final one, then the notes."""
    out = file or sys.stdout
    rule = "=" * 72
    print(rule, file=out)
    print(res.title, file=out)
    print(rule, file=out)
    print(f"Minimizing {res.objective}", file=out)
    print(file=out)
    head = f"{'Iteration':<12}" + "".join(f"{c.header:<{c.width}} " for c in res.columns)
    print(head.rstrip(), file=out)
    print("-" * max(60, len(head.rstrip())), file=out)

    def row(r: Record, label: str | None = None) -> str:
        first = label or str(int(r["i"]))
        return (f"{first:<12}" + "".join(f"{format(r[c.key], c.fmt):<{c.width}} "
                                         for c in res.columns)).rstrip()

    n_table = res.table_iterations or len(res.records)
    for r in res.records[:n_table]:
        if int(r["i"]) % res.every == 0:
            print(row(r), file=out)
    last = res.records[n_table - 1]
    if int(last["i"]) % res.every:
        print(row(last, f"{n_table - 1} (#{n_table})"), file=out)
    if n_table < len(res.records):
        print(f"-- beyond the document's {n_table} iterations --", file=out)
        extra = res.records[n_table:]
        for r in extra:
            if int(r["i"]) % res.every == res.every - 1 or r is extra[-1]:
                print(row(r, f"{int(r['i'])} (#{int(r['i']) + 1})"), file=out)
    print(file=out)
    for note in res.notes:
        print(note, file=out)
    print(file=out)
