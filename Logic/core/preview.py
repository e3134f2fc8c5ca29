"""PNG previews: a few axial slices of an image with the muscle labels overlaid in their colours."""

from __future__ import annotations

import io as _io
import os

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.atomic import atomic_write_bytes
from dafne_logic.core.labels import LabelTable
from dafne_logic.core.preprocessing import canonical


def render_preview(image: sitk.Image, labels: sitk.Image, table: LabelTable, n_slices: int = 3,
                   title: str = "") -> bytes:
    """PNG bytes of ``n_slices`` evenly spaced axial slices with a 45 % opaque label overlay."""
    # A bare Figure with the Agg canvas: no pyplot, so the host's backend (Slicer's) is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    oriented = canonical(image)  # LPS: slices show the patient's right on the left, as radiologists read
    img = sitk.GetArrayFromImage(oriented).astype(np.float32)
    lab = sitk.GetArrayFromImage(canonical(labels))
    z_count = img.shape[0]
    zs = sorted({int(round(f * (z_count - 1))) for f in np.linspace(0.2, 0.8, n_slices)}) if z_count > 1 else [0]
    lut = np.zeros((2 * table.n_muscles + 1, 4), dtype=np.float32)
    for entry in table.volume_labels():
        lut[entry.value, :3] = np.array(entry.muscle.color) / 255.0
        lut[entry.value, 3] = 0.45
    lo, hi = np.percentile(img, [1, 99])
    spacing = oriented.GetSpacing()
    aspect = spacing[1] / spacing[0]
    fig = Figure(figsize=(4 * len(zs), 4))
    FigureCanvasAgg(fig)
    for i, z in enumerate(zs):
        ax = fig.add_subplot(1, len(zs), i + 1)
        ax.imshow(img[z], cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        ax.imshow(lut[np.clip(lab[z], 0, len(lut) - 1)], aspect=aspect, interpolation="nearest")
        ax.set_title(f"slice {z + 1}/{z_count}   R ← → L", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def write_preview(image: sitk.Image, labels: sitk.Image, table: LabelTable, path: str | os.PathLike[str],
                  title: str = "") -> None:
    atomic_write_bytes(path, render_preview(image, labels, table, title=title))
