"""``dafne-slicer phantom``: files written, read back with their label table; bad input writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from dafne_logic.cli import main
from dafne_logic.core.io import read_segmentation
from dafne_logic.core.labels import BUILTIN_TABLES
from dafne_logic.phantoms.images import make_phantom


def test_writes_image_labels_and_table(tmp_path, capsys):
    out = tmp_path / "phantoms"
    rc = main(["phantom", "--region", "leg", "--output", str(out), "--shape", "3", "96", "128", "--seed", "5",
               "--contrast", "water", "--legs", "both"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [  # a Dixon contrast also writes its true fat fraction
        "leg_phantom.nii.gz", "leg_phantom_fat_fraction.csv", "leg_phantom_labels.json", "leg_phantom_labels.nii.gz"]
    assert "leg_phantom.nii.gz" in capsys.readouterr().out
    image = sitk.ReadImage(str(out / "leg_phantom.nii.gz"))
    labels, unknown = read_segmentation(out / "leg_phantom_labels.nii.gz", BUILTIN_TABLES["leg"])
    assert unknown == []
    expected_image, expected_labels = make_phantom("leg", (3, 96, 128), contrast="water", seed=5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected_image), rtol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(expected_labels))
    for a, b in ((image, expected_image), (labels, expected_labels)):
        assert a.GetSpacing() == pytest.approx(b.GetSpacing()) and a.GetOrigin() == pytest.approx(b.GetOrigin())


def test_options_reach_the_generator(tmp_path):
    out = tmp_path / "one"
    assert main(["phantom", "--region", "thigh", "--output", str(out), "--shape", "1", "80", "80",
                 "--spacing", "2.5", "2.5", "5", "--legs", "left", "--touching", "--noise", "0",
                 "--bias", "0", "--fat-infiltration", "0.3", "--slice-thickness", "8"]) == 0
    labels = sitk.ReadImage(str(out / "thigh_phantom_labels.nii.gz"))
    assert labels.GetSpacing() == (2.5, 2.5, 5.0)
    values = np.unique(sitk.GetArrayFromImage(labels))
    assert values.min() == 0 and values[1] > BUILTIN_TABLES["thigh"].n_muscles  # left muscles only


def test_bad_region_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "bad"
    result = subprocess.run([sys.executable, "-m", "dafne_logic.cli", "phantom", "--region", "arm", "--output",
                             str(out)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "arm" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_shape_exits_2_with_one_sentence_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["phantom", "--region", "thigh", "--output", str(out), "--shape", "0", "64", "64"]) == 2
    err = capsys.readouterr().err
    assert "shape" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_paths_the_console_cannot_show_are_printed_escaped_not_a_crash(tmp_path):
    """Windows writes redirected output in the ANSI code page, strictly; PYTHONIOENCODING=ascii makes
    the same console here. A folder named in Greek must not stop the command after its work is done."""
    out = tmp_path / "μυς"
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = subprocess.run([sys.executable, "-m", "dafne_logic.cli", "phantom", "--region", "leg", "--output",
                             str(out), "--shape", "1", "64", "64"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "\\u03bc\\u03c5\\u03c2" in result.stdout and (out / "leg_phantom.nii.gz").is_file()
