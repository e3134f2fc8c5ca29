"""Reading MR volumes and writing / reading muscle label maps and Slicer segmentations.

Images are :class:`SimpleITK.Image` objects in LPS physical space; their origin, spacing and
direction are kept exactly as read. Label images hold **volume labels** (see :mod:`.labels`).

Writers pick the format from the file name:

* ``.seg.nrrd``: a 3D Slicer segmentation (one labelmap layer, label value = volume label), each
  segment named ("right vastus lateralis"), coloured and coded (SNOMED CT type + laterality).
  **Every** label of the table gets a segment, also a muscle that is absent from this volume:
  Slicer users then find the full, consistently ordered list in the Segment Editor and can paint
  a missed muscle into its existing, correctly coded segment.
* ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``: a label map plus a JSON label table beside it
  (``<stem>.json``: value → name, side, colour, terminology).

Readers of segmentations match segments to the label table by **name**, so internal label values,
layers and segment order do not matter.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.atomic import atomic_path
from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import ANATOMICAL_STRUCTURE, Code, LabelTable, Side, VolumeLabel, normalise_name

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)

# 3D Slicer terminology contexts (Slicer's Terminologies module, TerminologyEntry tag). The muscles' codes
# are not in Slicer's bundled lists: the Slicer module ships and loads this context (its terminology.py).
TERMINOLOGY_CONTEXT = "Segmentation category and type - DafneSlicer muscles"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

SEGMENTATION_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
LABEL_TABLE_FORMAT = "dafne-label-table"

_DICOM_DESCRIPTION_TAG = "0008|103e"


# --- reading images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str  # SeriesInstanceUID
    description: str  # SeriesDescription, "" when absent
    files: tuple[str, ...]  # slice files, sorted by GDCM along the slice normal


def list_dicom_series(folder: PathLike) -> list[DicomSeries]:
    """The DICOM series directly inside ``folder`` (not its subfolders)."""
    folder = str(folder)
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        series.append(DicomSeries(uid, _series_description(files[0]), files))
    return series


def _series_description(first_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData(_DICOM_DESCRIPTION_TAG).strip() if reader.HasMetaDataKey(_DICOM_DESCRIPTION_TAG) else ""


class SeveralSeriesError(InputError):
    """A DICOM folder holds several series and none was chosen; ``listing`` names them."""

    def __init__(self, folder: Path, count: int, listing: str) -> None:
        super().__init__(f"{folder} holds {count} DICOM series: {listing}; choose one with --series UID.")
        self.folder, self.count, self.listing = folder, count, listing


def choose_dicom_series(folder: PathLike, series_uid: str | None = None) -> DicomSeries:
    """The series of a DICOM folder that :func:`read_image` reads: the only one, or ``series_uid``.

    Raises InputError (listing the series) for a folder without series, with several and no UID,
    or without the UID asked for.
    """
    folder = Path(folder)
    found = list_dicom_series(folder)
    if not found:
        raise InputError(f"{folder} is a folder without DICOM series; give a DICOM series folder or an image file.")
    listing = "; ".join(f"{s.uid} ({s.description or 'no description'}, {len(s.files)} files)" for s in found)
    if series_uid is None:
        if len(found) > 1:
            raise SeveralSeriesError(folder, len(found), listing)
        chosen = found[0]
    else:
        matches = [s for s in found if s.uid == series_uid]
        if not matches:
            raise InputError(f"{folder} has no DICOM series {series_uid}; it holds: {listing}.")
        chosen = matches[0]
    return chosen


def _read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[sitk.Image, DicomSeries]:
    chosen = choose_dicom_series(folder, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position and orientation, checked below
    image = reader.Execute()
    slices = [_slice_geometry(reader, k) for k in range(len(chosen.files))]
    if image.GetDimension() == 2:  # a one-file series is still a (single-slice) volume
        image = sitk.JoinSeries(image)
    if len(slices) == 1:  # one file: one slice, or a multi-frame object whose spacing ITK read from it
        thickness = _slice_thickness(reader) if image.GetSize()[2] == 1 else None
        if thickness is not None:  # not ITK's 1 mm: volumes along the leg depend on it
            image.SetSpacing((*image.GetSpacing()[:2], thickness))
    else:
        _check_slice_geometry(folder, slices)
    return image, chosen


_POSITION_TAG, _ORIENTATION_TAG = "0020|0032", "0020|0037"
_SPACING_BETWEEN_TAG, _THICKNESS_TAG = "0018|0088", "0018|0050"
SLICE_GAP_TOLERANCE = 0.01  # relative: scanners write positions to a few micrometres, a missing slice is 100 %


def _numbers(reader: sitk.ImageSeriesReader, k: int, tag: str) -> np.ndarray | None:
    if not reader.HasMetaDataKey(k, tag):
        return None
    try:
        return np.array([float(v) for v in reader.GetMetaData(k, tag).split("\\")])
    except ValueError:
        return None


def _slice_geometry(reader: sitk.ImageSeriesReader, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(ImagePositionPatient (3,), ImageOrientationPatient (6,)) of slice ``k`` in mm, or None without them."""
    position, orientation = _numbers(reader, k, _POSITION_TAG), _numbers(reader, k, _ORIENTATION_TAG)
    if position is None or orientation is None or position.size != 3 or orientation.size != 6:
        return None
    return position, orientation


def _slice_thickness(reader: sitk.ImageSeriesReader) -> float | None:
    """A one-slice series' extent along its normal (mm): SpacingBetweenSlices, else SliceThickness."""
    for tag in (_SPACING_BETWEEN_TAG, _THICKNESS_TAG):
        value = _numbers(reader, 0, tag)
        if value is not None and value.size == 1 and np.isfinite(value[0]) and value[0] > 0:
            return float(value[0])
    return None


def _check_slice_geometry(folder: Path, slices: list[tuple[np.ndarray, np.ndarray] | None]) -> None:
    """Refuse a series ITK would read with a wrong geometry (it only warns): slices of several
    orientations (a three-plane localizer), several images at one position (echoes or phases in one
    series) or unevenly spaced slices (a slice missing), each of which would make volumes,
    areas and statistics silently wrong.
    """
    if any(s is None for s in slices):  # without positions ITK cannot do better either: read as it is
        return
    orientations = np.array([s[1] for s in slices])  # type: ignore[index]
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise InputError(f"{folder}: the series' slices have several orientations (a localizer?); choose a series "
                         "of parallel slices.")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    along = np.sort(np.array([s[0] for s in slices]) @ normal)  # type: ignore[index]
    steps = np.diff(along)
    if steps.min() < 1e-3:
        raise InputError(f"{folder}: the series has several images at one slice position (several echoes, phases "
                         "or repetitions in one series?); export one of them as its own series.")
    typical = float(np.median(steps))
    if np.abs(steps - typical).max() > SLICE_GAP_TOLERANCE * typical:
        gap = int(np.argmax(np.abs(steps - typical)))
        raise InputError(f"{folder}: the slices are not evenly spaced ({steps[gap]:.3g} mm between slices "
                         f"{gap + 1} and {gap + 2}, {typical:.3g} mm elsewhere): is a slice missing? Volumes and "
                         "areas would be wrong.")


def read_image(path: PathLike, series_uid: str | None = None, missing_as_nan: bool = False) -> sitk.Image:
    """Read a validated 3D scalar MR volume (NIfTI, NRRD, MHA/MHD or a DICOM series folder):
    :func:`read_image_and_series` without the series."""
    return read_image_and_series(path, series_uid, missing_as_nan)[0]


def read_image_and_series(path: PathLike, series_uid: str | None = None,
                          missing_as_nan: bool = False) -> tuple[sitk.Image, DicomSeries | None]:
    """Read a validated 3D scalar MR volume (NIfTI, NRRD, MHA/MHD or a DICOM series folder), and
    the DICOM series it was read from (None for a file): its files are the sources of a DICOM SEG,
    found here once rather than by listing the folder again.

    The image keeps the file's pixel type and full geometry (LPS origin, spacing in mm, direction).
    A 4D file whose fourth axis has length 1 is read as its 3D volume. ``series_uid`` picks one
    series of a DICOM folder that holds several. Raises :class:`InputError` for anything that is
    not a usable volume (see :func:`validate_image`). ``missing_as_nan``: NaN and infinite voxels
    are kept as NaN ("no value here", as parametric maps mark failed fits) instead of refused.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    series = None
    try:
        if path.is_dir():
            image, series = _read_dicom_folder(path, series_uid)
        else:
            image = sitk.ReadImage(str(path), imageIO=image_io_for(path))
    except RuntimeError as exc:
        raise InputError(f"{path} could not be read as an image (NIfTI, NRRD, MHA or a DICOM folder): "
                         f"{_first_line(exc)}.") from exc
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    validate_image(image, str(path), missing_as_nan)
    if not path.is_dir() and sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "NiftiImageIO":
        image = _non_finite_nifti(path, image, missing_as_nan)
    return image, series


def _non_finite_nifti(path: Path, image: sitk.Image, missing_as_nan: bool) -> sitk.Image:
    """``image`` (read from the NIfTI file ``path``), refused if the file stores NaN or infinite values,
    or with those voxels set back to NaN when ``missing_as_nan``.

    SimpleITK's NIfTI reader (2.5) turns them into 0 (ITK issue #6683), so :func:`validate_image`
    cannot see them: a failed T2 fit's NaN would enter the per-muscle means as 0. The stored values
    are read again with nibabel, only for floating-point files (the only ones that can hold them).
    """
    import nibabel  # the NIfTI reference reader; only this check needs it
    from nibabel.spatialimages import SpatialImage

    try:
        stored = nibabel.load(str(path))
        if not isinstance(stored, SpatialImage) or stored.get_data_dtype().kind not in "fc":
            return image
        proxy = stored.dataobj
        # As stored (float32 stays float32): a scaling slope would make a float64 copy, and cannot create NaN.
        voxels = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
    except Exception as exc:  # noqa: BLE001 - SimpleITK read the file: an unchecked file is not refused
        log.warning("%s: could not check its stored values for NaN (%s)", path, exc)
        return image
    finite = np.isfinite(voxels)
    if finite.all():
        return image
    if not missing_as_nan:
        kind = "NaN" if np.isnan(voxels).any() else "infinite"
        raise InputError(f"{path} contains {kind} voxel values; fix or mask them first.")
    # nibabel's array is (x, y, z[, 1]) of the same stored voxels as SimpleITK's (z, y, x).
    missing = ~finite.reshape(finite.shape[:3]).transpose(2, 1, 0)
    array = sitk.GetArrayFromImage(image)
    if array.shape != missing.shape or not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{path} stores NaN or infinite values in a layout that could not be matched; mask them first.")
    array[missing] = np.nan
    restored = sitk.GetImageFromArray(array)
    restored.CopyInformation(image)
    return restored


# ITK picks a MetaImage reader from a lower-case ".mha"/".mhd" only; other formats it recognises by content.
_META_IMAGE_SUFFIXES = (".mha", ".mhd")


def image_io_for(path: PathLike) -> str:
    """The SimpleITK ImageIO to read ``path`` with: "" (ITK chooses) unless an upper-case MetaImage
    extension (``SCAN.MHA``) would leave ITK without a reader."""
    name = Path(path).name
    return "MetaImageIO" if name.lower().endswith(_META_IMAGE_SUFFIXES) and not name.endswith(_META_IMAGE_SUFFIXES) else ""


def _first_line(exc: BaseException) -> str:
    """SimpleITK errors span many lines of C++ context; keep the informative one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "Exception" not in line and not line.startswith("in ")] or lines or [""]
    return useful[-1].rstrip(".")


def read_header(path: PathLike, kind: str = "an image") -> sitk.ImageFileReader:
    """A reader holding ``path``'s header (size, pixel type, geometry) without its voxels.

    Raises:
        InputError: an empty file, or one SimpleITK cannot read (the reason in one line).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path} is an empty file.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(image_io_for(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path} could not be read as {kind}: {_first_line(exc)}.") from exc
    return reader


def validate_image(image: sitk.Image, name: str, missing_as_nan: bool = False) -> None:
    """Raise :class:`InputError` (one sentence naming ``name``) unless ``image`` is a usable volume.

    Usable: three dimensions (a single slice stored as a 3D volume is fine), one scalar component,
    at least one voxel, finite values (or, ``missing_as_nan``, at least one finite value), not constant.
    """
    dimension = image.GetDimension()
    if dimension == 2:
        raise InputError(f"{name} is a 2D image without a slice axis; save it as a 3D volume (one slice is fine).")
    if dimension != 3:
        raise InputError(f"{name} has {dimension} dimensions; give a single 3D volume (one time point or echo).")
    # SimpleITK counts a complex voxel as one component; numpy would keep only its real part.
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{name} holds complex voxel values; give a magnitude (or real-valued) volume.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         f"(colour, vector or complex data); give a scalar MR volume.")
    if image.GetNumberOfPixels() == 0:
        raise InputError(f"{name} is empty (size {image.GetSize()}).")
    voxels = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(voxels.dtype, np.floating):
        finite = np.isfinite(voxels)
        if not finite.all() and not missing_as_nan:
            kind = "NaN" if np.isnan(voxels).any() else "infinite"
            raise InputError(f"{name} contains {kind} voxel values; fix or mask them first.")
        if not finite.any():
            raise InputError(f"{name} holds no finite value.")
        voxels = voxels[finite] if not finite.all() else voxels
    low, high = voxels.min(), voxels.max()
    if low == high:
        raise InputError(f"{name} is constant (every voxel is {low}); it holds no image.")


# --- label table JSON ----------------------------------------------------------------------------


def terminology(label: VolumeLabel) -> dict[str, Any]:
    """Slicer terminology of one volume label, as ``slicerio`` represents a ``TerminologyEntry``.

    Category "Anatomical Structure", the muscle's SNOMED CT code as type and the laterality as
    type modifier, in DafneSlicer's own context (:data:`TERMINOLOGY_CONTEXT`, shipped by the Slicer module).
    """
    return {
        "contextName": TERMINOLOGY_CONTEXT,
        "category": _triplet(ANATOMICAL_STRUCTURE),
        "type": _triplet(label.muscle.code),
        "typeModifier": _triplet(label.laterality),
        "anatomicContextName": ANATOMIC_CONTEXT,
    }


def _triplet(code: Code) -> list[str]:
    return [code.scheme, code.value, code.meaning]


def label_table_json(table: LabelTable) -> dict[str, Any]:
    """The JSON written beside a label map: value → name, side, colour (RGB 0..255), terminology."""
    return {
        "format": LABEL_TABLE_FORMAT,
        "version": 1,
        "region": table.region,
        "labels": {
            str(label.value): {
                "name": label.name,
                "muscle": label.muscle.name,
                "side": label.side,
                "color": list(label.muscle.color),
                "terminology": terminology(label),
            }
            for label in table.volume_labels()
        },
        "table": table.to_json(),
    }


def label_table_path(labelmap_path: PathLike) -> Path:
    """``out.nii.gz`` → ``out.json`` (the label table beside a label map)."""
    path = Path(labelmap_path)
    name = path.name
    for suffix in LABELMAP_SUFFIXES:
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def read_label_names(table_path: PathLike) -> dict[int, str]:
    """Value → name from a JSON label table file (ours, or a plain ``{"1": "Soleus_R"}`` mapping).

    Raises:
        InputError: unreadable JSON, or entries without an integer value and a name.
    """
    path = Path(table_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a table saved by a Windows editor
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON: {exc}") from exc
    return _names_by_value(data, path)


def _names_by_value(data: Any, source: Path) -> dict[int, str]:
    """Value → name from our label table JSON or a plain ``{"1": "Soleus_R", ...}`` mapping."""
    entries = data.get("labels", data) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise InputError(f"{source} is not a label table (expected an object mapping label values to names).")
    names = {}
    for key, entry in entries.items():
        name = entry.get("name") if isinstance(entry, dict) else entry
        try:
            value = int(key)
        except ValueError:
            raise InputError(f"{source}: label value {key!r} is not an integer.") from None
        if not isinstance(name, str) or value < 0:
            raise InputError(f"{source}: label {key} needs a name and a value of 0 or more.")
        names[value] = name
    return names


# --- name matching -------------------------------------------------------------------------------

_SIDE_WORDS: dict[str, Side] = {"right": "right", "r": "right", "rt": "right", "dx": "right",
                                "left": "left", "l": "left", "lt": "left", "sx": "left"}
# Words that name no muscle, and spelling variants mapped to the label tables' words.
_FILLER_WORDS = {"muscle", "musculus", "m", "of", "the", "head", "caput", "side"}
_WORD_VARIANTS = {"medial": "medialis", "lateral": "lateralis", "fibularis": "peroneus", "peroneal": "peroneus",
                  "peronaeus": "peroneus", "muscles": "muscle"}


def _muscle_words(name: str) -> frozenset[str]:
    words = (_WORD_VARIANTS.get(w, w) for w in normalise_name(re.sub(r"[.,;:()\[\]/]", " ", name)).split())
    return frozenset(w for w in words if w not in _FILLER_WORDS)


def split_side(name: str) -> tuple[str, Side | None]:
    """A label name without its side word (normalised) and the side it names, or None.

    The side may come first or last as a word or abbreviation ("right vastus lateralis",
    "Soleus_R", "soleus.r", "Tibia Lt"); punctuation counts as a separator."""
    words = normalise_name(re.sub(r"[.,;:()\[\]/]", " ", name)).split()
    for position in (0, -1):
        if len(words) > 1 and words[position] in _SIDE_WORDS:
            side = _SIDE_WORDS[words.pop(position)]
            return " ".join(words), side
    return " ".join(words), None


def match_label_name(name: str, table: LabelTable) -> int | None:
    """Volume label value of a segment or label name, or None when it names no label of ``table``.

    The side may come first or last as a word or abbreviation ("right vastus lateralis",
    "vastus lateralis left", "Vastus_Lateralis_L", "Soleus_R", "soleus.r"); case, separators,
    word order and "muscle"/"head" do not matter ("Extensor Longus Digitorum_R" is the right
    extensor digitorum longus, "medial gastrocnemius" is gastrocnemius medialis).
    """
    base, side = split_side(name)
    if side is None:
        return None
    wanted = _muscle_words(base)
    for index, muscle in enumerate(table.muscles, start=1):
        if _muscle_words(muscle.name) == wanted:
            return table.value_of(index, side)
    return None


# --- writing label maps and segmentations --------------------------------------------------------


def _label_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(SEGMENTATION_SUFFIX):
        return "segmentation"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise InputError(f"{path}: unknown output format; name it .seg.nrrd (Slicer segmentation) "
                     f"or {', '.join(LABELMAP_SUFFIXES)} (label map + JSON label table).")


def check_output_path(path: PathLike) -> None:
    """Raise :class:`InputError` now if :func:`write_labels` could not write ``path`` (its extension)."""
    _label_format(Path(path))


def _label_array(label_image: sitk.Image, table: LabelTable) -> np.ndarray:
    """Voxels (z, y, x) of a volume-label image, checked, as uint8 (or uint16 for large tables)."""
    if label_image.GetDimension() != 3 or label_image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the label image must be a 3D scalar image.")
    voxels = sitk.GetArrayViewFromImage(label_image)
    if not np.issubdtype(voxels.dtype, np.integer):
        raise InputError(f"the label image has pixel type {voxels.dtype}; labels must be integers.")
    n_labels = 2 * table.n_muscles
    if voxels.size and (voxels.min() < 0 or voxels.max() > n_labels):
        raise InputError(f"the label image has values outside 0..{n_labels} of the {table.region} label table.")
    return voxels.astype(label_dtype(table))


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4×4 matrix from voxel index (i, j, k) to LPS millimetres."""
    matrix = np.eye(4)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _set_geometry(image: sitk.Image, matrix: np.ndarray) -> None:
    """Inverse of :func:`ijk_to_lps`."""
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(spacing == 0):
        raise InputError("the segmentation has a zero or undefined voxel spacing.")
    if abs(np.linalg.det(matrix[:3, :3] / spacing)) < 1e-6:
        raise InputError("the segmentation's axes are not independent (two along one direction): a damaged header.")
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in (matrix[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(o) for o in matrix[:3, 3]))


def _segment_extents(voxels_zyx: np.ndarray, n_labels: int) -> list[list[int]]:
    """Per label 1..n_labels the [i_min, i_max, j_min, j_max, k_min, k_max] box; empty → [0,-1,0,-1,0,-1]."""
    from scipy import ndimage

    boxes = ndimage.find_objects(voxels_zyx, max_label=n_labels)
    extents = []
    for box in boxes:
        if box is None:
            extents.append([0, -1, 0, -1, 0, -1])
        else:
            z, y, x = box
            extents.append([x.start, x.stop - 1, y.start, y.stop - 1, z.start, z.stop - 1])
    return extents


def _write_segmentation(voxels_zyx: np.ndarray, label_image: sitk.Image, table: LabelTable, target: Path) -> None:
    import slicerio

    labels = table.volume_labels()
    extents = _segment_extents(voxels_zyx, 2 * table.n_muscles)
    segments = [
        {
            "id": label.name.replace(" ", "_"),
            "name": label.name,
            "nameAutoGenerated": False,
            "color": [c / 255.0 for c in label.muscle.color],
            "colorAutoGenerated": False,
            "labelValue": label.value,
            "layer": 0,
            "extent": extents[label.value - 1],
            "terminology": terminology(label),
        }
        for label in labels
    ]
    segmentation = {
        # slicerio writes voxels indexed (i, j, k) ("F" index order); SimpleITK arrays are (k, j, i).
        "voxels": np.ascontiguousarray(voxels_zyx.transpose(2, 1, 0)),
        "ijkToLPS": ijk_to_lps(label_image),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "segments": segments,
    }
    slicerio.write_segmentation(str(target), segmentation)


def write_labels(label_image: sitk.Image, path: PathLike, table: LabelTable) -> list[Path]:
    """Write a volume-label image as a Slicer segmentation or a label map + JSON label table.

    The format follows the file name (see the module docstring); an unknown extension raises
    :class:`InputError` before anything is computed or written. All files appear atomically:
    an error leaves none of them behind (and an existing file unchanged). Returns the written paths.
    """
    path = Path(path)
    kind = _label_format(path)
    voxels = _label_array(label_image, table)
    if kind == "segmentation":
        with atomic_path(path) as tmp:
            _write_segmentation(voxels, label_image, table, tmp)
        return [path]
    table_path = label_table_path(path)
    image = sitk.GetImageFromArray(voxels)
    image.CopyInformation(label_image)
    with atomic_path(table_path) as tmp_table, atomic_path(path) as tmp_image:
        sitk.WriteImage(image, str(tmp_image), useCompression=True)
        tmp_table.write_text(json.dumps(label_table_json(table), indent=1) + "\n", encoding="utf-8")
    return [path, table_path]


# --- reading segmentations -----------------------------------------------------------------------


def read_segmentation(path: PathLike, table: LabelTable) -> tuple[sitk.Image, list[str]]:
    """Volume labels of a segmentation file, matched to ``table`` by segment/label name.

    ``path`` is a Slicer ``.seg.nrrd`` (any layers and label values), or a label map with a JSON
    label table beside it (ours, or a plain ``{"value": "name"}`` mapping such as
    ``{"1": "Soleus_R"}``); a label map without one is taken to hold volume labels of ``table``.
    Returns the uint8/uint16 label image on the segmentation's own grid (a Slicer file may be cropped
    to its segments) and the names that match no label (their voxels become background).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a segmentation file (.seg.nrrd or a label map).")
    if path.name.lower().endswith(SEGMENTATION_SUFFIX):
        return _read_slicer_segmentation(path, table)
    return _read_labelmap(path, table)


def labels_named_by(path: PathLike, table: LabelTable) -> frozenset[int] | None:
    """The volume labels of ``table`` that a segmentation file names (its segments, or the JSON
    label table beside a label map), whether or not they have voxels; None for a label map without a
    table (it is taken to hold every label of ``table``).

    A reference drawn in another labelling scheme (an 11-muscle thigh set without the adductor
    longus) names fewer muscles than the model segments: those it never names cannot be scored.
    """
    path = Path(path)
    if path.name.lower().endswith(SEGMENTATION_SUFFIX):
        import slicerio

        try:
            segments = slicerio.read_segmentation(str(path), skip_voxels=True).get("segments", [])
        except Exception as exc:  # slicerio raises IOError, nrrd errors, ValueError... for bad files
            raise InputError(f"{path} could not be read as a Slicer segmentation: {exc}") from exc
        names = [str(s.get("name", s.get("id", ""))) for s in segments]
    elif label_table_path(path).is_file():
        names = list(read_label_names(label_table_path(path)).values())
    else:
        return None
    return frozenset(v for v in (match_label_name(name, table) for name in names) if v is not None)


# Largest voxel value a segmentation file may hold: lookup arrays are sized by it (uint16 range).
MAX_FILE_LABEL_VALUE = int(np.iinfo(np.uint16).max)


def _checked_max_value(voxels: np.ndarray, path: Path) -> int:
    """Largest voxel value of a file's label voxels; refuses values a lookup array should not be sized by."""
    max_value = voxels.max() if voxels.size else 0
    if max_value > MAX_FILE_LABEL_VALUE:
        raise InputError(f"{path} has label values up to {max_value}; label values above "
                         f"{MAX_FILE_LABEL_VALUE} are not supported.")
    return int(max_value)


def _lookup(names: dict[int, str], table: LabelTable, max_value: int) -> tuple[np.ndarray, list[str]]:
    """Array mapping a file's label value 0..``max_value`` to our volume label (0 for unmatched), and the
    unmatched names.

    Sized by the largest VOXEL value only: the values a file names are not trusted to size anything,
    and a name whose value lies above it labels no voxel (unmatched names are still reported).
    """
    lut = np.zeros(max_value + 1, dtype=np.uint16)
    unknown = []
    for value, name in sorted(names.items()):
        target = match_label_name(name, table)
        if target is None:
            unknown.append(name)
        elif 0 <= value <= max_value:
            lut[value] = target
    return lut, unknown


def label_dtype(table: LabelTable) -> type:
    """The pixel type of volume labels of ``table``: uint8 up to 255 values, else uint16."""
    return np.uint8 if 2 * table.n_muscles <= np.iinfo(np.uint8).max else np.uint16


def _read_slicer_segmentation(path: Path, table: LabelTable) -> tuple[sitk.Image, list[str]]:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises IOError, nrrd errors, ValueError... for bad files
        raise InputError(f"{path} could not be read as a Slicer segmentation: {exc}") from exc
    voxels = segmentation.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise InputError(f"{path} holds no 3D segmentation voxels.")
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    _require_whole_numbers(layers, path)
    output = np.zeros(layers.shape[1:], dtype=label_dtype(table))  # (i, j, k)
    unknown = []
    segments = _segment_layers(segmentation.get("segments", []), layers.shape[0], path)
    overlap = 0
    for layer_index in range(layers.shape[0]):
        layer = layers[layer_index]
        names = {value: name for layer_of, value, name in segments if layer_of == layer_index}
        lut, layer_unknown = _lookup(names, table, _checked_max_value(layer, path))
        unknown += layer_unknown
        mapped = lut[layer.astype(np.int64, copy=False).clip(0, len(lut) - 1)]
        overlap += int(np.count_nonzero((mapped > 0) & (output > 0)))
        np.copyto(output, mapped.astype(output.dtype), where=mapped > 0)
    if overlap:  # Slicer lets segments of different layers overlap; a volume label holds one muscle per voxel
        log.warning("%s: %d voxels belong to segments of several layers; each keeps the segment of its last layer",
                    path, overlap)
    image = sitk.GetImageFromArray(np.ascontiguousarray(output.transpose(2, 1, 0)))
    _set_geometry(image, np.asarray(segmentation["ijkToLPS"], dtype=float))
    return image, unknown


def _segment_layers(segments: list[dict], n_layers: int, path: Path) -> list[tuple[int, int, str]]:
    """(layer, label value, name) of each segment of a ``.seg.nrrd``.

    Files of Slicer before 4.11 name no layer and no label value: one segment per layer, drawn
    with 1, as Slicer itself reads them (a missing layer is the segment's index).
    """
    found = []
    for index, segment in enumerate(segments):
        try:
            layer = int(segment.get("layer", index if n_layers > 1 else 0))
            value = int(segment.get("labelValue", 1))
        except (TypeError, ValueError):
            raise InputError(f"{path}: segment {index} has a layer or label value that is not a number.") from None
        found.append((layer, value, str(segment.get("name", segment.get("id", "")))))
    return found


def _require_whole_numbers(voxels: np.ndarray, path: Path) -> None:
    """Refuse label voxels that are not whole numbers (fractions, NaN, complex): an image, not labels."""
    if np.issubdtype(voxels.dtype, np.integer) or voxels.dtype == np.bool_:
        return
    if np.iscomplexobj(voxels) or not np.all(np.isfinite(voxels)) or not np.all(np.mod(voxels, 1) == 0):
        raise InputError(f"{path} holds non-integer values; it is an image, not a label map.")


def read_label_volume(path: PathLike) -> sitk.Image:
    """A 3D scalar label map file, checked to hold only whole-number values (any pixel type).

    Raises:
        InputError: unreadable, not 3D scalar, or non-integer values (an image, not a label map).
    """
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path), imageIO=image_io_for(path))
    except RuntimeError as exc:
        raise InputError(f"{path} could not be read as a label map: {_first_line(exc)}.") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} is not a 3D scalar label map.")
    _require_whole_numbers(sitk.GetArrayViewFromImage(image), path)
    return image


def _read_labelmap(path: Path, table: LabelTable) -> tuple[sitk.Image, list[str]]:
    image = read_label_volume(path)
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.size and voxels.min() < 0:
        raise InputError(f"{path} has negative label values.")
    max_value = _checked_max_value(voxels, path)  # before the cast: 1e30 must not wrap around
    values = voxels.astype(np.int64)
    table_path = label_table_path(path)
    if table_path.is_file():
        lut, unknown = _lookup(read_label_names(table_path), table, max_value)
    else:
        n_labels = 2 * table.n_muscles
        lut = np.zeros(max(max_value, n_labels) + 1, dtype=np.uint16)
        lut[1 : n_labels + 1] = np.arange(1, n_labels + 1)
        unknown = [f"label value {v}" for v in np.unique(values[values > n_labels]).tolist()]
    output = sitk.GetImageFromArray(lut[values].astype(label_dtype(table)))
    output.CopyInformation(image)
    return output, unknown


__all__ = [
    "ANATOMIC_CONTEXT", "DicomSeries", "LABELMAP_SUFFIXES", "SEGMENTATION_SUFFIX", "TERMINOLOGY_CONTEXT",
    "check_output_path", "ijk_to_lps", "label_table_json", "label_table_path", "list_dicom_series",
    "match_label_name", "read_image", "read_label_names", "read_label_volume", "read_segmentation", "terminology",
    "validate_image", "write_labels",
]
