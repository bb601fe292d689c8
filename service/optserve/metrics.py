"""Prometheus metrics, correct with several worker processes.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``optserve serve`` always sets it, to a private
directory wiped at start) every process writes its values to files there and a scrape of
any process reads them all (`prometheus_client.multiprocess`): counters sum over workers,
gauges say how they combine (``multiprocess_mode``). Without it (an app embedded in another
process, the tests' thread servers) each process reports its own, as before.

The variable must be set before this module is imported: values pick their storage then.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REGISTRY = CollectorRegistry(auto_describe=True)

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# ------------------------------------------------------------------ HTTP
REQUESTS = Counter("optserve_requests_total", "HTTP requests", ["method", "route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("optserve_request_seconds", "HTTP request latency", ["method", "route"],
                    buckets=_FAST, registry=REGISTRY)
BYTES_IN = Counter("optserve_request_bytes_total", "Request body bytes", ["route"],
                   registry=REGISTRY)
BYTES_OUT = Counter("optserve_response_bytes_total", "Response body bytes", ["route"],
                    registry=REGISTRY)
IN_FLIGHT = Gauge("optserve_requests_in_flight", "HTTP requests being served",
                  multiprocess_mode="livesum", registry=REGISTRY)
IN_FLIGHT_BYTES = Gauge("optserve_request_body_bytes_in_flight",
                        "Request body bytes received by requests still being served",
                        multiprocess_mode="livesum", registry=REGISTRY)
PROBLEMS = Counter("optserve_problems_total", "Problem responses by code (see the API's "
                   "error table)", ["code"], registry=REGISTRY)

# ------------------------------------------------------------------ steps and the store
STEPS = Counter("optserve_steps_applied_total", "Optimizer steps applied", ["optimizer"],
                registry=REGISTRY)
STEP_SECONDS = Histogram("optserve_step_seconds", "One step under the session's lock: load, "
                         "update, commit (not the wait for a lock or a sync round)",
                         ["mode"], buckets=_FAST, registry=REGISTRY)
UPDATE_SECONDS = Histogram("optserve_update_seconds", "The optimizer update itself (torch)",
                           ["optimizer"], buckets=_FAST, registry=REGISTRY)
STORE_LATENCY = Histogram("optserve_store_seconds", "Redis round trips of the step path",
                          ["op"], buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                           0.05, 0.1, 0.5, 1.0), registry=REGISTRY)
STORE_ERRORS = Counter("optserve_store_errors_total", "Redis failures answered to clients, by "
                       "kind: store_full (OOM), store_unavailable (down, read-only, moved, "
                       "loading), other", ["kind"], registry=REGISTRY)
LOCK_WAIT = Histogram("optserve_lock_wait_seconds", "Time to take a session's step lock",
                      buckets=_FAST, registry=REGISTRY)
SESSION_BUSY = Counter("optserve_session_busy_total", "Steps refused with session_busy, by "
                       "reason: lock (not had in time) or conflict (moved under a commit)",
                       ["reason"], registry=REGISTRY)

# ------------------------------------------------------------------ sync rounds
ROUNDS = Counter("optserve_rounds_total", "Sync rounds by event: opened, closed, failed",
                 ["event"], registry=REGISTRY)
ROUND_SECONDS = Histogram("optserve_round_seconds", "From a round's first contribution to "
                          "its step (closed rounds)", buckets=_SLOW, registry=REGISTRY)
ROUND_WAIT = Histogram("optserve_round_wait_seconds", "Time a contribution waited for its "
                       "round to close", buckets=_SLOW, registry=REGISTRY)

# ------------------------------------------------------------------ tensor cache
CACHE = Counter("optserve_cache_total", "Tensor cache look-ups: hit, miss (stale or absent), "
                "evicted", ["result"], registry=REGISTRY)
CACHE_BYTES = Gauge("optserve_cache_bytes", "Bytes held by the tensor caches (all workers)",
                    multiprocess_mode="livesum", registry=REGISTRY)
CACHE_ENTRIES = Gauge("optserve_cache_entries", "Sessions held by the tensor caches",
                      multiprocess_mode="livesum", registry=REGISTRY)

# ------------------------------------------------------------------ write-ahead log
LOGGED_BYTES = Counter("optserve_wal_bytes_total", "Gradient bytes written to the step log",
                       registry=REGISTRY)
CHECKPOINTS = Counter("optserve_checkpoints_total", "Checkpoints of full tensors, by kind: "
                      "background, sync (a log at its bound), superseded (a newer one or a "
                      "PUT landed first), failed", ["kind"], registry=REGISTRY)
HOT_STEPS = Counter("optserve_hot_steps_total", "Steps tried in one round trip on cached "
                    "tensors: committed, or handed to the locked path because the session was "
                    "locked, had moved on, or the Idempotency-Key was used", ["result"],
                    registry=REGISTRY)
CHECKPOINT_BYTES = Counter("optserve_checkpoint_bytes_total", "Tensor bytes checkpointed",
                           registry=REGISTRY)
REPLAYS = Counter("optserve_replayed_steps_total", "Logged steps replayed to rebuild a session "
                  "(not hot in this process)", registry=REGISTRY)
REPLAY_BYTES = Counter("optserve_replayed_bytes_total", "Gradient bytes of the replayed steps",
                       registry=REGISTRY)


_DIR = os.environ.get(MULTIPROC_ENV) or None  # the mode this process's values were made in


def multiproc_dir() -> str | None:
    """The multiprocess directory this process's values live in (None: in memory)."""
    return _DIR


if _DIR is None:
    # One process: its own process metrics. Multiprocess: see `collectors.WorkerProcesses`.
    ProcessCollector(registry=REGISTRY)


_CHILDREN: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus_client builds and locks on every
    call, a visible part of a small step's CPU. Label values here come from small fixed sets
    (routes, statuses, optimizers, outcomes), so the memo stays small."""
    key = (metric, labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


@contextmanager
def timed(observe: Callable[[float], None]) -> Iterator[None]:
    """Observe the block's duration (seconds), whether it returns or raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe(time.perf_counter() - start)


def store_error(kind: str) -> None:
    """Count one Redis failure answered to a client (kinds as in `store.faults`)."""
    STORE_ERRORS.labels(kind if kind in ("store_full", "store_unavailable") else "other").inc()


def problem(code: str) -> None:
    """Count one problem response (and session_busy's reason where it is known)."""
    PROBLEMS.labels(code).inc()
