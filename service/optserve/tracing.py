"""OpenTelemetry spans, when `opentelemetry` is installed; no-ops when it is not.

Spans: one server span per HTTP request (an incoming W3C ``traceparent`` is its parent), one
per Redis round trip of the step path, and one for the optimizer update. They go to the
global tracer provider: the one `setup` installs from the standard ``OTEL_*`` variables
(``OTEL_TRACES_EXPORTER``: otlp, console or none; ``OTEL_EXPORTER_OTLP_*``;
``OTEL_SERVICE_NAME``), or one set by ``opentelemetry-instrument`` or a test. With no provider
set, nothing is made at all (no-op spans cost ~30 us a step, more than the work they time).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("optserve")

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import (
        NoOpTracerProvider,
        ProxyTracerProvider,
        SpanKind,
        Status,
        StatusCode,
    )
except ImportError:  # the `otel` extra is not installed
    trace = None  # type: ignore[assignment]

ENABLED = trace is not None


def recording() -> bool:
    """Whether spans go anywhere: a real tracer provider is set (checked on every call: a
    provider may be set after start-up, by ``opentelemetry-instrument`` or a test)."""
    return ENABLED and not isinstance(trace.get_tracer_provider(),
                                      (ProxyTracerProvider, NoOpTracerProvider))


def _tracer() -> Any:
    return trace.get_tracer("optserve")


@contextlib.contextmanager
def server_span(method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
    """The request's span, child of the caller's ``traceparent`` if it sent one."""
    if not recording():
        yield None
        return
    parent = propagate.extract(headers)
    with _tracer().start_as_current_span(f"{method} {path}", context=parent,
                                         kind=SpanKind.SERVER,
                                         attributes={"http.request.method": method,
                                                     "url.path": path}) as span:
        yield span


def finish_server_span(span: Any, method: str, route: str | None, status: int,
                       failed: bool) -> None:
    """Name the span by its route template; ``failed``: a server error (the caller says)."""
    if span is None or not span.is_recording():
        return
    if route:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if failed:
        span.set_status(Status(StatusCode.ERROR))


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """An internal (or client, for Redis) span under the current one."""
    if not recording():
        return contextlib.nullcontext()
    return _span(name, **attributes)


@contextlib.contextmanager
def _span(name: str, **attributes: Any) -> Iterator[Any]:
    kind = SpanKind.CLIENT if attributes.get("db.system") else SpanKind.INTERNAL
    with _tracer().start_as_current_span(name, kind=kind, attributes=attributes) as s:
        yield s


def redis_span(commands: list[Any]) -> contextlib.AbstractContextManager[Any]:
    """A span for one Redis round trip (its commands' names, never their arguments)."""
    if not recording():
        return contextlib.nullcontext()
    names = [str(c[0]) for c in commands]
    op = names[0] if len(names) == 1 else "PIPELINE"
    return span(f"redis {op}", **{"db.system": "redis", "db.operation.name": op,
                                  "db.operation.batch.size": len(names),
                                  "db.query.summary": " ".join(names)[:200]})


def setup() -> bool:
    """Install an SDK tracer provider from the ``OTEL_*`` variables, if asked for and the SDK
    is installed. True when one was installed here."""
    if not ENABLED or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if exporter_name == "none" or (exporter_name == "" and not endpoint):
        return False  # nothing asked for: the API stays a no-op
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_* is set but opentelemetry-sdk is not installed (pip install "
                    "'optserve[otel]'): no traces")
        return False
    if exporter_name == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL traces asked for but opentelemetry-exporter-otlp is not "
                        "installed (pip install 'optserve[otel]'): no traces")
            return False
        exporter = OTLPSpanExporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                               "optserve")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True
