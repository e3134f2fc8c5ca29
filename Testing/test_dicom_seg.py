"""DICOM SEG output: written with highdicom, read back with pydicom/highdicom (segments, codes,
references, geometry, masks); refused with one sentence when there is no DICOM source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_seg_readback import segment_numbers_as_labels

from dafne_logic.cli import main
from dafne_logic.core.dicom_seg import DicomSegUnavailable, write_dicom_seg
from dafne_logic.core.errors import InputError
from dafne_logic.core.io import choose_dicom_series, read_image
from dafne_logic.core.labels import LEG
from dafne_logic.phantoms.dicom import write_dicom_series
from dafne_logic.phantoms.images import make_phantom


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    """A 4-slice calf phantom as a DICOM MR series, with its exact labels on the series' grid."""
    folder = tmp_path_factory.mktemp("dicom") / "series"
    image, labels = make_phantom("leg", (4, 96, 128), contrast="t1", seed=2)
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    labels[:, :, 3] = 0 * labels[:, :, 3]  # an empty slice: its frames are left out, read back empty
    write_dicom_series(image, folder, series_number=7)
    series = choose_dicom_series(folder)
    labels.CopyInformation(read_image(folder))
    return series, labels


def test_dicom_seg_reads_back_with_segments_codes_references_and_masks(dicom_case, tmp_path):
    series, labels = dicom_case
    out = tmp_path / "result.dcm"
    values = write_dicom_seg(labels, series.files[::-1], LEG, out, algorithm_version="2")  # any file order
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v)
    assert values == present and len(values) == 12

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    seg = pydicom.dcmread(out)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == sources[0].PatientID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {ds.SOPInstanceUID for ds in sources}

    by_name = {item.SegmentLabel: item for item in seg.SegmentSequence}
    soleus = by_name["right soleus"]
    assert soleus.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert soleus.SegmentedPropertyTypeCodeSequence[0].CodeValue == LEG.muscles[0].code.value
    modifier = soleus.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodingSchemeDesignator, modifier.CodeValue) == ("SCT", "24028007")
    left = by_name["left soleus"].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert left.CodeMeaning == "Left"
    assert soleus.SegmentAlgorithmType == "AUTOMATIC"

    # Frames lie on the source slices: each frame's position is its source image's.
    position_of = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in sources}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx(position_of[source_uid])

    back = segment_numbers_as_labels(out, [ds.SOPInstanceUID for ds in sources], values)
    np.testing.assert_array_equal(back, sitk.GetArrayFromImage(labels))


def test_labels_off_the_source_slices_are_refused(dicom_case, tmp_path):
    series, labels = dicom_case
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(o + 5.0 for o in labels.GetOrigin()))
    with pytest.raises(InputError, match="source slices"):
        write_dicom_seg(shifted, series.files, LEG, tmp_path / "x.dcm")
    with pytest.raises(InputError, match="source slices"):
        write_dicom_seg(labels[:, :, :3], series.files, LEG, tmp_path / "x.dcm")
    assert not list(tmp_path.iterdir())


def _oblique_series_with_rounded_positions(folder: Path) -> tuple[list[str], sitk.Image]:
    """A 6-slice oblique series of 0.5 mm pixels whose ImagePositionPatient is stored to 2 decimals (mm),
    up to a hundredth of a pixel off its exact place; and labels on the grid SimpleITK reads from it."""
    image, labels = make_phantom("leg", (6, 48, 64), contrast="t1", seed=3)
    tilt = sitk.Euler3DTransform((0, 0, 0), 0.2, 0.1, 0.0)
    image.SetSpacing((0.5, 0.5, 4.0))
    image.SetDirection(tilt.GetMatrix())
    files = write_dicom_series(image, folder)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [round(float(v), 2) for v in ds.ImagePositionPatient]
        ds.save_as(f)
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    labels.CopyInformation(read_image(folder))
    return [str(f) for f in files], labels


def test_an_oblique_series_with_positions_rounded_to_10_micrometres_is_written_and_reads_back(tmp_path):
    files, labels = _oblique_series_with_rounded_positions(tmp_path / "series")
    out = tmp_path / "result.dcm"
    values = write_dicom_seg(labels, files, LEG, out)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    np.testing.assert_array_equal(segment_numbers_as_labels(out, uids, values), sitk.GetArrayFromImage(labels))


def test_labels_with_the_in_plane_axes_swapped_are_refused_though_the_first_pixels_match(tmp_path):
    files, labels = _oblique_series_with_rounded_positions(tmp_path / "series")
    swapped = sitk.Image(labels)
    d = np.reshape(labels.GetDirection(), (3, 3))
    swapped.SetDirection(tuple(d[:, [1, 0, 2]].ravel()))  # same origin: every slice's first pixel is where it was
    with pytest.raises(InputError, match="in-plane axes or pixel spacing"):
        write_dicom_seg(swapped, files, LEG, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def _count_listings(monkeypatch) -> list:
    """Each listing of a DICOM folder's series (headers of every file read), recorded."""
    import dafne_logic.core.io as io

    listings: list = []
    real_listing = io.list_dicom_series
    monkeypatch.setattr(io, "list_dicom_series", lambda *a, **k: listings.append(a) or real_listing(*a, **k))
    return listings


def test_segment_writes_a_dicom_seg_of_a_dicom_series(dicom_case, tmp_path, capsys, monkeypatch):
    series, _ = dicom_case
    folder = str(Path(series.files[0]).parent)
    out = tmp_path / "result.dcm"
    listings = _count_listings(monkeypatch)
    assert main(["segment", folder, "--model", "leg", "--output", str(out), "--no-progress"]) == 0
    assert len(listings) == 1  # the folder's headers are read once (a network share of thousands of files)
    seg = pydicom.dcmread(out)
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) >= 10
    assert "DafneSlicer leg" in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName


def test_without_highdicom_a_dicom_seg_is_one_sentence_and_nothing_is_written(dicom_case, tmp_path, capsys, monkeypatch):
    """Slicer 5.10 (pydicom 2, numpy 2) can run no highdicom release: the export says why, writes nothing."""
    import sys

    series, labels = dicom_case
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    import dafne_logic.inference.segment

    def no_segmentation(*args, **kwargs):
        raise AssertionError("the command should refuse before segmenting")
    monkeypatch.setattr(dafne_logic.inference.segment, "segment_volume", no_segmentation)
    with pytest.raises(DicomSegUnavailable, match="needs pydicom 3 .* Save the segmentation as .seg.nrrd"):
        write_dicom_seg(labels, series.files, LEG, tmp_path / "x.dcm")
    folder = str(Path(series.files[0]).parent)
    out = tmp_path / "result.dcm"
    assert main(["segment", folder, "--model", "leg", "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "DICOM SEG needs the highdicom package" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_dicom_seg_of_a_non_dicom_input_is_one_sentence_and_writes_nothing(tmp_path, capsys):
    image, _ = make_phantom("leg", (2, 64, 96), seed=1)
    source = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(source))
    out = tmp_path / "result.dcm"
    assert main(["segment", str(source), "--model", "leg", "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a DICOM series folder" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_dicom_seg_outputs_are_planned_only_for_dicom_folders(tmp_path):
    from dafne_logic.commands.segment import plan_outputs

    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    assert plan_outputs(folders, tmp_path / "out", ".dcm") == [tmp_path / "out" / "a.dcm", tmp_path / "out" / "b.dcm"]
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    with pytest.raises(InputError, match="not a DICOM series folder"):
        plan_outputs([folders[0], scan], tmp_path / "out", ".dcm")


def _stats_rows(args: list[str], out: Path) -> dict[str, dict[str, str]]:
    import csv

    assert main(["stats", *args, "--region", "leg", "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_stats_measures_a_dicom_seg_like_the_label_map_it_was_written_from(dicom_case, tmp_path, monkeypatch):
    series, labels = dicom_case
    folder = Path(series.files[0]).parent
    seg_path, map_path = tmp_path / "result.dcm", tmp_path / "labels.nrrd"  # NIfTI would round the spacing
    write_dicom_seg(labels, series.files, LEG, seg_path)
    sitk.WriteImage(labels, str(map_path))
    listings = _count_listings(monkeypatch)
    from_seg = _stats_rows([str(folder), str(seg_path)], tmp_path / "seg.csv")
    assert len(listings) == 1  # as for segment
    from_map = _stats_rows([str(folder), str(map_path)], tmp_path / "map.csv")
    assert from_seg == from_map
    assert int(from_seg["right soleus"]["voxel_count"]) == int((sitk.GetArrayViewFromImage(labels) == 1).sum()) > 0


def test_a_dicom_seg_whose_segments_have_other_names_is_matched_by_its_codes(dicom_case, tmp_path):
    """Slicer or another tool may name segments "Segment_1": the SNOMED CT type and laterality still say."""
    series, labels = dicom_case
    folder = Path(series.files[0]).parent
    seg_path = tmp_path / "result.dcm"
    write_dicom_seg(labels, series.files, LEG, seg_path)
    seg = pydicom.dcmread(seg_path)
    for number, item in enumerate(seg.SegmentSequence, start=1):
        item.SegmentLabel = f"Segment_{number}"
    seg.save_as(seg_path)
    rows = _stats_rows([str(folder), str(seg_path)], tmp_path / "seg.csv")
    arrays = sitk.GetArrayViewFromImage(labels)
    assert int(rows["left soleus"]["voxel_count"]) == int((arrays == 7).sum()) > 0
    assert int(rows["right soleus"]["voxel_count"]) == int((arrays == 1).sum()) > 0


def test_a_dicom_seg_needs_the_series_it_segments(dicom_case, tmp_path, capsys):
    series, labels = dicom_case
    seg_path = tmp_path / "result.dcm"
    write_dicom_seg(labels, series.files, LEG, seg_path)
    image_file = tmp_path / "image.nii.gz"
    sitk.WriteImage(read_image(Path(series.files[0]).parent), str(image_file))
    other = tmp_path / "other"
    image, _ = make_phantom("leg", (4, 96, 128), contrast="t1", seed=2)
    write_dicom_series(image, other, series_number=8)  # same grid, other instances
    for case in (image_file, other):
        out = tmp_path / "out" / "stats.csv"
        rc = main(["stats", str(case), str(seg_path), "--region", "leg", "--csv", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert ("DICOM series folder it segments" if case == image_file else "does not segment this DICOM series") in err
        assert not (tmp_path / "out").exists()


def _seg_of(series, masks: np.ndarray, segments: list[tuple[str, str, str | None]], path: Path, *,
            fractional: bool = False, first: int = 0) -> Path:
    """A SEG made by highdicom directly (as another tool would): ``masks`` (frames, rows, columns,
    segments) on the series' images ``first``.. in k order; ``segments``: (label, SNOMED type, laterality)."""
    import highdicom as hd

    sources = sorted((pydicom.dcmread(f) for f in series.files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    descriptions = []
    for number, (label, code, side) in enumerate(segments, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        if side:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(side, "SCT", "side")]
        descriptions.append(description)
    kind = hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY
    hd.seg.Segmentation(
        source_images=sources[first:first + masks.shape[0]], pixel_array=masks, segmentation_type=kind,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="another tool", manufacturer_model_name="x", software_versions="1",
        device_serial_number="0").save_as(path)
    return path


RIGHT, LEFT = "24028007", "7771000"


def test_dicom_segs_of_other_tools_overlapping_fractional_partial_or_unordered_are_read(dicom_case, tmp_path, caplog):
    from dafne_logic.core.dicom_seg import read_dicom_seg

    series, labels = dicom_case
    image = read_image(Path(series.files[0]).parent)
    soleus, tibialis = LEG.muscles[0].code.value, LEG.muscles[3].code.value
    masks = np.zeros((4, 96, 128, 3), np.uint8)
    masks[:, 10:30, 10:30, 0] = 1  # right soleus
    masks[:, 25:40, 10:30, 1] = 1  # right tibialis anterior, over the soleus' rows 25..29
    masks[:, 0:50, 0:50, 2] = 1    # a compartment no label matches, over both
    seg = _seg_of(series, masks, [("Segment_1", soleus, RIGHT), ("Segment_2", tibialis, RIGHT),
                                  ("leg compartment", "0000", None)], tmp_path / "overlap.dcm")
    read, unknown = read_dicom_seg(seg, image, series.files, LEG)
    voxels = sitk.GetArrayViewFromImage(read)
    assert unknown == ["leg compartment"] and "more than one muscle" in caplog.text
    assert (voxels == 1).sum() == 4 * 15 * 20 and (voxels == 4).sum() == 4 * 15 * 20  # the later segment wins
    # Fractional: a voxel belongs from half the maximum; only rows 1..2 referenced (a tool writing what it segments).
    fraction = np.zeros((2, 96, 128, 1), np.float32)
    fraction[:, 10:20, 10:20, 0] = 1.0
    fraction[:, 20:22, 10:20, 0] = 0.4
    seg = _seg_of(series, fraction, [("right soleus", soleus, RIGHT)], tmp_path / "fractional.dcm", fractional=True,
                  first=1)
    voxels = sitk.GetArrayFromImage(read_dicom_seg(seg, image, series.files, LEG)[0])
    assert (voxels == 1).sum(axis=(1, 2)).tolist() == [0, 100, 100, 0]
    # Segments listed out of their number order are still told apart by SegmentNumber.
    ordered = tmp_path / "ordered.dcm"
    write_dicom_seg(labels, series.files, LEG, ordered)
    shuffled = pydicom.dcmread(ordered)
    shuffled.SegmentSequence = pydicom.Sequence(list(shuffled.SegmentSequence)[::-1])
    shuffled.save_as(tmp_path / "shuffled.dcm")
    back = read_dicom_seg(tmp_path / "shuffled.dcm", image, series.files, LEG)[0]
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))


def test_a_code_two_muscles_share_is_not_guessed(dicom_case, tmp_path):
    """Both gastrocnemii carry one SNOMED CT code in the table: a renamed segment of either is left out."""
    from dafne_logic.core.dicom_seg import read_dicom_seg

    series, _ = dicom_case
    image = read_image(Path(series.files[0]).parent)
    medialis, lateralis = LEG.muscles[1], LEG.muscles[2]
    assert medialis.code == lateralis.code  # what makes the code ambiguous
    masks = np.zeros((4, 96, 128, 2), np.uint8)
    masks[:, 10:20, 10:20, 0] = 1
    masks[:, 30:40, 10:20, 1] = 1
    seg = _seg_of(series, masks, [("Segment_1", medialis.code.value, LEFT), ("Segment_2", lateralis.code.value, LEFT)],
                  tmp_path / "gastrocnemii.dcm")
    read, unknown = read_dicom_seg(seg, image, series.files, LEG)
    assert unknown == ["Segment_1", "Segment_2"] and not sitk.GetArrayViewFromImage(read).any()


def test_a_dicom_seg_without_a_file_extension_is_recognised(dicom_case, tmp_path):
    series, labels = dicom_case
    folder = Path(series.files[0]).parent
    write_dicom_seg(labels, series.files, LEG, tmp_path / "result.dcm")
    (tmp_path / "result.dcm").rename(tmp_path / "IM0001")  # as PACS exports name files
    rows = _stats_rows([str(folder), str(tmp_path / "IM0001")], tmp_path / "seg.csv")
    assert int(rows["right soleus"]["voxel_count"]) == int((sitk.GetArrayViewFromImage(labels) == 1).sum()) > 0
