"""`optserve demo`: run demos against a URL (or a service started here), print, plot."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .centered import centered
from .experiments import ill_conditioned, quadratic, vs_adagrad
from .plots import plot_result
from .report import print_result
from .result import DemoResult

__all__ = ["DEMOS", "main", "run"]

DEMOS: dict[str, Callable[..., DemoResult]] = {
    "quadratic": quadratic,
    "ill-conditioned": ill_conditioned,
    "vs-adagrad": vs_adagrad,
    "centered": centered,
}


def run(which: str, url: str | None = None, plot: str | Path | None = None,
        file: TextIO | None = None) -> dict[str, DemoResult]:
    """Run one demo or ``all`` against ``url`` (or a service started here), print, plot."""
    from ..local import local_service

    out = file or sys.stdout
    names = list(DEMOS) if which == "all" else [which]
    results: dict[str, DemoResult] = {}
    with contextlib.ExitStack() as stack:
        base = url or stack.enter_context(local_service())
        where = url or f"{base} (started here: embedded redis-server + the app)"
        print(f"optserve demos: every optimizer step is a POST to {where}\n", file=out)
        for name in names:
            res = DEMOS[name](base, progress=url is not None)
            results[name] = res
            print_result(res, out)
            if plot is not None:
                for path in plot_result(res, plot):
                    print(f"wrote {path}", file=out)
                print(file=out)
    return results


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing_dependencies(url: str | None, plot: str | Path | None) -> str | None:
    """What these options need that is not installed, as one message with the exact install
    command; None when everything is there. Checked before anything runs."""
    needs: list[tuple[str, str, str]] = []  # (module, why, extra)
    if url:
        needs.append(("tqdm", "--url (its progress bar)", "demo"))
    if plot:
        needs.append(("matplotlib", "--plot", "demo"))
    if not url:
        needs += [(m, "a service started here (no --url)", "server") for m in _SERVER_MODULES]
    gone = [(m, why, extra) for m, why, extra in needs if not _importable(m)]
    if not gone:
        return None
    what = "; ".join(f"{why} needs {m}" for m, why, _ in gone)
    extras = ",".join(sorted({extra for *_, extra in gone}))
    return f"{what}, not installed here. Install with: pip install \"optserve[{extras}]\""


# What `local_service` imports: the app, uvicorn, redis-py and torch.
_SERVER_MODULES = ("fastapi", "uvicorn", "redis", "torch")


def main(args: argparse.Namespace) -> int:
    """`optserve demo which [--url URL] [--plot DIR]`."""
    from optserve_client import Client, OptserveError

    from ..store.embedded import EmbeddedRedisError, RedisServerNotFound

    problem = missing_dependencies(args.url, args.plot)
    if problem:
        print(f"optserve demo: {problem}", file=sys.stderr)
        return 1
    if args.url:
        with Client(args.url) as client:
            if not client.live():
                print(f"optserve demo: nothing answers at {args.url}: is `optserve serve` "
                      "running there?", file=sys.stderr)
                return 1
    try:
        run(args.which, args.url, args.plot)
    except (RedisServerNotFound, EmbeddedRedisError) as exc:
        print(f"optserve demo: cannot start a local service: {exc}", file=sys.stderr)
        return 2
    except OptserveError as exc:
        print(f"optserve demo: {exc}", file=sys.stderr)
        return 1
    return 0
