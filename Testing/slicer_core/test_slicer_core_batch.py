"""DafneSlicer/Scripts/batch_segment.py on a real MRML scene: .seg.nrrd per volume, one statistics CSV."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")
import SimpleITK as sitk  # noqa: E402

from dafne_logic.core.labels import LEG  # noqa: E402
from dafne_logic.phantoms.images import make_phantom  # noqa: E402
from DafneSlicerLib import mrml_conversion as mc  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "DafneSlicer" / "Scripts" / "batch_segment.py"


def _batch_module():
    spec = importlib.util.spec_from_file_location("batch_segment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_writes_segmentations_and_statistics_and_lists_failures(scene, tmp_path, tiny_leg_model, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for seed in (1, 2):
        image, _ = make_phantom("leg", shape=(2, 64, 96), seed=seed)
        sitk.WriteImage(image, str(inputs / f"case{seed}.nrrd"))
    sitk.WriteImage(sitk.Image([8, 8, 2], sitk.sitkFloat32), str(inputs / "blank.nii.gz"))  # constant: refused
    (inputs / "old.seg.nrrd").write_bytes(b"not an input")  # segmentations in the folder are skipped

    status = _batch_module().main(["--model", tiny_leg_model, "--device", "cpu", str(inputs), str(outputs)], scene=scene)

    assert status == 1  # one input failed
    captured = capsys.readouterr()
    assert "blank.nii.gz: FAILED" in captured.err and "2 of 3 volumes segmented" in captured.out
    assert sorted(p.name for p in outputs.iterdir()) == ["case1.seg.nrrd", "case2.seg.nrrd", "statistics.csv"]
    node = mc.load_segmentation(scene, str(outputs / "case1.seg.nrrd"))
    assert mc.segment_names(node) == [label.name for label in LEG.volume_labels()]
    with open(outputs / "statistics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case1"] * 12 + ["case2"] * 12  # as dafne-slicer segment names cases
    found = [r for r in rows if int(r["voxel_count"])]
    assert found and all(0 < float(r["confidence"]) <= 1 and r["review"] in ("True", "False") for r in found)
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0  # one case at a time


def test_batch_refuses_unusable_arguments(scene, tmp_path, capsys):
    batch = _batch_module()
    assert batch.main([str(tmp_path / "absent"), str(tmp_path / "out")], scene=scene) == 2
    (tmp_path / "empty").mkdir()
    assert batch.main([str(tmp_path / "empty"), str(tmp_path / "out")], scene=scene) == 2
    assert "no image files" in capsys.readouterr().err
    np.testing.assert_equal(list(tmp_path.iterdir()), [tmp_path / "empty"])  # nothing written


def test_batch_side_option_reaches_the_segmentation(scene, tmp_path, tiny_leg_model, monkeypatch):
    from DafneSlicerLib.segmentation_logic import SegmentationLogic

    sides = []
    segment = SegmentationLogic.segment

    def recording(self, image, model, device, progress, cancel, single_leg_side=None):
        sides.append(single_leg_side)
        return segment(self, image, model, device, progress, cancel, single_leg_side=single_leg_side)

    monkeypatch.setattr(SegmentationLogic, "segment", recording)
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = make_phantom("leg", shape=(1, 64, 96), legs="right", seed=3)
    sitk.WriteImage(image, str(inputs / "one_leg.nrrd"))
    batch = _batch_module()
    assert batch.main(["--model", tiny_leg_model, "--device", "cpu", "--side", "left", str(inputs),
                       str(tmp_path / "out")], scene=scene) == 0
    assert batch.main(["--model", tiny_leg_model, "--device", "cpu", str(inputs), str(tmp_path / "out2")],
                      scene=scene) == 0
    assert sides == ["left", None]
    with pytest.raises(SystemExit):
        batch.parse_args(["--side", "middle", "in", "out"])


@pytest.mark.parametrize("failure, status", [(RuntimeError("the GPU fell off"), 2), (KeyboardInterrupt(), 2),
                                             (SystemExit(2), 2)])
def test_batch_always_exits_with_a_status_even_on_unexpected_errors(scene, tmp_path, monkeypatch, capsys, failure, status):
    """Slicer stays open after --python-script unless the script exits: ``run`` must always call exit."""
    from DafneSlicerLib.segmentation_logic import SegmentationLogic

    def broken(self, name):
        raise failure

    monkeypatch.setattr(SegmentationLogic, "load_model", broken)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.Image([8, 8, 2], sitk.sitkFloat32), str(tmp_path / "in" / "a.nrrd"))
    exits = []
    _batch_module().run(["--model", "leg", str(tmp_path / "in"), str(tmp_path / "out")], exits.append, scene=scene)
    assert exits == [status]
    assert not (tmp_path / "out").exists()
    assert "run(sys.argv[1:], slicer.util.exit)" in SCRIPT.read_text()  # what Slicer runs goes through run()


def test_batch_counts_an_unexpected_error_of_one_case_as_failed_and_goes_on(scene, tmp_path, tiny_leg_model, monkeypatch,
                                                                            capsys):
    import dafne_logic.core.io

    read_image = dafne_logic.core.io.read_image

    def flaky(path):
        if Path(path).name == "a.nrrd":
            raise MemoryError("out of memory")
        return read_image(path)

    monkeypatch.setattr(dafne_logic.core.io, "read_image", flaky)
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        sitk.WriteImage(make_phantom("leg", shape=(1, 64, 96), seed=1)[0], str(tmp_path / "in" / f"{name}.nrrd"))
    exits = []
    _batch_module().run(["--model", tiny_leg_model, "--device", "cpu", str(tmp_path / "in"), str(tmp_path / "out")],
                        exits.append, scene=scene)
    assert exits == [1]
    assert "a.nrrd: FAILED: MemoryError: out of memory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.seg.nrrd", "statistics.csv"]


def test_an_output_folder_inside_the_input_folder_and_with_a_dot_in_its_name(scene, tmp_path, tiny_leg_model):
    """OUTPUT_DIR is always a folder (results.v1 too), and one inside INPUT_DIR is not an input the next time."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = make_phantom("leg", shape=(2, 64, 96), seed=1)
    sitk.WriteImage(image, str(inputs / "case1.nrrd"))
    outputs = inputs / "results.v1"
    batch = _batch_module()
    for _ in range(2):  # the second run finds the first run's folder beside its input
        assert batch.main(["--model", tiny_leg_model, "--device", "cpu", str(inputs), str(outputs)], scene=scene) == 0
    assert sorted(p.name for p in outputs.iterdir()) == ["case1.seg.nrrd", "statistics.csv"]


def test_inputs_whose_names_differ_only_in_letter_case_are_refused(scene, tmp_path, tiny_leg_model, capsys):
    """Scan.nrrd and scan.nii.gz would write one scan.seg.nrrd on a macOS or Windows disk."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = make_phantom("leg", shape=(2, 64, 96), seed=1)
    sitk.WriteImage(image, str(inputs / "Scan.nrrd"))
    sitk.WriteImage(image, str(inputs / "scan.nii.gz"))
    assert _batch_module().main(["--model", tiny_leg_model, str(inputs), str(tmp_path / "out")], scene=scene) == 2
    assert "share a name" in capsys.readouterr().err and not (tmp_path / "out").exists()



def test_a_rerun_leaves_the_output_folder_true_to_it(scene, tmp_path, tiny_leg_model, capsys):
    """A case failing now loses its earlier result, a run segmenting nothing removes the earlier
    statistics, an earlier run's output folder inside INPUT_DIR is no input, and no node stays behind."""
    inputs, outputs = tmp_path / "in", tmp_path / "in" / "results_v2"
    inputs.mkdir()
    image, _ = make_phantom("leg", shape=(2, 64, 96), seed=1)
    sitk.WriteImage(image, str(inputs / "case1.nrrd"))
    batch = _batch_module()
    run = ["--model", tiny_leg_model, "--device", "cpu", str(inputs)]
    assert batch.main(run + [str(inputs / "results_v1")], scene=scene) == 0
    assert batch.main(run + [str(outputs)], scene=scene) == 0  # results_v1 is not taken for a DICOM folder
    assert scene.GetNodesByClass("vtkMRMLSegmentationDisplayNode").GetNumberOfItems() == 0  # one case at a time
    sitk.WriteImage(sitk.Image([8, 8, 2], sitk.sitkFloat32), str(inputs / "case1.nrrd"))  # now unusable
    capsys.readouterr()
    assert batch.main(run + [str(outputs)], scene=scene) == 1
    assert "the earlier result is now case1.seg.nrrd.previous" in capsys.readouterr().err
    # Neither a stale segmentation posing as this run's nor stale statistics; the earlier result is kept aside.
    assert [p.name for p in outputs.iterdir()] == ["case1.seg.nrrd.previous"]


def test_a_dicom_case_folder_keeping_a_corrected_segmentation_is_still_a_case(tmp_path):
    from dafne_logic.phantoms.dicom import write_dicom_series

    case = tmp_path / "in" / "subject01"
    image, _ = make_phantom("leg", shape=(2, 64, 96), seed=1)
    write_dicom_series(sitk.RescaleIntensity(image, 0, 1000), case)
    (case / "subject01_corrected.seg.nrrd").write_bytes(b"x")
    earlier = tmp_path / "in" / "results_v1"
    earlier.mkdir()
    (earlier / "statistics.csv").write_text("x")
    (earlier / "statistics.xlsx").write_bytes(b"x")  # the CSV saved from a spreadsheet beside it
    (earlier / "subject01.seg.nrrd").write_bytes(b"x")
    assert _batch_module().find_inputs(tmp_path / "in") == [case]


@pytest.mark.parametrize("problem, message", [
    ("device", "cuda"),  # checked once before any case (was one failure per case, exit 1)
    ("output under a file", "cannot make the folder"),  # was a NotADirectoryError traceback
])
def test_batch_refuses_a_device_or_output_it_cannot_use_before_any_case(scene, tmp_path, tiny_leg_model, capsys,
                                                                       monkeypatch, problem, message):
    import torch

    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = make_phantom("leg", shape=(2, 64, 96), seed=1)
    sitk.WriteImage(image, str(inputs / "case1.nrrd"))
    (tmp_path / "notes.txt").write_text("x")
    output = tmp_path / "notes.txt" / "out" if problem == "output under a file" else tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = "cuda" if problem == "device" else "cpu"
    assert _batch_module().main(["--model", tiny_leg_model, "--device", device, str(inputs), str(output)], scene=scene) == 2
    assert message in capsys.readouterr().err.lower() and not (tmp_path / "out").exists()


def test_a_folder_of_several_series_says_to_split_them_not_to_use_an_option_the_batch_lacks(scene, tmp_path,
                                                                                          tiny_leg_model, capsys):
    from dafne_logic.phantoms.dicom import write_dicom_series

    exam = tmp_path / "in" / "exam"
    image, _ = make_phantom("leg", shape=(2, 64, 96), seed=1)
    positive = sitk.RescaleIntensity(image, 0, 1000)
    write_dicom_series(positive, exam, series_description="water", series_number=1)
    for path in write_dicom_series(positive, tmp_path / "fat", series_description="fat", series_number=2):
        path.rename(exam / f"fat_{path.name}")  # a Dixon exam: two series in one folder
    assert _batch_module().main(["--model", tiny_leg_model, "--device", "cpu", str(tmp_path / "in"),
                                 str(tmp_path / "out")], scene=scene) == 1
    err = capsys.readouterr().err
    assert "holds 2 DICOM series" in err and "put each in its own folder" in err and "--series" not in err
