"""Which models exist and segmenting a volume with one: a thin, MRML-free layer over ``dafne_logic``.

Torch-dependent modules are imported inside the methods: the module must load (and show its
dependency section) before torch is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import SimpleITK as sitk

from dafne_logic.core.errors import InputError

from .jobs import CancelCheck, ProgressCallback

if TYPE_CHECKING:
    from dafne_logic.inference.confidence import Confidence
    from dafne_logic.inference.manifest import Manifest
    from dafne_logic.inference.model_package import ModelPackage

DEVICES = ("auto", "cpu", "cuda")
# "Single leg side" choices: auto lets the leg's position decide (patient right where LPS x < 0).
SINGLE_LEG_SIDES = ("auto", "right", "left")


def single_leg_side(choice: str) -> str | None:
    """``segment_volume``'s ``single_leg_side`` for a panel / command-line choice (auto -> None)."""
    if choice not in SINGLE_LEG_SIDES:
        raise InputError(f"Single leg side must be one of {', '.join(SINGLE_LEG_SIDES)}, not '{choice}'.")
    return None if choice == "auto" else choice


@dataclass(frozen=True)
class ModelChoice:
    """One line of the model selector."""

    name: str  # registry name passed back to load_model ("thigh", "leg", a user/pulled model folder)
    family: str  # the server's model family (the manifest name: "thigh", "leg")
    title: str  # what the selector shows, e.g. "thigh 1 (bundled)"
    version: str
    source: str  # "bundled" or "user"
    label_names: tuple[str, ...]  # volume label names, right side first


class SegmentationLogic:
    """Lists and checks models (torch-free, for the GUI thread), loads one and segments an image (in the worker)."""

    def list_models(self) -> list[ModelChoice]:
        from dafne_logic.inference.manifest import list_models

        return [
            ModelChoice(entry.name, entry.manifest.name, f"{entry.name} {entry.manifest.version} ({entry.source})",
                        entry.manifest.version, entry.source,
                        tuple(label.name for label in entry.manifest.labels.volume_labels()))
            for entry in list_models()
        ]

    def check_model(self, name: str) -> Manifest:
        """The model's manifest (label table, version), its weights file checked against it, without
        loading the weights: torch stays out of Slicer's GUI thread (the worker process loads them)."""
        from dafne_logic.inference.manifest import check_package

        return check_package(name)

    def load_model(self, name: str) -> ModelPackage:
        from dafne_logic.inference.model_package import load_model

        return load_model(name)

    def segment(self, image: sitk.Image, model: ModelPackage, device: str, progress: ProgressCallback,
                cancel: CancelCheck, single_leg_side: str | None = None) -> tuple[sitk.Image, Confidence]:
        """Volume labels (uint8, right muscles 1..N, left N+1..2N) on ``image``'s grid, and how sure
        the network was of each muscle and each slice (:mod:`dafne_logic.inference.confidence`).

        ``single_leg_side`` ("right", "left" or None: from the leg's position) names the side of the
        only leg in the field of view; ignored when both legs are found.
        """
        from dafne_logic.inference.segment import segment_with_confidence

        return segment_with_confidence(image, model, device=device, progress=progress, cancel=cancel,
                                       single_leg_side=single_leg_side)
