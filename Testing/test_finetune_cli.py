"""``dafne-slicer finetune``, ``evaluate`` and ``report`` end to end on tiny files."""

from __future__ import annotations

import csv
import json

import pytest
import SimpleITK as sitk
from test_finetune import folder_digest, tiny_model, two_legs

from dafne_logic.cli import main
from dafne_logic.core.io import write_labels
from dafne_logic.core.labels import LEG
from dafne_logic.inference.model_package import ModelPackage


def write_case(folder, name, seed, n_slices=4, fmt=".seg.nrrd"):
    image, labels = two_legs(n_slices=n_slices, seed=seed)
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    write_labels(labels, folder / f"{name}{fmt}", LEG)
    return folder / f"{name}.nii.gz", folder / f"{name}{fmt}"


def test_finetune_evaluate_report(tmp_path, capsys):
    tiny_model().save(tmp_path / "parent")
    before = folder_digest(tmp_path / "parent")
    img_a, seg_a = write_case(tmp_path, "a", 0)
    img_b, seg_b = write_case(tmp_path, "b", 1, n_slices=3, fmt=".nii.gz")

    rc = main(["finetune", "--model", str(tmp_path / "parent"), "--image", str(img_a), "--segmentation", str(seg_a),
               "--output-model", str(tmp_path / "child"), "--epochs", "6", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "leg-slices" in out and "delta" in out
    child = ModelPackage.load(tmp_path / "child")
    assert child.manifest.parent_version == "1"
    assert {p.name for p in (tmp_path / "child").iterdir()} >= {
        "manifest.json", "weights.safetensors", "delta.safetensors.zz", "delta.json", "finetune_report.json"}
    assert folder_digest(tmp_path / "parent") == before

    dice_csv = tmp_path / "dice.csv"
    rc = main(["evaluate", "--model", str(tmp_path / "parent"), str(tmp_path / "child"),
               "--image", str(img_a), str(img_b), "--reference", str(seg_a), str(seg_b), "--csv", str(dice_csv),
               "--device", "cpu"])
    assert rc == 0
    with dice_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["model_version"]) for r in rows] == [
        ("a", "1"), ("a", child.manifest.version), ("b", "1"), ("b", child.manifest.version)]
    assert list(rows[0])[:4] == ["dataset", "model_version", "dice", "right soleus"]
    dice = {(r["dataset"], r["model_version"] == "1"): float(r["dice"]) for r in rows}
    assert dice[("a", False)] > dice[("a", True)] + 0.08  # learnt on a (default, cautious settings)
    assert dice[("b", False)] > dice[("b", True)] + 0.05  # and it carries over to b

    capsys.readouterr()
    rc = main(["report", "--dice-csv", str(dice_csv), "--json", str(tmp_path / "fit.json")])
    assert rc == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["n_datasets"] == 2 and fit["n_observations"] == 4 and fit["slope"] > 0.05


def test_finetune_cli_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    tiny_model().save(tmp_path / "parent")
    image, labels = two_legs(n_slices=2)
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    array = sitk.GetArrayFromImage(labels)
    array[0, 0, :3] = 13
    extra = sitk.GetImageFromArray(array)
    extra.CopyInformation(labels)
    sitk.WriteImage(extra, str(tmp_path / "seg.nii.gz"))
    names = {str(lab.value): lab.name for lab in LEG.volume_labels()} | {"13": "Tibia"}
    (tmp_path / "seg.json").write_text(json.dumps(names))
    common = ["finetune", "--model", str(tmp_path / "parent"), "--image", str(tmp_path / "img.nii.gz"),
              "--segmentation", str(tmp_path / "seg.nii.gz"), "--no-progress", "--epochs", "1"]

    assert main(common + ["--output-model", str(tmp_path / "out")]) == 2
    assert "Tibia" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(common + ["--output-model", str(tmp_path / "parent")]) == 2
    assert "parent" in capsys.readouterr().err
    assert main(common + ["--output-model", str(tmp_path / "out"), "--slices", "1-x"]) == 2
    assert not (tmp_path / "out").exists()
    # unknown labels may be dropped on request
    assert main(common + ["--output-model", str(tmp_path / "out"), "--ignore-unknown-labels"]) == 0
    assert (tmp_path / "out" / "delta.json").is_file()


def test_evaluate_cli_checks_pairs(tmp_path, capsys):
    tiny_model().save(tmp_path / "m")
    img, seg = write_case(tmp_path, "a", 0, n_slices=2)
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--image", str(img), str(img),
                 "--reference", str(seg), "--csv", str(tmp_path / "d.csv")]) == 2
    assert "one reference per image" in capsys.readouterr().err
    assert not (tmp_path / "d.csv").exists()
    reference = seg.read_bytes()
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--image", str(img), "--reference", str(seg),
                 "--csv", str(seg)]) == 2  # --csv naming the reference: refused before any work
    assert "overwrite one of this command's inputs" in capsys.readouterr().err and seg.read_bytes() == reference


def test_an_output_naming_the_parent_in_other_letter_case_is_refused(tmp_path, capsys, monkeypatch):
    """On macOS's case-insensitive disk ``./mythigh`` is ``./MyThigh``, and ``resolve()`` keeps the case
    as typed: the fine-tuned model would replace its parent. A small fake of that disk's samefile."""
    import os

    tiny_model().save(tmp_path / "MyLeg")
    before = folder_digest(tmp_path / "MyLeg")
    real_samefile = os.path.samefile

    def case_insensitive_disk(a, b):
        fold = [str(p).casefold() for p in (a, b)]
        return fold[0] == fold[1] or real_samefile(a, b)

    monkeypatch.setattr(os.path, "samefile", case_insensitive_disk)
    assert main(["finetune", "--model", str(tmp_path / "MyLeg"), "--image", str(tmp_path / "img.nii.gz"),
                 "--segmentation", str(tmp_path / "seg.nii.gz"), "--output-model", str(tmp_path / "myleg")]) == 2
    assert "parent model's folder" in capsys.readouterr().err
    assert folder_digest(tmp_path / "MyLeg") == before


def test_an_output_naming_the_case_folder_or_a_segmentation_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """``--output-model .`` in the case folder, or the corrected file itself, used to be replaced by the model."""
    import dafne_logic.learning.finetune as finetune

    tiny_model().save(tmp_path / "parent")
    case = tmp_path / "case"
    case.mkdir()
    image, segmentation = write_case(case, "a", 0, n_slices=2)
    before = folder_digest(case)
    monkeypatch.setattr(finetune, "train_on_slices", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    for output in (case, segmentation):
        assert main(["finetune", "--model", str(tmp_path / "parent"), "--image", str(image), "--segmentation",
                     str(segmentation), "--output-model", str(output), "--no-progress"]) == 2
        assert "not a model package folder" in capsys.readouterr().err
    assert folder_digest(case) == before


def test_evaluate_scores_only_the_muscles_the_reference_names(tmp_path, capsys):
    """A reference of another labelling scheme (here without the left soleus) gave that muscle Dice 0 and
    pulled the mean down; a reference of another region gave 0 everywhere with exit status 0."""
    from dafne_logic.core.labels import THIGH

    tiny_model().save(tmp_path / "m")
    image, reference = write_case(tmp_path, "a", 0, n_slices=2, fmt=".nii.gz")
    table = json.loads(reference.with_name("a.json").read_text())
    full_csv, partial_csv = tmp_path / "full.csv", tmp_path / "partial.csv"
    args = ["evaluate", "--model", str(tmp_path / "m"), "--image", str(image), "--reference", str(reference),
            "--device", "cpu", "--csv"]
    assert main(args + [str(full_csv)]) == 0
    table["labels"] = {value: entry for value, entry in table["labels"].items() if entry["name"] != "left soleus"}
    reference.with_name("a.json").write_text(json.dumps(table))
    assert main(args + [str(partial_csv)]) == 0
    full, partial = (next(csv.DictReader(p.open())) for p in (full_csv, partial_csv))
    assert full["left soleus"] != "" and partial["left soleus"] == ""
    others = [float(v) for k, v in partial.items() if k not in ("dataset", "model_version", "dice") and v != ""]
    assert float(partial["dice"]) == pytest.approx(sum(others) / len(others), abs=1e-5)  # the CSV rounds

    thigh = tmp_path / "thigh.nii.gz"
    reference.rename(thigh)
    thigh.with_name("thigh.json").write_text(json.dumps({str(v.value): v.name for v in THIGH.volume_labels()}))
    assert main(args[:6] + [str(thigh)] + args[7:] + [str(tmp_path / "x.csv")]) == 2
    assert "thigh.nii.gz names none of the" in capsys.readouterr().err
