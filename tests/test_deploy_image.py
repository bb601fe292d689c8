"""The image as built, statically: what its run-time kernels need (g++, ninja), the tested
versions it installs (deploy/constraints.txt, written by scripts/constraints.py), and the
health check that survives OCI-format builds (in the compose files, see
test_deploy_cluster.py) with `--format docker` documented for podman/buildah."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_deploy import REPO, dockerignore_rules, excluded, parse_dockerfile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

CONSTRAINTS = REPO / "deploy" / "constraints.txt"


def pins() -> dict[str, str]:
    out = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][\w.]*)", line)
            assert m, f"not name==version: {line!r}"
            out[canonicalize_name(m[1])] = m[2]
    return out


def server_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]
            + project["optional-dependencies"]["server"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"python_version": "3.11"})]


def test_runtime_image_carries_a_cxx_compiler_and_ninja() -> None:
    df = parse_dockerfile()
    for variant in ("cpu", "cuda"):
        runs = " ".join(rest for k, rest in df.final(TORCH_VARIANT=variant) if k == "RUN")
        installs = re.findall(r"apt-get install ([^&;]+)", runs)
        packages = {w for i in installs for w in i.split() if not w.startswith("-")}
        assert {"g++", "ninja-build"} <= packages, (variant, packages)


def test_every_pip_install_takes_the_constraints() -> None:
    df = parse_dockerfile()
    for variant in ("cpu", "cuda"):
        chain = df.chain(df.stage("builder"), TORCH_VARIANT=variant)
        steps = [(k, rest) for st in chain for k, rest in st.instructions]
        copied = [i for i, (k, rest) in enumerate(steps)
                  if k == "COPY" and rest.split()[0] == "deploy/constraints.txt"]
        assert copied, "deploy/constraints.txt is not copied into the build"
        target = steps[copied[0]][1].split()[-1]
        installs = [(i, rest) for i, (k, rest) in enumerate(steps)
                    if k == "RUN" and "pip install" in rest]
        assert installs
        for i, rest in installs:
            assert i > copied[0] and f"-c {target}" in rest, rest
    rules = dockerignore_rules()
    assert not excluded("deploy/constraints.txt", rules)
    assert excluded("deploy/.env", rules) and excluded("deploy/docker-compose.yml", rules)


def test_constraints_pin_the_server_dependencies_within_their_ranges() -> None:
    pinned = pins()
    assert not {n for n in pinned if n == "torch" or n == "triton" or n.startswith("nvidia-")}
    assert not any("+" in v for v in pinned.values())  # no local (CUDA/CPU) builds
    for req in server_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pinned, f"{name} is not pinned"
        assert req.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
    # torch itself is the Dockerfile's TORCH_VERSION: the one tested here
    tested = Version(metadata.version("torch")).base_version
    assert parse_dockerfile().args["TORCH_VERSION"] == tested


def test_constraints_script_writes_the_same_names() -> None:
    """The script runs; the packages it finds here are the ones pinned (versions may move
    in another environment: regenerate with `python scripts/constraints.py`)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "constraints.py")],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    names = {canonicalize_name(line.split("==")[0]) for line in out.splitlines()
             if line and not line.startswith("#")}
    assert names == set(pins())


def test_readme_says_how_to_keep_the_healthcheck_with_podman() -> None:
    readme = (REPO / "README.md").read_text()
    assert "--format docker" in readme
