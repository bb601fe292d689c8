"""deploy/docker-compose.cluster.yml, checked without a Docker engine: the schema and a real
Compose when installed, the services' consistency, every OPTSERVE_* name a real setting, and
the nodes' own command run here (six local redis-servers formed into a cluster the way the
one-shot service does it) under the api service's environment, serving a step."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from redis_topologies import cluster_port, redis_cli, wait_for
from test_deploy import (
    COMPOSE,
    DEPLOY,
    ENV_EXAMPLE,
    REDIS_CONF,
    _conf_directives,
    as_mapping,
    check_schema,
    compose_commands,
    healthcheck_argv,
    interpolate,
    load_yaml,
    parse_dockerfile,
    read_dotenv,
)

from helpers import create, decode, step

CLUSTER = DEPLOY / "docker-compose.cluster.yml"


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load_yaml(CLUSTER)


def nodes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in doc["services"].items()
            if "--cluster-enabled yes" in " ".join(svc.get("command", []))}


def test_cluster_compose_matches_the_schema_and_real_compose(tmp_path: Path) -> None:
    pytest.importorskip("check_jsonschema")
    result = check_schema(CLUSTER)
    assert result.returncode == 0, result.stdout + result.stderr
    for cmd in compose_commands():
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # no user docker config
        out = subprocess.run([*cmd, "--project-directory", str(DEPLOY), "-f", str(CLUSTER),
                              "config", "-q"], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr


def test_cluster_services_fit_together(cluster: dict[str, Any]) -> None:
    services = cluster["services"]
    data_nodes = nodes(cluster)
    init = services["redis-cluster-init"]
    script = init["command"][-1]
    m = re.search(r"for n in ([\w\- ]+); do", script)
    assert m and sorted(m[1].split()) == sorted(data_nodes), "init names every node"
    replicas = int(re.search(r"--cluster-replicas (\d+)", script)[1])
    assert len(data_nodes) % (1 + replicas) == 0 and len(data_nodes) // (1 + replicas) >= 3
    assert init["depends_on"] == {n: {"condition": "service_healthy"} for n in data_nodes}
    assert init.get("restart") == "no"
    port = _conf_directives(REDIS_CONF)["port"][0]
    for name, svc in data_nodes.items():
        assert svc["environment"]["NODE_NAME"] == name  # announced: the API connects by name
        assert "--cluster-preferred-endpoint-type hostname" in svc["command"][-1]
        assert svc["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
        mounts = dict(v.split(":")[1::-1] for v in svc["volumes"])
        assert mounts["/data"] == f"{name}-data" and mounts["/data"] in cluster["volumes"]
        assert "ports" not in svc
    api = services["api"]
    env = as_mapping(api["environment"])
    assert "OPTSERVE_REDIS_URL" not in env
    for hostport in env["OPTSERVE_REDIS_CLUSTER_NODES"].split(","):
        host, _, p = hostport.partition(":")
        assert host in data_nodes and p == port
    assert api["depends_on"] == {
        "redis-cluster-init": {"condition": "service_completed_successfully"}}
    assert services["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"
    for key in ("container_name", "ports", "hostname"):
        assert key not in api, f"api.{key} prevents `--scale api=N`"
    used = {str(v).split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert set(cluster["volumes"]) <= used


def test_api_healthcheck_in_compose_is_the_images(cluster: dict[str, Any]) -> None:
    """OCI-format builds drop HEALTHCHECK; both compose files carry the same probe."""
    image = healthcheck_argv(parse_dockerfile())
    for doc in (load_yaml(COMPOSE), cluster):
        test = doc["services"]["api"]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:] == image


def test_cluster_compose_names_only_real_settings(cluster: dict[str, Any]) -> None:
    from optserve.settings import Settings

    known = {f"OPTSERVE_{name.upper()}" for name in Settings.model_fields}
    text = CLUSTER.read_text()
    used = set(re.findall(r"\bOPTSERVE_[A-Z0-9_]+", text))
    assert used and used <= known, used - known
    documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    for name in re.findall(r"\$\{(\w+)", text):
        assert name in documented, f"{name} is used but not in .env.example"


@pytest.mark.cluster
@pytest.mark.slow
def test_cluster_nodes_and_init_as_composed_serve_a_step(cluster: dict[str, Any], tmp_path: Path,
                                                         make_server) -> None:
    """Each node's own command line (redis.conf's settings, the cluster flags, its name
    announced; here `localhost`, the container network's name service being absent), the
    one-shot's `redis-cli --cluster create`, and the api's environment: a step lands."""
    from optserve.store.embedded import EmbeddedRedis

    conf = _conf_directives(REDIS_CONF)
    base = [x for key, values in conf.items() if key not in {"bind", "port", "dir",
            "protected-mode", "appendfsync"} for x in (f"--{key}", *values)]
    dotenv = read_dotenv(ENV_EXAMPLE)
    servers: list[EmbeddedRedis] = []
    try:
        for name, svc in sorted(nodes(cluster).items()):
            env = {**as_mapping(interpolate(svc["environment"], dotenv)), "NODE_NAME": "localhost"}
            line = interpolate(svc["command"][-1], {}).replace("$$", "$")
            argv = shlex.split(re.sub(r'"\$(\w+)"', lambda m, env=env: env[m[1]], line))
            assert argv[:3] == ["exec", "redis-server", "/usr/local/etc/redis/redis.conf"]
            flags = argv[3:]
            fsync = flags[flags.index("--appendfsync") + 1]
            del flags[flags.index("--appendfsync"):flags.index("--appendfsync") + 2]
            d = tmp_path / name
            d.mkdir()
            server = EmbeddedRedis(data_dir=d, port=cluster_port(), appendfsync=fsync,
                                   extra_args=[*base, *flags])
            server.start()
            servers.append(server)
        script = cluster["services"]["redis-cluster-init"]["command"][-1]
        replicas = re.search(r"--cluster-replicas (\d+)", script)[1]
        subprocess.run([redis_cli(), "--cluster", "create",
                        *[f"127.0.0.1:{s.port}" for s in servers], "--cluster-replicas",
                        replicas, "--cluster-yes"], check=True, capture_output=True, timeout=60)
        wait_for(lambda: all(b"cluster_state:ok" in s.client().execute_command("CLUSTER", "INFO")
                             for s in servers), 30, "cluster_state:ok")
        slots = servers[0].client().execute_command("CLUSTER", "SLOTS")
        assert {entry[2][0] for entry in slots} == {b"localhost"}  # names, not addresses

        env = as_mapping(cluster["services"]["api"]["environment"])
        names = env["OPTSERVE_REDIS_CLUSTER_NODES"].split(",")
        local = ",".join(f"127.0.0.1:{servers[int(n.split(':')[0][-1]) - 1].port}"
                         for n in names)
        srv = make_server(redis_cluster_nodes=local, redis_url="")  # only the nodes, as composed
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            sid = create(c, {"w": torch.zeros(4)}, optimizer="sgd", hyperparams={"lr": 0.5})["id"]
            r = step(c, sid, {"w": torch.ones(4)})
            assert r.status_code == 200, r.text
            assert torch.equal(decode(r)["w"], torch.full((4,), -0.5))
    finally:
        for s in servers:
            s.stop()
