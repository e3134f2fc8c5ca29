"""Held-out validation cases of a family and the Dice of a model on them.

Cases are image/label pairs: by default procedural phantoms of the family's region (made once per
process, deterministic seeds), or a folder ``<dir>/<family>/<case>_image.<ext>`` +
``<case>_labels.<ext>`` (any SimpleITK-readable format) configured with ``--validation DIR``.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from dafne_logic.core.errors import InputError
from dafne_logic.core.numbers import nanmean
from dafne_logic.inference.model_package import ModelPackage

Segmenter = Callable[[sitk.Image, ModelPackage], sitk.Image]
Scorer = Callable[[ModelPackage], dict[str, float]]
PHANTOM_SEED_BASE = 7_000  # far from seeds used for training phantoms elsewhere


@dataclass(frozen=True)
class Case:
    name: str
    image: sitk.Image
    labels: sitk.Image  # volume labels (right 1..N, left N+1..2N)


def phantom_cases(region: str, n: int, shape: tuple[int, int, int]) -> list[Case]:
    """``n`` phantoms of ``region`` with fixed seeds (the same cases in every process)."""
    from dafne_logic.phantoms.images import make_phantom

    cases = []
    for i in range(n):
        image, labels = make_phantom(region=region, shape=shape, seed=PHANTOM_SEED_BASE + i)
        cases.append(Case(f"phantom-{region}-{i}", image, labels))
    return cases


def folder_cases(folder: str | Path) -> list[Case]:
    """Pairs ``<case>_image.*`` / ``<case>_labels.*`` in ``folder`` (images validated on reading)."""
    from dafne_logic.core.io import read_image

    folder = Path(folder)
    cases = []
    for image_path in sorted(folder.glob("*_image.*")):
        stem = image_path.name.split("_image.")[0]
        matches = sorted(m for m in folder.glob(f"{glob.escape(stem)}_labels.*")  # a case named ab[1] is not ab1
                         if not m.name.endswith(".json"))  # a label table beside a label map is not one
        if not matches:
            raise InputError(f"validation case {image_path} has no {stem}_labels file beside it")
        if len(matches) > 1:
            raise InputError(f"validation case {stem} has several label files ({', '.join(m.name for m in matches)})")
        cases.append(Case(stem, read_image(image_path), sitk.ReadImage(str(matches[0]), sitk.sitkUInt8)))
    if not cases:
        raise InputError(f"no validation cases (<case>_image.* + <case>_labels.*) in {folder}")
    return cases


def score_model(model: ModelPackage, cases: Sequence[Case], segment: Segmenter) -> dict[str, float]:
    """Mean Dice per volume label over ``cases`` (labels absent from every case: NaN)."""
    from dafne_logic.learning.evaluation import dice_per_label

    per_case = [dice_per_label(segment(case.image, model), case.labels, model.labels) for case in cases]
    names = list(per_case[0]) if per_case else []
    out = {}
    for name in names:
        out[name] = nanmean(d[name] for d in per_case)
    return out


def make_scorer(cases: Sequence[Case], segment: Segmenter | None = None) -> Scorer:
    """A scorer over fixed cases; ``segment`` defaults to :func:`dafne_logic.inference.segment.segment_volume` on CPU."""
    if segment is None:
        from dafne_logic.inference.segment import segment_volume

        def segment(image: sitk.Image, model: ModelPackage) -> sitk.Image:
            return segment_volume(image, model, device="cpu")

    return lambda model: score_model(model, cases, segment)
