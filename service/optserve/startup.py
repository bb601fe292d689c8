"""Start-up checks: refuse, with a message naming the variable, what cannot work.

A service that starts healthy and then answers every step with a 500 (``OPTSERVE_DEVICE=cuda``
without CUDA), or one that is open to anyone holding the example file's key, is worse than
one that does not start. ``optserve serve`` exits non-zero with these messages; under
``uvicorn optserve.app:app_factory --factory`` the factory or the lifespan raises them.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from optserve_client.wire import clip

from .settings import Settings

ENV_PREFIX = "OPTSERVE_"
PLACEHOLDER = "change-me"
"""The placeholder in deploy/.env.example's API keys: a key containing it is refused."""
_SECRET_FIELDS = ("api_keys",)


class ConfigError(RuntimeError):
    """Settings the service cannot start with; the message names the variables."""


def env_name(field: Any) -> str:
    return f"{ENV_PREFIX}{str(field).upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; a bad value names its variable, not the field."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = err["loc"][0] if err["loc"] else ""
            got = ("" if field in _SECRET_FIELDS or "input" not in err
                   else f" (got {clip(str(err['input']))!r})")
            lines.append(f"{env_name(field)}: {err['msg']}{got}")
        raise ConfigError("invalid settings: " + "; ".join(lines)) from None


def check(settings: Settings) -> None:
    """Every reason these settings cannot serve, as one ConfigError."""
    problems: list[str] = []
    try:
        keys = settings.keys
    except (ValueError, OSError) as exc:
        problems.append(f"{env_name('api_keys')}: {exc}")
    else:
        placeholders = sorted({t for k, t in keys.items() if PLACEHOLDER in k.lower()})
        if placeholders:
            problems.append(
                f"{env_name('api_keys')}: the key of tenant(s) {placeholders} is the "
                f"{PLACEHOLDER!r} placeholder from deploy/.env.example; make real keys with "
                "python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append(
                f"{env_name('device')}=cuda, but torch {torch.__version__} finds no CUDA "
                f"device (built for CUDA {torch.version.cuda or 'none'}); use "
                f"{env_name('device')}=cpu or auto")
    if problems:
        raise ConfigError("cannot start: " + "; ".join(problems))
