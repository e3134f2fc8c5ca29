"""``dafne-slicer segment``, ``models`` and ``phantom`` end to end through the console entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from dafne_logic.phantoms.images import make_phantom


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # UTF-8 both ways, whatever the locale (GDCM may have set C) or the code page (Windows) says.
    return subprocess.run([sys.executable, "-m", "dafne_logic.cli", *args], capture_output=True, text=True, encoding="utf-8",
                          cwd=cwd, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


@pytest.fixture(scope="module")
def calf_volume(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calf")
    image, _ = make_phantom("leg", shape=(4, 432, 432), seed=9002)
    sitk.WriteImage(image, str(folder / "calf.nii.gz"))
    return folder / "calf.nii.gz"


def test_segment_writes_named_segmentation_stats_and_preview(calf_volume: Path, tmp_path: Path):
    out = tmp_path / "calf.seg.nrrd"
    result = cli("segment", str(calf_volume), "--model", "leg", "--output", str(out), "--stats",
                 str(tmp_path / "stats.csv"), "--preview", str(tmp_path / "preview.png"), "--no-progress")
    assert result.returncode == 0, result.stderr
    segmentation = slicerio.read_segmentation(str(out))
    names = {segment["name"] for segment in segmentation["segments"]}
    assert {"right soleus", "left soleus", "right tibialis anterior", "left peroneus"} <= names
    stats = (tmp_path / "stats.csv").read_text().splitlines()
    assert stats[0].startswith("case,label_value,name")
    assert len(stats) == 1 + 12
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    least = result.stdout.split("least sure on slices ")[1].splitlines()[0].split()  # 4 slices: 3 to start with
    assert len(least) == 3 and {int(k.rstrip(",")) for k in least} <= {0, 1, 2, 3}
    assert "No muscle was found" not in result.stderr


def test_a_scan_without_muscle_is_written_empty_and_said_so(tmp_path: Path):
    """Noise (or another body part) gives an empty segmentation: written, but not in silence."""
    noise = np.random.default_rng(0).normal(100.0, 20.0, (4, 256, 256)).astype(np.float32)
    image = sitk.GetImageFromArray(noise)
    image.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(image, str(tmp_path / "noise.nii.gz"))
    out = tmp_path / "noise.seg.nrrd"
    result = cli("segment", str(tmp_path / "noise.nii.gz"), "--model", "thigh", "--output", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "No muscle was found" in result.stderr and "thighs" in result.stderr
    assert not sitk.GetArrayViewFromImage(sitk.ReadImage(str(out))).any()


def test_several_inputs_go_to_a_folder(calf_volume: Path, tmp_path: Path):
    second = tmp_path / "second.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(calf_volume)), str(second))
    result = cli("segment", str(calf_volume), str(second), "--model", "leg", "--output", str(tmp_path / "out"),
                 "--format", ".nii.gz", "--no-progress")
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["calf.json", "calf.nii.gz", "second.json", "second.nii.gz"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "second.nii.gz")))
    assert set(np.unique(labels)) > {0}


def _bad_volume(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.nrrd"
    if kind == "nan":
        array = np.ones((4, 32, 32), np.float32)
        array[1, 2, 3] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    elif kind == "4d":
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 3, 16, 16), np.float32), isVector=False), str(path))
    elif kind == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(32, 32).astype(np.float32)), str(path))
    elif kind == "constant":
        sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 32, 32), 7, np.float32)), str(path))
    elif kind == "text":
        path = tmp_path / "notes.nii.gz"
        path.write_text("not an image")
    elif kind == "spacing in metres":  # 432 pixels of 0.001 "mm": resampled to the model's grid, a few pixels
        image, _ = make_phantom("leg", shape=(2, 96, 128), seed=1)
        image.SetSpacing((0.001, 0.001, 0.005))
        sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("kind", ["nan", "4d", "2d", "constant", "text", "spacing in metres"])
def test_bad_input_exits_with_one_sentence_and_writes_nothing(tmp_path: Path, kind: str):
    bad = _bad_volume(tmp_path, kind)
    out = tmp_path / "out.seg.nrrd"
    result = cli("segment", str(bad), "--model", "leg", "--output", str(out), "--stats", str(tmp_path / "s.csv"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "s.csv").exists()


def test_unknown_model_and_bad_extension_are_refused(calf_volume: Path, tmp_path: Path):
    result = cli("segment", str(calf_volume), "--model", "knee", "--output", str(tmp_path / "x.seg.nrrd"))
    assert result.returncode == 2 and "unknown model 'knee'" in result.stderr
    result = cli("segment", str(calf_volume), "--model", "leg", "--output", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "unknown output format" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_models_lists_both_bundled_models_with_provenance():
    result = cli("models")
    assert result.returncode == 0
    assert "thigh" in result.stdout and "leg" in result.stdout
    assert "vastus lateralis" in result.stdout and "soleus" in result.stdout


@pytest.mark.parametrize("flags, message", [(["--device", "gpu"], "unknown device"),
                                            (["--device", "cuda:7"], "cuda"),
                                            (["--batch-size", "0"], "at least 1")])
def test_bad_device_or_batch_size_is_one_sentence(calf_volume: Path, tmp_path: Path, flags, message):
    result = cli("segment", str(calf_volume), "--model", "leg", "--output", str(tmp_path / "o.seg.nrrd"), *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and message in result.stderr
    assert list(tmp_path.iterdir()) == []
    # With several inputs too: one sentence and exit 2 before any work, not one failure per input.
    result = cli("segment", str(calf_volume), str(calf_volume.with_name("x.nrrd")), "--model", "leg",
                 "--output", str(tmp_path / "out"), *flags)
    assert result.returncode == 2 and result.stderr.count(message) == 1 and list(tmp_path.iterdir()) == []


def test_outputs_never_overwrite_inputs_or_their_sidecars(tmp_path: Path):
    image, _ = make_phantom("leg", shape=(1, 128, 160), seed=3)
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(scan))
    (tmp_path / "scan.json").write_text('{"EchoTime": 0.01}')
    before = scan.read_bytes()
    for output in (scan, tmp_path):
        result = cli("segment", str(scan), "--model", "leg", "--output", str(output), "--format", ".nii.gz")
        assert result.returncode == 2 and "would overwrite" in result.stderr
    assert scan.read_bytes() == before and (tmp_path / "scan.json").read_text() == '{"EchoTime": 0.01}'


def test_a_failing_case_is_named_and_the_others_are_still_written(calf_volume: Path, tmp_path: Path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("not an image")
    out = tmp_path / "out"
    result = cli("segment", str(calf_volume), str(broken), "--model", "leg", "--output", str(out),
                 "--stats", str(tmp_path / "s.csv"), "--no-progress")
    assert result.returncode == 1
    assert "broken.nii.gz" in result.stderr and "1 of 2 inputs failed" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["calf.seg.nrrd"]
    cases = {line.split(",")[0] for line in (tmp_path / "s.csv").read_text().splitlines()[1:]}
    assert cases == {"calf"}


def test_unwritable_output_is_one_sentence(calf_volume: Path, tmp_path: Path):
    (tmp_path / "afile").write_text("x")
    result = cli("segment", str(calf_volume), "--model", "leg", "--output", str(tmp_path / "afile" / "o.seg.nrrd"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "afile" in result.stderr


@pytest.mark.parametrize("clash", ["stats is csa", "stats is the input", "stats is the label table", "csa is a folder",
                                   "csa is the input's sidecar"])
def test_outputs_that_clash_are_refused_before_anything_is_written(calf_volume: Path, tmp_path: Path, clash: str):
    """One file per output, never an input, never a folder: checked before segmenting, so nothing is written."""
    work = tmp_path / "work"
    work.mkdir()
    scan = work / "scan.nii.gz"
    scan.write_bytes(calf_volume.read_bytes())
    stats, csa = work / "s.csv", work / "csa.csv"
    output = work / "scan_labels.nii.gz"
    stats, csa, expected = {"stats is csa": (stats, stats, "both name"),
                            "stats is the input": (scan, csa, "inputs"),
                            "stats is the label table": (work / "scan_labels.json", csa, "both name"),
                            "csa is a folder": (stats, tmp_path, "is a folder"),
                            "csa is the input's sidecar": (stats, work / "scan.json", "inputs")}[clash]
    before = sorted(p.name for p in work.iterdir())
    result = cli("segment", str(scan), "--model", "leg", "--output", str(output), "--stats", str(stats),
                 "--csa", str(csa), "--no-progress")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in work.iterdir()) == before and scan.read_bytes() == calf_volume.read_bytes()


def test_an_unexpected_failure_of_one_input_keeps_the_others_and_the_statistics(calf_volume: Path, tmp_path: Path,
                                                                               monkeypatch, capsys):
    """Not every failure is a DafneError (a bug, memory): a batch still writes the other cases and the CSV."""
    import dafne_logic.inference.segment as inference
    from dafne_logic.cli import main

    second = tmp_path / "second.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(calf_volume)), str(second))
    real, calls = inference.segment_with_confidence, []

    def flaky(image, model, **options):
        calls.append(1)
        if len(calls) == 2:  # the second input
            raise ValueError("weights must be positive")
        return real(image, model, **options)
    monkeypatch.setattr(inference, "segment_with_confidence", flaky)
    out, stats = tmp_path / "out", tmp_path / "s.csv"
    import dafne_logic.core.preview as preview

    def no_picture(*args, **kwargs):
        raise RuntimeError("matplotlib backend unavailable")
    monkeypatch.setattr(preview, "write_preview", no_picture)  # and every preview fails: the statistics stay
    assert main(["segment", str(calf_volume), str(second), "--model", "leg", "--output", str(out),
                 "--stats", str(stats), "--preview", str(tmp_path / "pictures"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "second.nrrd: failed: ValueError: weights must be positive" in err and "calf.nii.gz: preview failed" in err
    assert "2 of 2 inputs failed" in err  # the second's segmentation, the first's picture
    assert sorted(p.name for p in out.iterdir()) == ["calf.seg.nrrd"]
    assert {line.split(",")[0] for line in stats.read_text().splitlines()[1:]} == {"calf"}


def test_a_dot_input_is_named_after_its_folder_and_a_file_for_several_previews_is_refused(tmp_path: Path):
    from dafne_logic.commands.segment import case_name

    assert case_name(Path(".")) == Path.cwd().name and case_name(tmp_path / "series" / "..") == tmp_path.name
    taken = tmp_path / "preview.png"
    taken.write_bytes(b"x")
    result = cli("segment", "a.nii.gz", "b.nii.gz", "--model", "leg", "--output", str(tmp_path / "out"),
                 "--preview", str(taken))
    assert result.returncode == 2 and "must be a folder" in result.stderr and not (tmp_path / "out").exists()


def test_evaluate_refuses_a_reference_drawn_elsewhere_instead_of_scoring_dice_0(calf_volume: Path, tmp_path: Path):
    image = sitk.ReadImage(str(calf_volume))
    labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(image)
    labels[10:20, 10:20, 0] = 1
    labels.SetOrigin(tuple(o + 5000.0 for o in image.GetOrigin()))  # 5 m away
    far = tmp_path / "far.nii.gz"
    sitk.WriteImage(labels, str(far))
    result = cli("evaluate", "--model", "leg", "--image", str(calf_volume), "--reference", str(far),
                 "--csv", str(tmp_path / "d.csv"))
    assert result.returncode == 2 and "does not overlap the image" in result.stderr
    assert not (tmp_path / "d.csv").exists()

