"""The dashboard's plots: the data each is drawn from (read per request: cheap), the drawing
(matplotlib, server-side: the expensive part) and a cache that draws a plot again only when its
data changed.

Aggregates only (no user names): validation Dice per version, the client-reported Dice over time
(the automatic-vs-corrected Dice sites send with each update: the real-world statistic),
contributions per week, and the learning curve fitted on the client-reported Dice
(:mod:`dafne_logic.learning.learning_curve`: each site a dataset, the parent version of its update
the model version, as in Dafne's own analysis).
"""

from __future__ import annotations

import io
import math
import tempfile
import threading
from collections.abc import Callable, Hashable
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from .db import UpdateRow, Version  # noqa: E402

PLOTS = ("versions", "client-dice", "contributions", "learning-curve")


def client_dice_table(session: Session, family: str):  # noqa: ANN201 - a pandas DataFrame
    """One row per (site, parent version): the mean client-reported Dice of that site's updates."""
    import pandas as pd

    rows = session.execute(select(UpdateRow.user_id, UpdateRow.parent_version, UpdateRow.client_dice)
                           .where(UpdateRow.family == family)).all()
    table = pd.DataFrame([{"dataset": f"site {u}", "model_version": str(v), "dice": mean(d.values())}
                          for u, v, d in rows if d], columns=["dataset", "model_version", "dice"])
    return table.groupby(["dataset", "model_version"], as_index=False)["dice"].mean()


def plot_data(session: Session, family: str, kind: str) -> tuple:
    """What plot ``kind`` of ``family`` shows, as a hashable tuple (the cache key)."""
    if kind == "versions":
        rows = session.execute(select(Version.number, Version.validation).where(Version.family == family)
                               .order_by(Version.number)).all()
        return tuple((n, v.get("mean")) for n, v in rows if v.get("mean") is not None and not math.isnan(v["mean"]))
    if kind == "client-dice":
        rows = session.execute(select(UpdateRow.created_at, UpdateRow.client_dice)
                               .where(UpdateRow.family == family).order_by(UpdateRow.created_at)).all()
        return tuple((t, mean(d.values())) for t, d in rows if d)
    if kind == "contributions":
        weeks: dict[str, int] = {}
        for (t,) in session.execute(select(UpdateRow.created_at).where(UpdateRow.family == family)):
            week = datetime.fromtimestamp(t, timezone.utc).strftime("%G-W%V")
            weeks[week] = weeks.get(week, 0) + 1
        return tuple(sorted(weeks.items()))
    if kind == "learning-curve":
        return tuple(client_dice_table(session, family).itertuples(index=False, name=None))
    raise ValueError(f"unknown plot {kind!r}")


def _figure_png(fig) -> bytes:  # noqa: ANN001 - a matplotlib Figure
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _learning_curve_png(family: str, data: tuple) -> bytes:
    import pandas as pd

    from dafne_logic.core.errors import InputError
    from dafne_logic.learning.learning_curve import fit_learning_curve, plot_learning_curve, prepare_learning_curve

    try:
        prepared = prepare_learning_curve(pd.DataFrame(list(data), columns=["dataset", "model_version", "dice"]))
        fit = fit_learning_curve(prepared)
    except InputError as exc:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, f"no learning curve yet:\n{exc}", ha="center", va="center", wrap=True, fontsize=8)
        ax.set_axis_off()
        return _figure_png(fig)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curve.png"
        plot_learning_curve(prepared, fit, path, title=f"{family}: client Dice per model generation")
        return path.read_bytes()


def render_plot(family: str, kind: str, data: tuple) -> bytes:
    """PNG bytes of plot ``kind`` drawn from ``data`` (:func:`plot_data`). Not thread-safe (pyplot)."""
    if kind == "learning-curve":
        return _learning_curve_png(family, data)
    fig, ax = plt.subplots(figsize=(5, 3))
    if kind == "versions":
        ax.plot([n for n, _ in data], [m for _, m in data], "o-")
        ax.set(xlabel="version", ylabel="mean Dice (validation cases)")
    elif kind == "client-dice":
        times = [datetime.fromtimestamp(t, timezone.utc) for t, _ in data]
        ax.plot(times, [d for _, d in data], ".")  # type: ignore[arg-type]  # matplotlib plots datetimes; its stubs omit them
        ax.set(xlabel="upload time (UTC)", ylabel="client Dice (automatic vs corrected)")
        fig.autofmt_xdate()
    else:
        ax.bar([w for w, _ in data], [n for _, n in data])
        ax.set(xlabel="ISO week", ylabel="contributions")
    ax.set_title(f"{family}: {kind}")
    return _figure_png(fig)


class PlotCache:
    """The last PNG of every (family, plot), drawn again only when its data changed.

    Drawing holds one lock: pyplot's state is global (not thread-safe). Requests never queue behind
    a drawing they do not need: an up-to-date image is served at once, and while another plot is
    being drawn a plot with an older image gets that one (the next request draws it anew). Only a
    plot never drawn waits for the lock, then looks again, so a burst asking for it draws it once.
    """

    def __init__(self) -> None:
        self._draw_lock = threading.Lock()
        self._entries_lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[Hashable, bytes]] = {}  # families × PLOTS entries at most
        self.draws = 0

    def _cached(self, key: tuple[str, str]) -> tuple[Hashable, bytes] | None:
        with self._entries_lock:
            return self._entries.get(key)

    def get(self, family: str, kind: str, data: Hashable, draw: Callable[[], bytes]) -> bytes:
        key = (family, kind)
        hit = self._cached(key)
        if hit is not None and hit[0] == data:
            return hit[1]
        if not self._draw_lock.acquire(blocking=hit is None):
            assert hit is not None
            return hit[1]  # busy drawing: the previous image now, the new one at a later request
        try:
            hit = self._cached(key)
            if hit is not None and hit[0] == data:  # drawn while this request waited
                return hit[1]
            png = draw()
            with self._entries_lock:
                self.draws += 1
                self._entries[key] = (data, png)
            return png
        finally:
            self._draw_lock.release()
