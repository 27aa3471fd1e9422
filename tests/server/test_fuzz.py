"""Property-based fuzzing of the real server: schemathesis over the OpenAPI spec, and
hypothesis mutations of valid upload payloads. No request may produce a 5xx."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from server_helpers import (
    ADMIN,
    ServerProc,
    make_manifest,
    make_payload,
    register,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProc(tmp_path_factory.mktemp("fuzz") / "data", {"train": False}).start()
    m = make_manifest("tiny-fuzz")
    s.reg = register(s.url, "fuzz-phone", m)
    s.manifest = m
    upload_ok = make_payload(s.reg, m, range(4))
    httpx.post(
        f"{s.url}/v1/batches",
        content=upload_ok,
        headers={
            "Authorization": f"Bearer {s.reg['token']}",
            "Content-Type": "application/octet-stream",
        },
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(srv):
    return schemathesis.openapi.from_url(f"{srv.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_no_server_errors(case, srv):
    for token in (None, ADMIN, srv.reg["token"]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = case.call(base_url=srv.url, headers=headers, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])


@given(
    cut=st.integers(min_value=0, max_value=4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_mutated_payloads_get_4xx_never_5xx(srv, cut, flips):
    payload = bytearray(make_payload(srv.reg, srv.manifest, range(100, 104), key="fuzz"))
    for pos, value in flips:
        if pos < len(payload):
            payload[pos] = value
    payload = bytes(payload[: len(payload) - cut % len(payload)] if cut else payload)
    r = httpx.post(
        f"{srv.url}/v1/batches",
        content=payload,
        timeout=30,
        headers={
            "Authorization": f"Bearer {srv.reg['token']}",
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code < 500, r.text
