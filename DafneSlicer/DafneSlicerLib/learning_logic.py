"""Improve: fine-tune the case's model on the corrected slices and keep the child as a user model."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk

from .jobs import CancelCheck, ProgressCallback

if TYPE_CHECKING:
    from dafne_logic.inference.model_package import ModelPackage
    from dafne_logic.learning.finetune import FinetuneConfig, FinetuneResult


@dataclass(frozen=True)
class Improvement:
    """A saved fine-tuned model and what the user is shown about it."""

    model_name: str  # registry name of the saved child (selectable in the model list)
    path: Path
    version: str
    parent_version: str
    n_slices: int
    dice_before: dict[str, float]  # automatic vs corrected, per volume label, on the trained slices
    dice_after: dict[str, float]  # fine-tuned model vs corrected, same slices
    # Mean Dice on the corrected leg-slices held out of training (they only steered early stopping):
    # the honest figure; None when too few slices were corrected to hold any out.
    n_held_out: int = 0
    held_out_before: float | None = None
    held_out_after: float | None = None


class LearningLogic:
    """Runs ``dafne_logic.learning.finetune`` (on whatever thread calls it) and saves the result."""

    def __init__(self, config: FinetuneConfig | None = None):
        self.config = config  # None: dafne_logic's defaults

    def finetune(self, model: ModelPackage, image: sitk.Image, corrected: sitk.Image, slices: list[int],
                 progress: ProgressCallback, cancel: CancelCheck, config: FinetuneConfig | None = None,
                 ) -> FinetuneResult:
        """Child of ``model`` trained on the k-slices ``slices`` of ``corrected`` (volume labels on ``image``)."""
        from dafne_logic.learning.finetune import finetune_on_corrections

        return finetune_on_corrections(model, image, corrected, slices=slices, progress=progress, cancel=cancel,
                                       config=config or self.config)

    def save(self, result: FinetuneResult) -> Improvement:
        """Write the child (package + delta) into the user model folder, where the registry lists it."""
        from dafne_logic.core.paths import user_models_dir

        manifest = result.model.manifest
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{manifest.name}-{manifest.version}")
        path = result.save(user_models_dir() / name)
        report: dict[str, Any] = result.report
        return Improvement(name, path, manifest.version, manifest.parent_version or "", int(report["n_slices"]),
                           dict(report["dice_before"]), dict(report["dice_after"]), int(report.get("n_held_out", 0)),
                           report.get("mean_dice_held_out_before"), report.get("mean_dice_held_out_after"))


def dice_rows(improvement: Improvement) -> list[dict[str, object]]:
    """Table rows (muscle, Dice automatic vs corrected, Dice after fine-tuning) for labels with a defined Dice."""
    return [
        {"muscle": name, "dice_automatic": round(before, 4), "dice_improved": round(improvement.dice_after[name], 4)}
        for name, before in improvement.dice_before.items()
        if not math.isnan(before) and name in improvement.dice_after
    ]
