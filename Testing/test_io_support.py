"""Small synthetic images shared by the test_io_* and test_statistics tests (this module has no tests)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.labels import LabelTable


def oblique_direction(angle: float = 0.3) -> tuple[float, ...]:
    """A rotation about the patient's S axis, then a flip of the slice axis: not identity, not axis-aligned."""
    c, s = np.cos(angle), np.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0)


def make_image(shape_zyx=(4, 6, 7), spacing=(0.7, 0.9, 3.0), origin=(12.5, -40.25, 7.0),
               direction=None, dtype=np.float32, seed=0) -> sitk.Image:
    """A random scalar volume with the given geometry (direction defaults to :func:`oblique_direction`)."""
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random(shape_zyx) * 1000).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction or oblique_direction())
    return image


def make_labels(reference: sitk.Image, table: LabelTable, absent: tuple[int, ...] = ()) -> sitk.Image:
    """Volume labels on ``reference``'s grid: every label except ``absent`` owns a few voxels."""
    size_x, size_y, size_z = reference.GetSize()
    voxels = np.zeros((size_z, size_y, size_x), dtype=np.uint8)
    flat = voxels.reshape(-1)
    present = [v for v in range(1, 2 * table.n_muscles + 1) if v not in absent]
    for i, value in enumerate(present):  # value v at flat indices 3i .. 3i+2 (three voxels each)
        flat[3 * i : 3 * i + 3] = value
    labels = sitk.GetImageFromArray(voxels)
    labels.CopyInformation(reference)
    return labels


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)
