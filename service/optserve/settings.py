"""Service configuration: every knob is an ``OPTSERVE_*`` environment variable."""

from __future__ import annotations

import hmac
import logging
import warnings
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("optserve")

OPEN_TENANT = "default"  # the one tenant of a service with no API keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", extra="ignore")

    redis_url: str | None = Field(
        None, description="Redis to keep state in; unset: `optserve serve` starts its own."
    )
    redis_cluster_nodes: str | None = Field(
        None, description="host:port,... of Redis Cluster nodes (a URL naming a cluster node "
        "is detected too)."
    )
    redis_sentinels: str | None = Field(
        None, description="host:port,... of Redis Sentinels; the primary they name is used."
    )
    redis_sentinel_master: str | None = Field(None, description="The Sentinels' master name.")
    redis_sentinel_password: str | None = Field(None, description="The Sentinels' password.")
    redis_password: str | None = Field(
        None, description="The data nodes' password (or put it in OPTSERVE_REDIS_URL)."
    )
    redis_min_replicas_ack: int = Field(
        0, ge=0, description="Replicas that must hold a write (WAIT) before it is answered."
    )
    redis_wait_timeout_s: float = Field(
        1.0, gt=0, description="How long a write waits for those replicas (then 503)."
    )
    data_dir: Path = Field(Path(".optserve-data"), description="The embedded Redis's files.")
    redis_server: str | None = Field(
        None, description="The redis-server `optserve serve` runs (unset: the newest found)."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    kernel: Literal["exact", "compiled"] = Field(
        "exact",
        description="exact: bitwise equal to torch.optim (torch's own ops, blocked for cache); "
        "compiled: torch.compile'd one-pass update, faster, close but not bitwise.",
    )
    fused: Literal["auto", "on", "off"] | None = Field(
        None, description="Deprecated alias of kernel: on -> compiled, auto/off -> exact."
    )
    max_body_bytes: int = Field(512 * 1024 * 1024, gt=0)
    idempotency_ttl_s: int = Field(86400, gt=0)
    log_level: str = "info"
    log_format: Literal["auto", "json", "plain"] = Field(
        "auto", description="Log lines: json, plain, or auto (plain on a terminal, else json)."
    )
    metrics_key: str | None = Field(
        None, description="Bearer token /metrics requires; unset: /metrics is open."
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve /metrics on this port only (from the "
        "`optserve serve` process), not on the API's port."
    )
    api_keys: str | None = Field(None, description="Comma-separated tenant:key pairs.")
    api_keys_file: Path | None = Field(None, description="One `tenant key` per line.")
    cache_bytes: int = Field(1024 * 1024 * 1024, ge=0, description="Per-process tensor cache.")
    lock_timeout_s: float = Field(30.0, gt=0, description="Lifetime of a session's step lock.")
    checkpoint_steps: int = Field(
        8, ge=1, description="Write a session's full tensors (in the background) once this "
        "many steps are logged since its last checkpoint; at twice it, the step does."
    )
    checkpoint_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Also checkpoint once the logged gradients "
        "reach this many bytes (twice it: synchronously). Bounds Redis memory per session."
    )
    hot_step_bytes: int = Field(
        1024 * 1024, ge=0, description="A step of a session this process holds hot, with "
        "gradients up to this many bytes, is computed on the cached tensors and committed "
        "in one Redis round trip (a guarded script); larger ones, or 0, take the locked "
        "path (two round trips; the gradient is not copied through a script). Step bodies "
        "up to this size of a session this process has seen are served in front of the "
        "middleware stack (api/hot_route.py); 0 sends every request through it."
    )
    redis_timeout_s: float = Field(5.0, gt=0)
    redis_max_connections: int = Field(
        512, ge=2, description="Redis connections per process; a request waits when all are busy."
    )
    tenant_max_sessions: int | None = Field(
        None, ge=0, description="Sessions per tenant; unset: unlimited (429 quota_exceeded)."
    )
    tenant_max_bytes: int | None = Field(
        None, ge=0, description="Stored tensor bytes per tenant (parameters and the state "
        "steps will make, see README); unset: unlimited."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=1)
    offload_bytes: int = Field(
        256 * 1024, ge=0,
        description="Tensor work over this many bytes runs in a worker thread, off the loop.",
    )
    offload_tensors: int = Field(
        16, ge=0, description="So does work on more tensors than this (per-tensor Python)."
    )
    max_tensors_per_session: int = Field(
        10_000, gt=0, description="Parameters a session may have (422 too_many_tensors)."
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="A request body must arrive within this many seconds (408)."
    )
    max_inflight_body_bytes: int = Field(
        1024 * 1024 * 1024, gt=0,
        description="Request body bytes held at once per process; beyond: 503 server_busy.",
    )

    @model_validator(mode="after")
    def _fused_alias(self) -> Settings:
        """Map the deprecated OPTSERVE_FUSED onto kernel (an explicit kernel wins)."""
        if self.fused is not None:
            mapped = "compiled" if self.fused == "on" else "exact"
            warnings.warn(f"OPTSERVE_FUSED / fused={self.fused!r} is deprecated; use "
                          f"OPTSERVE_KERNEL / kernel={mapped!r}", DeprecationWarning,
                          stacklevel=2)
            if "kernel" not in self.model_fields_set:
                self.kernel = mapped
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {v!r}")
        return v.lower()

    @cached_property
    def keys(self) -> dict[str, str]:
        """api key -> tenant. Empty: the service is open (one tenant)."""
        pairs: list[tuple[str, str]] = []
        if self.api_keys:
            for item in self.api_keys.split(","):
                item = item.strip()
                if not item:
                    continue
                tenant, sep, key = item.partition(":")
                if not sep or not tenant or not key:
                    raise ValueError("OPTSERVE_API_KEYS entries must look like tenant:key")
                pairs.append((tenant.strip(), key.strip()))
        if self.api_keys_file:
            for n, line in enumerate(self.api_keys_file.read_text().splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(
                        f"{self.api_keys_file.name} line {n}: expected `tenant key`"
                    )
                pairs.append((parts[0], parts[1]))
        return {key: tenant for tenant, key in pairs}

    @property
    def redis_given(self) -> bool:
        """Whether a Redis is named (a URL, cluster nodes or Sentinels); unset: `optserve
        serve` starts its own."""
        return bool(self.redis_url or self.redis_cluster_nodes or self.redis_sentinels)

    def tenant_for(self, key: str) -> str | None:
        """Constant-time lookup: every configured key is compared, whatever matches."""
        found: str | None = None
        for known, tenant in self.keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                found = tenant
        return found

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
