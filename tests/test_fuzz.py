"""Schemathesis fuzzes the OpenAPI document over the ASGI app: no request may cause a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from optserve.app import create_app
from optserve.settings import Settings


@pytest.fixture(scope="module")
def api_schema(redis_url: str) -> Any:
    app = create_app(Settings(redis_url=redis_url, kernel="exact"))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
def test_no_server_errors(case: Any) -> None:
    response = case.call_and_validate(checks=[not_a_server_error])
    assert response.status_code < 500, response.text
