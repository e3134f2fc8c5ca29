"""Finding the body and the legs in an axial MR volume.

Every array here is in the canonical orientation of :mod:`dafne_logic.core.preprocessing`: numpy axes
(z: inferior→superior, y: anterior→posterior, x: patient right→left). Spacings are in mm.

The body is what survives a threshold chosen by Otsu's method on the logarithm of a smoothed image
(the log makes air against tissue the dominant split whatever the contrast, and keeps the mask
unchanged when intensities are scaled or shifted), with holes filled slice by slice and small debris
dropped. The legs are then found on the projection of the body over all slices: two separate blobs,
or one blob that is either one leg or two legs touching (split at the valley of its column profile).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dafne_logic.core.errors import InputError

SMOOTHING_MM = 2.0  # in-plane Gaussian sigma before thresholding: averages out noise, keeps leg edges
MIN_COMPONENT_FRACTION = 0.1  # blobs smaller than this fraction of the largest are debris, not legs
# The thresholds ignore exact-minimum padding when it is at least PADDING_MIN_SHARE of the voxels (a
# scattering of minimum voxels in noisy air is no padding) and at least PADDING_MIN_KEPT is above it.
PADDING_MIN_SHARE = 0.01
PADDING_MIN_KEPT = 0.05
PROFILE_SMOOTHING_MM = 5.0  # sigma of the column profile smoothing when looking for a valley
TOUCHING_ASPECT = 1.4  # one blob wider than this (width / depth in mm) may be two touching legs ...
TOUCHING_VALLEY = 0.85  # ... if its column profile dips below this fraction of the lower of its two peaks
VALLEY_WINDOW = (0.2, 0.8)  # where in the blob's width the valley between two legs may lie
MAX_SAMPLES = 2_000_000  # voxels used for histogram-based thresholds on large volumes

# Connectivity within a slice only: holes are filled per slice, never through the stack.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def strided_sample(values: np.ndarray, limit: int = MAX_SAMPLES) -> np.ndarray:
    """At most about ``limit`` voxels of a (z, y, x) array, evenly strided (deterministic).

    The stride is coprime with the slice size, so the samples visit every in-plane position
    rather than a few columns.
    """
    flat = values.reshape(-1)
    stride = max(1, flat.size // limit)
    plane = int(np.prod(values.shape[-2:]))
    while np.gcd(stride, plane) != 1:
        stride += 1
    return flat[::stride]


def body_mask(volume: np.ndarray, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Voxels inside the body.

    The work happens on a grid decimated in-plane to at most ``SMOOTHING_MM`` pixels (the Gaussian
    is its anti-aliasing filter), a few slices at a time, so large volumes cost little memory; the
    result comes back at full resolution by nearest neighbour (edges within about 1 mm are plenty
    for bounding boxes with margins and for intensity statistics).

    Args:
        volume: (z, y, x) float32 image.
        spacing_yx: in-plane (row, column) spacing in mm.

    Returns:
        (z, y, x) bool mask: thresholded, holes filled per slice, components smaller than
        ``MIN_COMPONENT_FRACTION`` of the largest removed.
    """
    steps = [max(1, int(SMOOTHING_MM // s)) for s in spacing_yx]
    smooth = _smooth_decimated(volume, spacing_yx, steps)
    low = float(smooth.min())
    span = float(smooth.max()) - low
    if not span > 0:
        raise InputError("the image is constant, so there is no body to segment")
    # A floor proportional to the range keeps the log finite on zero backgrounds and scale-free.
    floor = 1e-3 * span
    sample = strided_sample(smooth)
    # Zero padding (a scan resampled into a larger grid, a masked field of view) stays exactly at the
    # minimum after smoothing; left in, Otsu splits padding from everything else and the air's noise
    # becomes "body", merging the legs. Only the values above it are thresholded.
    above = sample[sample > low]
    if sample.size - above.size >= PADDING_MIN_SHARE * sample.size and above.size >= PADDING_MIN_KEPT * sample.size:
        sample = above
    logs = np.log(sample.astype(np.float64) - low + floor)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.GetImageFromArray(logs.reshape(1, -1)))
    mask = smooth > low - floor + float(np.exp(otsu.GetThreshold()))
    del smooth
    mask = ndimage.binary_fill_holes(mask, structure=_IN_PLANE)
    components, count = ndimage.label(mask)
    if count == 0:
        raise InputError("no body was found in the image")
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = sizes >= MIN_COMPONENT_FRACTION * sizes.max()
    keep[0] = False
    mask = keep[components]
    del components
    rows = np.minimum(np.rint(np.arange(volume.shape[1]) / steps[0]).astype(np.intp), mask.shape[1] - 1)
    cols = np.minimum(np.rint(np.arange(volume.shape[2]) / steps[1]).astype(np.intp), mask.shape[2] - 1)
    return mask[:, rows][:, :, cols]


def _smooth_decimated(volume: np.ndarray, spacing_yx: tuple[float, float], steps: list[int]) -> np.ndarray:
    """In-plane Gaussian (``SMOOTHING_MM``) of a (z, y, x) volume, keeping every ``steps``-th row and column."""
    height, width = (-(-n // f) for n, f in zip(volume.shape[1:], steps))
    out = np.empty((volume.shape[0], height, width), dtype=np.float32)
    chunk = max(1, MAX_SAMPLES // (volume.shape[1] * volume.shape[2]))
    for z0 in range(0, volume.shape[0], chunk):
        part = ndimage.gaussian_filter1d(volume[z0 : z0 + chunk], SMOOTHING_MM / spacing_yx[0], axis=1, output=np.float32)
        part = ndimage.gaussian_filter1d(part[:, :: steps[0]], SMOOTHING_MM / spacing_yx[1], axis=2, output=np.float32)
        out[z0 : z0 + chunk] = part[:, :, :: steps[1]]
    return out


def find_legs(body: np.ndarray, spacing_yx: tuple[float, float]) -> list[np.ndarray]:
    """The region of the slice plane that belongs to each leg.

    Args:
        body: (z, y, x) bool body mask from :func:`body_mask`.
        spacing_yx: in-plane (row, column) spacing in mm.

    Returns:
        One or two (y, x) bool masks that partition the plane (every pixel belongs to exactly one
        leg, the nearest), ordered by increasing x, i.e. patient right first when there are two.
    """
    projection = body.any(axis=0)
    blobs, count = ndimage.label(projection, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        raise InputError("no body was found in the image")
    areas = np.bincount(blobs.ravel())[1:]
    ranked = [int(i) + 1 for i in np.argsort(areas)[::-1] if areas[i] >= MIN_COMPONENT_FRACTION * areas.max()]
    if len(ranked) >= 2:
        seeds = [blobs == ranked[0], blobs == ranked[1]]
        seeds.sort(key=lambda m: float(np.nonzero(m)[1].mean()))
    else:
        blob = blobs == ranked[0]
        split = _touching_split(blob, body.sum(axis=0), spacing_yx)
        if split is None:
            return [np.ones_like(projection)]
        columns = np.arange(projection.shape[1])[None, :]
        seeds = [blob & (columns < split), blob & (columns >= split)]
    # Every pixel goes to the nearest leg: a Voronoi partition of the plane from the two seeds.
    seed_labels = np.zeros(projection.shape, dtype=np.uint8)
    seed_labels[seeds[0]] = 1
    seed_labels[seeds[1]] = 2
    nearest = ndimage.distance_transform_edt(
        seed_labels == 0, sampling=spacing_yx, return_distances=False, return_indices=True
    )
    owner = seed_labels[nearest[0], nearest[1]]
    return [owner == 1, owner == 2]


def _touching_split(blob: np.ndarray, counts: np.ndarray, spacing_yx: tuple[float, float]) -> int | None:
    """Column at which a single projected blob splits into two touching legs, or None for one leg.

    Args:
        blob: (y, x) bool projection of the blob.
        counts: (y, x) number of body voxels over slices (weights the column profile by volume).
    """
    rows = np.nonzero(blob.any(axis=1))[0]
    cols = np.nonzero(blob.any(axis=0))[0]
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    width_mm = (x1 - x0) * spacing_yx[1]
    depth_mm = (int(rows[-1]) + 1 - int(rows[0])) * spacing_yx[0]
    if width_mm < TOUCHING_ASPECT * depth_mm:
        return None
    profile = ndimage.gaussian_filter1d(
        np.where(blob, counts, 0).sum(axis=0)[x0:x1].astype(np.float64), PROFILE_SMOOTHING_MM / spacing_yx[1]
    )
    lo = int(VALLEY_WINDOW[0] * profile.size)
    hi = max(lo + 1, int(VALLEY_WINDOW[1] * profile.size))
    valley = lo + int(np.argmin(profile[lo:hi]))
    lower_peak = min(profile[: valley + 1].max(), profile[valley:].max())
    if profile[valley] >= TOUCHING_VALLEY * lower_peak:
        return None
    return x0 + valley
