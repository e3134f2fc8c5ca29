"""DICOM Segmentation objects (DICOM SEG) of a muscle label map, written with highdicom.

The SEG references the source series and study (same patient, study, frame of reference), holds
one segment per muscle present, coded as Slicer and dcmqi code them: category SNOMED CT
"Anatomical Structure", the muscle's SNOMED CT type and the laterality as type modifier, with the
muscle's colour as recommended display colour. Frames lie on the source slices (one per source
image holding the muscle; empty frames are left out). Read it back with
:func:`read_dicom_seg` (labels on the source series' grid) or ``highdicom.seg.segread``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.atomic import atomic_path
from dafne_logic.core.errors import DafneError, InputError
from dafne_logic.core.io import PathLike, label_dtype, match_label_name
from dafne_logic.core.labels import ANATOMICAL_STRUCTURE, Code, LabelTable

DICOM_SEG_SUFFIX = ".dcm"

log = logging.getLogger(__name__)


class DicomSegUnavailable(DafneError):
    """highdicom cannot be imported here (e.g. Slicer 5.10: pydicom 2 and numpy 2, which no highdicom runs on)."""


_SAVE_INSTEAD = "Save the segmentation as .seg.nrrd instead."


def _highdicom(advice: str = _SAVE_INSTEAD):  # -> the highdicom module
    """highdicom, or a sentence saying why DICOM SEG is not available in this Python, ending with ``advice``."""
    try:
        import highdicom
    except ImportError as exc:
        raise DicomSegUnavailable(
            "DICOM SEG needs the highdicom package, which needs pydicom 3 (Slicer 5.11 or later; "
            f"outside Slicer: pip install highdicom). It could not be loaded here ({exc}). {advice}") from exc
    return highdicom


def require_dicom_seg_support() -> None:
    """Raise :class:`DicomSegUnavailable` when DICOM SEG cannot be written here (checked before long work)."""
    _highdicom()


def _coded(code: Code):  # -> highdicom.sr.CodedConcept
    hd = _highdicom()
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


SLICE_TOLERANCE = 0.05  # voxels: how far a source image's position may lie from a label slice's


def _read_sources(files: Sequence[str], labels: sitk.Image):  # -> list[pydicom.Dataset]
    """The source datasets in the label image's k order (found from each image's position, whatever
    order the files come in); refuses a series whose slices the labels do not lie on."""
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    size_x, size_y, size_z = labels.GetSize()
    if len(datasets) != size_z or any((int(ds.Rows), int(ds.Columns)) != (size_y, size_x) for ds in datasets):
        raise InputError(f"the segmentation ({size_x}×{size_y}×{size_z}) does not lie on the DICOM series "
                         f"({len(datasets)} images); a DICOM SEG needs the segmentation on its source slices.")
    # Continuous index of each image's first pixel: (0, 0, k) when the labels lie on its slice.
    index = np.array([labels.TransformPhysicalPointToContinuousIndex([float(v) for v in ds.ImagePositionPatient])
                      for ds in datasets])
    k = np.rint(index[:, 2]).astype(int)
    # A twentieth of a voxel: positions are often stored with 3 decimals (mm), which an oblique
    # series' exact geometry misses by far more than 1e-3 voxel.
    on_slices = np.allclose(index[:, :2], 0.0, atol=SLICE_TOLERANCE) and np.allclose(index[:, 2], k, atol=SLICE_TOLERANCE)
    if not on_slices or sorted(k.tolist()) != list(range(size_z)):
        raise InputError("the segmentation's slices do not match the DICOM series' slice positions; "
                         "a DICOM SEG needs the segmentation on its source slices.")
    # Rows and columns run along the labels' x and y axes with their spacing (a transposed or
    # resampled in-plane grid has the right first-pixel positions but would be written wrongly).
    direction = np.reshape(labels.GetDirection(), (3, 3))
    for ds in datasets:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        spacing = np.asarray([float(v) for v in ds.PixelSpacing])  # (between rows, between columns)
        if not (np.allclose(orientation, np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-2)
                and np.allclose(spacing, labels.GetSpacing()[1::-1], rtol=1e-3)):
            raise InputError("the segmentation's in-plane axes or pixel spacing differ from the DICOM series'; "
                             "a DICOM SEG needs the segmentation on its source slices.")
    return [datasets[i] for i in np.argsort(k)]


def write_dicom_seg(labels: sitk.Image, source_files: Sequence[str], table: LabelTable, path: PathLike, *,
                    algorithm_name: str = "DafneSlicer", algorithm_version: str = "", automatic: bool = True,
                    series_description: str = "Muscle segmentation") -> list[int]:
    """Write ``labels`` (volume labels of ``table`` on the source series' grid) as a DICOM SEG, atomically.

    ``source_files`` are the series' files, in any order (e.g. :attr:`dafne_logic.core.io.DicomSeries.files`
    or the files of a volume Slicer loaded from DICOM). ``automatic`` False marks a corrected result
    (algorithm type SEMIAUTOMATIC). Returns the volume label values written, in segment-number order
    (segment n holds label ``values[n-1]``). Raises InputError when no muscle is present or the
    labels do not lie on the source slices.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every attribute module it copies
    voxels = sitk.GetArrayFromImage(labels)  # (k, j, i) = (frames, rows, columns)
    by_value = {label.value: label for label in table.volume_labels()}
    present = [int(v) for v in np.unique(voxels) if int(v) in by_value]
    if not present:
        raise InputError("the segmentation holds no muscle; there is nothing to write as DICOM SEG.")
    sources = _read_sources(source_files, labels)
    # Segment numbers must run 1..M: renumber the present labels in table order.
    lookup = np.zeros(int(voxels.max()) + 1, np.uint16)
    lookup[present] = np.arange(1, len(present) + 1)
    segment_numbers = lookup[voxels]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version or "unknown", family=codes.cid7162.ArtificialIntelligence)
    # Display colours need highdicom >= 0.23 (pydicom 3); Slicer 5.10's pydicom 2 gets highdicom 0.22,
    # whose segments then carry no recommended colour (optional: viewers pick their own).
    with_colour = hasattr(hd.color.CIELabColor, "from_rgb")
    descriptions = []
    for number, value in enumerate(present, start=1):
        label = by_value[value]
        colour = {"display_color": hd.color.CIELabColor.from_rgb(*label.muscle.color)} if with_colour else {}
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.name,
            segmented_property_category=_coded(ANATOMICAL_STRUCTURE),
            segmented_property_type=_coded(label.muscle.code),
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if automatic
                            else hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC),
            algorithm_identification=algorithm,
            **colour,
        )
        # Laterality as the type's modifier, as Slicer and dcmqi write it ("right" + "soleus").
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(label.laterality)]
        descriptions.append(description)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=segment_numbers, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_series_number(sources),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="DafneSlicer",
        manufacturer_model_name=algorithm_name, software_versions=algorithm_version or "unknown",
        device_serial_number="0", series_description=series_description,
    )
    target = Path(path)
    with atomic_path(target) as tmp:
        seg.save_as(tmp)
    return present


def _series_number(sources: Sequence) -> int:
    """One above the source series' number, so viewers list the SEG beside it."""
    number = getattr(sources[0], "SeriesNumber", None)
    return int(number) + 1000 if number not in (None, "") else 1000


_DICOM_MAGIC_OFFSET = 128  # a DICOM file: a 128-byte preamble, then "DICM"


def is_dicom_seg_file(path: PathLike) -> bool:
    """Whether ``path`` is a DICOM file (not a folder) that is a Segmentation: named ``.dcm``, or a file
    whose header says so (PACS exports often have no extension)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == DICOM_SEG_SUFFIX:
        return True
    with path.open("rb") as f:
        head = f.read(_DICOM_MAGIC_OFFSET + 4)
    if head[_DICOM_MAGIC_OFFSET:] != b"DICM":
        return False
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "")) == "SEG"
    except Exception:  # an unreadable DICOM file: not a SEG; the label-map reader will say what it is
        return False


def read_dicom_seg(path: PathLike, image: sitk.Image, source_files: Sequence[str],
                   table: LabelTable) -> tuple[sitk.Image, list[str]]:
    """A DICOM SEG of the series ``image`` was read from, as volume labels of ``table`` on ``image``'s grid.

    Segments are matched to labels by their label ("right soleus", "Soleus_R": as
    :func:`dafne_logic.core.io.match_label_name`), else by their SNOMED CT type and laterality
    modifier where that pair belongs to one label only (the tables give both heads of the biceps
    femoris one code, and both gastrocnemii another), so a SEG written by Slicer or another tool
    with its own segment names is read too. Binary or fractional (a voxel belongs to a segment from
    half its maximum); where matched segments overlap, the later segment's label wins (as with the
    layers of a ``.seg.nrrd``), with a warning. Source images without a frame are empty.
    Returns the labels and the segments matching no label (their voxels become background).
    Raises InputError for a file that is no DICOM SEG or does not segment this series.
    """
    hd = _highdicom("Read the DICOM SEG where highdicom runs, or measure a .seg.nrrd of the segmentation.")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # pydicom and highdicom raise many kinds for a file that is no SEG
        raise InputError(f"{path} could not be read as a DICOM SEG: {exc}") from exc
    codes = Counter((label.muscle.code.value, label.laterality.value) for label in table.volume_labels())
    by_code = {(label.muscle.code.value, label.laterality.value): label.value for label in table.volume_labels()
               if codes[(label.muscle.code.value, label.laterality.value)] == 1}
    wanted: dict[int, int] = {}  # segment number -> volume label
    unknown = []
    for segment in seg.SegmentSequence:
        value = match_label_name(str(segment.SegmentLabel), table)
        if value is None:
            value = by_code.get(_type_and_laterality(segment))
        if value is None:
            unknown.append(str(segment.SegmentLabel))
        else:
            wanted[int(segment.SegmentNumber)] = value
    sources = _read_sources(source_files, image)  # in the image's k order; refuses another grid
    referenced = {str(item.SeriesInstanceUID) for item in getattr(seg, "ReferencedSeriesSequence", [])}
    if str(sources[0].SeriesInstanceUID) not in referenced:
        raise InputError(f"{path} does not segment this DICOM series (it references "
                         f"{', '.join(sorted(referenced)) or 'no series'}); give the series it was made on.")
    voxels = np.zeros(sitk.GetArrayViewFromImage(image).shape, label_dtype(table))
    if wanted:
        numbers = sorted(wanted)
        try:
            masks = seg.get_pixels_by_source_instance(
                [str(ds.SOPInstanceUID) for ds in sources], segment_numbers=numbers, combine_segments=False,
                assert_missing_frames_are_empty=True)  # (k, rows, columns, segment)
        except (ValueError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
            raise InputError(f"{path} could not be read on this DICOM series ({exc}); give the series it was made "
                             "on, with a SEG whose frames name their source images.") from exc
        inside = masks >= (0.5 if np.issubdtype(masks.dtype, np.floating) else 1)
        overlapping = int((inside.sum(axis=-1) > 1).sum())
        if overlapping:
            log.warning("%s: %d voxels lie in more than one muscle's segment; each is given the later segment's muscle",
                        path, overlapping)
        for index, number in enumerate(numbers):
            voxels[inside[..., index]] = wanted[number]
    labels = sitk.GetImageFromArray(voxels)
    labels.CopyInformation(image)
    return labels, unknown


def _type_and_laterality(segment) -> tuple[str, str | None]:  # segment: a pydicom SegmentSequence item
    """(SNOMED CT type code, laterality modifier code or None) of a segment description."""
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    modifiers = getattr(kind, "SegmentedPropertyTypeModifierCodeSequence", None) or []
    return str(kind.CodeValue), (str(modifiers[0].CodeValue) if modifiers else None)
