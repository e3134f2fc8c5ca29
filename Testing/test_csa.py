"""Cross-sectional area along the leg: areas, slice positions, orientation, max ACSA in the statistics."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from dafne_logic.core.csa import CSA_FIELDS, cross_sectional_areas, maximal_areas, write_csa_csv
from dafne_logic.core.labels import LEG
from dafne_logic.core.statistics import muscle_statistics

RIGHT_SOLEUS, LEFT_EDL = 1, 11


def _axial_labels() -> sitk.Image:
    """Right soleus: a square growing from 2×2 to 4×4 voxels over slices 0..2; left extensor digitorum longus on slice 1."""
    labels = np.zeros((3, 10, 10), np.uint8)
    for k, side in enumerate((2, 3, 4)):
        labels[k, :side, :side] = RIGHT_SOLEUS
    labels[1, 8, 8:10] = LEFT_EDL
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.5, 0.8, 5.0))  # 0.4 mm² per voxel
    image.SetOrigin((10.0, 20.0, -30.0))
    return image


def test_areas_per_slice_with_positions_along_the_axial_axis():
    rows = cross_sectional_areas(_axial_labels(), LEG)
    soleus = [row for row in rows if row["label_value"] == RIGHT_SOLEUS]
    assert [row["slice"] for row in soleus] == [0, 1, 2]
    assert [row["area_mm2"] for row in soleus] == pytest.approx([4 * 0.4, 9 * 0.4, 16 * 0.4])
    assert [row["position_mm"] for row in soleus] == pytest.approx([-30.0, -25.0, -20.0])
    assert soleus[0]["name"] == "right soleus"
    edl = [row for row in rows if row["label_value"] == LEFT_EDL]
    assert len(edl) == 1 and edl[0]["area_mm2"] == pytest.approx(0.8)
    largest = maximal_areas(rows)
    assert largest[RIGHT_SOLEUS] == {"max_csa_mm2": pytest.approx(6.4), "max_csa_position_mm": pytest.approx(-20.0)}


def test_a_sagittal_label_map_is_measured_on_axial_slices():
    """The same labels stored with the slice axis along x (a sagittal acquisition) give the same areas."""
    axial = _axial_labels()
    voxels = sitk.GetArrayFromImage(axial)  # (k, j, i)
    # New grid: i' = S (old k), j' = P (old j), k' = L (old i): index (i', j', k') ↦ old (k, j, i).
    sagittal = sitk.GetImageFromArray(np.ascontiguousarray(voxels.transpose(2, 1, 0)))
    sagittal.SetSpacing((5.0, 0.8, 0.5))
    sagittal.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))
    sagittal.SetOrigin(axial.GetOrigin())
    assert np.allclose(sagittal.TransformIndexToPhysicalPoint((2, 3, 4)), axial.TransformIndexToPhysicalPoint((4, 3, 2)))
    def summary(rows):
        return [(r["label_value"], r["slice"], round(r["position_mm"], 6), round(r["area_mm2"], 6)) for r in rows]

    assert summary(cross_sectional_areas(sagittal, LEG)) == summary(cross_sectional_areas(axial, LEG))


def test_statistics_carry_the_maximal_area_and_the_csv_is_written(tmp_path):
    labels = _axial_labels()
    image = sitk.Cast(labels, sitk.sitkFloat32) + 1.0
    rows = {row["label_value"]: row for row in muscle_statistics(image, labels, LEG)}
    assert rows[RIGHT_SOLEUS]["max_csa_mm2"] == pytest.approx(6.4)
    assert rows[2]["max_csa_mm2"] is None  # absent muscle
    path = tmp_path / "csa.csv"
    write_csa_csv([{"case": "a", **row} for row in cross_sectional_areas(labels, LEG)], path)
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ("case", *CSA_FIELDS)
        assert len(list(reader)) == 4
