"""Problem+json responses become typed exceptions, one class per problem ``code``."""

from __future__ import annotations

import json

import pytest

import optserve_client as oc
from optserve_client.errors import error_from_response


def err(status: int, code: str | None = None, **fields: object) -> oc.APIStatusError:
    doc = {"type": "t", "title": "Title", "status": status, "detail": "what happened",
           **({"code": code} if code else {}), **fields}
    return error_from_response(status, json.dumps(doc).encode(),
                               {"content-type": "application/problem+json"},
                               method="POST", url="http://x/v1/sessions/s/step")


@pytest.mark.parametrize(("status", "code", "cls"), [
    (400, "malformed_body", oc.MalformedBodyError),
    (401, "unauthorized", oc.AuthenticationError),
    (404, "session_not_found", oc.SessionNotFoundError),
    (405, "method_not_allowed", oc.MethodNotAllowedError),
    (406, "not_acceptable", oc.NotAcceptableError),
    (409, "stale_gradient", oc.StaleGradientError),
    (409, "future_version", oc.FutureVersionError),
    (409, "round_closed", oc.RoundClosedError),
    (409, "round_failed", oc.RoundFailedError),
    (409, "no_params", oc.NoParamsError),
    (412, "version_mismatch", oc.PreconditionFailedError),
    (413, "body_too_large", oc.PayloadTooLargeError),
    (415, "unsupported_media_type", oc.UnsupportedMediaTypeError),
    (422, "unknown_tensor", oc.UnknownTensorError),
    (422, "missing_tensor", oc.MissingTensorError),
    (422, "shape_mismatch", oc.ShapeMismatchError),
    (422, "dtype_mismatch", oc.DtypeMismatchError),
    (422, "non_finite_gradient", oc.NonFiniteGradientError),
    (422, "non_finite_result", oc.NonFiniteResultError),
    (422, "invalid_hyperparams", oc.InvalidHyperparametersError),
    (422, "immutable_hyperparam", oc.ImmutableHyperparameterError),
    (422, "invalid_request", oc.InvalidRequestError),
    (422, "invalid_header", oc.InvalidHeaderError),
    (422, "invalid_state", oc.InvalidStateError),
    (428, "precondition_required", oc.PreconditionRequiredError),
    (429, "quota_exceeded", oc.QuotaExceededError),
    (507, "store_full", oc.StoreFullError),
    (503, "store_unavailable", oc.StoreUnavailableError),
    (503, "session_busy", oc.SessionBusyError),
    (503, "round_expired", oc.RoundExpiredError),
])
def test_each_code_has_its_class(status: int, code: str, cls: type) -> None:
    e = err(status, code)
    assert type(e) is cls
    assert isinstance(e, oc.APIStatusError) and isinstance(e, oc.OptserveError)
    assert e.status == status and e.code == code
    assert "what happened" in str(e) and code in str(e) and "POST" in str(e)


def test_fields_of_the_problem() -> None:
    e = err(409, "stale_gradient", current_version=12)
    assert isinstance(e, oc.ConflictError) and e.current_version == 12
    e = err(422, "shape_mismatch", tensor="fc.weight", expected=[2, 3], got=[3, 2])
    assert (e.tensor, e.expected, e.got) == ("fc.weight", [2, 3], [3, 2])
    assert e.tensors == ["fc.weight"]
    e = err(422, "unknown_tensor", tensors=["a", "b"])
    assert e.tensors == ["a", "b"]
    e = err(422, "invalid_hyperparams", errors=[{"field": "lr", "msg": "≥ 0"},
                                                {"field": "alpha", "msg": "< 1"}])
    assert e.field == "lr" and e.fields == ["lr", "alpha"]
    assert err(422, "immutable_hyperparam", field="centered").field == "centered"
    assert err(422, "invalid_header", header="X-Optserve-Weight").header == "X-Optserve-Weight"
    assert err(412, "version_mismatch", current_version=3).current_version == 3
    assert err(413, "body_too_large", limit=10).limit == 10
    e = err(429, "quota_exceeded", quota="bytes", usage=7, limit=8)
    assert (e.quota, e.usage, e.limit) == ("bytes", 7, 8) and isinstance(e, oc.RateLimitError)
    assert isinstance(err(507, "store_full"), oc.InsufficientStorageError)
    assert err(409, "stale_gradient").problem["detail"] == "what happened"


def test_unknown_codes_fall_back_to_the_status_class() -> None:
    assert type(err(409, "some_new_conflict")) is oc.ConflictError
    assert type(err(422, "new_rule")) is oc.UnprocessableEntityError
    assert type(err(503, None)) is oc.ServiceUnavailableError
    assert type(err(502, None)) is oc.InternalServerError
    assert type(err(418, None)) is oc.APIStatusError
    # a known code under another status than its class's: the status decides
    assert type(err(400, "stale_gradient")) is oc.BadRequestError


def test_non_json_error_bodies() -> None:
    e = error_from_response(502, b"<html>Bad gateway</html>", {"content-type": "text/html"})
    assert isinstance(e, oc.InternalServerError) and "Bad gateway" in str(e)
    assert e.code is None
    e = error_from_response(503, b"", {"retry-after": "3", "x-optserve-version": "4"})
    assert e.retry_after == 3.0 and e.current_version == 4


def test_register_code() -> None:
    class QuotaError(oc.ConflictError):
        pass

    oc.errors.register_code("quota", QuotaError)
    assert type(err(409, "quota")) is QuotaError
