"""Whole-volume inference: MR volume in, bilateral muscle label map on the same grid out."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .errors import Cancelled
from .model_package import ModelPackage
from .networks import resolve_device
from .preprocessing import prepare_volume, restore_labels

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]  # (fraction done in 0..1, message)
CancelCheck = Callable[[], bool]  # True once the user asked to stop


def predict_slices(net: torch.nn.Module, slices: np.ndarray, device: torch.device, batch_size: int = 8,
                   on_batch: Callable[[int], None] | None = None,
                   cancel: CancelCheck | None = None) -> np.ndarray:
    """Softmax probabilities of a 2D network over a stack of slices.

    Args:
        net: network in eval mode on ``device``, mapping (B, 1, H, W) to (B, C, H, W) logits.
        slices: (n_slices, H, W) float32 normalised input.
        on_batch: called with the number of slices just finished.

    Returns:
        (n_slices, C, H, W) float16 probabilities (half precision bounds memory on long volumes).
    """
    n = slices.shape[0]
    out: np.ndarray | None = None
    use_amp = device.type == "cuda"
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled; nothing was written")
            batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size, None])).to(device)
            with torch.autocast(device.type, enabled=use_amp):
                probs = torch.softmax(net(batch).float(), dim=1)
            if out is None:
                out = np.empty((n, probs.shape[1], *slices.shape[1:]), dtype=np.float16)
            out[start:start + batch.shape[0]] = probs.cpu().numpy()
            if on_batch is not None:
                on_batch(batch.shape[0])
    assert out is not None
    return out


def segment_volume(image: sitk.Image, model: ModelPackage, device: str = "auto", batch_size: int = 8,
                   progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> sitk.Image:
    """Segment every muscle of both legs in ``image``.

    Args:
        image: 3D scalar MR volume, any orientation (a single-slice 3D volume is valid).
        model: loaded model package; its preprocessing parameters define crops and spacing.
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        batch_size: slices per forward pass (bounds memory together with the crop size).
        progress: receives (fraction in 0..1, message) after each batch.
        cancel: polled before each batch; returning True raises :class:`Cancelled`.

    Returns:
        uint8 label image on exactly the input grid: patient-right muscles 1..N, left N+1..2N
        (see :mod:`dafne_logic.labels`).
    """
    dev = resolve_device(device)
    report = progress or (lambda fraction, message: None)
    report(0.0, "preparing volume")
    prepared = prepare_volume(image, model.manifest.preprocessing)
    net = model.network(dev)
    total = sum(leg.image.shape[0] for leg in prepared.legs)
    done = 0
    probabilities: dict[str, np.ndarray] = {}
    for leg in prepared.legs:
        def on_batch(n: int, side: str = leg.side) -> None:
            nonlocal done
            done += n
            report(0.05 + 0.85 * done / total, f"segmenting {side} leg ({done}/{total} slices)")

        probabilities[leg.side] = predict_slices(net, leg.image, dev, batch_size, on_batch, cancel)
        log.debug("%s leg: %s slices of %s", leg.side, leg.image.shape[0], leg.image.shape[1:])
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled; nothing was written")
    report(0.9, "mapping labels back onto the input grid")
    labels = restore_labels(prepared, probabilities, model.labels)
    report(1.0, "done")
    return labels
