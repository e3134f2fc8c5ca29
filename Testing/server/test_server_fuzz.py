"""API fuzzing with schemathesis against the served /openapi.json: no request may cause a 5xx.

Bounded: a few valid and invalid examples per operation (hypothesis, no example database), as a
contributor for every operation and as an administrator for the operations that cannot disturb
the other tests sharing the server (reads and user creation).
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES_PER_OPERATION = 8
ADMIN_SAFE = {("GET", None), ("POST", "/v1/admin/users"), ("POST", "/v1/admin/users/{name}/tokens")}


def _operations(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _admin_may_call(operation) -> bool:
    method = operation.method.upper()
    return (method, None) in ADMIN_SAFE or (method, operation.path) in ADMIN_SAFE


def _fuzz(server, operation, token: str, mode: GenerationMode, failures: list[str]) -> int:
    """Run the examples; append 5xx descriptions to ``failures``; return how many requests were sent."""
    calls = 0

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        nonlocal calls
        response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        calls += 1
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (e.g. no parameters): no negative example exists
        pass
    return calls


def test_openapi_is_served_and_lists_the_api(sqlite_server):
    spec = requests.get(f"{sqlite_server.url}/openapi.json", timeout=10).json()
    for path in ("/v1/models", "/v1/models/{family}/updates", "/v1/updates/{update_id}", "/v1/me",
                 "/v1/models/{family}/versions/{version}/package", "/v1/admin/audit"):
        assert path in spec["paths"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzzed_requests_never_cause_a_server_error(sqlite_server, mode):
    response = requests.post(f"{sqlite_server.url}/v1/admin/users", json={"name": f"fuzz-{mode.value}"},
                             headers={"Authorization": f"Bearer {sqlite_server.admin_token}"}, timeout=10)
    contributor = response.json()["token"]
    failures: list[str] = []
    calls = 0
    for operation in _operations(sqlite_server):
        calls += _fuzz(sqlite_server, operation, contributor, mode, failures)
        if _admin_may_call(operation):
            calls += _fuzz(sqlite_server, operation, sqlite_server.admin_token, mode, failures)
    assert failures == []
    assert calls >= 50  # the run really exercised the API
    assert requests.get(f"{sqlite_server.url}/healthz", timeout=10).ok
