"""Hostile segmentation files: label values that would size huge lookup arrays are ignored or refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from test_io_support import make_image, make_labels

from dafne_logic.core import io as dio
from dafne_logic.core.errors import InputError
from dafne_logic.core.io import read_segmentation, write_labels
from dafne_logic.core.labels import LEG, THIGH

HUGE = 10**13  # a lookup array this long needs 20 TB


def test_lookup_is_sized_by_the_largest_voxel_value_not_by_named_values():
    lut, unknown = dio._lookup({1: "right soleus", HUGE: "left soleus", 7: "Fat"}, LEG, max_value=3)
    assert len(lut) == 4 and lut[1] == LEG.value_of(1, "right")
    assert unknown == ["Fat"]  # unmatched names are reported even when they label no voxel


def test_seg_nrrd_naming_a_huge_label_value_reads_without_it(tmp_path):
    labels = make_labels(make_image(), THIGH)
    path = tmp_path / "ours.seg.nrrd"
    write_labels(labels, path, THIGH)
    segmentation = slicerio.read_segmentation(str(path))
    segmentation["segments"][0]["labelValue"] = HUGE  # "right vastus lateralis" now names no voxel
    hostile = tmp_path / "hostile.seg.nrrd"
    slicerio.write_segmentation(str(hostile), segmentation)

    read, unknown = read_segmentation(hostile, THIGH)
    expected = sitk.GetArrayFromImage(labels)
    expected[expected == 1] = 0
    assert unknown == []
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), expected)


def test_seg_nrrd_with_voxel_values_above_65535_is_refused(tmp_path):
    labels = make_labels(make_image(), THIGH)
    path = tmp_path / "ours.seg.nrrd"
    write_labels(labels, path, THIGH)
    segmentation = slicerio.read_segmentation(str(path))
    voxels = segmentation["voxels"].astype(np.uint32)
    voxels[0, 0, 0] = 70000
    segmentation["voxels"] = voxels
    hostile = tmp_path / "hostile.seg.nrrd"
    slicerio.write_segmentation(str(hostile), segmentation)
    with pytest.raises(InputError, match="above 65535"):
        read_segmentation(hostile, THIGH)


def test_json_label_table_naming_a_huge_value_is_ignored(tmp_path):
    voxels = np.zeros((2, 3, 4), dtype=np.uint8)
    voxels[0, 0, 0] = 1
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / "case.nii.gz"))
    (tmp_path / "case.json").write_text(json.dumps({"1": "Soleus_R", str(HUGE): "Soleus_L"}))
    labels, unknown = read_segmentation(tmp_path / "case.nii.gz", LEG)
    assert unknown == []
    assert sitk.GetArrayFromImage(labels)[0, 0, 0] == LEG.value_of(1, "right")
    assert int(sitk.GetArrayFromImage(labels).sum()) == LEG.value_of(1, "right")


@pytest.mark.parametrize("value, dtype", [(70000, np.uint32), (1e30, np.float32), (2**40, np.int64)])
def test_label_map_with_voxel_values_above_65535_is_refused(tmp_path, value, dtype):
    voxels = np.zeros((2, 3, 4), dtype=dtype)
    voxels[1, 2, 3] = value
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / "case.nrrd"))
    with pytest.raises(InputError, match="above 65535"):
        read_segmentation(tmp_path / "case.nrrd", LEG)


def test_large_tables_write_uint16_through_the_shared_output_dtype(monkeypatch):
    monkeypatch.setattr(dio, "label_dtype", lambda table: np.uint16)
    assert dio._label_array(make_labels(make_image(), LEG), LEG).dtype == np.uint16
