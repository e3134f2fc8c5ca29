"""Whole-volume inference: MR volume in, bilateral muscle label map on the same grid out."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import SimpleITK as sitk
import torch

from dafne_logic.core.errors import Cancelled, InputError
from dafne_logic.core.labels import Side
from dafne_logic.core.preprocessing import LabelAssembler, PreparedVolume, prepare_volume
from dafne_logic.core.progress import CancelCheck, ProgressCallback
from dafne_logic.inference.confidence import Confidence, ConfidenceTally, slices_on_input
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.inference.networks import resolve_device

log = logging.getLogger(__name__)



def predict_slices(net: torch.nn.Module, slices: np.ndarray, device: torch.device, batch_size: int = 8,
                   cancel: CancelCheck | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Softmax probabilities of a 2D network over a stack of slices, one batch at a time.

    Args:
        net: network in eval mode on ``device``, mapping (B, 1, H, W) to (B, C, H, W) logits.
        slices: (n_slices, H, W) float32 normalised input.
        cancel: polled before each batch; returning True raises :class:`Cancelled`.

    Yields:
        (index of the batch's first slice, (B, C, H, W) float32 probabilities). Batches are
        consumed as they come, so memory stays bounded by one batch whatever the volume's length.
    """
    use_amp = device.type == "cuda"
    with torch.inference_mode():
        for start in range(0, slices.shape[0], batch_size):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled; nothing was written")
            batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size, None])).to(device)
            with torch.autocast(device.type, enabled=use_amp):
                probabilities = torch.softmax(net(batch).float(), dim=1)
            yield start, probabilities.cpu().numpy()


def segment_volume(image: sitk.Image, model: ModelPackage, device: str = "auto", batch_size: int = 8,
                   progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
                   single_leg_side: Side | None = None) -> sitk.Image:
    """Segment every muscle of both legs in ``image``.

    Args:
        image: 3D scalar MR volume, any orientation (a single-slice 3D volume is valid).
        model: loaded model package; its preprocessing parameters define crops and spacing.
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        batch_size: slices per forward pass (bounds memory together with the crop size).
        progress: receives (fraction in 0..1, message) after each batch.
        cancel: polled before each batch; returning True raises :class:`Cancelled`.
        single_leg_side: the side of the leg when only one is in the field of view; by default it
            comes from the leg's physical x (patient midline at x = 0), which needs a real origin.

    Returns:
        uint8 label image on exactly the input grid: patient-right muscles 1..N, left N+1..2N
        (see :mod:`dafne_logic.core.labels`). Memory: one uint8 canonical volume plus one batch of
        probabilities, whatever the number of slices.
    """
    labels, _, _ = _segment(image, model, device, batch_size, progress, cancel, single_leg_side, confidence=False)
    return labels


def segment_with_confidence(image: sitk.Image, model: ModelPackage, device: str = "auto", batch_size: int = 8,
                            progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
                            single_leg_side: Side | None = None) -> tuple[sitk.Image, Confidence]:
    """:func:`segment_volume` plus how sure the network was of each predicted muscle and each slice
    (mean top-two probability margin, 0..1; :mod:`dafne_logic.inference.confidence`)."""
    labels, tally, prepared = _segment(image, model, device, batch_size, progress, cancel, single_leg_side, confidence=True)
    assert tally is not None  # confidence=True always tallies; this narrows the type
    per_slice = slices_on_input(tally.per_canonical_slice(), prepared.to_input_axes, prepared.to_input_flips,
                                prepared.canonical_shape[0])
    # A muscle the tally saw on owned crop pixels can still vanish in the resampling: score only what the map holds.
    present = set(np.flatnonzero(np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=1)).tolist())
    per_label = {v: c for v, c in tally.per_label().items() if v in present}
    return labels, Confidence(per_label, per_slice)


def _segment(image: sitk.Image, model: ModelPackage, device: str, batch_size: int,
             progress: ProgressCallback | None, cancel: CancelCheck | None, single_leg_side: Side | None,
             confidence: bool) -> tuple[sitk.Image, ConfidenceTally | None, PreparedVolume]:
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    report = progress or (lambda fraction, message: None)
    report(0.0, "preparing volume")
    prepared = prepare_volume(image, model.manifest.preprocessing, single_leg_side=single_leg_side)
    net = model.network(dev)
    assembler = LabelAssembler(prepared, model.labels)
    tally = (ConfidenceTally(model.labels, prepared.slices_with_body, {leg.side: leg.owned_on_crop() for leg in prepared.legs})
             if confidence else None)
    total = sum(leg.image.shape[0] for leg in prepared.legs)
    done = 0
    for leg in prepared.legs:
        for first, probabilities in predict_slices(net, leg.image, dev, batch_size, cancel):
            assembler.add(leg.side, first, probabilities)
            if tally is not None:
                tally.add(leg.side, first, probabilities)
            done += probabilities.shape[0]
            report(0.05 + 0.9 * done / total, f"segmenting {leg.side} leg ({done}/{total} slices)")
        log.debug("%s leg: %s slices of %s", leg.side, leg.image.shape[0], leg.image.shape[1:])
    labels = assembler.image()
    report(1.0, "done")
    return labels, tally, prepared
