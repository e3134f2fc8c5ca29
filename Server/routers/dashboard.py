"""Dashboard at ``/``: server-rendered HTML (versions, recent merges) and the plots of :mod:`..plots`.

Behind a login by default (``--public-dashboard`` opens it): ``POST /login`` with any live token
sets a signed session cookie (:mod:`..sessions`; HttpOnly, SameSite=Strict, Secure under TLS);
scripts may send ``Authorization: Bearer`` instead. The page and its plots show aggregates only.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from .. import crud
from ..auth import authenticate
from ..db import audit
from ..deps import FamilyName, get_storage
from ..plots import PLOTS, PlotCache, plot_data, render_plot
from ..sessions import COOKIE, MAX_AGE_S, SessionSigner
from ..storage import Storage

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent.parent / "templates"))
# The dashboard's own pages load nothing from elsewhere (inline styles only).
PAGE_POLICY = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
STATUSES = ("buffered", "merged", "overridden", "rejected")
DASHBOARD_VERSIONS = 20  # the newest; the API pages through the rest (GET /v1/models/{family}/versions?before=N)


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


def may_view(request: Request, storage: Storage = Depends(get_storage)) -> bool:
    """Whether the caller may see the dashboard: open, a live session cookie, or a bearer token."""
    if storage.settings.public_dashboard:
        return True
    signer: SessionSigner = request.app.state.sessions
    with storage.read() as session:
        return signer.is_live(session, request.cookies.get(COOKIE)) or \
            authenticate(session, request.headers.get("authorization")) is not None


def _page(request: Request, name: str, context: dict, status_code: int = 200) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request):
    return _page(request, "login.html", {"error": ""})


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, token: str = Form(max_length=200), storage: Storage = Depends(get_storage)):
    """Exchange a live token (any scope) for a session cookie; the token itself is not kept."""
    with storage.session.begin() as session:
        principal = authenticate(session, f"Bearer {token.strip()}")
        if principal is not None:
            audit(session, principal.name, "dashboard_login", token_id=principal.token_id)
    if principal is None:
        return _page(request, "login.html", {"error": "That token is unknown, expired or revoked."}, 401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, request.app.state.sessions.cookie_for(principal.token_id), max_age=MAX_AGE_S,
                        httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, httponly=True, samesite="strict")
    return response


@router.get("/", response_class=HTMLResponse)
def index(request: Request, allowed: bool = Depends(may_view), storage: Storage = Depends(get_storage)):
    if not allowed:
        return RedirectResponse("/login", status_code=303)
    with storage.read() as session:
        families = []
        for fam in crud.families(session):
            versions = crud.versions(session, fam.name, limit=DASHBOARD_VERSIONS)[::-1]  # newest first
            counts = {**dict.fromkeys(STATUSES, 0), **crud.update_status_counts(session, fam.name)}
            runs = crud.recent_merge_runs(session, fam.name)
            families.append({
                "name": fam.name, "region": fam.region, "active": fam.active_version, "counts": counts,
                "versions": [{"number": v.number, "parent": v.parent_number, "source": v.source,
                              "created": _date(v.created_at), "mean": v.validation.get("mean")} for v in versions],
                "runs": [{"finished": _date(r.finished_at), "outcome": r.outcome, "version": r.version,
                          "n": len(r.update_ids), "reason": r.detail.get("reason", "")} for r in runs],
            })
    return _page(request, "dashboard.html", {"families": families, "plots": PLOTS,
                                             "public": storage.settings.public_dashboard})


@router.get("/plots/{family}/{kind}.png")
def plot(request: Request, kind: str, family: str = FamilyName, allowed: bool = Depends(may_view),
         storage: Storage = Depends(get_storage)):
    if not allowed:
        raise HTTPException(401, "log in at /login or send a bearer token", headers={"WWW-Authenticate": "Bearer"})
    if kind not in PLOTS:
        raise HTTPException(404, "unknown plot")
    with storage.read() as session:
        crud.get_family(session, family)  # 404 for an unknown family
        data = plot_data(session, family, kind)
    cache: PlotCache = request.app.state.plots
    png = cache.get(family, kind, data, lambda: render_plot(family, kind, data))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-cache"})
