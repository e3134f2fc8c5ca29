"""``dafne-slicer stats`` / ``segment`` with maps: the columns, the CSA file, and bad maps refused with one
sentence, exit status 2 and nothing written."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dafne_logic.cli import main

GEOMETRY = dict(shape=(3, 96, 128), fat_infiltration=0.3, seed=4)


@pytest.fixture(scope="module")
def dixon(tmp_path_factory):
    """A calf Dixon pair written by ``dafne-slicer phantom`` (water, fat, labels, truth)."""
    root = tmp_path_factory.mktemp("dixon")
    for contrast in ("water", "fat"):
        assert main(["phantom", "--region", "leg", "--output", str(root / contrast), "--contrast", contrast,
                     "--shape", *map(str, GEOMETRY["shape"]), "--seed", "4", "--fat-infiltration", "0.3"]) == 0
    return {"water": root / "water" / "leg_phantom.nii.gz", "fat": root / "fat" / "leg_phantom.nii.gz",
            "labels": root / "water" / "leg_phantom_labels.nii.gz",
            "truth": root / "water" / "leg_phantom_fat_fraction.csv", "root": root}


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_phantom_writes_the_same_truth_for_water_and_fat(dixon):
    truth = _read(dixon["truth"])
    assert truth == _read(dixon["root"] / "fat" / "leg_phantom_fat_fraction.csv")
    assert len(truth) >= 10 and {"label_value", "name", "fat_fraction_true"} == set(truth[0])


def test_stats_with_dixon_maps_and_csa(dixon, tmp_path):
    out, csa = tmp_path / "stats.csv", tmp_path / "csa.csv"
    assert main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv", str(out),
                 "--water", str(dixon["water"]), "--fat", str(dixon["fat"]), "--map", f"T2={dixon['water']}",
                 "--erode-mm", "0", "--csa", str(csa)]) == 0
    rows = {row["name"]: row for row in _read(out)}
    truth = {row["name"]: float(row["fat_fraction_true"]) for row in _read(dixon["truth"])}
    errors = [float(rows[name]["fat_fraction_mean"]) - value for name, value in truth.items()]
    assert np.max(np.abs(errors)) < 4.0  # exact labels, no erosion, blurred and noisy images
    for column in ("fat_fraction_median", "fat_fraction_sd", "fat_fraction_voxels", "T2_mean", "T2_median", "T2_sd",
                   "max_csa_mm2", "max_csa_position_mm"):
        assert rows["right soleus"][column] != ""
    areas = _read(csa)
    soleus = [row for row in areas if row["name"] == "right soleus"]
    assert len(soleus) == 3 and max(float(r["area_mm2"]) for r in soleus) == pytest.approx(
        float(rows["right soleus"]["max_csa_mm2"]))


def _write_like(array, reference_path, path, **geometry):
    reference = sitk.ReadImage(str(reference_path))
    image = sitk.GetImageFromArray(array)
    if array.shape == sitk.GetArrayViewFromImage(reference).shape:
        image.CopyInformation(reference)
    for key, value in geometry.items():
        getattr(image, f"Set{key}")(value)
    sitk.WriteImage(image, str(path))
    return path


def _bad_maps(dixon, tmp_path):
    water = sitk.GetArrayFromImage(sitk.ReadImage(str(dixon["water"])))
    nan = water.copy()
    nan[0, 0, 0] = np.nan
    return {
        "elsewhere": ["--map", f"T2={_write_like(np.ones((3, 40, 40), np.float32), dixon['water'], tmp_path / 'far.nii.gz', Origin=(900.0, 900.0, 900.0))}"],  # noqa: E501
        "negative": ["--water", str(_write_like(water - 1.0, dixon["water"], tmp_path / "neg.nii.gz")), "--fat", str(dixon["fat"])],
        "nan": ["--fat-fraction", str(_write_like(nan, dixon["water"], tmp_path / "nan.mha"))],
        "nan nifti": ["--map", f"T2={_write_like(nan, dixon['water'], tmp_path / 'nan.nii.gz')}"],  # read as 0 by SimpleITK
        "4d": ["--map", f"T2={_write_like(np.ones((2, 3, 96, 128), np.float32), dixon['water'], tmp_path / 'four.nii.gz')}"],
        "water alone": ["--water", str(dixon["water"])],
        "bad map option": ["--map", "T2"],
        "bad map name": ["--map", f"fat_fraction={dixon['water']}"],
        "not a fat fraction": ["--fat-fraction", str(_write_like(water * 5000, dixon["water"], tmp_path / "big.nii.gz"))],
        "missing": ["--map", f"T2={tmp_path / 'absent.nii.gz'}"],
        "erosion nan": ["--erode-mm", "nan", "--water", str(dixon["water"]), "--fat", str(dixon["fat"])],
        # SimpleITK counts a complex voxel as one component; its real part alone would be measured.
        "complex": ["--map", f"T2={_write_like((water * (1 + 1j)).astype(np.complex64), dixon['water'], tmp_path / 'c.nii.gz')}"],
    }


@pytest.mark.parametrize("kind", ["elsewhere", "negative", "nan", "nan nifti", "4d", "water alone", "bad map option", "bad map name",
                                  "not a fat fraction", "missing", "erosion nan", "complex"])
def test_bad_maps_are_one_sentence_exit_2_nothing_written(dixon, tmp_path, capsys, kind):
    flags = _bad_maps(dixon, tmp_path)[kind]
    out, csa = tmp_path / "out" / "stats.csv", tmp_path / "out" / "csa.csv"
    rc = main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv", str(out),
               "--csa", str(csa), *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_segmentation_without_muscle_is_named_as_the_problem_not_the_maps(dixon, tmp_path, capsys):
    empty = _write_like(np.zeros(GEOMETRY["shape"], np.uint8), dixon["water"], tmp_path / "empty.nii.gz")
    out = tmp_path / "out" / "stats.csv"
    rc = main(["stats", str(dixon["water"]), str(empty), "--region", "leg", "--csv", str(out),
               "--water", str(dixon["water"]), "--fat", str(dixon["fat"])])
    err = capsys.readouterr().err
    assert rc == 2 and "no voxel of any leg muscle" in err and "map" not in err
    assert not (tmp_path / "out").exists()


def test_segment_adds_the_map_columns_and_refuses_maps_without_stats(dixon, tmp_path, capsys):
    stats, csa = tmp_path / "s.csv", tmp_path / "csa.csv"
    assert main(["segment", str(dixon["water"]), "--model", "leg", "-o", str(tmp_path / "seg.seg.nrrd"), "--no-progress",
                 "--stats", str(stats), "--water", str(dixon["water"]), "--fat", str(dixon["fat"]), "--csa", str(csa)]) == 0
    rows = _read(stats)
    assert rows[0]["case"] == "leg_phantom" and "fat_fraction_mean" in rows[0]
    assert sum(1 for row in rows if row["fat_fraction_mean"]) >= 10
    assert _read(csa)[0]["case"] == "leg_phantom"
    capsys.readouterr()
    out = tmp_path / "none.seg.nrrd"
    assert main(["segment", str(dixon["water"]), "--model", "leg", "-o", str(out), "--water", str(dixon["water"]),
                 "--fat", str(dixon["fat"])]) == 2
    assert "--stats" in capsys.readouterr().err and not out.exists()



def test_demo_fat_fraction_table_matches_the_truth(tmp_path, capsys):
    """``make demo`` step 2: the automatic segmentation's fat fraction within the issue's targets."""
    from dafne_server.demo import fat_fraction_demo

    errors = fat_fraction_demo(tmp_path, shape=(6, 432, 432))
    assert len(errors) == 12
    assert np.mean(np.abs(errors)) < 1.5 and np.max(np.abs(errors)) < 5.0
    assert "soleus" in capsys.readouterr().out
    rows = _read(tmp_path / "leg_dixon_statistics.csv")
    assert len(rows) == 12 and rows[0]["fat_fraction_mean"] != ""


def test_segment_with_a_map_that_misses_the_muscles_writes_no_segmentation(dixon, tmp_path, capsys):
    """The map overlaps the image (a corner of air) but no muscle: found after segmenting, before writing."""
    water = sitk.ReadImage(str(dixon["water"]))
    corner = sitk.Image(10, 10, 3, sitk.sitkFloat32) + 1.0
    corner[0, 0, 0] = 2.0
    corner.SetSpacing(water.GetSpacing())
    corner.SetOrigin(water.GetOrigin())
    sitk.WriteImage(corner, str(tmp_path / "corner.nii.gz"))
    out = tmp_path / "out" / "seg.seg.nrrd"
    rc = main(["segment", str(dixon["water"]), "--model", "leg", "-o", str(out), "--no-progress",
               "--stats", str(tmp_path / "out" / "s.csv"), "--map", f"T2={tmp_path / 'corner.nii.gz'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no value on any segmented muscle" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


NO_NEW_FILES = Path("/proc/self")  # a folder that takes no new file, even for root (chmod would not stop root)


@pytest.mark.parametrize("clash", ["csv is csa", "csv is the image", "csv is a map", "csa is a folder", "csa under a file",
                                   "csa in a folder that takes no files"])
def test_stats_outputs_that_clash_are_one_sentence_and_nothing_is_written(dixon, tmp_path, capsys, clash):
    if clash == "csa in a folder that takes no files" and not NO_NEW_FILES.is_dir():
        pytest.skip("needs Linux's /proc (CI runs there)")
    image = tmp_path / "water.nii.gz"
    image.write_bytes(dixon["water"].read_bytes())
    out, csa = {"csv is csa": (tmp_path / "s.csv", tmp_path / "s.csv"),
                "csv is the image": (image, tmp_path / "csa.csv"),
                "csv is a map": (dixon["fat"], tmp_path / "csa.csv"),
                "csa is a folder": (tmp_path / "s.csv", dixon["root"]),
                "csa under a file": (tmp_path / "s.csv", image / "areas.csv"),
                "csa in a folder that takes no files": (tmp_path / "s.csv", NO_NEW_FILES / "areas.csv")}[clash]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fat_before = dixon["fat"].read_bytes()
    rc = main(["stats", str(image), str(dixon["labels"]), "--region", "leg", "--csv", str(out), "--csa", str(csa),
               "--water", str(image), "--fat", str(dixon["fat"])])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert {"csv is csa": "both name", "csv is the image": "inputs", "csv is a map": "inputs",
            "csa is a folder": "is a folder", "csa under a file": "is a file, not a folder",
            "csa in a folder that takes no files": "does not take new files"}[clash] in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before and dixon["fat"].read_bytes() == fat_before


def test_muscles_eroded_away_are_named_in_a_warning(dixon, tmp_path, caplog):
    out = tmp_path / "s.csv"
    with caplog.at_level("WARNING"):
        assert main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv", str(out),
                     "--water", str(dixon["water"]), "--fat", str(dixon["fat"]), "--erode-mm", "50"]) == 0
    rows = _read(out)
    emptied = [row["name"] for row in rows if row["voxel_count"] != "0" and row["fat_fraction_mean"] == ""]
    assert emptied and all(name in caplog.text for name in emptied) and "50 mm erosion" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv", str(out),
                     "--water", str(dixon["water"]), "--fat", str(dixon["fat"]), "--erode-mm", "0"]) == 0
    assert "no value left" not in caplog.text


def test_a_t2_map_with_nan_background_is_refused_unless_nan_means_missing(dixon, tmp_path, capsys):
    """Fitting tools mark failed fits and background NaN; --nan-as-missing leaves those voxels out."""
    water = sitk.GetArrayFromImage(sitk.ReadImage(str(dixon["water"])))
    t2 = np.full(water.shape, 40.0, np.float32)
    t2[:, :, : water.shape[2] // 2] = np.nan  # the right half of the field of view has no fit
    t2[0, 0, -1] = np.inf
    t2[0, -1, -1] = 41.0  # background corner: a map, not a constant
    path = _write_like(t2, dixon["water"], tmp_path / "t2.nii.gz")
    out = tmp_path / "s.csv"
    args = ["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv", str(out), "--map", f"T2={path}"]
    assert main(args) == 2 and "NaN" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--nan-as-missing"]) == 0
    rows = [row for row in _read(out) if row["voxel_count"] != "0"]
    measured = [row for row in rows if row["T2_mean"] != ""]
    assert measured and len(measured) < len(rows)  # muscles in the NaN half have no value, the others do
    assert all(float(row["T2_mean"]) == pytest.approx(40.0) and float(row["T2_sd"]) == pytest.approx(0.0, abs=1e-9)
               for row in measured)  # a NaN read as 0 would pull these below 40


def test_a_dixon_folder_of_several_series_asks_for_the_map_alone_not_for_series(dixon, tmp_path, capsys):
    """Dixon water and fat often come as two series of one folder; --series chooses only the image's."""
    from dafne_logic.phantoms.dicom import write_dicom_series

    study = tmp_path / "study"
    study.mkdir()
    for number, contrast in enumerate(("water", "fat"), start=1):
        for path in write_dicom_series(sitk.ReadImage(str(dixon[contrast])), tmp_path / contrast, series_number=number,
                                       series_description=contrast):
            path.rename(study / f"{contrast}_{path.name}")
    out = tmp_path / "out" / "stats.csv"
    rc = main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv", str(out),
               "--water", str(study), "--fat", str(dixon["fat"])])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "water map" in err and "holds 2 DICOM series" in err and "its series alone" in err
    assert "--series" not in err  # the advice a map cannot follow
    assert not (tmp_path / "out").exists()


def test_a_dixon_image_astray_is_named_itself_not_its_partner(dixon, tmp_path, capsys):
    """A water image registered elsewhere was reported as "the fat map does not overlap the water image"."""
    water = sitk.GetArrayFromImage(sitk.ReadImage(str(dixon["water"])))
    far = _write_like(water, dixon["water"], tmp_path / "far_water.nii.gz", Origin=(900.0, 900.0, 900.0))
    rc = main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv", str(tmp_path / "s.csv"),
               "--water", str(far), "--fat", str(dixon["fat"])])
    err = capsys.readouterr().err
    assert rc == 2 and "the water map does not overlap the image" in err and "fat" not in err
    assert not (tmp_path / "s.csv").exists()


def test_a_refused_scanner_fat_fraction_map_gives_its_one_sentence_alone(dixon, tmp_path, caplog, capsys):
    """A scanner map has no noise floor to blame, and its scale note is not logged before its refusal."""
    water = sitk.ReadImage(str(dixon["water"]))
    corner = sitk.Image(10, 10, 3, sitk.sitkFloat32) + 0.3  # fractions, on a corner of air only
    corner[0, 0, 0] = 0.4
    corner.SetSpacing(water.GetSpacing())
    corner.SetOrigin(water.GetOrigin())
    ff = tmp_path / "corner_ff.nii.gz"
    sitk.WriteImage(corner, str(ff))
    with caplog.at_level("INFO"):
        rc = main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv",
                   str(tmp_path / "s.csv"), "--fat-fraction", str(ff)])
    err = capsys.readouterr().err
    assert rc == 2 and "no value on any segmented muscle" in err and "noise floor" not in err
    assert "read as fractions" not in caplog.text


def test_a_map_covering_part_of_the_muscles_is_reported(dixon, tmp_path, caplog):
    """A T2 map of one slice of three: the muscles' T2 describes that slice only, and the log says so."""
    water = sitk.GetArrayFromImage(sitk.ReadImage(str(dixon["water"]))).astype(np.float32)
    one_slice = np.full_like(water, np.nan)
    one_slice[1] = 40.0 + water[1] / max(float(water.max()), 1.0)
    t2 = _write_like(one_slice, dixon["water"], tmp_path / "t2_one_slice.mha")
    with caplog.at_level("WARNING"):
        assert main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv",
                     str(tmp_path / "s.csv"), "--map", f"T2={t2}", "--nan-as-missing", "--erode-mm", "0"]) == 0
    assert "T2: values on under 50 % of the voxels measured in" in caplog.text and "right soleus (" in caplog.text
    assert "noise floor" not in caplog.text
    assert _read(tmp_path / "s.csv")[0]["T2_mean"] != ""
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["stats", str(dixon["water"]), str(dixon["labels"]), "--region", "leg", "--csv",
                     str(tmp_path / "s.csv"), "--map", f"T2={dixon['water']}", "--erode-mm", "0"]) == 0
    assert "values on under" not in caplog.text
