"""Print pip constraints that pin each direct dependency to its declared floor.

    python .ci/floors.py server [EXTRA ...] [--pin torch==2.13.0] > constraints.txt

Reads pyproject.toml: the runtime dependencies plus those of the named extras (an
``optserve[...]`` entry pulls in those extras too), and prints ``name==floor`` for every
requirement with a ``>=`` floor whose environment marker holds here. ``--pin`` replaces a
package's floor (torch: other versions mean a multi-GB CUDA download on CI). A lowest-
versions install with these constraints shows whether the floors are true.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ModuleNotFoundError:  # a bare interpreter: pip's copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements(extras: list[str], path: Path = PYPROJECT) -> list[Requirement]:
    """The runtime requirements and those of ``extras``, self-references expanded."""
    project = tomllib.loads(path.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out: list[Requirement] = [Requirement(r) for r in project.get("dependencies", [])]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            sys.exit(f"floors.py: no extra {extra!r} in {path.name}")
        seen.add(extra)
        for line in optional[extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def floors(extras: list[str], pins: list[str]) -> list[str]:
    pinned = {canonicalize_name(Requirement(p).name): p for p in pins}
    lines: dict[str, str] = {}
    for req in requirements(extras):
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        floor = [s.version for s in req.specifier if s.operator == ">="]
        if name in pinned:
            lines[name] = pinned[name]
        elif floor:
            lines[name] = f"{name}=={max(floor)}"
    return [lines[n] for n in sorted(lines)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("extras", nargs="*")
    ap.add_argument("--pin", action="append", default=[], help="name==version to use instead")
    args = ap.parse_args()
    print("\n".join(floors(args.extras, args.pin)))


if __name__ == "__main__":
    main()
