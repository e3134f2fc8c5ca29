"""Dashboard at ``/``: server-rendered HTML and plots drawn server-side with matplotlib.

Shows aggregates only (no user names): per family the versions with their validation Dice, the
client-reported Dice over time (the automatic-vs-corrected Dice sites send with each update:
the real-world statistic), contributions per week, and the learning curve fitted on the
client-reported Dice (:mod:`dafne_logic.learning.learning_curve`: each site a dataset, the parent version
of its update the model version, as in Dafne's own analysis).
"""

from __future__ import annotations

import io
import math
import tempfile
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
from .deps import FamilyName, get_storage  # noqa: E402
from .storage import Storage  # noqa: E402

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
PLOTS = ("versions", "client-dice", "contributions", "learning-curve")


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


def client_dice_table(session, family: str):  # noqa: ANN001, ANN201 - a pandas DataFrame
    """One row per (site, parent version): the mean client-reported Dice of that site's updates."""
    import pandas as pd

    rows = session.execute(select(UpdateRow.user_id, UpdateRow.parent_version, UpdateRow.client_dice)
                           .where(UpdateRow.family == family)).all()
    table = pd.DataFrame([{"dataset": f"site {u}", "model_version": str(v), "dice": mean(d.values())}
                          for u, v, d in rows if d], columns=["dataset", "model_version", "dice"])
    return table.groupby(["dataset", "model_version"], as_index=False)["dice"].mean()


def _learning_curve_png(session, family: str) -> bytes:  # noqa: ANN001
    from dafne_logic.core.errors import InputError
    from dafne_logic.learning.learning_curve import fit_learning_curve, plot_learning_curve, prepare_learning_curve

    try:
        data = prepare_learning_curve(client_dice_table(session, family))
        fit = fit_learning_curve(data)
    except InputError as exc:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, f"no learning curve yet:\n{exc}", ha="center", va="center", wrap=True, fontsize=8)
        ax.set_axis_off()
        return _figure_png(fig)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curve.png"
        plot_learning_curve(data, fit, path, title=f"{family}: client Dice per model generation")
        return path.read_bytes()


@router.get("/plots/{family}/{kind}.png")
def plot(kind: str, family: str = FamilyName, storage: Storage = Depends(get_storage)):
    if kind not in PLOTS:
        raise HTTPException(404, "unknown plot")
    with storage.read() as session:
        if session.get(Family, family) is None:
            raise HTTPException(404, f"no model family {family!r}")
        if kind == "learning-curve":
            return Response(_learning_curve_png(session, family), media_type="image/png",
                            headers={"Cache-Control": "no-cache"})
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
