"""Voxel grids: whether two images share one, and carrying label maps from one grid onto another.

Grids are compared by size, spacing, origin and direction (SimpleITK's LPS geometry); label maps
move between grids by physical position with nearest-neighbour interpolation, never by index.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.errors import InputError

log = logging.getLogger(__name__)


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """Whether two images share size, spacing, origin and direction (within ``tolerance`` mm / cosine)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def resample_labels(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Labels carried onto ``reference``'s grid by physical position (nearest neighbour, outside → 0).

    A Slicer segmentation is often stored cropped to its segments; this puts it back on the image grid.
    """
    if same_grid(labels, reference):
        return labels
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (LPS mm, two arrays of shape (3,)) of an image's voxel extent."""
    size = np.array(image.GetSize(), dtype=float)
    corners = [image.TransformContinuousIndexToPhysicalPoint(tuple(c))
               for c in np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size])).reshape(3, -1).T]
    points = np.array(corners)
    return points.min(axis=0), points.max(axis=0)


def overlaps(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether the physical boxes of two images share a volume."""
    lo_a, hi_a = physical_box(a)
    lo_b, hi_b = physical_box(b)
    return bool(np.all(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b) > 0))


def align_labels_to_image(labels: sitk.Image, image: sitk.Image) -> sitk.Image:
    """The labels on the image's grid: unchanged when the grids match, resampled (nearest
    neighbour, by physical position) when they overlap, refused when they do not.

    Raises:
        InputError: not 3D, or the two volumes share no physical space.
    """
    if labels.GetDimension() != 3:
        raise InputError(f"expected a 3D segmentation, got a {labels.GetDimension()}D one")
    if same_grid(labels, image):
        return labels
    if not overlaps(labels, image):
        raise InputError("the segmentation does not overlap the image (different position or orientation); "
                         "was it drawn on another volume?")
    log.info("the segmentation lies on another grid than the image; resampling it (nearest neighbour)")
    return resample_labels(labels, image)
