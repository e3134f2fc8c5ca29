"""Dashboard at ``/``: server-rendered HTML and plots drawn server-side with matplotlib.

Shows aggregates only (no user names): per family the versions with their validation Dice, the
client-reported Dice over time (the automatic-vs-corrected Dice sites send with each update:
the real-world statistic) and contributions per week.
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from fastapi import APIRouter, Depends, HTTPException, Request  # noqa: E402
from fastapi.responses import HTMLResponse, Response  # noqa: E402
from fastapi.templating import Jinja2Templates  # noqa: E402
from sqlalchemy import select  # noqa: E402

from .db import Family, MergeRun, UpdateRow, Version  # noqa: E402
from .deps import get_storage  # noqa: E402
from .routers.models import FamilyName  # noqa: E402
from .storage import Storage  # noqa: E402

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
PLOTS = ("versions", "client-dice", "contributions")


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


@router.get("/", response_class=HTMLResponse)
def index(request: Request, storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        families = []
        for fam in session.scalars(select(Family).order_by(Family.name)):
            versions = list(session.scalars(select(Version).where(Version.family == fam.name)
                                            .order_by(Version.number.desc())))
            counts = {s: 0 for s in ("buffered", "merged", "rejected")}
            for status in session.scalars(select(UpdateRow.status).where(UpdateRow.family == fam.name)):
                counts[status] = counts.get(status, 0) + 1
            runs = list(session.scalars(select(MergeRun).where(MergeRun.family == fam.name)
                                        .order_by(MergeRun.id.desc()).limit(10)))
            families.append({
                "name": fam.name, "region": fam.region, "active": fam.active_version, "counts": counts,
                "versions": [{"number": v.number, "parent": v.parent_number, "source": v.source,
                              "created": _date(v.created_at), "mean": v.validation.get("mean")} for v in versions],
                "runs": [{"finished": _date(r.finished_at), "outcome": r.outcome, "version": r.version,
                          "n": len(r.update_ids), "reason": r.detail.get("reason", "")} for r in runs],
            })
    return templates.TemplateResponse(request, "dashboard.html", {"families": families, "plots": PLOTS})


def _figure_png(fig) -> bytes:  # noqa: ANN001
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


@router.get("/plots/{family}/{kind}.png")
def plot(kind: str, family: str = FamilyName, storage: Storage = Depends(get_storage)):
    if kind not in PLOTS:
        raise HTTPException(404, "unknown plot")
    with storage.read() as session:
        if session.get(Family, family) is None:
            raise HTTPException(404, f"no model family {family!r}")
        fig, ax = plt.subplots(figsize=(5, 3))
        if kind == "versions":
            rows = [(v.number, v.validation.get("mean")) for v in
                    session.scalars(select(Version).where(Version.family == family).order_by(Version.number))]
            points = [(n, m) for n, m in rows if m is not None and not math.isnan(m)]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
            ax.set(xlabel="version", ylabel="mean Dice (validation cases)")
        elif kind == "client-dice":
            rows = session.execute(select(UpdateRow.created_at, UpdateRow.client_dice)
                                   .where(UpdateRow.family == family).order_by(UpdateRow.created_at)).all()
            points = [(datetime.fromtimestamp(t, timezone.utc), mean(d.values())) for t, d in rows if d]
            ax.plot([p[0] for p in points], [p[1] for p in points], ".")
            ax.set(xlabel="upload time (UTC)", ylabel="client Dice (automatic vs corrected)")
            fig.autofmt_xdate()
        else:
            weeks: dict[str, int] = {}
            for (t,) in session.execute(select(UpdateRow.created_at).where(UpdateRow.family == family)):
                week = datetime.fromtimestamp(t, timezone.utc).strftime("%G-W%V")
                weeks[week] = weeks.get(week, 0) + 1
            keys = sorted(weeks)
            ax.bar(keys, [weeks[k] for k in keys])
            ax.set(xlabel="ISO week", ylabel="contributions")
        ax.set_title(f"{family}: {kind}")
    return Response(_figure_png(fig), media_type="image/png", headers={"Cache-Control": "no-cache"})
