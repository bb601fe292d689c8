"""Per-tenant quotas (OPTSERVE_TENANT_MAX_SESSIONS, OPTSERVE_TENANT_MAX_BYTES): the limit,
the problem's fields, one winner for the last slot under a race, release on delete.

Real optserve processes on the shared real Redis; each test has tenants of its own.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

import optserve_client as oc
from optserve.store import keys, quotas
from tests.helpers import ST, create, jt, st_body

CHARGE_100 = 100 * 4 * (1 + quotas.STATE_COPIES) + quotas.STEP_BYTES  # 100 float32s


def tenant_client(srv: Any, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=30, headers={"authorization": f"Bearer {key}"})


def keyed(make_server: Any, n: int = 1, **limits: Any) -> tuple[list[Any], str, str]:
    """`n` server processes with these limits, and a fresh tenant's (name, key)."""
    tenant, key = f"q{secrets.token_hex(4)}", secrets.token_hex(8)
    servers = [make_server(api_keys=f"{tenant}:{key}", **limits) for _ in range(n)]
    return servers, tenant, key


def assert_quota(r: httpx.Response, quota: str, usage: int, limit: int) -> None:
    assert r.status_code == 429, r.text
    doc = r.json()
    assert doc["code"] == "quota_exceeded" and doc["status"] == 429
    assert (doc["quota"], doc["usage"], doc["limit"]) == (quota, usage, limit)
    assert f"OPTSERVE_TENANT_MAX_{quota.upper()}" in doc["detail"]
    assert str(usage) in doc["detail"] and str(limit) in doc["detail"]


def test_session_limit_and_release_on_delete(make_server: Any) -> None:
    (srv,), _tenant, key = keyed(make_server, tenant_max_sessions=3)
    with tenant_client(srv, key) as c:
        ids = [create(c, name=f"s{i}")["id"] for i in range(3)]
        assert_quota(c.post("/v1/sessions", json={}), "sessions", 3, 3)
        assert len(c.get("/v1/sessions").json()["sessions"]) == 3
        assert c.delete(f"/v1/sessions/{ids[0]}").status_code == 204
        assert c.delete(f"/v1/sessions/{ids[0]}").status_code == 404  # releases nothing more
        again = create(c)["id"]
        assert_quota(c.post("/v1/sessions", json={}), "sessions", 3, 3)
        # A retried create (same Idempotency-Key) at the limit gets its session, not a 429.
        assert c.delete(f"/v1/sessions/{again}").status_code == 204
        first = c.post("/v1/sessions", json={}, headers={"idempotency-key": "k1"})
        retry = c.post("/v1/sessions", json={}, headers={"idempotency-key": "k1"})
        assert first.status_code == 201 and retry.status_code in (200, 201), retry.text
        assert retry.json()["id"] == first.json()["id"]


def test_racing_creates_for_the_last_slot_have_one_winner(make_server: Any,
                                                          redis_url: str) -> None:
    servers, tenant, key = keyed(make_server, n=2, tenant_max_sessions=5)
    with tenant_client(servers[0], key) as c:
        for _ in range(4):
            create(c)

    def attempt(i: int) -> int:
        with tenant_client(servers[i % 2], key) as ci:
            return ci.post("/v1/sessions", json={"params": {"w": jt([1.0])}}).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(attempt, range(16)))
    assert sorted(codes) == [201] + [429] * 15
    with tenant_client(servers[1], key) as c:
        assert len(c.get("/v1/sessions").json()["sessions"]) == 5
    assert redis.Redis.from_url(redis_url).hlen(keys.tenant_usage(tenant)) == 5


def test_byte_limit_counts_params_and_the_state_steps_will_make(make_server: Any,
                                                                redis_url: str) -> None:
    limit = 2 * CHARGE_100 + 100
    (srv,), tenant, key = keyed(make_server, tenant_max_bytes=limit)
    r = redis.Redis.from_url(redis_url)
    w100 = {"w": jt(np.arange(100.0))}
    with tenant_client(srv, key) as c:
        a = create(c, params={"w": torch.arange(100.0)})["id"]
        b = c.post("/v1/sessions", json={"params": w100}).json()["id"]
        assert_quota(c.post("/v1/sessions", json={"params": w100}), "bytes", 2 * CHARGE_100,
                     limit)
        d = create(c)["id"]  # no parameters: no bytes
        put = c.put(f"/v1/sessions/{d}/params", content=st_body({"w": torch.ones(100)}),
                    headers={"content-type": ST})
        assert_quota(put, "bytes", 2 * CHARGE_100, limit)
        assert c.get(f"/v1/sessions/{d}").json()["version"] is None
        # Stepping never adds a charge: the state was paid for with the parameters.
        grad = st_body({"w": torch.ones(100)})
        assert c.post(f"/v1/sessions/{a}/step", content=grad,
                      headers={"content-type": ST}).status_code == 200
        assert quotas.STATE_COPIES == 3  # RMSprop: square_avg, momentum_buffer, grad_avg
        # PUT state counts too: importing a's state into d would pass the limit.
        state = c.get(f"/v1/sessions/{a}/state").content
        imp = c.put(f"/v1/sessions/{d}/state", content=state, headers={"content-type": ST})
        assert_quota(imp, "bytes", 2 * CHARGE_100, limit)
        # Same-size replacements of a charged session pass.
        ok = c.put(f"/v1/sessions/{b}/params", content=st_body({"w": torch.ones(100)}),
                   headers={"content-type": ST, "if-match": '"0"'})
        assert ok.status_code == 200, ok.text
        assert c.delete(f"/v1/sessions/{b}").status_code == 204
        imp = c.put(f"/v1/sessions/{d}/state", content=state, headers={"content-type": ST})
        assert imp.status_code == 200, imp.text
        assert int(r.get(keys.tenant_bytes(tenant))) == 2 * CHARGE_100
        assert r.hlen(keys.tenant_usage(tenant)) == 2
        for sid in (a, d):
            assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        assert int(r.get(keys.tenant_bytes(tenant))) == 0
        assert r.hlen(keys.tenant_usage(tenant)) == 0


def test_lost_byte_counter_is_rebuilt(make_server: Any, redis_url: str) -> None:
    """A release that Redis refused to count (out of memory) drops the counter; the next
    charge sums the per-session charges again."""
    (srv,), tenant, key = keyed(make_server, tenant_max_bytes=CHARGE_100)
    r = redis.Redis.from_url(redis_url)
    with tenant_client(srv, key) as c:
        create(c, params={"w": torch.arange(100.0)})
        r.delete(keys.tenant_bytes(tenant))
        assert_quota(c.post("/v1/sessions", json={"params": {"w": jt([1.0])}}), "bytes",
                     CHARGE_100, CHARGE_100)


def test_sdk_raises_quota_exceeded_without_retrying(make_server: Any) -> None:
    (srv,), _tenant, key = keyed(make_server, tenant_max_sessions=1)
    with oc.Client(srv.url, api_key=key) as client:
        client.create_session("sgd", {"lr": 0.1}, {"w": np.ones(3, np.float32)})
        with pytest.raises(oc.QuotaExceededError) as info:
            client.create_session("sgd", {"lr": 0.1})
    e = info.value
    assert isinstance(e, oc.RateLimitError) and e.status == 429
    assert (e.quota, e.usage, e.limit) == ("sessions", 1, 1)
