"""Prometheus metrics (per process; with several workers each reports its own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("optserve_requests_total", "HTTP requests", ["method", "route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("optserve_request_seconds", "HTTP request latency", ["method", "route"],
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5, 5.0, 10.0), registry=REGISTRY)
BYTES_IN = Counter("optserve_request_bytes_total", "Request body bytes", ["route"],
                   registry=REGISTRY)
BYTES_OUT = Counter("optserve_response_bytes_total", "Response body bytes", ["route"],
                    registry=REGISTRY)
STEPS = Counter("optserve_steps_applied_total", "Optimizer steps applied", ["optimizer"],
                registry=REGISTRY)
STORE_LATENCY = Histogram("optserve_store_seconds", "Redis round trips of the step path",
                          ["op"], buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                           0.05, 0.1, 0.5, 1.0), registry=REGISTRY)
