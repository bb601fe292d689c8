"""Logs: plain or one JSON object per line, each carrying the request it belongs to.

A request's middleware (`api.observability`) sets `REQUEST` for the request's context;
`ContextFilter` copies its request id, tenant, session and route onto every record logged
while it is served (worker threads of the step included: anyio copies the context). The
same formatters serve uvicorn's own loggers (`uvicorn_log_config`), so one process writes one
format.
"""

from __future__ import annotations

import json
import logging
import logging.config
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .settings import Settings

REQUEST_FIELDS = ("request_id", "tenant", "session", "route")


@dataclass
class RequestContext:
    """What log lines name about the request being served (filled in as it is learnt)."""

    request_id: str
    method: str = ""
    tenant: str | None = None
    scope: dict[str, Any] = field(default_factory=dict)

    @property
    def route(self) -> str | None:
        route = self.scope.get("route")
        return getattr(route, "path", None)

    @property
    def session(self) -> str | None:
        sid = (self.scope.get("path_params") or {}).get("session_id")
        return sid if isinstance(sid, str) else None


REQUEST: ContextVar[RequestContext | None] = ContextVar("optserve_request", default=None)


class ContextFilter(logging.Filter):
    """Adds request_id, tenant, session and route (None outside a request) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = REQUEST.get()
        for name in REQUEST_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, getattr(ctx, name) if ctx is not None else None)
        return True


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message",
                                                   "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, the request's
    fields, any ``extra=`` fields, and the traceback as ``exc`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class PlainFormatter(logging.Formatter):
    """The classic line, with the request id (and route) when the record has one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [{rid}]" if rid else line


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, say), not to the
    stream that was current when logging was configured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def log_format(settings: Settings) -> str:
    """`json` or `plain`: as set, else plain on a terminal and JSON otherwise."""
    if settings.log_format != "auto":
        return settings.log_format
    return "plain" if sys.stderr.isatty() else "json"


def _formatter_key(settings: Settings) -> str:
    return log_format(settings)


def uvicorn_log_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn.run: its loggers and ours, one format.

    One handler, on the root logger (as `logging.basicConfig` would put it): uvicorn's and
    our loggers propagate to it at the configured level, other libraries' at WARNING.
    Uvicorn's access log is off: our middleware writes one line per request instead."""
    level = settings.log_level.upper()
    handler = {"()": "optserve.logs.StderrHandler", "formatter": _formatter_key(settings),
               "filters": ["context"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "optserve.logs.ContextFilter"}},
        "formatters": {"json": {"()": "optserve.logs.JsonFormatter"},
                       "plain": {"()": "optserve.logs.PlainFormatter"}},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": "WARNING"},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": True},
            "optserve": {"handlers": [], "level": level, "propagate": True},
        },
    }


_configured: list[str] = []


def configure(settings: Settings) -> None:
    """Install the handlers on this process's loggers (once; a worker process calls it from
    `app_factory`, `optserve serve` passes the same through uvicorn's ``log_config``)."""
    key = f"{log_format(settings)}:{settings.log_level}"
    if key in _configured:
        return
    _configured.append(key)
    logging.config.dictConfig(uvicorn_log_config(settings))
