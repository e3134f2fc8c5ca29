"""Model package format: round trip, and every way a package can be broken gives a clear ModelError."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from dafne_logic.core.errors import ModelError
from dafne_logic.core.labels import LEG, THIGH, LabelTable
from dafne_logic.inference.manifest import (
    ALLOWED_KWARGS,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Manifest,
    check_package,
    list_models,
    resolve_model_path,
)
from dafne_logic.inference.model_package import ModelPackage, load_model
from dafne_logic.inference.networks import ARCHITECTURES, build_network, unet_architecture

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 0}


def tiny_package(table: LabelTable = LEG, version: str = "1") -> ModelPackage:
    arch = unet_architecture(table.n_classes, TINY)
    net = build_network(arch)
    manifest = Manifest(name=table.region, region=table.region, version=version, architecture=arch, labels=table)
    return ModelPackage(manifest, {k: v.clone() for k, v in net.state_dict().items()})


def test_round_trip_keeps_manifest_and_weights_within_fp16(tmp_path: Path):
    pkg = tiny_package(THIGH, version="7")
    pkg.manifest.provenance = {"trained_on": "phantoms"}
    pkg.save(tmp_path / "m")
    loaded = ModelPackage.load(tmp_path / "m")
    assert loaded.manifest.version == "7"
    assert loaded.labels == THIGH
    assert loaded.manifest.provenance["trained_on"] == "phantoms"
    assert set(loaded.state_dict) == set(pkg.state_dict)
    for k, v in pkg.state_dict.items():
        assert torch.allclose(loaded.state_dict[k], v, atol=1e-3, rtol=1e-3)
    out = loaded.network()(torch.zeros(1, 1, 16, 16))
    assert out.shape == (1, THIGH.n_classes, 16, 16)


def test_sha256_mismatch_is_refused(tmp_path: Path):
    tiny_package().save(tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_NAME
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="sha256"):
        ModelPackage.load(tmp_path / "m")


def _rewrite_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / MANIFEST_NAME).read_text())
    edit(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


def test_tensor_shape_mismatch_is_refused(tmp_path: Path):
    tiny_package().save(tmp_path / "m")
    first = None

    def edit(d):
        nonlocal first
        first = next(iter(d["weights"]["tensors"]))
        d["weights"]["tensors"][first] = [1, 2, 3]

    _rewrite_manifest(tmp_path / "m", edit)
    with pytest.raises(ModelError, match="shape"):
        ModelPackage.load(tmp_path / "m")


def test_missing_tensor_is_refused(tmp_path: Path):
    tiny_package().save(tmp_path / "m")
    _rewrite_manifest(tmp_path / "m", lambda d: d["weights"]["tensors"].update({"extra.weight": [1]}))
    with pytest.raises(ModelError, match="names differ"):
        ModelPackage.load(tmp_path / "m")


def test_pickled_weights_are_refused(tmp_path: Path):
    pkg = tiny_package()
    pkg.save(tmp_path / "m")
    blob = pickle.dumps({"a": 1})
    (tmp_path / "m" / WEIGHTS_NAME).write_bytes(blob)
    import hashlib

    _rewrite_manifest(tmp_path / "m", lambda d: d["weights"].update({"sha256": hashlib.sha256(blob).hexdigest()}))
    with pytest.raises(ModelError, match="safetensors"):
        ModelPackage.load(tmp_path / "m")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update({"format": "keras"}), "not a DafneSlicer"),
        (lambda d: d.update({"format_version": 99}), "format_version"),
        (lambda d: d.pop("labels"), "malformed"),
        (lambda d: d["architecture"]["kwargs"].update({"out_channels": 3}), "outputs"),
        (lambda d: d["architecture"].update({"name": "os.system"}), "unknown architecture"),
        (lambda d: d["architecture"].update({"name": ["unet2d"]}), "unknown architecture"),
        (lambda d: d["architecture"]["kwargs"].update({"channels": 5}), "channel counts"),
        (lambda d: d["architecture"]["kwargs"].update({"strides": "x"}), "strides"),
        (lambda d: d["architecture"]["kwargs"].update({"strides": [2, 2]}), "strides"),
        (lambda d: d["architecture"]["kwargs"].update({"num_res_units": 10**6}), "num_res_units"),
        (lambda d: d["architecture"]["kwargs"].update({"dropout": "0.1"}), "dropout"),
        # a network that can be built, but not with these weights: refused on loading, not on Segment
        (lambda d: d["architecture"]["kwargs"].update({"channels": [8, 16]}), "do not fit the manifest's architecture"),
    ],
)
def test_bad_manifest_is_refused(tmp_path: Path, edit, message):
    tiny_package().save(tmp_path / "m")
    _rewrite_manifest(tmp_path / "m", edit)
    with pytest.raises(ModelError, match=message):
        ModelPackage.load(tmp_path / "m")


def test_a_user_model_with_a_malformed_architecture_is_skipped_not_fatal(tmp_path: Path):
    """One hand-edited folder in the user models must not break `models` or segmenting with a bundled model."""
    from dafne_logic.core.paths import user_models_dir

    tiny_package().save(user_models_dir() / "broken")
    _rewrite_manifest(user_models_dir() / "broken", lambda d: d["architecture"].update({"name": ["unet2d"]}))
    names = [entry.name for entry in list_models()]
    assert "broken" not in names and "thigh" in names


def test_failed_save_leaves_previous_package_intact(tmp_path: Path, monkeypatch):
    tiny_package(version="1").save(tmp_path / "m")
    import dafne_logic.inference.model_package as mp

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mp, "weights_bytes", boom)
    with pytest.raises(OSError):
        tiny_package(version="2").save(tmp_path / "m")
    assert ModelPackage.load(tmp_path / "m").manifest.version == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_registry_finds_user_models_and_rejects_unknown_names(tmp_path: Path):
    from dafne_logic.core.paths import user_models_dir

    tiny_package(version="3.local-abc").save(user_models_dir() / "my-calf")
    names = {e.name: e for e in list_models()}
    assert names["my-calf"].source == "user"
    assert load_model("my-calf").manifest.version == "3.local-abc"
    assert resolve_model_path(user_models_dir() / "my-calf") == user_models_dir() / "my-calf"
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_model("nope")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["architecture"]["kwargs"].update({"channels": [4, 100000]}), "channel counts"),
        (lambda d: d["architecture"]["kwargs"].update({"act": "os.system"}), "does not take act"),
        (lambda d: d["preprocessing"].update({"pad_multiple": 0}), "pad_multiple"),
        (lambda d: d["preprocessing"].update({"spacing_mm": [0.0, 1.0]}), "spacing_mm"),
        (lambda d: d["preprocessing"].update({"percentiles": [99, 1]}), "percentiles"),
    ],
)
def test_hostile_or_unusable_manifest_values_are_refused_before_building(tmp_path: Path, edit, message):
    tiny_package().save(tmp_path / "m")
    _rewrite_manifest(tmp_path / "m", edit)
    with pytest.raises(ModelError, match=message):
        ModelPackage.load(tmp_path / "m")


def test_integer_tensors_are_refused(tmp_path: Path):
    pkg = tiny_package()
    name = next(iter(pkg.state_dict))
    pkg.state_dict[name] = torch.zeros(pkg.state_dict[name].shape, dtype=torch.int32)
    pkg.save(tmp_path / "m")
    with pytest.raises(ModelError, match="floating"):
        ModelPackage.load(tmp_path / "m")


def test_save_failing_inside_the_folder_leaves_previous_package_intact(tmp_path: Path, monkeypatch):
    tiny_package(version="1").save(tmp_path / "m")
    real_write_text = Path.write_text

    def failing_write_text(self, *args, **kwargs):
        if self.name == MANIFEST_NAME:
            raise OSError("disk full")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(OSError):
        tiny_package(version="2").save(tmp_path / "m")
    monkeypatch.undo()
    assert ModelPackage.load(tmp_path / "m").manifest.version == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_names_resolve_in_the_registry_first_and_user_models_shadow_bundled(tmp_path: Path, monkeypatch):
    from dafne_logic.core.paths import user_models_dir

    monkeypatch.chdir(tmp_path)
    tiny_package(version="local-folder").save(tmp_path / "leg")  # ./leg must not hijack the name "leg"
    assert resolve_model_path("leg") != tmp_path / "leg"
    assert load_model("./leg").manifest.version == "local-folder"
    tiny_package(version="user-leg").save(user_models_dir() / "leg")
    assert load_model("leg").manifest.version == "user-leg"
    (user_models_dir() / ".leg-tmp123").mkdir()
    (user_models_dir() / ".leg-tmp123" / MANIFEST_NAME).write_text("{}")
    assert all(not e.name.startswith(".") for e in list_models())


def test_undefined_figures_are_saved_as_strict_json_null(tmp_path: Path):
    """A Dice that is not defined (NaN) is written as null: FastAPI and browsers refuse NaN."""
    package = tiny_package()
    package.manifest.provenance = {"validation": {"adductor longus": float("nan"), "soleus": 0.9,
                                                  "per step": [float("inf"), 1.0]}}
    package.save(tmp_path / "m")
    text = (tmp_path / "m" / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    loaded = ModelPackage.load(tmp_path / "m").manifest.provenance["validation"]
    assert loaded == {"adductor longus": None, "soleus": 0.9, "per step": [None, 1.0]}


def test_every_buildable_network_has_its_allowed_arguments_and_no_other():
    assert set(ALLOWED_KWARGS) == set(ARCHITECTURES)


def test_check_package_reads_the_manifest_and_checks_the_weights_without_loading_them(tmp_path):
    folder = tiny_package().save(tmp_path / "tiny")
    assert check_package(folder).labels is not None
    (folder / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes()[:-1] + b"x")
    with pytest.raises(ModelError, match="does not match the manifest"):
        check_package(folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelError, match="missing or unreadable"):
        check_package(folder)

