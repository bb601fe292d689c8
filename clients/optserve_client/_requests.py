"""The request builders of every endpoint, sans I/O.

Each API method is split into a pure *builder* that returns a `Call` (method, path, body,
headers, and a parser for the response) and a loop that sends it (`Client._run` /
`AsyncClient._run`), so both clients run the same requests through the same policy and
differ only in how they wait.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

from . import wire
from ._codec import (
    ArrayKind,
    check_grad_dtype,
    compress,
    decode_tensors,
    is_torch,
    nbytes,
    plain_hyperparams,
    safetensors_parts,
    wire_ready,
)
from ._results import Session, StepResult
from ._transport import Body, RawResponse
from .errors import APIResponseValidationError
from .spec import HYPERPARAMS_META_KEY

T = TypeVar("T")
Format = Literal["safetensors", "json"]
FORMATS: dict[str, str] = {"safetensors": wire.SAFETENSORS_TYPE, "json": wire.JSON_TYPE}
# Parameters this small go inline (JSON) in the create request; larger ones by PUT, binary.
INLINE_PARAMS_MAX_BYTES = 256 * 1024


def check_format(format: str) -> Format:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, not {format!r}")
    return format  # type: ignore[return-value]


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


class RequestBuilder:
    """The builders of every endpoint; `BaseClient` gives them ``format``."""

    format: Format

    @property
    def content_type(self) -> str:
        return FORMATS[self.format]

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
                             name: str | None, preset: str | None
                             ) -> tuple[Call[Session], Mapping[str, Any] | None]:
        """The create call, and the ``params`` to PUT after it (None: small, sent inline)."""
        upload = None if self._inline(params) else params
        if upload is not None:
            params = None
        doc: dict[str, Any] = {"optimizer": optimizer, "mode": mode}
        if hyperparams is not None:
            doc["hyperparams"] = plain_hyperparams(hyperparams)
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
                    idempotent=True), upload

    @staticmethod
    def _inline(params: Mapping[str, Any] | None) -> bool:
        return params is None or sum(nbytes(v) for v in params.values()) <= \
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
            doc["hyperparams"] = plain_hyperparams(hyperparams)
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
                   return_params: bool, grad_dtype: str | None, as_: ArrayKind | None,
                   hyperparams: Mapping[str, Any] | None = None) -> Call[StepResult]:
        check_grad_dtype(grad_dtype)
        hp = plain_hyperparams(hyperparams) if hyperparams else None
        sent = wire_ready({k: compress(v, grad_dtype) for k, v in grads.items()})
        if as_ is None:
            as_ = "torch" if any(is_torch(v) for v in grads.values()) else "numpy"
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

        if hp is None:
            body = self._encode(sent)
        elif self.format == "safetensors":
            body = safetensors_parts(sent, {HYPERPARAMS_META_KEY: json.dumps({"hyperparams": hp})})
        else:
            body = wire.encode_json(sent, hyperparams=hp)
        return Call("POST", f"/v1/sessions/{self._sid(session_id)}/step", parse,
                    body=body, headers=headers,
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


_SESSIONS = "/v1/sessions/"


def session_of(path: str) -> str | None:
    """The session a request path is about (as quoted in the path), for the affinity header
    (`spec.SESSION_HEADER`); None for requests about no one session."""
    if not path.startswith(_SESSIONS):
        return None
    sid = path[len(_SESSIONS):].split("/", 1)[0].split("?", 1)[0]
    return sid or None
