"""What the examples check before they start: their dependencies, then the service.

Without these a missing scikit-learn or a service that is not running ends in tracebacks
(dozens of lines, from every worker process); with them, in one line saying what to do.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

__all__ = ["require_modules", "require_service"]

# module -> (what to call it, the command that installs it)
INSTALL = {
    "torch": ("torch", "pip install torch"),
    "sklearn": ("scikit-learn", 'pip install "optserve[demo]"'),
    "numpy": ("numpy", "pip install optserve"),
    "optserve_client": ("optserve_client", "pip install optserve"),
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require_modules(script: str, *modules: str) -> None:
    """Exit 1 with the install command unless every module imports."""
    gone = [m for m in modules if not _importable(m)]
    if gone:
        names = ", ".join(INSTALL[m][0] for m in gone)
        how = " and ".join(dict.fromkeys(INSTALL[m][1] for m in gone))
        print(f"{Path(script).name} needs {names}, not installed here. "
              f"Install with: {how}", file=sys.stderr)
        raise SystemExit(1)


def require_service(script: str, url: str) -> None:
    """Exit 1 in one line unless an optserve answers at ``url``."""
    from optserve_client import Client

    with Client(url) as client:
        if client.live():
            return
    print(f"{Path(script).name}: is `optserve serve` running at {url}? Nothing answers "
          "there.", file=sys.stderr)
    raise SystemExit(1)
