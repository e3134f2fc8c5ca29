"""The ASGI application: routers, request-size limit, health check, dashboard.

``create_app(settings)`` for tests and embedding; ``create_app_from_env()`` is the factory each
uvicorn worker process calls (settings arrive as JSON in ``DAFNE_SERVER_SETTINGS``).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dafne_logic.core.errors import DafneError
from dafne_logic.core.numbers import strict_json

from . import dashboard
from .config import ServerSettings
from .crud import NotFound
from .routers import admin, models, updates
from .storage import Storage
from .uploads import UploadSlots

API_VERSION = "1"


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` before they are read: 413, or 411 without a length.

    The declared Content-Length is enforced by the HTTP server (h11/httptools), so checking it here
    bounds what any handler or the multipart parser can receive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            problem = None
            if length is None:
                if headers.get(b"transfer-encoding"):
                    problem = (411, "a Content-Length header is required")
            elif not length.isdigit():
                problem = (400, "malformed Content-Length header")
            elif int(length) > self.max_bytes:
                problem = (413, f"request body larger than {self.max_bytes} bytes")
            if problem is not None:
                await JSONResponse({"detail": problem[1]}, problem[0], headers={"Connection": "close"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: ServerSettings) -> FastAPI:
    storage = Storage(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        storage.dispose()

    app = FastAPI(title="DafneSlicer federated server", version=API_VERSION, lifespan=lifespan,
                  description="Model families and versions, validated weight-delta uploads, robust merging.")
    app.state.storage = storage
    app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads, settings.max_concurrent_uploads_per_user)
    for router in (models.router, updates.router, admin.router, dashboard.router):
        app.include_router(router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI echoes the offending input, which may be NaN or Infinity (Python's json reads
        # them): answered as null, the refusal stays a 422 instead of failing to serialise (500).
        return JSONResponse({"detail": strict_json(jsonable_encoder(exc.errors()))}, 422)

    @app.exception_handler(NotFound)
    async def _not_found(_request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 404)

    @app.exception_handler(DafneError)
    async def _dafne_error(_request, exc: DafneError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 422)

    # Slack for multipart framing around the delta itself.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 70_000)
    return app


def create_app_from_env() -> FastAPI:
    return create_app(ServerSettings.from_env())
