"""The body-size limit per route, on the ASGI level: uploads may be large, every other body small."""

from __future__ import annotations

import asyncio

import pytest

from dafne_server.app import BodySizeLimit


def _status(path: str, length: int, root_path: str = "") -> int:
    """Status the limit answers for a POST of ``length`` bytes to ``path`` (200: passed to the app)."""
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": root_path, "query_string": b"",
             "headers": [(b"content-length", str(length).encode())]}
    asyncio.run(BodySizeLimit(app, max_bytes=1_000_000, small_bytes=1000)(scope, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize("root_path", ["", "/dafne"])  # behind a proxy prefix uvicorn keeps it in the path
def test_uploads_may_be_large_other_routes_not(root_path):
    assert _status(f"{root_path}/v1/models/leg/updates", 900_000, root_path) == 200
    assert _status(f"{root_path}/v1/models/leg/updates", 1_000_001, root_path) == 413
    assert _status(f"{root_path}/v1/admin/users", 1001, root_path) == 413
    assert _status(f"{root_path}/v1/admin/users", 1000, root_path) == 200
    assert _status(f"{root_path}/login", 5000, root_path) == 413


def test_the_early_login_check_reads_the_first_authorization_header_as_the_route_does():
    """Starlette's request.headers.get (the route's own check) takes the first of repeated headers."""
    from dafne_server.app import UploadsNeedALogin

    seen: list[str | None] = []
    passed: list[bool] = []

    async def app(scope, receive, send):
        passed.append(True)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    check = UploadsNeedALogin(app, storage=None)
    check._logged_in = lambda header: seen.append(header) or header == "Bearer first"
    scope = {"type": "http", "method": "POST", "path": "/v1/models/leg/updates", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", b"Bearer first"), (b"authorization", b"Bearer second")]}
    asyncio.run(check(scope, receive, send))
    assert seen == ["Bearer first"] and passed == [True]
    asyncio.run(check({**scope, "path": "/v1/models/leg"}, receive, send))  # not an upload: no early check
    assert seen == ["Bearer first"] and passed == [True, True]
