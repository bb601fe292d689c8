"""What the sync and async clients share: configuration, request building, the retry policy,
response parsing and the default (urllib3) transport.

Each API method is split into a pure *builder* that returns a `Call` (method, path, body,
headers, and a parser for the response) and a loop that sends it (`Client._run` /
`AsyncClient._run`), so both clients run the same requests through the same policy and
differ only in how they wait.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import quote, urlencode

import numpy as np
import urllib3

from . import wire
from .errors import APIConnectionError, APIResponseValidationError, APITimeoutError

log = logging.getLogger("optserve_client")

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
ENV_URL = "OPTSERVE_URL"
ENV_API_KEY = "OPTSERVE_API_KEY"

Format = Literal["safetensors", "json"]
ArrayKind = Literal["numpy", "torch"]
FORMATS: dict[str, str] = {"safetensors": wire.SAFETENSORS_TYPE, "json": wire.JSON_TYPE}
GRAD_DTYPES = ("bfloat16", "float16", "float32", "float64")

# torch's defaults (the service's too), only the hyperparameters that change the math.
TORCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "rmsprop": {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False, "maximize": False},
    "adagrad": {"lr": 0.01, "lr_decay": 0.0, "weight_decay": 0.0,
                "initial_accumulator_value": 0.0, "eps": 1e-10, "maximize": False},
    "sgd": {"lr": 0.001, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
            "nesterov": False, "maximize": False},
}
# The "Common Configurations" of the RMSprop document (RMSprop hyperparameters).
PRESETS: dict[str, dict[str, Any]] = {
    "standard": {"lr": 1e-3, "alpha": 0.99},
    "rnn": {"lr": 1e-4, "alpha": 0.9},
    "momentum": {"lr": 1e-3, "alpha": 0.99, "momentum": 0.9},
}
# Parameters this small go inline (JSON) in the create request; larger ones by PUT, binary.
INLINE_PARAMS_MAX_BYTES = 256 * 1024


def check_format(format: str) -> Format:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, not {format!r}")
    return format  # type: ignore[return-value]


# --------------------------------------------------------------------------- timeouts


@dataclass(frozen=True)
class Timeout:
    """Connect and read timeouts in seconds (None: wait forever)."""

    connect: float | None = 10.0
    read: float | None = 60.0

    @classmethod
    def of(cls, value: float | tuple[float | None, float | None] | Timeout | None) -> Timeout:
        if isinstance(value, Timeout):
            return value
        if value is None:
            return cls(None, None)
        if isinstance(value, tuple):
            return cls(*value)
        return cls(min(float(value), 10.0), float(value))


# --------------------------------------------------------------------------- transport


Body = bytes | list[bytes | memoryview]


@dataclass
class RawRequest:
    """One HTTP request. A list ``body`` is sent part by part (tensor memory, uncopied) and
    carries its Content-Length header; it can be iterated again for a retry."""

    method: str
    url: str
    headers: dict[str, str]
    body: Body | None = None


@dataclass
class RawResponse:
    """A whole response; ``headers`` keys are lower case, ``body`` is writable when possible."""

    status: int
    headers: dict[str, str]
    body: bytes | bytearray | memoryview


class Transport(Protocol):
    """Sends one request, no retries. Raises `APIConnectionError`/`APITimeoutError`."""

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse: ...

    def close(self) -> None: ...


class Urllib3Transport:
    """The default transport: urllib3's pool over http.client, bodies read without copies.

    httpx (through h11) moves large bodies several times slower than http.client. urllib3
    hands each body part to ``sendall`` (a list body: the tensors' own memory, no join)
    and, for a response with a Content-Length, we ``readinto`` one uninitialised buffer:
    no chunk list, no join, no zero-fill, and the arrays decoded from it are writable.
    Thread-safe.
    """

    def __init__(self, *, max_connections: int = 32, **pool_kwargs: Any) -> None:
        # block=False: a burst beyond max_connections opens extra connections, not a queue
        self._pool = urllib3.PoolManager(num_pools=8, maxsize=max_connections, block=False,
                                         retries=False, **pool_kwargs)

    def send(self, request: RawRequest, timeout: Timeout) -> RawResponse:
        exc_mod = urllib3.exceptions
        try:
            resp = self._pool.urlopen(
                request.method, request.url, body=request.body, headers=request.headers,
                retries=False, redirect=False, preload_content=False,
                timeout=urllib3.Timeout(connect=timeout.connect, read=timeout.read),
            )
        except exc_mod.NewConnectionError as exc:  # before ConnectTimeoutError: a subclass
            raise APIConnectionError(f"cannot connect to {request.url}: {exc}",
                                     request_sent=False, cause=exc) from exc
        except exc_mod.ConnectTimeoutError as exc:
            raise APITimeoutError(f"connect timeout: {request.url}", request_sent=False,
                                  cause=exc) from exc
        except exc_mod.ReadTimeoutError as exc:
            raise APITimeoutError(f"read timeout: {request.method} {request.url}",
                                  request_sent=True, cause=exc) from exc
        except (exc_mod.HTTPError, OSError, http.client.HTTPException) as exc:
            raise APIConnectionError(f"connection error: {request.method} {request.url}: {exc}",
                                     request_sent=None, cause=exc) from exc
        try:
            body = _read_body(resp, request.method)
        except (TimeoutError, exc_mod.ReadTimeoutError) as exc:
            resp.close()
            raise APITimeoutError(f"read timeout: {request.method} {request.url}",
                                  request_sent=True, cause=exc) from exc
        except (exc_mod.HTTPError, OSError, http.client.HTTPException) as exc:
            resp.close()
            raise APIConnectionError(f"connection broke reading {request.url}: {exc}",
                                     request_sent=True, cause=exc) from exc
        finally:
            resp.release_conn()
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return RawResponse(resp.status, headers, body)

    def close(self) -> None:
        self._pool.clear()


def _read_body(resp: Any, method: str) -> bytes | memoryview:
    """Read a urllib3 response whole: into one writable buffer when the length is known.

    (``np.empty``, not ``bytearray(n)``: the latter zero-fills, a full extra pass over the
    memory that costs as much as the copy we avoid.)"""
    fp = getattr(resp, "_fp", None)
    length = resp.headers.get("content-length")
    if (method != "HEAD" and isinstance(fp, http.client.HTTPResponse) and length
            and length.isdigit() and not resp.headers.get("content-encoding")):
        n = int(length)
        view = memoryview(np.empty(n, dtype=np.uint8))
        got = 0
        while got < n:
            k = fp.readinto(view[got:])
            if not k:
                raise http.client.IncompleteRead(bytes(view[:got]), n - got)
            got += k
        return view
    return resp.read()


# --------------------------------------------------------------------------- retries


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before resending (exponential backoff with jitter).

    Retried: connection errors (those that may have reached the server only when the call is
    safe to resend: every call but session creation, steps included since each logical step
    keeps one Idempotency-Key), and the statuses in ``statuses``. A ``Retry-After`` up to
    ``max_retry_after`` is honoured (plus up to 10 % jitter); a longer one is not waited out
    (the error is raised with ``retry_after`` set).
    """

    max_retries: int = 3
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = frozenset({408, 429, 502, 503, 504})

    def backoff(self, attempt: int, retry_after: float | None = None,
                rng: Callable[[], float] = random.random) -> float:
        """Delay before retry number ``attempt + 1`` (attempt counts from 0)."""
        if retry_after is not None:
            return retry_after * (1.0 + 0.1 * rng())
        base = min(self.initial_delay * (2.0 ** attempt), self.max_delay)
        return base * (0.5 + 0.5 * rng())

    def delay_for_status(self, status: int, headers: Mapping[str, str], attempt: int,
                         rng: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait before resending after this status, or None to give up."""
        if attempt >= self.max_retries or status not in self.statuses:
            return None
        ra = parse_retry_after(headers)
        if ra is not None and ra > self.max_retry_after:
            return None
        return self.backoff(attempt, ra, rng)

    def delay_for_exception(self, exc: APIConnectionError, idempotent: bool, attempt: int,
                            rng: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait before resending after a connection error, or None to give up."""
        if attempt >= self.max_retries or not (idempotent or exc.request_sent is False):
            return None
        return self.backoff(attempt, None, rng)


# --------------------------------------------------------------------------- results


@dataclass
class Session:
    """A session document. Attribute access for the known fields, ``doc["x"]`` for any field."""

    id: str
    version: int | None = None
    name: str | None = None
    optimizer: str = "rmsprop"
    hyperparams: dict[str, Any] = field(default_factory=dict)
    mode: str = "async"
    max_staleness: int | None = None
    sync: dict[str, Any] | None = None
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: str | None = None
    updated_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Session:
        if not isinstance(doc, Mapping) or "id" not in doc:
            raise APIResponseValidationError(f"not a session document: {doc!r:.200}")
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc and k != "raw"}
        for key in ("hyperparams", "tensors"):
            if known.get(key) is None:
                known.pop(key, None)
        return cls(**known, raw=dict(doc))

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


@dataclass
class StepResult:
    """A step's outcome: the session's version after it and (unless return_params=False) the
    new parameters. ``attempts`` counts the HTTP tries it took (1 without retries);
    ``replayed`` says the step had already been applied by an earlier try."""

    version: int
    params: dict[str, Any] | None = None
    attempts: int = 1
    replayed: bool = False  # the server answered from its idempotency record


# --------------------------------------------------------------------------- calls

T = TypeVar("T")


@dataclass
class Call(Generic[T]):
    """One logical API call: the request and how to read its response."""

    method: str
    path: str
    parse: Callable[[RawResponse, int], T]
    body: Body | None = None
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] | None = None
    idempotent: bool = True  # safe to resend after a failure that may have reached the server
    absent_ok_on_retry: bool = False  # DELETE: a 404 after an ambiguous failure means "done"
    max_retries: int | None = None  # overrides the client's


def etag(version: int | str) -> str:
    """``3`` -> ``'"3"'`` (the If-Match form); a string already quoted is kept."""
    s = str(version)
    if s == "*" or (s.startswith('"') and s.endswith('"')) or s.startswith("W/"):
        return s
    return f'"{s}"'


def version_of(headers: Mapping[str, str]) -> int | None:
    v = headers.get("x-optserve-version")
    if v is None and headers.get("etag"):
        v = headers["etag"].removeprefix("W/").strip('"')
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _json(resp: RawResponse) -> Any:
    try:
        return json.loads(bytes(resp.body)) if resp.body else None
    except ValueError as exc:
        raise APIResponseValidationError(f"response is not JSON: {exc}") from None


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def convert_tensors(tensors: Mapping[str, wire.WireTensor], as_: ArrayKind
                    ) -> dict[str, Any]:
    """Wire tensors -> NumPy arrays or torch tensors, sharing the response's memory."""
    if as_ == "torch":
        return {k: wire.to_torch(t) for k, t in tensors.items()}
    if as_ != "numpy":
        raise ValueError(f"as_ must be 'numpy' or 'torch', not {as_!r}")
    return {k: wire.to_numpy(t) for k, t in tensors.items()}


def decode_tensors(resp: RawResponse, as_: ArrayKind
                   ) -> tuple[dict[str, Any], dict[str, str] | None]:
    ctype = resp.headers.get("content-type", wire.SAFETENSORS_TYPE)
    try:
        tensors, metadata = wire.decode(resp.body, ctype)
    except wire.WireError as exc:
        raise APIResponseValidationError(f"cannot decode the tensor body: {exc}") from None
    return convert_tensors(tensors, as_), metadata


def compress(value: Any, grad_dtype: str | None) -> Any:
    """Cast one gradient to ``grad_dtype`` for the wire (bfloat16/float16: half the bytes)."""
    if grad_dtype is None or value is None:
        return value
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype must be one of {GRAD_DTYPES}, not {grad_dtype!r}")
    if _is_torch(value):
        torch = sys.modules["torch"]
        return value.detach().to(getattr(torch, grad_dtype))
    if isinstance(value, wire.WireTensor):
        return value
    arr = np.asarray(value)
    if grad_dtype == "bfloat16":
        bits = wire.float32_to_bfloat16_bits(arr.astype(np.float32, copy=False))
        return wire.WireTensor("bfloat16", tuple(arr.shape),
                               memoryview(bits.reshape(-1)).cast("B"))
    return arr.astype(grad_dtype, copy=False)


def wire_ready(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Drop None entries (a parameter without a gradient is simply not sent)."""
    return {name: value for name, value in tensors.items() if value is not None}


def safetensors_parts(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                      ) -> list[bytes | memoryview]:
    """The body as the header plus the tensors' own bytes: sent as a list, never joined."""
    return wire.encode_safetensors_parts(wire_ready(tensors), metadata)



def _nbytes(value: Any) -> int:
    if isinstance(value, wire.WireTensor):
        return len(value.data)
    if _is_torch(value):
        return value.numel() * value.element_size()
    return np.asarray(value).nbytes


class BaseClient:
    """Configuration and the request builders of every endpoint of the API."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | tuple[float | None, float | None] | Timeout | None = 60.0,
                 max_retries: int = 3, format: Format = "safetensors", *,
                 default_headers: Mapping[str, str] | None = None,
                 retry_policy: RetryPolicy | None = None) -> None:
        url = base_url or os.environ.get(ENV_URL) or DEFAULT_BASE_URL
        if "://" not in url:
            url = "http://" + url
        self.base_url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or None)
        self.timeout = Timeout.of(timeout)
        self.format: Format = check_format(format)
        self.retry_policy = replace(retry_policy or RetryPolicy(), max_retries=max_retries)
        self.default_headers = dict(default_headers or {})
        self._sleep_rng: Callable[[], float] = random.random

    @property
    def max_retries(self) -> int:
        return self.retry_policy.max_retries

    @property
    def content_type(self) -> str:
        return FORMATS[self.format]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, format={self.format!r})"

    # ------------------------------------------------------------------ request building

    def _prepare(self, call: Call[Any], idempotency_key: str | None) -> RawRequest:
        url = self.base_url + call.path
        if call.query:
            url += "?" + urlencode(call.query)
        headers = {"User-Agent": f"optserve-python/{__version__}", **self.default_headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        headers.update(call.headers)
        if isinstance(call.body, list):
            headers["Content-Length"] = str(sum(len(p) for p in call.body))
        return RawRequest(call.method, url, headers, call.body)

    @staticmethod
    def _new_idempotency_key() -> str:
        return f"optserve-{uuid.uuid4().hex}"

    @staticmethod
    def _sid(session_id: str | Session) -> str:
        sid = session_id.id if isinstance(session_id, Session) else session_id
        if not sid:
            raise ValueError("a session id is required")
        return quote(str(sid), safe="")

    def _encode(self, tensors: Mapping[str, Any]) -> Body:
        if self.format == "safetensors":
            return safetensors_parts(tensors)
        return wire.encode(wire_ready(tensors), self.content_type)

    # ------------------------------------------------------------------ endpoint builders

    def _create_session_call(self, optimizer: str, hyperparams: Mapping[str, Any] | None,
                             params: Mapping[str, Any] | None, mode: str,
                             max_staleness: int | None, sync: Mapping[str, Any] | None,
                             name: str | None, preset: str | None) -> Call[Session]:
        doc: dict[str, Any] = {"optimizer": optimizer, "mode": mode}
        if hyperparams is not None:
            doc["hyperparams"] = dict(hyperparams)
        if preset is not None:
            doc["preset"] = preset  # the server merges it under `hyperparams`
        if params is not None:
            doc["params"] = json.loads(wire.encode_json(wire_ready(params)))["tensors"]
        if max_staleness is not None:
            doc["max_staleness"] = max_staleness
        if sync is not None:
            doc["sync"] = dict(sync)
        if name is not None:
            doc["name"] = name
        # The server honours Idempotency-Key on create, so every try carries one key and a
        # retry after an ambiguous failure returns the session the first try made.
        return Call("POST", "/v1/sessions", _parse_session, body=json.dumps(doc).encode(),
                    headers={"Content-Type": "application/json", "Accept": "application/json",
                             "Idempotency-Key": f"optserve-create-{uuid.uuid4()}"},
                    idempotent=True)

    @staticmethod
    def _inline(params: Mapping[str, Any] | None) -> bool:
        return params is None or sum(_nbytes(v) for v in params.values()) <= \
            INLINE_PARAMS_MAX_BYTES

    def _list_sessions_call(self) -> Call[list[Session]]:
        def parse(resp: RawResponse, attempts: int) -> list[Session]:
            doc = _json(resp)
            items = doc.get("sessions", []) if isinstance(doc, dict) else doc
            return [Session.from_dict(d) for d in items or []]

        return Call("GET", "/v1/sessions", parse, headers={"Accept": "application/json"})

    def _get_session_call(self, session_id: str | Session) -> Call[Session]:
        return Call("GET", f"/v1/sessions/{self._sid(session_id)}", _parse_session,
                    headers={"Accept": "application/json"})

    def _update_session_call(self, session_id: str | Session,
                             hyperparams: Mapping[str, Any] | None,
                             extra: Mapping[str, Any]) -> Call[Session]:
        doc: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
        if hyperparams is not None:
            doc["hyperparams"] = dict(hyperparams)
        return Call("PATCH", f"/v1/sessions/{self._sid(session_id)}", _parse_session,
                    body=json.dumps(doc).encode(),
                    headers={"Content-Type": "application/json", "Accept": "application/json"})

    def _delete_session_call(self, session_id: str | Session) -> Call[None]:
        return Call("DELETE", f"/v1/sessions/{self._sid(session_id)}", lambda r, a: None,
                    absent_ok_on_retry=True)

    def _get_params_call(self, session_id: str | Session, as_: ArrayKind
                         ) -> Call[tuple[dict[str, Any], int]]:
        def parse(resp: RawResponse, attempts: int) -> tuple[dict[str, Any], int]:
            tensors, _ = decode_tensors(resp, as_)
            return tensors, _require_version(resp)

        return Call("GET", f"/v1/sessions/{self._sid(session_id)}/params", parse,
                    headers={"Accept": self.content_type})

    def _put_params_call(self, session_id: str | Session, params: Mapping[str, Any],
                         if_match: int | str | None) -> Call[Session]:
        headers = {"Content-Type": self.content_type, "Accept": "application/json"}
        if if_match is not None:
            headers["If-Match"] = etag(if_match)
        return Call("PUT", f"/v1/sessions/{self._sid(session_id)}/params", _parse_session,
                    body=self._encode(params), headers=headers)

    def _step_call(self, session_id: str | Session, grads: Mapping[str, Any], *,
                   base_version: int | None, weight: float | None, if_match: int | str | None,
                   return_params: bool, grad_dtype: str | None, as_: ArrayKind | None
                   ) -> Call[StepResult]:
        if grad_dtype is not None and grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be one of {GRAD_DTYPES}, not {grad_dtype!r}")
        sent = wire_ready({k: compress(v, grad_dtype) for k, v in grads.items()})
        if as_ is None:
            as_ = "torch" if any(_is_torch(v) for v in grads.values()) else "numpy"
        headers = {"Content-Type": self.content_type, "Accept": self.content_type}
        if base_version is not None:
            headers["X-Optserve-Base-Version"] = str(int(base_version))
        if weight is not None:
            if not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"weight must be a positive finite number, not {weight!r}")
            headers["X-Optserve-Weight"] = repr(float(weight))
        if if_match is not None:
            headers["If-Match"] = etag(if_match)
        kind: ArrayKind = as_

        def parse(resp: RawResponse, attempts: int) -> StepResult:
            version = _require_version(resp)
            params = None
            if return_params and resp.body:
                params, _ = decode_tensors(resp, kind)
            replayed = resp.headers.get("idempotent-replayed", "").lower() == "true"
            return StepResult(version, params, attempts, replayed)

        return Call("POST", f"/v1/sessions/{self._sid(session_id)}/step", parse,
                    body=self._encode(sent), headers=headers,
                    query={"return": "params" if return_params else "none"})

    def _get_state_call(self, session_id: str | Session, as_: ArrayKind
                        ) -> Call[tuple[dict[str, Any], dict[str, Any]]]:
        def parse(resp: RawResponse, attempts: int) -> tuple[dict[str, Any], dict[str, Any]]:
            tensors, metadata = decode_tensors(resp, as_)
            meta: dict[str, Any] = {}
            if metadata and "optserve" in metadata:
                try:
                    meta = json.loads(metadata["optserve"])
                except ValueError as exc:
                    raise APIResponseValidationError(f"bad optserve metadata: {exc}") from None
            if "version" not in meta and version_of(resp.headers) is not None:
                meta["version"] = version_of(resp.headers)
            return tensors, meta

        return Call("GET", f"/v1/sessions/{self._sid(session_id)}/state", parse,
                    headers={"Accept": wire.SAFETENSORS_TYPE})

    def _put_state_call(self, session_id: str | Session, tensors: Mapping[str, Any],
                        meta: Mapping[str, Any], if_match: int | str | None
                        ) -> Call[Session | None]:
        headers = {"Content-Type": wire.SAFETENSORS_TYPE, "Accept": "application/json"}
        if if_match is not None:
            headers["If-Match"] = etag(if_match)
        body = safetensors_parts(tensors, {"optserve": json.dumps(dict(meta))})

        def parse(resp: RawResponse, attempts: int) -> Session | None:
            doc = _json(resp)
            return Session.from_dict(doc) if isinstance(doc, dict) and "id" in doc else None

        return Call("PUT", f"/v1/sessions/{self._sid(session_id)}/state", parse, body=body,
                    headers=headers)

    def _stats_call(self, session_id: str | Session) -> Call[dict[str, Any]]:
        return Call("GET", f"/v1/sessions/{self._sid(session_id)}/stats",
                    lambda r, a: _json(r), headers={"Accept": "application/json"})

    def _probe_call(self, path: str) -> Call[bool]:
        return Call("GET", path, lambda r, a: True, max_retries=0)

    def _metrics_call(self) -> Call[str]:
        return Call("GET", "/metrics", lambda r, a: bytes(r.body).decode("utf-8", "replace"))


def _parse_session(resp: RawResponse, attempts: int) -> Session:
    return Session.from_dict(_json(resp) or {})


def _require_version(resp: RawResponse) -> int:
    v = version_of(resp.headers)
    if v is None:
        raise APIResponseValidationError("response carries no X-Optserve-Version or ETag")
    return v


def named(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A dict from a mapping or (name, tensor) pairs (e.g. ``model.named_parameters()``)."""
    return dict(tensors.items() if isinstance(tensors, Mapping) else tensors)
