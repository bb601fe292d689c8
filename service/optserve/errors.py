"""Domain errors: what went wrong, as a problem ``code`` and its fields, with no HTTP in it.

Everything below ``api/`` raises these; ``api/problems.py`` alone turns one into an HTTP
status and an application/problem+json body (the status comes from
``optserve_client.spec.PROBLEMS``). The code is checked at construction, so a code the
contract does not list fails loudly wherever it is first raised, tests included.
"""

from __future__ import annotations

from typing import Any

from optserve_client.spec import PROBLEMS


class DomainError(Exception):
    """A refusal with a stable ``code``, a human ``detail`` and extra body fields.

    ``retry_after`` (seconds) says the same request may succeed later.
    """

    def __init__(self, code: str, detail: str, *, retry_after: int | None = None,
                 **fields: Any) -> None:
        if code not in PROBLEMS:
            raise ValueError(f"unknown problem code {code!r}: add it to optserve_client.spec")
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.retry_after = retry_after
        self.fields = fields


class Busy(DomainError):
    """The session could not be had (lock or a moving version): nothing was applied, retry."""

    def __init__(self, reason: str) -> None:
        super().__init__("session_busy", f"{reason}; nothing was applied, retry",
                         retry_after=1)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class SessionBusy(Busy):
    """The session's lock could not be taken in time."""


class StoreConflict(Busy):
    """The version moved under a commit (a lock expired mid-step): nothing was written."""



class StoreFull(DomainError):
    """Redis refused a write: out of memory (``maxmemory`` with ``noeviction``)."""

    def __init__(self, reason: str) -> None:
        super().__init__("store_full", "the state store is out of memory; nothing was "
                         f"applied. Deleting sessions frees space ({reason})", retry_after=30)


class StoreUnavailable(DomainError):
    """Redis cannot take this command now (a replica, a failover, a cluster move, loading)."""

    def __init__(self, reason: str) -> None:
        super().__init__("store_unavailable", "the state store cannot take this request now; "
                         f"nothing was applied, retry shortly ({reason})", retry_after=1)


class QuotaExceeded(DomainError):
    """A tenant limit would be exceeded: ``quota`` names it (``sessions`` or ``bytes``)."""

    def __init__(self, tenant: str, quota: str, usage: int, limit: int, wanted: int) -> None:
        what = "sessions" if quota == "sessions" else "stored tensor bytes"
        super().__init__(
            "quota_exceeded",
            f"tenant {tenant!r} is at {usage} {what} of its limit of {limit} "
            f"(OPTSERVE_TENANT_MAX_{quota.upper()}); this request needs {wanted} more. "
            "Delete sessions to free quota", quota=quota, usage=usage, limit=limit)
