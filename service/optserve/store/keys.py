"""Key names. Every key of one session carries the hash tag ``{s:<id>}`` (Redis Cluster safe)."""

from __future__ import annotations

PREFIX = "os"


def meta(sid: str) -> str:
    return f"{PREFIX}:{{s:{sid}}}:meta"


def tensors(sid: str) -> str:
    return f"{PREFIX}:{{s:{sid}}}:t"


def checkpoint(sid: str) -> str:
    """The last checkpoint: every tensor's bytes (``p.*``, ``s.*``) at version ``k``, and
    ``lb``, the bytes logged since (see store/wal.py)."""
    return f"{PREFIX}:{{s:{sid}}}:ck"


def checkpoint_staging(sid: str, token: str) -> str:
    """A background checkpoint's tensors before they become `checkpoint` (a RENAME)."""
    return f"{PREFIX}:{{s:{sid}}}:ck:{token}"


def wal(sid: str) -> str:
    """The write-ahead log: a stream, one entry per step since the checkpoint, id = version."""
    return f"{PREFIX}:{{s:{sid}}}:wal"


def wal_index(sid: str) -> str:
    """Logged version -> "<gradient bytes> <commit nonce>" (small: trimming reads it)."""
    return f"{PREFIX}:{{s:{sid}}}:wali"


def lock(sid: str) -> str:
    return f"{PREFIX}:{{s:{sid}}}:lock"


def idempotency(sid: str, key: str) -> str:
    return f"{PREFIX}:{{s:{sid}}}:idem:{key}"


def idempotency_set(sid: str) -> str:
    """The names of the session's idempotency records (for deleting them without a scan)."""
    return f"{PREFIX}:{{s:{sid}}}:idems"


def round_(sid: str) -> str:
    """The open sync round: its token, version, deadline and contributions."""
    return f"{PREFIX}:{{s:{sid}}}:round"


def round_outcome(sid: str, token: str) -> str:
    return f"{PREFIX}:{{s:{sid}}}:round:{token}:outcome"


def round_params(sid: str, token: str) -> str:
    """The parameters a closed round produced, for its waiters (kept a while)."""
    return f"{PREFIX}:{{s:{sid}}}:round:{token}:params"


ROUNDS_CHANNEL = f"{PREFIX}:rounds"


def round_channel(sid: str) -> str:
    """On a Redis Cluster, the shard channel (in the session's slot) its rounds are
    announced on instead of `ROUNDS_CHANNEL` (SPUBLISH inside the round's own MULTI)."""
    return f"{PREFIX}:{{s:{sid}}}:rounds"


def create_idempotency(tenant: str, key: str) -> str:
    return f"{PREFIX}:tenant:{{t:{tenant}}}:create:{key}"


def tenant_sessions(tenant: str) -> str:
    return f"{PREFIX}:tenant:{{t:{tenant}}}:sessions"


def tenant_usage(tenant: str) -> str:
    """Quota usage: session id -> the stored bytes charged to it (HLEN: the session count)."""
    return f"{PREFIX}:tenant:{{t:{tenant}}}:usage"


def tenant_bytes(tenant: str) -> str:
    """The sum of `tenant_usage`'s values (dropped when it cannot be updated; rebuilt)."""
    return f"{PREFIX}:tenant:{{t:{tenant}}}:bytes"


HEALTH = f"{PREFIX}:health"  # /readyz writes it (with a TTL) to prove Redis takes writes


# Fields of the tensor hash.
VERSION = "v"
UPDATED = "u"
LAST_GRAD_NORM = "gn"
LAST_UPDATE_NORM = "un"
STEPS = "n"  # steps applied, for "cannot change once a step has been applied"
NONCE = "c"  # a random token per commit, checked by the tensor cache with the version
CKPT_VERSION = "k"  # in `checkpoint`: the version its tensors hold
LOG_BYTES = "lb"  # in `checkpoint`: gradient bytes logged since it
HEAD_FIELDS = (VERSION, UPDATED, LAST_GRAD_NORM, LAST_UPDATE_NORM, STEPS)  # numbers


def param_field(name: str) -> str:
    return f"p.{name}"


def state_field(name: str, key: str) -> str:
    return f"s.{name}.{key}"


def parse_field(field: str) -> tuple[str, str, str | None] | None:
    """`p.w` -> ("p", "w", None); `s.layer.0.weight.step` -> ("s", "layer.0.weight", "step")."""
    kind, _, rest = field.partition(".")
    if kind == "p" and rest:
        return "p", rest, None
    if kind == "s" and "." in rest:
        name, _, key = rest.rpartition(".")
        return "s", name, key
    return None
