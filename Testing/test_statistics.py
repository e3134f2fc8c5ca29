"""Per-muscle statistics against hand-computed numbers, the CSV, and the ``stats`` command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_io_support import make_image

from dafne_logic.cli import main
from dafne_logic.core.errors import InputError
from dafne_logic.core.io import read_segmentation, write_labels
from dafne_logic.core.labels import LEG
from dafne_logic.core.statistics import STAT_FIELDS, muscle_statistics, write_statistics_csv

SPACING = (0.5, 0.75, 4.0)  # anisotropic: one voxel is 1.5 mm³
RIGHT_SOLEUS, RIGHT_GM, LEFT_SOLEUS = 1, 2, 7


def _phantom() -> tuple[sitk.Image, sitk.Image]:
    """A 5-slice volume whose muscles have hand-computable statistics.

    right soleus: a 4×10×10 block (slices 0-3) holding the intensities 1..400;
    right gastrocnemius medialis: one voxel of 7; left soleus: 3 voxels of 50 on slice 1 and 3 on slice 3;
    value 40 (not in the leg table) must be ignored.
    """
    intensities = np.full((5, 12, 12), -3.0, dtype=np.float32)
    labels = np.zeros((5, 12, 12), dtype=np.uint8)
    labels[0:4, 0:10, 0:10] = RIGHT_SOLEUS
    intensities[0:4, 0:10, 0:10] = np.arange(1, 401, dtype=np.float32).reshape(4, 10, 10)
    labels[4, 11, 11], intensities[4, 11, 11] = RIGHT_GM, 7.0
    labels[1, 11, 0:3] = LEFT_SOLEUS
    labels[3, 11, 0:3] = LEFT_SOLEUS
    intensities[labels == LEFT_SOLEUS] = 50.0
    labels[2, 10, 10] = 40
    image = sitk.GetImageFromArray(intensities)
    reference = make_image(shape_zyx=(5, 12, 12), spacing=SPACING)
    image.CopyInformation(reference)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(reference)
    return image, label_image


def _rows_by_value(rows):
    return {row["label_value"]: row for row in rows}


def test_statistics_match_hand_computed_values():
    image, labels = _phantom()
    rows = muscle_statistics(image, labels, LEG)
    assert [row["label_value"] for row in rows] == list(range(1, 13))
    by_value = _rows_by_value(rows)

    soleus = by_value[RIGHT_SOLEUS]
    assert soleus["name"] == "right soleus" and soleus["side"] == "right" and soleus["muscle"] == "soleus"
    assert soleus["voxel_count"] == 400
    assert soleus["volume_ml"] == pytest.approx(400 * 1.5 / 1000)  # 0.6 ml
    assert soleus["mean"] == pytest.approx(200.5)
    assert soleus["sd"] == pytest.approx(np.sqrt(400 * 401 / 12))  # sample SD of 1..n is sqrt(n(n+1)/12)
    assert soleus["median"] == pytest.approx(200.5)
    assert soleus["p5"] == pytest.approx(1 + 0.05 * 399)  # linear interpolation at rank 19.95
    assert soleus["p95"] == pytest.approx(1 + 0.95 * 399)
    assert (soleus["first_slice"], soleus["last_slice"], soleus["n_slices"]) == (0, 3, 4)

    single = by_value[RIGHT_GM]
    assert single["voxel_count"] == 1 and single["volume_ml"] == pytest.approx(0.0015)
    assert single["mean"] == single["median"] == single["p5"] == single["p95"] == 7.0 and single["sd"] is None
    assert (single["first_slice"], single["last_slice"], single["n_slices"]) == (4, 4, 1)

    left = by_value[LEFT_SOLEUS]
    assert left["voxel_count"] == 6 and left["mean"] == 50.0 and left["sd"] == 0.0
    assert (left["first_slice"], left["last_slice"], left["n_slices"]) == (1, 3, 2)  # slice 2 skipped

    absent = by_value[LEG.value_of(LEG.muscle_index("peroneus"), "left")]
    assert absent["voxel_count"] == 0 and absent["volume_ml"] == 0 and absent["mean"] is None
    assert absent["n_slices"] == 0 and absent["first_slice"] is None
    assert sum(row["voxel_count"] for row in rows) == 407  # value 40 ignored


def test_statistics_need_the_same_grid():
    image, labels = _phantom()
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(o + 1.0 for o in labels.GetOrigin()))
    with pytest.raises(InputError, match="grid"):
        muscle_statistics(image, shifted, LEG)


def test_csv_has_header_and_blank_cells_for_absent_muscles(tmp_path):
    image, labels = _phantom()
    path = tmp_path / "stats.csv"
    write_statistics_csv(muscle_statistics(image, labels, LEG), path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == STAT_FIELDS
        rows = list(reader)
    assert len(rows) == 12
    assert rows[0]["name"] == "right soleus" and float(rows[0]["volume_ml"]) == pytest.approx(0.6)
    assert float(rows[0]["sd"]) == pytest.approx(np.sqrt(400 * 401 / 12), rel=1e-9)
    assert rows[-1]["mean"] == "" and rows[-1]["voxel_count"] == "0"


def test_csv_keeps_columns_a_caller_adds_first(tmp_path):
    image, labels = _phantom()
    rows = [{"case": case, **row} for case in ("a", "b") for row in muscle_statistics(image, labels, LEG)]
    path = tmp_path / "stats.csv"
    write_statistics_csv(rows, path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ("case",) + STAT_FIELDS
        assert [r["case"] for r in reader] == ["a"] * 12 + ["b"] * 12


def test_failed_csv_write_leaves_no_file(tmp_path, monkeypatch):
    import dafne_logic.core.statistics as statistics

    def broken(rows):
        raise RuntimeError("formatting failed")

    monkeypatch.setattr(statistics, "statistics_csv", broken)
    with pytest.raises(RuntimeError):
        write_statistics_csv([], tmp_path / "stats.csv")
    assert list(tmp_path.iterdir()) == []


def _write_inputs(tmp_path):
    image, labels = _phantom()
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    write_labels(labels_within_table(labels), tmp_path / "seg.seg.nrrd", LEG)
    return image, labels


def labels_within_table(labels: sitk.Image) -> sitk.Image:
    """The phantom's labels without the out-of-table value 40 (writers refuse it)."""
    cleaned = sitk.Threshold(labels, 0, 2 * LEG.n_muscles, 0)
    cleaned.CopyInformation(labels)
    return cleaned


def test_stats_command_writes_the_csv(tmp_path):
    _write_inputs(tmp_path)
    out = tmp_path / "stats.csv"
    assert main(["stats", str(tmp_path / "image.nii.gz"), str(tmp_path / "seg.seg.nrrd"),
                 "--region", "leg", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open(newline="")))
    assert rows[0]["voxel_count"] == "400" and float(rows[0]["mean"]) == pytest.approx(200.5)


def test_stats_command_puts_a_cropped_segmentation_back_on_the_image_grid(tmp_path):
    """Slicer stores segmentations cropped to their segments; voxels must still be counted where they lie."""
    image, labels = _write_inputs(tmp_path)
    cropped = sitk.RegionOfInterest(labels_within_table(labels), size=[12, 12, 4], index=[0, 0, 0])
    write_labels(cropped, tmp_path / "cropped.seg.nrrd", LEG)
    out = tmp_path / "stats.csv"
    assert main(["stats", str(tmp_path / "image.nii.gz"), str(tmp_path / "cropped.seg.nrrd"),
                 "--region", "leg", "--csv", str(out)]) == 0
    rows = {int(r["label_value"]): r for r in csv.DictReader(out.open(newline=""))}
    assert rows[RIGHT_SOLEUS]["voxel_count"] == "400" and rows[LEFT_SOLEUS]["voxel_count"] == "6"
    assert rows[RIGHT_GM]["voxel_count"] == "0"  # its only voxel lies on slice 4, outside the crop


@pytest.mark.parametrize("case", ["bad image", "unknown model", "no muscle on image"])
def test_stats_command_errors_write_nothing(tmp_path, capsys, case):
    _write_inputs(tmp_path)
    image, option = str(tmp_path / "image.nii.gz"), ["--region", "leg"]
    if case == "bad image":
        (tmp_path / "bad.nii.gz").write_text("not an image")
        image = str(tmp_path / "bad.nii.gz")
    elif case == "unknown model":
        option = ["--model", "no-such-model"]
    else:
        empty = sitk.Image(labels_within_table(_phantom()[1]) * 0)
        write_labels(empty, tmp_path / "seg.seg.nrrd", LEG)
    out = tmp_path / "stats.csv"
    assert main(["stats", image, str(tmp_path / "seg.seg.nrrd"), *option, "--csv", str(out)]) == 2
    assert not out.exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("dafne-slicer stats: error:") and "\n" not in error


def test_stats_command_needs_a_label_table(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["stats", "image.nii.gz", "seg.seg.nrrd", "--csv", str(tmp_path / "out.csv")])
    assert exit_.value.code == 2


def test_stats_on_the_real_calf_slice(shared_data, tmp_path):
    folder = shared_data / "calf_slices"
    out = tmp_path / "pd.csv"
    assert main(["stats", str(folder / "pd_example.nii.gz"), str(folder / "pd_example_labels.nii.gz"),
                 "--region", "leg", "--csv", str(out)]) == 0
    rows = {r["name"]: r for r in csv.DictReader(out.open(newline=""))}
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "pd_example_labels.nii.gz")))
    names = json.loads((folder / "pd_example_labels.json").read_text())
    image = sitk.ReadImage(str(folder / "pd_example.nii.gz"))
    voxel_ml = np.prod(image.GetSpacing()) / 1000
    assert read_segmentation(folder / "pd_example_labels.nii.gz", LEG)[1] == []
    soleus_r = rows["right soleus"]
    expected = int((raw == int(next(k for k, v in names.items() if v == "Soleus_R"))).sum())
    assert int(soleus_r["voxel_count"]) == expected > 0
    assert float(soleus_r["volume_ml"]) == pytest.approx(expected * voxel_ml)
    assert all(r["n_slices"] == "1" for r in rows.values())  # a single-slice volume
