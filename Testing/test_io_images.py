"""Reading MR volumes: file formats, DICOM series, geometry, and every kind of bad input."""

from __future__ import annotations

import locale
import re

import numpy as np
import pytest
import SimpleITK as sitk
from test_io_support import assert_same_geometry, make_image, oblique_direction

from dafne_logic.core.errors import InputError
from dafne_logic.core.io import list_dicom_series, read_image, validate_image

SERIES_A = "1.2.826.0.1.3680043.2.1125.7001"
SERIES_B = "1.2.826.0.1.3680043.2.1125.7002"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_keeps_voxels_and_oblique_geometry(tmp_path, suffix):
    image = make_image()
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(image, str(path))
    read = read_image(path)
    assert_same_geometry(read, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_single_slice_volume_is_valid(tmp_path):
    image = make_image(shape_zyx=(1, 6, 7))
    sitk.WriteImage(image, str(tmp_path / "slice.nii.gz"))
    read = read_image(tmp_path / "slice.nii.gz")
    assert read.GetSize() == (7, 6, 1)


def test_four_d_file_with_one_time_point_reads_as_its_volume(tmp_path):
    voxels = np.random.default_rng(1).random((1, 3, 5, 6)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(voxels, isVector=False), str(tmp_path / "t1.nii.gz"))
    read = read_image(tmp_path / "t1.nii.gz")
    assert read.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), voxels[0])


def _write_dicom_series(folder, image: sitk.Image, series_uid: str, description: str, prefix: str) -> None:
    """Write ``image`` slice by slice as an MR DICOM series with full geometry tags.

    GDCM's writer leaves the process's LC_CTYPE at "C" (SimpleITK 2.5): put back, or every later
    test decoding a subprocess's UTF-8 output with the locale's encoding would read ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(folder, image, series_uid, description, prefix)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(folder, image: sitk.Image, series_uid: str, description: str, prefix: str) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(str(v) for v in list(direction[:, 0]) + list(direction[:, 1]))
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR", "0008|103e": description, "0020|000d": "1.2.826.0.1.3680043.2.1125.7000",
            "0020|000e": series_uid, "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in position), "0020|0037": orientation,
            "0018|0050": str(image.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_)


def _dicom_image(n_slices: int, seed: int) -> sitk.Image:
    # In-plane rotation only: a DICOM series stacks slices along the normal of the rows and columns.
    c, s = np.cos(0.3), np.sin(0.3)
    return make_image(shape_zyx=(n_slices, 5, 6), spacing=(0.8, 0.9, 3.0), origin=(10.0, -20.0, 5.0),
                      direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0), dtype=np.int16, seed=seed)


def test_dicom_series_keeps_geometry_and_voxels(tmp_path):
    image = _dicom_image(4, seed=2)
    _write_dicom_series(tmp_path, image, SERIES_A, "T1 axial", "a")
    read = read_image(tmp_path)
    assert_same_geometry(read, image, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_folder_with_two_series_lists_both_and_series_uid_selects(tmp_path):
    first, second = _dicom_image(4, seed=3), _dicom_image(2, seed=4)
    _write_dicom_series(tmp_path, first, SERIES_A, "T1 axial", "a")
    _write_dicom_series(tmp_path, second, SERIES_B, "T2 axial", "b")
    assert {(s.uid, s.description, len(s.files)) for s in list_dicom_series(tmp_path)} == {
        (SERIES_A, "T1 axial", 4), (SERIES_B, "T2 axial", 2)}
    with pytest.raises(InputError) as error:
        read_image(tmp_path)
    message = str(error.value)
    for expected in (SERIES_A, "T1 axial", "4 files", SERIES_B, "T2 axial", "2 files", "--series"):
        assert expected in message
    assert "\n" not in message
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path, series_uid=SERIES_B)),
                                  sitk.GetArrayFromImage(second))
    assert read_image(tmp_path, series_uid=SERIES_A).GetSize() == first.GetSize()
    with pytest.raises(InputError, match=SERIES_A):
        read_image(tmp_path, series_uid="1.2.3")


def _bad_2d(path):
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(30, dtype=np.float32).reshape(5, 6)), str(path))


def _bad_4d(path):
    voxels = np.random.default_rng(0).random((2, 3, 5, 6)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(voxels, isVector=False), str(path))


def _bad_vector(path):
    rgb = np.random.default_rng(0).integers(0, 255, (3, 5, 6, 3)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))


def _bad_constant(path):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 5, 6), 7.0, dtype=np.float32)), str(path))


def _bad_value(value):
    def write(path):
        voxels = np.random.default_rng(0).random((3, 5, 6)).astype(np.float32)
        voxels[1, 2, 3] = value
        sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
    return write


def _bad_empty_file(path):
    path.write_bytes(b"")


def _bad_text(path):
    path.write_text("not an image\n")


BAD_INPUTS = {
    "2d": (_bad_2d, "volume.nii.gz", "2D"),
    "4d": (_bad_4d, "volume.nii.gz", "4 dimensions"),
    "vector": (_bad_vector, "volume.nrrd", "components"),
    "constant": (_bad_constant, "volume.nii.gz", "constant"),
    "nan": (_bad_value(np.nan), "volume.nrrd", "NaN"),
    # SimpleITK's NIfTI reader turns NaN and Inf into 0: the file's stored values are checked instead.
    "nan nifti": (_bad_value(np.nan), "volume.nii.gz", "NaN"),
    "inf nifti": (_bad_value(-np.inf), "volume.nii", "infinite"),
    "inf": (_bad_value(np.inf), "volume.mha", "infinite"),
    "empty file": (_bad_empty_file, "volume.nii.gz", "could not be read"),
    "text file": (_bad_text, "volume.nii.gz", "could not be read"),
    "missing": (None, "volume.nii.gz", "does not exist"),
    "folder without dicom": (lambda path: path.mkdir(), "folder", "without DICOM"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_sentence_naming_the_file(tmp_path, case):
    make, name, expected = BAD_INPUTS[case]
    path = tmp_path / name
    if make is not None:
        make(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError) as error:
        read_image(path)
    message = str(error.value)
    assert expected in message and name in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_zero_voxel_image_is_rejected():
    with pytest.raises(InputError, match="empty"):
        validate_image(sitk.Image([0, 4, 4], sitk.sitkFloat32), "nothing.nrrd")


def test_oblique_helper_is_really_oblique():
    """Guards the geometry tests above against a helper that silently returns identity."""
    direction = np.array(oblique_direction()).reshape(3, 3)
    assert not np.allclose(direction, np.eye(3))
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)


def test_a_nifti_that_nibabel_cannot_check_is_read_with_a_warning(tmp_path, monkeypatch, caplog):
    """The NaN check re-reads NIfTI files with nibabel; where it cannot, SimpleITK's image still counts."""
    import nibabel

    path = tmp_path / "volume.nii.gz"
    _bad_value(1.0)(path)  # a finite float volume

    def unreadable(*args, **kwargs):
        raise nibabel.filebasedimages.ImageFileError("not what nibabel expects")

    monkeypatch.setattr(nibabel, "load", unreadable)
    with caplog.at_level("WARNING"):
        image = read_image(path)
    assert image.GetSize() == (6, 5, 3) and "could not check" in caplog.text


def _phantom_series(folder, n_slices: int = 5):
    from dafne_logic.phantoms.dicom import write_dicom_series

    image = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 100, (n_slices, 8, 9)).astype(np.float32))
    image.SetSpacing((0.8, 0.8, 5.0))
    return write_dicom_series(image, folder)


def _edit_slice(path, **tags):
    import pydicom

    dataset = pydicom.dcmread(path)
    for name, value in tags.items():
        setattr(dataset, name, value)
    return dataset


@pytest.mark.parametrize("damage, message", [
    ("missing slice", "not evenly spaced (10 mm between slices 2 and 3, 5 mm elsewhere)"),
    ("second echo", "several images at one slice position"),
    ("localizer", "several orientations"),
])
def test_a_dicom_series_itk_would_read_with_a_wrong_geometry_is_refused(tmp_path, damage, message):
    """ITK only warns (or says nothing): a missing slice read as 7.5 mm spacing made volumes 50 % too large."""
    import pydicom

    files = _phantom_series(tmp_path / "series")
    if damage == "missing slice":
        files[2].unlink()
    elif damage == "second echo":
        echo = _edit_slice(files[1], EchoNumbers=2, SOPInstanceUID=pydicom.uid.generate_uid())
        echo.file_meta.MediaStorageSOPInstanceUID = echo.SOPInstanceUID
        echo.save_as(tmp_path / "series" / "echo2.dcm")
    else:
        _edit_slice(files[4], ImageOrientationPatient=[1, 0, 0, 0, 0, -1]).save_as(files[4])
    with pytest.raises(InputError, match=re.escape(message)):
        read_image(tmp_path / "series")


def test_a_one_slice_dicom_series_takes_its_slice_thickness_not_one_millimetre(tmp_path):
    files = _phantom_series(tmp_path / "series", n_slices=1)
    assert read_image(tmp_path / "series").GetSpacing() == pytest.approx((0.8, 0.8, 5.0))
    _edit_slice(files[0], SpacingBetweenSlices=6.0).save_as(files[0])  # the slab's step, when given, goes first
    assert read_image(tmp_path / "series").GetSpacing()[2] == pytest.approx(6.0)
