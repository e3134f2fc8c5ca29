"""The ASGI application: routers, request-size limit, security headers, health check, dashboard.

``create_app(settings)`` for tests and embedding; ``create_app_from_env()`` is the factory each
uvicorn worker process calls (settings arrive as JSON in ``DAFNE_SERVER_SETTINGS``).
"""

from __future__ import annotations

import json
import re
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dafne_logic.core.errors import DafneError
from dafne_logic.core.numbers import strict_json

from .auth import authenticate
from .config import ServerSettings
from .crud import NotFound
from .deps import UNAUTHENTICATED
from .heartbeat import merge_worker_health
from .plots import PlotCache
from .routers import admin, dashboard, models, updates
from .sessions import SessionSigner
from .storage import Storage
from .uploads import UploadSlots

API_VERSION = "1"


# The one route whose body is large: a weight-delta upload (multipart). Every other body is a small form or JSON.
UPLOAD_ROUTE = re.compile(r"^/v1/models/[^/]+/updates/?$")
SMALL_BODY_BYTES = 64 * 1024


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped (``\\uXXXX``), so any Python str, even a lone surrogate, renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _route_path(scope: Scope) -> str:
    """The request's path within the app: behind a proxy prefix, uvicorn puts ``root_path`` in the path too."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class BodySizeLimit:
    """Refuse request bodies over their route's limit before they are read: 413, or 411 without a length.

    Uploads (:data:`UPLOAD_ROUTE`) may carry ``max_bytes``; every other body :data:`SMALL_BODY_BYTES`,
    because FastAPI reads and parses a body before the login check runs: a client without a token
    must not make the server hold an upload's worth of memory on a JSON or form route. The declared
    Content-Length is enforced by the HTTP server (h11/httptools), so checking it here bounds what
    any handler or the multipart parser can receive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, small_bytes: int = SMALL_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.small_bytes = min(small_bytes, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            limit = self.max_bytes if UPLOAD_ROUTE.match(_route_path(scope)) else self.small_bytes
            problem = None
            if length is None:
                if headers.get(b"transfer-encoding"):
                    problem = (411, "a Content-Length header is required")
            elif not length.isdigit():
                problem = (400, "malformed Content-Length header")
            elif int(length) > limit:
                problem = (413, f"request body larger than {limit} bytes")
            if problem is not None:
                await JSONResponse({"detail": problem[1]}, problem[0], headers={"Connection": "close"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class UploadsNeedALogin:
    """Refuse an upload without a live bearer token (401) before its body is read.

    FastAPI receives and parses a multipart body, spooling the delta to a temporary file, before it
    solves the route's dependencies, login included: without this check a client with no token
    could make the server receive and store up to ``--max-upload-mb`` per request. The route still
    checks the token itself (``current_principal``); this only refuses earlier.

    The connection stays open: a client sends its whole body before it reads the answer, and
    closing on unread bytes resets the connection (on Windows the 401 is then lost, and a client
    would retry a "connection error"). uvicorn discards the rest of a body once its response is
    complete, within the body deadline of :mod:`dafne_server.deadlines`.
    """

    def __init__(self, app: ASGIApp, storage: Storage) -> None:
        self.app = app
        self.storage = storage

    def _logged_in(self, header: str | None) -> bool:
        with self.storage.read() as session:
            return authenticate(session, header) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and UPLOAD_ROUTE.match(_route_path(scope)):
            # The first Authorization header, as Starlette's request.headers.get gives the route's own check.
            header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
            if not await run_in_threadpool(self._logged_in, None if header is None else header.decode("latin-1")):
                await JSONResponse({"detail": UNAUTHENTICATED}, 401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """The usual headers on every response: no MIME sniffing, no framing (clickjacking), no
    referrer, and HSTS when the request came over TLS (behind a TLS proxy, let the proxy send it)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer")]
    FRAME_POLICY = (b"content-security-policy", b"frame-ancestors 'none'")
    HSTS = (b"strict-transport-security", b"max-age=31536000")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [*self.HEADERS, *([self.HSTS] if scope.get("scheme") == "https" else [])]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in extra if h[0] not in present]
                if self.FRAME_POLICY[0] not in present:  # pages with their own policy include frame-ancestors
                    headers.append(self.FRAME_POLICY)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: ServerSettings) -> FastAPI:
    storage = Storage(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        storage.dispose()

    app = FastAPI(title="DafneSlicer federated server", version=API_VERSION, lifespan=lifespan,
                  description="Model families and versions, validated weight-delta uploads, robust merging.")
    app.state.storage = storage
    app.state.sessions = SessionSigner(settings)
    app.state.plots = PlotCache()
    app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads, settings.max_concurrent_uploads_per_user)
    for router in (models.router, updates.router, admin.router, dashboard.router):
        app.include_router(router)

    started = time.time()

    @app.get("/healthz", tags=["health"], responses={503: {"description": "no live merge worker, or a stuck one"}})
    def healthz() -> JSONResponse:
        """200 while the API and a merge worker are well (or the worker is still starting), else 503."""
        worker = merge_worker_health(settings, started)
        healthy = worker["state"] in ("ok", "starting")
        return JSONResponse({"status": "ok" if healthy else "degraded", "merge_worker": worker},
                            200 if healthy else 503)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI echoes the offending input, which may be NaN or Infinity (Python's json reads
        # them): answered as null, the refusal stays a 422 instead of failing to serialise (500).
        # ASCII escapes: the echoed input may hold a lone surrogate, which UTF-8 cannot encode.
        return AsciiJSONResponse({"detail": strict_json(jsonable_encoder(exc.errors()))}, 422)

    @app.exception_handler(NotFound)
    async def _not_found(_request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 404)

    @app.exception_handler(DafneError)
    async def _dafne_error(_request, exc: DafneError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 422)

    app.add_middleware(UploadsNeedALogin, storage=storage)
    # Slack for multipart framing around the delta itself.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 70_000)
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, the size limit's included
    return app


def create_app_from_env() -> FastAPI:
    return create_app(ServerSettings.from_env())
