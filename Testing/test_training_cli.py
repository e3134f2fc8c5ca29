"""``dafne-slicer train`` end to end on tiny label maps: package, resume, hold-out, clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dafne_logic.cli import main
from dafne_logic.commands.train import DATA_SOURCES, PHANTOM_SOURCE, data_sources, merge_sources, pair_sources, source_list
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.training.synthesis import SynthesisConfig

FAST = ["--steps", "4", "--batch-size", "2", "--size", "64", "--checkpoint-every", "2", "--val-every", "2",
        "--no-progress"]


def calf_map(path: Path, shift: int = 0) -> Path:
    """Both calves, named like the real calf slices' tables ({"1": "Soleus_R", ...})."""
    volume = np.zeros((2, 60, 120), np.uint8)
    for value_offset, cx in ((0, 30 + shift), (1, 90 - shift)):
        volume[:, 30:45, cx - 10:cx + 10] = 1 + value_offset  # soleus
        volume[:, 20:30, cx - 10:cx] = 3 + value_offset  # gastrocnemius medialis
        volume[:, 20:30, cx:cx + 10] = 5 + value_offset  # gastrocnemius lateralis
        volume[:, 10:20, cx - 5:cx + 5] = 7 + value_offset  # tibialis anterior
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.0, 1.0, 5.0))
    image.SetOrigin((-60.0, -30.0, 0.0))
    sitk.WriteImage(image, str(path))
    names = ["Soleus", "Gastrocnemius Medialis", "Gastrocnemius Lateralis", "Tibialis Anterior"]
    table = {str(2 * i + 1 + s): f"{n}_{'RL'[s]}" for i, n in enumerate(names) for s in (0, 1)}
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(table))
    return path


def two_calf_maps(tmp_path: Path) -> Path:
    """A folder of two subjects' calf label maps (subject_a, and subject_b shifted by 3 voxels)."""
    maps = tmp_path / "maps"
    maps.mkdir()
    calf_map(maps / "subject_a_labels.nii.gz")
    calf_map(maps / "subject_b_labels.nii.gz", shift=3)
    return maps


def test_train_from_label_maps_resume_and_holdout(tmp_path: Path, capsys):
    maps = two_calf_maps(tmp_path)
    out = tmp_path / "model"
    args = ["train", "--region", "leg", "--label-maps", str(maps), "--holdout-subjects", "subject_b",
            "--output", str(out)] + FAST
    assert main(args) == 0
    package = ModelPackage.load(out)
    training = package.manifest.provenance["training"]
    assert training["training_subjects"] == ["subject_a"] and training["holdout_subjects"] == ["subject_b"]
    assert "--holdout-subjects subject_b" in training["command"]
    assert package.manifest.preprocessing.spacing_mm == (1.0, 1.0)
    assert 0.0 <= training["final_validation"]["mean_dice"] <= 1.0
    rows = list(csv.DictReader((tmp_path / "model.training" / "train_log.csv").open()))
    assert [r["step"] for r in rows] == ["2", "4"] and rows[-1]["mean_dice"] != ""
    # Resuming a finished run changes nothing; resuming with other settings is refused.
    assert main(args + ["--resume"]) == 0
    again = ModelPackage.load(out)
    assert all((again.state_dict[k] == v).all() for k, v in package.state_dict.items())
    assert main(args[:-len(FAST)] + ["--lr", "0.1"] + FAST + ["--resume"]) == 2
    assert "other settings" in capsys.readouterr().err
    # Resuming on other data (here: subject_b no longer held out) would leave a manifest describing data
    # its weights did not see.
    other_data = [a for a in args if a not in ("--holdout-subjects", "subject_b")]
    assert main(other_data + ["--resume"]) == 2
    assert "trained on other data" in capsys.readouterr().err
    assert all((ModelPackage.load(out).state_dict[k] == v).all() for k, v in package.state_dict.items())
    # Fewer steps than the checkpoint holds: refused (the checkpoint was saved as the earlier step, and a later
    # --resume trained those steps twice).
    at = args.index("--steps") + 1
    steps = args[at]
    fewer = args[:at] + [str(int(steps) - 2)] + args[at + 1:]
    assert main(fewer + ["--resume"]) == 2
    assert f"the checkpoint is at step {steps}" in capsys.readouterr().err


def test_train_with_phantoms_only(tmp_path: Path):
    out = tmp_path / "ph"
    assert main(["train", "--region", "leg", "--phantoms", "1", "--output", str(out), "--steps", "2",
                 "--batch-size", "2", "--size", "64", "--no-progress"]) == 0
    assert ModelPackage.load(out).manifest.provenance["trained_on"].endswith("phantoms")


def test_synthesis_ranges_can_be_changed_and_are_recorded(tmp_path: Path):
    """``--synthesis``: the sampler draws with the changed ranges, which the manifest and its command keep."""
    out = tmp_path / "ph"
    assert main(["train", "--region", "leg", "--phantoms", "1", "--output", str(out), "--steps", "2",
                 "--batch-size", "2", "--size", "64", "--no-progress",
                 "--synthesis", "p_infiltration=0.7", "--synthesis", "infiltration_affected=[0.5,1.0]",
                 "--time-limit", "5"]) == 0
    training = ModelPackage.load(out).manifest.provenance["training"]
    assert 0 < training["config"]["time_limit_s"] < 300  # 5 minutes less the time the data took to read
    assert "--time-limit 5.0" in training["command"] and training["steps_done"] == 2  # --steps still caps it
    assert training["synthesis"]["p_infiltration"] == 0.7
    assert training["synthesis"]["infiltration_affected"] == [0.5, 1.0]
    assert training["synthesis"]["p_bone"] == SynthesisConfig().p_bone  # the rest as today
    assert "--synthesis p_infiltration=0.7 'infiltration_affected=[0.5,1.0]'" in training["command"]


@pytest.mark.parametrize("problem, message", [
    ("empty_folder", "no label maps found"),
    ("unknown_holdout", "held-out subjects ['nobody'] are in none"),
    ("no_source", "nothing to learn from"),
    ("no_table", "say which labels to learn"),
    ("unknown_label", "not named in"),
    ("empty_file", "a_labels.nii.gz is an empty file"),
    ("corrupt_file", "a_labels.nrrd could not be read as a label map"),
    ("mismatched_table", "are not muscles of the leg table"),
    ("bad_synthesis", "--synthesis p_infiltration=lots: the value is not JSON"),
    ("bad_time_limit", "--time-limit must be a positive number of minutes"),
    ("resumed_time_limit", "--time-limit cannot be combined with --resume"),
    ("negative_lr", "the learning rate must be a positive number"),  # was AdamW's ValueError traceback
    ("odd_size", "--size must be a multiple of 16"),  # was a tensor size mismatch at the first step
    ("zero_spacing", "--spacing must be a pixel size"),  # 0 silently meant the default
])
def test_bad_training_input_is_one_sentence(tmp_path: Path, capsys, problem: str, message: str):
    maps = tmp_path / "maps"
    maps.mkdir()
    base = ["train", "--output", str(tmp_path / "m")] + FAST
    if problem == "empty_folder":
        args = base + ["--region", "leg", "--label-maps", str(maps)]
    elif problem == "unknown_holdout":
        calf_map(maps / "a_labels.nii.gz")
        args = base + ["--region", "leg", "--label-maps", str(maps), "--holdout-subjects", "nobody"]
    elif problem == "bad_time_limit":
        calf_map(maps / "a_labels.nii.gz")
        args = base + ["--region", "leg", "--label-maps", str(maps), "--time-limit", "0"]
    elif problem in ("negative_lr", "odd_size", "zero_spacing"):
        calf_map(maps / "a_labels.nii.gz")
        option = {"negative_lr": ["--lr", "-0.002"], "odd_size": ["--size", "100"], "zero_spacing": ["--spacing", "0"]}
        args = base + ["--region", "leg", "--label-maps", str(maps)] + option[problem]
    elif problem == "resumed_time_limit":
        calf_map(maps / "a_labels.nii.gz")
        args = base + ["--region", "leg", "--label-maps", str(maps), "--time-limit", "5", "--resume"]
    elif problem == "bad_synthesis":
        calf_map(maps / "a_labels.nii.gz")
        args = base + ["--region", "leg", "--label-maps", str(maps), "--synthesis", "p_infiltration=lots"]
    elif problem == "no_source":
        args = base + ["--region", "leg"]
    elif problem == "no_table":
        args = base + ["--label-maps", str(maps)]
    elif problem == "empty_file":
        calf_map(maps / "b_labels.nii.gz")
        (maps / "a_labels.nii.gz").write_bytes(b"")
        args = base + ["--region", "leg", "--label-maps", str(maps)]
    elif problem == "corrupt_file":
        calf_map(maps / "b_labels.nii.gz")
        (maps / "a_labels.nrrd").write_bytes(b"NRRD0004\ntype: nonsense\n\n")
        args = base + ["--region", "leg", "--label-maps", str(maps)]
    elif problem == "mismatched_table":
        path = calf_map(maps / "a_labels.nii.gz")
        path.with_name("a_labels.json").write_text(json.dumps({str(v): f"Vastus Lateralis_{v}" for v in range(1, 9)}))
        args = base + ["--region", "leg", "--label-maps", str(path)]
    else:
        path = calf_map(maps / "a_labels.nii.gz")
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        volume[0, 0, 0] = 42
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((1.0, 1.0, 5.0))
        sitk.WriteImage(image, str(path))
        args = base + ["--region", "leg", "--label-maps", str(path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_train_on_real_pairs(tmp_path: Path):
    """The generic path: a phantom volume with its label map as a real pair, any label table file."""
    from dafne_logic.core.io import write_labels
    from dafne_logic.core.labels import LEG
    from dafne_logic.phantoms.images import make_phantom

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    image, labels = make_phantom(region="leg", shape=(2, 96, 128), seed=3)
    sitk.WriteImage(image, str(pairs / "case1.nii.gz"))
    write_labels(labels, pairs / "case1_labels.nii.gz", LEG)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(LEG.to_json()))
    out = tmp_path / "m"
    assert main(["train", "--label-table", str(table), "--pairs", str(pairs), "--output", str(out)] + FAST) == 0
    package = ModelPackage.load(out)
    assert package.manifest.provenance["trained_on"] == "real image/label pairs"
    training = package.manifest.provenance["training"]
    assert training["synthesis"]["rotation_deg"] == SynthesisConfig().rotation_deg  # the augmentation used
    assert training["data_sources"] == [{"name": f"image/label pairs in {pairs}", "used": "real images and their label maps"}]
    assert package.manifest.labels.n_classes == LEG.n_classes
    # A misspelled held-out subject would be trained on while the manifest lists it as held out.
    assert main(["train", "--label-table", str(table), "--pairs", str(pairs), "--output", str(tmp_path / "m2"),
                 "--holdout-subjects", "case_1"] + FAST) == 2
    assert not (tmp_path / "m2").exists()


def test_train_from_a_shipped_model_keeps_its_weights_and_says_so(tmp_path: Path, capsys):
    """``--init``: training continues from a package's weights (a tiny learning rate barely moves
    them, a random start is far away); a package of other anatomy is refused before training."""
    from dafne_logic.inference.model_package import load_model

    parent = load_model("leg")
    base = ["train", "--region", "leg", "--phantoms", "1", "--steps", "1", "--batch-size", "2", "--size", "64",
            "--lr", "1e-9", "--no-progress"]
    assert main(base + ["--init", str(parent.path), "--output", str(tmp_path / "warm")]) == 0
    assert main(base + ["--output", str(tmp_path / "cold")]) == 0
    warm, cold = ModelPackage.load(tmp_path / "warm"), ModelPackage.load(tmp_path / "cold")
    key = "model.0.conv.unit0.conv.weight"
    assert torch.allclose(warm.state_dict[key], parent.state_dict[key], atol=1e-3)
    assert not torch.allclose(cold.state_dict[key], parent.state_dict[key], atol=1e-2)
    origin = warm.manifest.provenance["training"]["initialised_from"]
    assert origin == {"name": "leg", "version": parent.manifest.version,
                      "weights_sha256": parent.manifest.weights_sha256}
    assert "--init" in warm.manifest.provenance["training"]["command"]
    # Resumed without --init, the manifest lost the parent and its credited sources while the weights kept them.
    capsys.readouterr()
    assert main(base + ["--output", str(tmp_path / "warm"), "--resume"]) == 2
    assert "started from another model" in capsys.readouterr().err
    assert main(base + ["--init", str(parent.path), "--output", str(tmp_path / "warm"), "--resume"]) == 0
    # What the parent learnt from stays credited; a model from scratch names only its own sources.
    names = [source["name"] for source in warm.manifest.provenance["training"]["data_sources"]]
    parent_names = [source["name"] for source in parent.manifest.provenance["training"]["data_sources"]]
    assert names[0] == PHANTOM_SOURCE["name"] and set(parent_names) <= set(names) and len(set(names)) == len(names)
    assert cold.manifest.provenance["training"]["data_sources"] == [PHANTOM_SOURCE]
    # The whole synthesis is recorded, so the recipe is known after the defaults change.
    synthesis = cold.manifest.provenance["training"]["synthesis"]
    assert synthesis["infiltration_affected"] == list(SynthesisConfig().infiltration_affected)
    assert synthesis["size"] == [64, 64] and synthesis["p_infiltration"] == SynthesisConfig().p_infiltration
    capsys.readouterr()
    assert main(base + ["--init", str(load_model("thigh").path), "--output", str(tmp_path / "bad")]) == 2
    assert "architecture" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_source_weights_set_each_label_maps_share(tmp_path: Path, capsys):
    maps = two_calf_maps(tmp_path)
    out = tmp_path / "model"
    base = ["train", "--region", "leg", "--label-maps", str(maps), "--output", str(out)] + FAST
    assert main(base + ["--source-weights", "subject_a=3"]) == 0
    training = ModelPackage.load(out).manifest.provenance["training"]
    assert training["source_weights"] == [["subject_a", 0.75], ["subject_b", 0.25]]
    assert "--source-weights subject_a=3" in training["command"]
    assert main(base + ["--source-weights", "nobody=2"]) == 2
    assert "no label map's file name contains 'nobody'" in capsys.readouterr().err
    assert main(base + ["--source-weights", "subject_a=-1"]) == 2
    assert "positive weight" in capsys.readouterr().err
    assert main(base + ["--source-weights", "subject=2", "subject_a=5"]) == 2  # the second would do nothing
    assert "put the more specific name first" in capsys.readouterr().err and not out.with_name("model2").exists()


def test_pairs_from_a_shared_folder_credit_it_and_say_its_images_were_used():
    sources = pair_sources([Path("../shared/data/calf_slices"), Path("mine")])
    assert [s["name"] for s in sources] == ["image/label pairs in ../shared/data/calf_slices", "image/label pairs in mine",
                                            DATA_SOURCES["calf_slices"]["name"]]
    assert sources[2]["licence"] == "Apache-2.0" and "images" in sources[2]["used"]


def test_data_sources_are_named_from_the_shared_folders_used():
    """Each shared-data folder in the label-map paths brings its credit and licence; phantoms when used."""
    files = [Path("../shared/data/visible_human_label_maps/VHM_legs_labels.nii.gz"),
             Path("../shared/data/calf_slices/t1_example_labels.nii.gz"), Path("elsewhere/mine_labels.nii.gz")]
    sources = data_sources(files, phantoms=True)
    assert [s["licence"] for s in sources] == ["Apache-2.0", "CC BY 4.0", "Apache-2.0 (generated)"]
    assert "Visible Human" in sources[1]["name"] and sources[-1] == PHANTOM_SOURCE
    assert data_sources(files[2:], phantoms=False) == []
    assert merge_sources(sources[:1], sources) == sources  # each source once, first seen first
    # A parent manifest written before the list (folder -> text) still passes its credit on.
    old = source_list({"calf_slices": "dafne-evaluation ...", "my_maps": "our own label maps"})
    assert old[0] == DATA_SOURCES["calf_slices"] and old[1] == {"name": "my_maps", "used": "our own label maps"}
    assert source_list([{"licence": "MIT"}, "junk", {"name": "x"}]) == [{"name": "x"}] and source_list(None) == []


def test_a_new_run_removes_an_earlier_runs_checkpoint_with_its_description(tmp_path: Path):
    """Else a new run stopped before its first checkpoint could be resumed from the earlier run's weights
    under the new run's data description."""
    from dafne_logic.commands.train import check_resumed_data
    from dafne_logic.training.trainer import CHECKPOINT_DIR

    work = tmp_path / "m.training"
    (work / CHECKPOINT_DIR).mkdir(parents=True)
    check_resumed_data(work, {"holdout_subjects": ["a"]}, resume=True)  # resuming keeps it
    assert (work / CHECKPOINT_DIR).is_dir()
    check_resumed_data(work, {"holdout_subjects": ["b"]}, resume=False)
    assert not (work / CHECKPOINT_DIR).exists()



def test_a_new_run_refused_for_its_init_model_keeps_the_earlier_runs_checkpoint(tmp_path: Path, capsys):
    from dafne_logic.inference.manifest import BUNDLED_DIR
    from dafne_logic.training.trainer import CHECKPOINT_DIR

    maps = two_calf_maps(tmp_path)
    args = ["train", "--region", "leg", "--label-maps", str(maps), "--output", str(tmp_path / "m")] + FAST
    assert main(args) == 0
    checkpoint = tmp_path / "m.training" / CHECKPOINT_DIR
    assert checkpoint.is_dir()
    assert main(args + ["--init", str(BUNDLED_DIR / "thigh")]) == 2  # another label table: refused
    assert "Traceback" not in capsys.readouterr().err and checkpoint.is_dir()
