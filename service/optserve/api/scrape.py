"""What a scrape of /metrics returns, and who may scrape it.

A scrape builds its registry fresh: all workers' values (multiprocess mode) or this
process's, the workers' process metrics, and each configured tenant's sessions and stored
bytes read from Redis at that moment (the quota hash, `store.quotas`). Tenants are those of
the configured API keys (``default`` when the service is open), so the label set is bounded
by configuration, never by what clients send. The Redis read is synchronous (a scrape runs
in a thread, or in the metrics port's server thread) and short (``redis_timeout_s``).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as _generate
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..settings import OPEN_TENANT, Settings
from ..store import keys

log = logging.getLogger("optserve")


def tenants(settings: Settings) -> list[str]:
    """The bounded tenant label set: the configured tenants, or the open one."""
    return sorted(set(settings.keys.values())) or [OPEN_TENANT]


class TenantUsage(Collector):
    """Sessions and charged bytes per configured tenant, read from Redis per scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis

            t = self.settings.redis_timeout_s
            self._client = redis.Redis.from_url(self.settings.redis_url or "",
                                                socket_timeout=t, socket_connect_timeout=t)
        return self._client

    def collect(self) -> Iterable[Metric]:
        sessions = GaugeMetricFamily("optserve_tenant_sessions", "Sessions per tenant "
                                     "(configured tenants only)", labels=["tenant"])
        stored = GaugeMetricFamily("optserve_tenant_stored_bytes", "Stored tensor bytes "
                                   "charged per tenant (see Limits and quotas)",
                                   labels=["tenant"])
        up = GaugeMetricFamily("optserve_tenant_usage_up", "1 when this scrape could read "
                               "the tenants' usage from Redis")
        try:
            pipe = self._redis().pipeline(transaction=False)
            names = tenants(self.settings)
            for tenant in names:
                pipe.hlen(keys.tenant_usage(tenant))
                pipe.hvals(keys.tenant_usage(tenant))
            replies = pipe.execute()
        except Exception as exc:  # Redis down: the other metrics still count
            log.debug("tenant usage not read: %s", exc)
            up.add_metric([], 0)
            return [up]
        for i, tenant in enumerate(names):
            sessions.add_metric([tenant], int(replies[2 * i]))
            stored.add_metric([tenant], sum(int(v) for v in replies[2 * i + 1]))
        up.add_metric([], 1)
        return [sessions, stored, up]


class WorkerProcesses(Collector):
    """`process_*` metrics of every live worker (multiprocess mode), with a ``pid`` label.

    The workers are those that wrote values to the multiprocess directory; each one's
    figures are read from ``/proc`` (Linux), as `ProcessCollector` reads its own."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def pids(self) -> list[int]:
        found = set()
        for f in self.directory.glob("*.db"):
            tail = f.stem.rsplit("_", 1)[-1]
            if tail.isdigit() and Path(f"/proc/{tail}").exists():
                found.add(int(tail))
        return sorted(found)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for pid in self.pids():
            for fam in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "pid": str(pid)}, s.value)
        yield from families.values()


def registry(settings: Settings) -> CollectorRegistry:
    """What one scrape reports (see the module)."""
    # Read from the environment, not from optserve.metrics: the `optserve serve` supervisor
    # serving the metrics port must not import it (it would show up as a worker).
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        from .. import metrics

        reg = CollectorRegistry()
        reg.register(_Forward(metrics.REGISTRY))
    else:
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg, path=directory)
        reg.register(WorkerProcesses(directory))
    reg.register(_usage(settings))
    return reg


_USAGE: dict[int, TenantUsage] = {}


def _usage(settings: Settings) -> TenantUsage:
    """One TenantUsage (one Redis connection) per Settings object."""
    found = _USAGE.get(id(settings))
    if found is None or found.settings is not settings:
        found = _USAGE[id(settings)] = TenantUsage(settings)
    return found


class _Forward(Collector):
    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.collect()


def generate(settings: Settings) -> bytes:
    return _generate(registry(settings))


def authorized(settings: Settings, header: str | None) -> bool:
    """No metrics key: anyone; else ``Authorization: Bearer <OPTSERVE_METRICS_KEY>``."""
    if not settings.metrics_key:
        return True
    scheme, _, key = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        key.strip().encode(), settings.metrics_key.encode())


def wsgi_app(settings: Settings) -> Callable[..., Iterable[bytes]]:
    """The metrics port's application: GET /metrics only, behind the key if there is one."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if not authorized(settings, environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", "Bearer")])
            return [b"metrics need the metrics key\n"]
        body = generate(settings)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]

    return app


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


def serve_metrics_port(settings: Settings, host: str) -> WSGIServer:
    """Serve /metrics on ``settings.metrics_port`` from a daemon thread of this process."""
    import threading

    assert settings.metrics_port is not None
    server = make_server(host, settings.metrics_port, wsgi_app(settings),
                         handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="optserve-metrics",
                     daemon=True).start()
    log.info("metrics on http://%s:%d/metrics (pid %d)", host, settings.metrics_port,
             os.getpid())
    return server
