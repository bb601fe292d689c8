"""Write deploy/constraints.txt: the versions of the server's dependencies, direct and
transitive, as installed in this (tested) environment, for the Dockerfile's pip installs.

    python scripts/constraints.py > deploy/constraints.txt

torch itself and what only its CUDA build pulls in (nvidia-*, triton) are left out: the
Dockerfile's TORCH_VERSION argument and the index it installs from choose those; torch's own
requirements (sympy, jinja2...) are pinned.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
LEFT_OUT = re.compile(r"^(triton|nvidia-.*)$")
UNPINNED = {"torch"}  # its own requirements are pinned, not torch itself


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**default_environment(), "extra": e})
               for e in extras or {""})


def closure(roots: list[Requirement]) -> dict[str, str]:
    """name -> installed version, for `roots` and everything they require here."""
    found: dict[str, str] = {}
    todo = [(r, set(r.extras)) for r in roots]
    while todo:
        req, extras = todo.pop()
        name = canonical(req.name)
        if LEFT_OUT.match(name):
            continue
        dist = metadata.distribution(req.name)
        seen = name in found
        found[name] = dist.version
        if seen and not extras:
            continue
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if wanted(sub, extras):
                todo.append((sub, set(sub.extras)))
    return found


def main() -> int:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r) for r in project["dependencies"]
             + project["optional-dependencies"]["server"]]
    roots = [r for r in roots if r.marker is None or r.marker.evaluate()]
    pins = {k: v for k, v in closure(roots).items() if k not in UNPINNED}
    print("# The server's dependencies as tested (scripts/constraints.py writes this file);")
    print("# the Dockerfile's pip installs take it with `-c`. torch: see TORCH_VERSION.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
