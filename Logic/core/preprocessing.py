"""From an MR volume to per-leg network input, and from network output back to the input grid.

Forward (:func:`prepare_volume`):

1. Orientation: ``sitk.DICOMOrient(image, "LPS")`` permutes and flips the axes (exactly; oblique
   volumes take their nearest axes) so that the **canonical array** has numpy axes
   (z: inferior→superior, y: anterior→posterior, x: patient right→left). Left and right therefore
   come from the direction matrix, never from the side of the input array a leg lies on.
2. Body and legs (:mod:`dafne_logic.core.leg_detection`): two legs, one leg (its side from its physical
   x in LPS: x < 0 is the patient's right, unless the caller says), or two legs touching.
3. Intensity: the ``percentiles`` of body voxels map to 0 and 1, clipped to :data:`NORMALISED_RANGE`.
4. Each leg: bounding box over all slices plus ``margin_mm``, resampled in-plane to ``spacing_mm``
   (linear for images, nearest for labels; slices are kept as they are: the network is 2D) on a grid
   whose sides are multiples of ``pad_multiple`` centred on the box; the left leg is mirrored along
   x so that it looks like a right leg.

Inverse (:func:`restore_labels`, or :class:`LabelAssembler` for slice-by-slice streaming): the
class probabilities of each crop are resampled linearly back onto the canonical grid, one class and
a bounded chunk of slices at a time, the winning class becomes that side's volume label, and the
canonical array is permuted and flipped back onto exactly the input grid. Each canonical pixel is
written by exactly one leg (the nearest, see :func:`dafne_logic.core.leg_detection.find_legs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dafne_logic.core.errors import InputError
from dafne_logic.core.grids import same_grid
from dafne_logic.core.labels import SIDES, LabelTable, Side
from dafne_logic.core.leg_detection import body_mask, find_legs, strided_sample

CANONICAL_ORIENTATION = "LPS"
FIELD_OF_VIEW_MM = (10.0, 3000.0)  # an axial plane outside this (each side) is no leg scan: a spacing error
NORMALISED_RANGE = (-0.1, 1.1)  # normalised intensities are clipped a little beyond [0, 1]
RESTORE_CHUNK_ELEMENTS = 16_000_000  # probabilities (slices × classes × plane) resampled at once on restore


@dataclass(frozen=True)
class PreprocessingParams:
    """How a volume becomes network input (this module)."""

    spacing_mm: tuple[float, float] = (1.0, 1.0)  # in-plane (row, column) spacing the model sees
    pad_multiple: int = 16  # crop sizes are padded to a multiple of this (2 ** number of strides)
    margin_mm: float = 10.0  # margin kept around each leg's bounding box
    percentiles: tuple[float, float] = (0.5, 99.5)  # robust intensity range mapped to [0, 1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 2 or not all(0.05 <= s <= 20.0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be two values in 0.05..20 mm, got {self.spacing_mm}")
        if not 1 <= self.pad_multiple <= 256:
            raise ValueError(f"pad_multiple must be in 1..256, got {self.pad_multiple}")
        if not 0.0 <= self.margin_mm <= 200.0:
            raise ValueError(f"margin_mm must be in 0..200, got {self.margin_mm}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must rise within 0..100, got {self.percentiles}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessingParams:
        """Parse and check; raises ValueError (or TypeError) for unusable values."""
        return cls(
            spacing_mm=tuple(float(v) for v in data.get("spacing_mm", (1.0, 1.0))),  # type: ignore[arg-type]
            pad_multiple=int(data.get("pad_multiple", 16)),
            margin_mm=float(data.get("margin_mm", 10.0)),
            percentiles=tuple(float(v) for v in data.get("percentiles", (0.5, 99.5))),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class AxisSampling:
    """One in-plane axis of a crop: crop pixel ``i`` sits at canonical pixel ``start + i * step``.

    ``step`` is the model spacing over the input spacing (canonical pixels per crop pixel).
    """

    start: float
    step: float
    size: int

    @classmethod
    def around(cls, first: int, stop: int, source_mm: float, target_mm: float, multiple: int) -> AxisSampling:
        """A grid of ``target_mm`` pixels, a multiple of ``multiple`` long, centred on pixels [first, stop).

        The start is rounded to a whole canonical pixel so that equal spacings copy pixels exactly;
        one spare crop pixel covers that rounding.
        """
        step = target_mm / source_mm
        size = multiple * int(np.ceil(((stop - first) / step + 1.0) / multiple))
        centre = (first + stop - 1) / 2.0
        return cls(float(np.floor(centre - (size - 1) * step / 2.0 + 0.5)), step, size)


@dataclass
class LegCrop:
    """One leg as the network sees it, and where it came from.

    Attributes:
        side: the patient side of this leg, from the image geometry.
        image: (n_slices, H, W) float32 normalised intensities at ``params.spacing_mm``; H and W are
            multiples of ``params.pad_multiple``. The left leg is mirrored along x.
        target: (n_slices, H, W) uint8 model classes (0 background, 1..N this leg's muscles) when
            labels were given, else None. Mirrored like ``image``.
        rows, columns: crop rows ↔ canonical y and crop columns (before mirroring) ↔ canonical x.
        box: (y0, y1, x0, x1) half-open canonical pixel box that this crop restores.
        owned: (y1 - y0, x1 - x0) bool, the pixels of ``box`` that belong to this leg.
        mirrored: True when ``image`` is flipped along its last axis (the left leg).
    """

    side: Side
    image: np.ndarray
    target: np.ndarray | None
    rows: AxisSampling
    columns: AxisSampling
    box: tuple[int, int, int, int]
    owned: np.ndarray
    mirrored: bool

    def owned_on_crop(self) -> np.ndarray:
        """(H, W) bool on the crop's own grid (mirrored as the crop is): the crop pixels whose nearest
        canonical pixel belongs to this leg (in ``box`` and ``owned``); the rest (the other leg,
        the margin around the box) never reaches the label map."""
        y0, y1, x0, x1 = self.box
        y = np.floor(self.rows.start + np.arange(self.rows.size) * self.rows.step + 0.5).astype(np.intp)
        x = np.floor(self.columns.start + np.arange(self.columns.size) * self.columns.step + 0.5).astype(np.intp)
        if self.mirrored:
            x = x[::-1]
        inside_y, inside_x = (y >= y0) & (y < y1), (x >= x0) & (x < x1)
        mask = np.zeros((y.size, x.size), bool)
        rows, columns = np.flatnonzero(inside_y), np.flatnonzero(inside_x)
        mask[np.ix_(rows, columns)] = self.owned[np.ix_(y[rows] - y0, x[columns] - x0)]
        return mask


@dataclass
class PreparedVolume:
    """The legs of one volume plus the geometry that maps predictions back onto the input grid.

    Attributes:
        legs: one or two crops, patient right first.
        canonical_shape: (z, y, x) shape of the canonical (LPS) array.
        to_input_axes: numpy transpose that takes a canonical array to the input array's axis order ...
        to_input_flips: ... after which these input numpy axes are reversed.
        size, origin, spacing, direction: the input image's grid (SimpleITK conventions).
        intensity_range: the raw intensities that became 0 and 1.
        slices_with_body: (z,) bool, canonical slices where the body mask found anything; the
            others (beyond the end of the body, noise only) get no labels. None: every slice.
    """

    legs: list[LegCrop]
    canonical_shape: tuple[int, int, int]
    to_input_axes: tuple[int, int, int]
    to_input_flips: tuple[bool, bool, bool]
    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    intensity_range: tuple[float, float]
    slices_with_body: np.ndarray | None = None

    def leg(self, side: Side) -> LegCrop:
        for leg in self.legs:
            if leg.side == side:
                return leg
        raise KeyError(f"this volume has no {side} leg")

    def to_input_array(self, canonical: np.ndarray) -> np.ndarray:
        """A (z, y, x) canonical array rearranged onto the input image's numpy axes (a view)."""
        return _rearranged(canonical, self.to_input_axes, self.to_input_flips)

    def to_input_image(self, canonical: np.ndarray) -> sitk.Image:
        """A canonical array as an image on exactly the input grid."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.to_input_array(canonical)))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


def canonical(image: sitk.Image) -> sitk.Image:
    """The image reoriented to axial LPS (exact permutation and flips of the axes); itself if it is."""
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    return image if orientation == CANONICAL_ORIENTATION else sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def canonical_array_on_input(array: np.ndarray, image: sitk.Image, oriented: sitk.Image) -> np.ndarray:
    """A (z, y, x) array on ``oriented`` (= :func:`canonical` of ``image``) put back on ``image``'s numpy
    axes (a view). Exact whatever orientation ``DICOMOrient`` chose: reorienting ``oriented`` to
    ``image``'s orientation code is not, where a direction lies halfway between two axes."""
    axes, flips = _to_input_mapping(image, oriented)
    return _rearranged(array, axes, flips)


def _rearranged(array: np.ndarray, axes: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    out = array.transpose(axes)
    flipped = tuple(axis for axis, flip in enumerate(flips) if flip)
    return np.flip(out, axis=flipped) if flipped else out


def prepare_volume(
    image: sitk.Image,
    params: PreprocessingParams,
    labels: sitk.Image | None = None,
    table: LabelTable | None = None,
    single_leg_side: Side | None = None,
) -> PreparedVolume:
    """Per-leg, mirrored, resampled, normalised slice stacks of one MR volume.

    Args:
        image: 3D scalar MR volume in any orientation (a single-slice 3D volume is valid).
        params: the model's preprocessing parameters.
        labels: optional volume labels (right muscles 1..N, left N+1..2N) on the image's grid;
            needs ``table``. Fills each leg's ``target``.
        table: the label table that defines N.
        single_leg_side: the side of the leg when only one is found (default: from its position,
            physical x < 0 in LPS is the patient's right). Ignored when two legs are found.

    Raises:
        InputError: not a 3D scalar image, non-finite or constant voxels, no body, or labels that
            do not fit the image or the table.
    """
    _check_image(image)
    if labels is not None and table is None:
        raise ValueError("labels need the label table that defines their values")
    if single_leg_side is not None and single_leg_side not in SIDES:
        raise ValueError(f"single_leg_side must be one of {SIDES}, not {single_leg_side!r}")
    check_field_of_view(image)
    oriented = canonical(image)
    # A view in the stored type (int16 for most MR): no full-volume copy; ``oriented`` outlives its use.
    volume = sitk.GetArrayViewFromImage(oriented)
    # A float64 sum of float32 values cannot overflow, so it is finite exactly when every voxel is.
    if not np.isfinite(volume.sum(dtype=np.float64)):
        raise InputError("the image contains NaN or infinite voxels")
    label_volume = _canonical_labels(labels, image, table) if labels is not None else None
    spacing_yx = (oriented.GetSpacing()[1], oriented.GetSpacing()[0])

    body = body_mask(volume, spacing_yx)
    regions = find_legs(body, spacing_yx)
    sides = _assign_sides(regions, body, oriented, single_leg_side)
    low, high, fill = _intensity_statistics(volume, body, params.percentiles)

    footprint = body.any(axis=0)
    legs = []
    for side, region in sorted(zip(sides, regions, strict=True), key=lambda pair: SIDES.index(pair[0])):
        box = _leg_box(footprint & region, spacing_yx, params.margin_mm)
        rows = AxisSampling.around(box[0], box[1], spacing_yx[0], params.spacing_mm[0], params.pad_multiple)
        columns = AxisSampling.around(box[2], box[3], spacing_yx[1], params.spacing_mm[1], params.pad_multiple)
        mirrored = side == "left"
        crop = _sample(volume, rows, columns, order=1, fill=fill, dtype=np.float32)
        crop -= low
        crop /= high - low
        np.clip(crop, *NORMALISED_RANGE, out=crop)
        target = None
        if label_volume is not None and table is not None:
            target = _sample(_side_classes(label_volume, table, side), rows, columns, order=0, fill=0, dtype=np.uint8)
        legs.append(
            LegCrop(
                side=side,
                image=_mirror(crop, mirrored),
                target=None if target is None else _mirror(target, mirrored),
                rows=rows,
                columns=columns,
                box=box,
                owned=region[box[0] : box[1], box[2] : box[3]].copy(),
                mirrored=mirrored,
            )
        )
    axes, flips = _to_input_mapping(image, oriented)
    return PreparedVolume(
        legs=legs,
        canonical_shape=volume.shape,
        to_input_axes=axes,
        to_input_flips=flips,
        size=image.GetSize(),
        origin=image.GetOrigin(),
        spacing=image.GetSpacing(),
        direction=image.GetDirection(),
        intensity_range=(low, high),
        slices_with_body=body.any(axis=(1, 2)),
    )


def slice_axis(image: sitk.Image) -> int:
    """The image axis (SimpleITK order: 0 i, 1 j, 2 k) nearest the patient's S axis, which
    ``DICOMOrient`` makes the slice axis: 2 for an axial scan, 0 or 1 for a sagittal or coronal one."""
    return int(np.argmax(np.abs(np.reshape(image.GetDirection(), (3, 3))[2, :])))


def check_field_of_view(image: sitk.Image) -> None:
    """Refuse an image whose axial plane has a physical size no leg scan has (a spacing stored in
    metres, or 1e6 by mistake): resampled to the model's millimetre grid it would not fit in memory,
    or would vanish to a few pixels. Cheap: from the header only.

    The axial plane is spanned by the two axes other than the one nearest the patient's S axis,
    as ``DICOMOrient`` would put them.
    """
    plane = [a for a in range(3) if a != slice_axis(image)]
    size, spacing = [image.GetSize()[a] for a in plane], [image.GetSpacing()[a] for a in plane]
    fov = [n * s for n, s in zip(size, spacing)]
    if not all(FIELD_OF_VIEW_MM[0] <= f <= FIELD_OF_VIEW_MM[1] for f in fov):
        raise InputError(f"the image's axial plane is {fov[0]:.3g} × {fov[1]:.3g} mm ({size[0]} × {size[1]} pixels of "
                         f"{spacing[0]:.3g} × {spacing[1]:.3g} mm), which is no thigh or calf scan; check the voxel "
                         "spacing in the file's header (millimetres).")


class LabelAssembler:
    """Builds the volume label map from class probabilities delivered a few slices at a time.

    Memory stays bounded by one canonical uint8 volume plus one chunk: probabilities are resampled
    a few slices at a time, at most about ``RESTORE_CHUNK_ELEMENTS`` (slices × classes × plane) each.
    """

    def __init__(self, prepared: PreparedVolume, table: LabelTable):
        self.prepared = prepared
        self.table = table
        self.canonical = np.zeros(prepared.canonical_shape, dtype=np.uint8)

    def add(self, side: Side, first_slice: int, probabilities: np.ndarray) -> None:
        """Place one leg's predictions for slices ``first_slice ..`` of its crop.

        Args:
            side: which leg's crop the probabilities belong to.
            first_slice: index of the first slice of ``probabilities`` in the crop stack.
            probabilities: (k, C, H, W) softmax probabilities (any float dtype) in that leg's crop
                space, mirrored as the crop is; C = ``table.n_classes``.
        """
        leg = self.prepared.leg(side)
        expected = (self.table.n_classes, leg.rows.size, leg.columns.size)
        if probabilities.ndim != 4 or probabilities.shape[1:] != expected:
            raise ValueError(f"{side} probabilities have shape {probabilities.shape}, expected (k, *{expected})")
        if not 0 <= first_slice <= first_slice + probabilities.shape[0] <= leg.image.shape[0]:
            raise ValueError(f"slices {first_slice}..{first_slice + probabilities.shape[0]} outside the {side} crop")
        y0, y1, x0, x1 = leg.box
        plane = max((y1 - y0) * (x1 - x0), leg.rows.size * leg.columns.size)
        chunk = max(1, RESTORE_CHUNK_ELEMENTS // (self.table.n_classes * plane))
        values = np.array([0] + [self.table.value_of(i, side) for i in range(1, self.table.n_classes)], np.uint8)
        for start in range(0, probabilities.shape[0], chunk):
            classes = _resample_argmax(probabilities[start : start + chunk], leg)
            z0 = first_slice + start
            target = self.canonical[z0 : z0 + classes.shape[0], y0:y1, x0:x1]
            where = leg.owned[None]
            if self.prepared.slices_with_body is not None:  # no body, no labels
                where = where & self.prepared.slices_with_body[z0 : z0 + classes.shape[0], None, None]
            np.copyto(target, values[classes], where=where)

    def image(self) -> sitk.Image:
        """The uint8 volume labels on exactly the input image's grid."""
        return self.prepared.to_input_image(self.canonical)


def restore_labels(prepared: PreparedVolume, probabilities: dict[Side, np.ndarray], table: LabelTable) -> sitk.Image:
    """Volume labels on the input grid from each leg's class probabilities.

    Args:
        prepared: what :func:`prepare_volume` returned for this image.
        probabilities: per side, (n_slices, C, H, W) softmax probabilities in that leg's crop space
            (mirrored as given); every leg of ``prepared`` needs an entry.
        table: the label table (C = ``table.n_classes``).

    Returns:
        uint8 label image on exactly the input grid: right muscles 1..N, left N+1..2N, 0 elsewhere.
    """
    assembler = LabelAssembler(prepared, table)
    for leg in prepared.legs:
        if leg.side not in probabilities:
            raise ValueError(f"no probabilities for the {leg.side} leg")
        assembler.add(leg.side, 0, probabilities[leg.side])
    return assembler.image()


def labels_to_onehot(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, H, W) integer model classes → (n, C, H, W) float32 one-hot "probabilities"."""
    onehot = np.zeros((classes.shape[0], n_classes, *classes.shape[1:]), dtype=np.float32)
    np.put_along_axis(onehot, classes[:, None].astype(np.intp), 1.0, axis=1)
    return onehot


def _intensity_statistics(
    volume: np.ndarray, body: np.ndarray, percentiles: tuple[float, float]
) -> tuple[float, float, float]:
    """Raw intensities that become 0 and 1 (``percentiles`` of body voxels), and the raw value that
    fills crops beyond the image: the median outside the body (air), or the lowest clipped value
    when the body fills the image. Computed on an even subsample of voxels, without masked copies
    of the volume."""
    values, inside = strided_sample(volume).astype(np.float64), strided_sample(body)
    if not inside.any():
        raise InputError("no body was found in the image")
    low, high = (float(v) for v in np.percentile(values[inside], percentiles))
    if not high > low:
        raise InputError("the image has no intensity contrast inside the body")
    fill = float(np.median(values[~inside])) if not inside.all() else low + NORMALISED_RANGE[0] * (high - low)
    return low, high, fill


def _check_image(image: sitk.Image) -> None:
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3D image, got a {image.GetDimension()}D one")
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"expected a real scalar image, got pixels of type {image.GetPixelIDTypeAsString()}")


def _canonical_labels(labels: sitk.Image, image: sitk.Image, table: LabelTable | None) -> np.ndarray:
    """Volume labels checked against the image grid and the table, as a canonical (z, y, x) array."""
    assert table is not None
    if labels.GetDimension() != 3 or not same_grid(labels, image):
        raise InputError("the label map does not lie on the image's grid (size, spacing, origin or direction differ)")
    values = sitk.GetArrayFromImage(canonical(labels))
    if not np.issubdtype(values.dtype, np.integer):
        if not np.array_equal(values, np.round(values)):
            raise InputError("the label map holds non-integer values")
        values = values.astype(np.int64)
    top = 2 * table.n_muscles
    if values.size and (values.min() < 0 or values.max() > top):
        raise InputError(f"the label map holds values outside 0..{top} of the {table.region} label table")
    return values.astype(np.uint8)


def _side_classes(label_volume: np.ndarray, table: LabelTable, side: Side) -> np.ndarray:
    """(z, y, x) uint8 model classes of one side's muscles; the other side's labels become 0."""
    lookup = np.zeros(2 * table.n_muscles + 1, dtype=np.uint8)
    for i in range(1, table.n_classes):
        lookup[table.value_of(i, side)] = i
    return lookup[label_volume]


def _assign_sides(
    regions: list[np.ndarray], body: np.ndarray, oriented: sitk.Image, single_leg_side: Side | None
) -> list[Side]:
    """Patient sides of the leg regions: two are (right, left) by canonical x.

    A lone leg takes ``single_leg_side`` if given, else the sign of the physical x (LPS) of its
    body's centre: negative on the patient's right.
    """
    if len(regions) == 2:
        return ["right", "left"]
    if single_leg_side is not None:
        return [single_leg_side]
    z, y, x = (float(c) for c in ndimage.center_of_mass(body))
    return ["right" if oriented.TransformContinuousIndexToPhysicalPoint((x, y, z))[0] < 0 else "left"]


def _leg_box(footprint: np.ndarray, spacing_yx: tuple[float, float], margin_mm: float) -> tuple[int, int, int, int]:
    """Half-open (y0, y1, x0, x1) box around a (y, x) footprint, widened by the margin, inside the image."""
    rows = np.nonzero(footprint.any(axis=1))[0]
    cols = np.nonzero(footprint.any(axis=0))[0]
    my = int(np.ceil(margin_mm / spacing_yx[0]))
    mx = int(np.ceil(margin_mm / spacing_yx[1]))
    height, width = footprint.shape
    return (
        max(0, int(rows[0]) - my),
        min(height, int(rows[-1]) + 1 + my),
        max(0, int(cols[0]) - mx),
        min(width, int(cols[-1]) + 1 + mx),
    )


def _sample(
    volume: np.ndarray, rows: AxisSampling, columns: AxisSampling, order: int, fill: float, dtype: type
) -> np.ndarray:
    """(z, y, x) canonical array → (z, rows.size, columns.size) crop of ``dtype``; outside the image is ``fill``."""
    return ndimage.affine_transform(
        volume,
        np.array([1.0, rows.step, columns.step]),
        offset=(0.0, rows.start, columns.start),
        output_shape=(volume.shape[0], rows.size, columns.size),
        output=dtype,
        order=order,
        mode="constant",
        cval=fill,
        prefilter=False,
    )


def _resample_argmax(probabilities: np.ndarray, leg: LegCrop) -> np.ndarray:
    """(k, C, H, W) crop probabilities, mirrored as the crop is → (k, box_h, box_w) uint8 winning class.

    The class that wins after bilinear interpolation at each canonical pixel's crop coordinates
    (the mirror is folded into those coordinates). Where the four crop pixels around a point agree
    on their winner, that class also wins the interpolation (a convex combination keeps it on top),
    so probabilities are blended only in cells that straddle a boundary.
    """
    y0, y1, x0, x1 = leg.box
    r0, wr = _linear_cells(leg.rows, np.arange(y0, y1), mirrored=False)
    c0, wc = _linear_cells(leg.columns, np.arange(x0, x1), mirrored=leg.mirrored)
    winners = probabilities.argmax(axis=1).astype(np.uint8)  # (k, H, W)
    top, bottom = winners[:, r0], winners[:, r0 + 1]
    corners = [top[:, :, c0], top[:, :, c0 + 1], bottom[:, :, c0], bottom[:, :, c0 + 1]]
    result = corners[0].copy()
    z, r, c = np.nonzero((corners[0] != corners[1]) | (corners[0] != corners[2]) | (corners[0] != corners[3]))
    if z.size:
        ri, ci, u, v = r0[r], c0[c], wr[r, None], wc[c, None]
        blend = (
            probabilities[z, :, ri, ci] * ((1 - u) * (1 - v))
            + probabilities[z, :, ri, ci + 1] * ((1 - u) * v)
            + probabilities[z, :, ri + 1, ci] * (u * (1 - v))
            + probabilities[z, :, ri + 1, ci + 1] * (u * v)
        )
        result[z, r, c] = blend.argmax(axis=1)
    return result


def _linear_cells(sampling: AxisSampling, canonical: np.ndarray, mirrored: bool) -> tuple[np.ndarray, np.ndarray]:
    """For canonical pixel indices along one axis: the crop pixel before each (i, its neighbour is
    i + 1) and the float32 weight of the neighbour, clamped to the crop."""
    position = (canonical - sampling.start) / sampling.step
    if mirrored:
        position = (sampling.size - 1) - position
    position = np.clip(position, 0, sampling.size - 1)
    before = np.minimum(np.floor(position).astype(np.intp), sampling.size - 2)
    return before, (position - before).astype(np.float32)


def _mirror(array: np.ndarray, mirrored: bool) -> np.ndarray:
    return np.ascontiguousarray(array[..., ::-1]) if mirrored else array


def _to_input_mapping(image: sitk.Image, oriented: sitk.Image) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """The numpy transpose and flips taking the canonical array back to the input array.

    Derived from the two grids (index → physical point), so it is exact whatever DICOMOrient chose.
    """

    def index_to_physical(img: sitk.Image) -> np.ndarray:
        return np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())

    # canonical index = mapping @ input index + shift (SimpleITK x, y, z index order)
    mapping = np.linalg.solve(index_to_physical(oriented), index_to_physical(image))
    rounded = np.rint(mapping)
    permutation = np.abs(rounded)
    if np.abs(mapping - rounded).max() > 1e-3 or not (
        np.array_equal(permutation.sum(axis=0), np.ones(3)) and np.array_equal(permutation.sum(axis=1), np.ones(3))
    ):
        raise RuntimeError("DICOMOrient did not permute the axes exactly")
    axes = [0, 0, 0]
    flips = [False, False, False]
    for a in range(3):  # input SimpleITK axis a is numpy axis 2 - a
        b = int(np.argmax(permutation[:, a]))
        axes[2 - a] = 2 - b
        flips[2 - a] = bool(rounded[b, a] < 0)
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def fit_to(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop or zero-pad the last two axes of ``array`` to (height, width)."""
    h, w = array.shape[-2:]
    out = np.zeros(array.shape[:-2] + (height, width), dtype=array.dtype)
    sh, sw = max(0, (h - height) // 2), max(0, (w - width) // 2)
    dh, dw = max(0, (height - h) // 2), max(0, (width - w) // 2)
    ch, cw = min(h, height), min(w, width)
    out[..., dh:dh + ch, dw:dw + cw] = array[..., sh:sh + ch, sw:sw + cw]
    return out
