"""Render ``Docs/screenshot.png``: the bundled thigh model's segmentation of a procedural phantom.

An honest stand-in for the extension screenshot (Slicer's GUI cannot run where this is built):
three axial slices with the label overlay in each muscle's colour, a legend of the muscle names,
and the mean Dice against the phantom's exact labels. Run from the repository root:

    python Docs/make_figure.py [OUTPUT.png]

Deterministic (fixed phantom seed, CPU); about 0.1 MB (the extension index wants ≤ 300 KB).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "Docs" / "screenshot.png"
TITLE = "DafneSlicer — bundled thigh model on a phantom (command-line preview; not a Slicer screenshot)"
PHANTOM = {"region": "thigh", "shape": (20, 432, 432), "seed": 2024}
SLICES = (4, 10, 16)  # axial slice indices shown (z)
OVERLAY_ALPHA = 0.6


def label_colours(table) -> np.ndarray:
    """RGBA per volume label value (0 transparent); both sides of a muscle share its colour."""
    labels = table.volume_labels()
    colours = np.zeros((2 * table.n_muscles + 1, 4))
    for label in labels:
        colours[label.value, :3] = np.array(label.muscle.color) / 255.0
        colours[label.value, 3] = OVERLAY_ALPHA
    return colours


def _body_box(foreground, margin: int = 8) -> tuple[slice, slice]:
    """Rows and columns (y, x) of the body in a (z, y, x) foreground mask, with a margin."""
    ys, xs = np.nonzero(foreground.any(axis=0))
    height, width = foreground.shape[1:]
    return (slice(max(ys.min() - margin, 0), min(ys.max() + margin + 1, height)),
            slice(max(xs.min() - margin, 0), min(xs.max() + margin + 1, width)))


def render(output: Path = DEFAULT_OUTPUT) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from matplotlib.patches import Patch
    from PIL import Image

    from dafne_logic.core.atomic import atomic_path
    from dafne_logic.inference.model_package import load_model
    from dafne_logic.inference.segment import segment_volume
    from dafne_logic.learning.evaluation import dice_per_label
    from dafne_logic.phantoms.images import make_phantom

    model = load_model("thigh")
    table = model.labels
    image, truth = make_phantom(**PHANTOM)
    labels = segment_volume(image, model, device="cpu")
    dice = {name: value for name, value in dice_per_label(labels, truth, table).items() if not np.isnan(value)}
    mean_dice = float(np.mean(list(dice.values())))

    voxels = sitk.GetArrayFromImage(image)
    predicted = sitk.GetArrayFromImage(labels)
    colours = label_colours(table)
    low, high = np.percentile(voxels, [1, 99.5])
    rows, columns = _body_box(voxels[list(SLICES)] > low + 0.1 * (high - low))
    figure, axes = plt.subplots(1, len(SLICES), figsize=(12, 3.6), dpi=80)
    for ax, k in zip(axes, SLICES):
        # LPS arrays with identity direction: column index runs to patient left, so the patient's
        # right leg is on the viewer's left, as in radiological display.
        ax.imshow(voxels[k, rows, columns], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.imshow(colours[predicted[k, rows, columns]], interpolation="nearest")
        ax.set_title(f"slice {k + 1} of {voxels.shape[0]}", fontsize=10)
        ax.axis("off")
    handles = [Patch(color=np.array(m.color) / 255.0, label=m.name) for m in table.muscles]
    figure.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    figure.suptitle(TITLE, fontsize=11)
    figure.text(0.5, 0.865, f"phantom thigh, seed {PHANTOM['seed']}, {voxels.shape[2]}×{voxels.shape[1]}×"
                f"{voxels.shape[0]} voxels; model {model.manifest.name} {model.manifest.version}; mean Dice vs the "
                f"phantom's exact labels {mean_dice:.3f} over {len(dice)} labels", ha="center", fontsize=9)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.76, bottom=0.13, wspace=0.02)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    with Image.open(buffer) as rendered, atomic_path(output) as tmp:
        rendered.convert("RGB").save(tmp, optimize=True)  # no alpha channel: smaller file
    return {"mean_dice": mean_dice, "bytes": output.stat().st_size}


if __name__ == "__main__":
    figures = render(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT)
    print(f"wrote {sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUTPUT}: mean Dice {figures['mean_dice']:.3f}, "
          f"{figures['bytes'] / 1024:.0f} KB")
