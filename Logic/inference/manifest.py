"""Model manifests and the registry that finds model packages, without loading any weights.

Everything here is torch-free, so Slicer's GUI thread can list the models and read a model's label
table and version without importing torch (the worker process loads the weights:
:mod:`dafne_logic.inference.model_package`). A manifest names its network from an allow-list and is
checked here (:func:`check_architecture`) before any network is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dafne_logic.core.errors import ModelError
from dafne_logic.core.labels import LabelTable
from dafne_logic.core.numbers import strict_json
from dafne_logic.core.paths import user_models_dir
from dafne_logic.core.preprocessing import PreprocessingParams

FORMAT = "dafne-slicer-model"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled_models"


@dataclass
class Manifest:
    """Everything about a model except its weights."""

    name: str
    region: str
    version: str  # server versions are "1", "2", ...; local fine-tunes "3.local-<8 hex>"
    architecture: dict[str, Any]
    labels: LabelTable
    preprocessing: PreprocessingParams = field(default_factory=PreprocessingParams)
    parent_version: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # training data, command, validation
    weights_sha256: str = ""
    weights_dtype: str = "float16"
    tensors: dict[str, list[int]] = field(default_factory=dict)  # name -> shape
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "region": self.region,
            "version": self.version,
            "parent_version": self.parent_version,
            "created": self.created,
            "architecture": self.architecture,
            "labels": self.labels.to_json(),
            "preprocessing": self.preprocessing.to_json(),
            "provenance": strict_json(self.provenance),
            "weights": {
                "file": WEIGHTS_NAME,
                "sha256": self.weights_sha256,
                "dtype": self.weights_dtype,
                "tensors": dict(sorted(self.tensors.items())),  # stable files, readable diffs
            },
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "manifest") -> Manifest:
        """Validate and parse a manifest; any problem raises :class:`ModelError` naming ``source``."""
        if not isinstance(data, dict):
            raise ModelError(f"{source}: not a JSON object")
        if data.get("format") != FORMAT:
            raise ModelError(f"{source}: not a DafneSlicer model manifest (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{source}: unsupported format_version {data.get('format_version')!r}")
        try:
            weights = data["weights"]
            tensors = {str(k): [int(d) for d in v] for k, v in weights["tensors"].items()}
            manifest = cls(
                name=str(data["name"]),
                region=str(data["region"]),
                version=str(data["version"]),
                parent_version=None if data.get("parent_version") is None else str(data["parent_version"]),
                architecture=dict(data["architecture"]),
                labels=LabelTable.from_json(data["labels"]),
                preprocessing=PreprocessingParams.from_json(data.get("preprocessing", {})),
                provenance=dict(data.get("provenance", {})),
                weights_sha256=str(weights["sha256"]),
                weights_dtype=str(weights.get("dtype", "float16")),
                tensors=tensors,
                created=str(data.get("created", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from exc
        try:
            check_architecture(manifest.architecture)
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{source}: {exc}") from exc
        out_channels = manifest.architecture.get("kwargs", {}).get("out_channels")
        if out_channels != manifest.labels.n_classes:
            raise ModelError(
                f"{source}: network has {out_channels} outputs but the label table needs {manifest.labels.n_classes}"
            )
        return manifest


# Keyword arguments a manifest may give each architecture, and the largest channel count allowed:
# a hostile manifest must not make us allocate gigabytes before the weights are even compared.
ALLOWED_KWARGS: dict[str, frozenset[str]] = {  # one entry per network of networks.ARCHITECTURES
    "unet2d": frozenset({"in_channels", "out_channels", "channels", "strides", "num_res_units", "dropout"}),
}
MAX_CHANNELS = 1024
MAX_LEVELS = 8
MAX_STRIDE = 4
MAX_RES_UNITS = 8


def check_architecture(architecture: dict[str, Any]) -> None:
    """Refuse an architecture entry that is not on the allow-list or asks for too large a network.

    Raises:
        ValueError: unknown name, unexpected keyword arguments, or channel counts, strides, residual
            units or dropout of the wrong type or out of range (a million residual units would
            take the machine's memory before any weight is compared).
    """
    name = architecture.get("name")
    if not isinstance(name, str) or name not in ALLOWED_KWARGS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ALLOWED_KWARGS))}")
    kwargs = architecture.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"architecture {name!r}: kwargs must be an object")
    unknown = sorted(set(kwargs) - ALLOWED_KWARGS[name])
    if unknown:
        raise ValueError(f"architecture {name!r} does not take {', '.join(unknown)}")

    def integers(value: Any, low: int, high: int) -> bool:
        return isinstance(value, list) and all(_is_int(v) and low <= v <= high for v in value)

    levels: Any = kwargs.get("channels")
    if not (integers(levels, 1, MAX_CHANNELS) and 2 <= len(levels) <= MAX_LEVELS and all(
            _is_int(kwargs.get(key, 1)) and 1 <= kwargs.get(key, 1) <= MAX_CHANNELS for key in ("in_channels", "out_channels"))):
        raise ValueError(f"architecture {name!r}: channel counts must be integers in 1..{MAX_CHANNELS}, "
                         f"2 to {MAX_LEVELS} levels")
    strides: Any = kwargs.get("strides")
    if not integers(strides, 1, MAX_STRIDE) or len(strides) != len(levels) - 1:
        raise ValueError(f"architecture {name!r}: strides must be one integer in 1..{MAX_STRIDE} per level but the last")
    res_units = kwargs.get("num_res_units", 0)
    if not (_is_int(res_units) and 0 <= res_units <= MAX_RES_UNITS):
        raise ValueError(f"architecture {name!r}: num_res_units must be an integer in 0..{MAX_RES_UNITS}")
    dropout = kwargs.get("dropout", 0.0)
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
        raise ValueError(f"architecture {name!r}: dropout must be a number in [0, 1)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model the registry knows, without its weights loaded."""

    name: str  # what users type: "thigh", "leg", or a user model's folder name
    path: Path
    manifest: Manifest
    source: str  # "bundled" or "user"


def read_manifest(folder: Path) -> Manifest:
    """The validated manifest of a package folder, without loading its weights."""
    manifest_path = folder / MANIFEST_NAME
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{manifest_path}: unreadable ({exc})") from exc
    return Manifest.from_json(data, source=str(manifest_path))


def list_models(include_user: bool = True) -> list[ModelEntry]:
    """Bundled models first, then valid user models; broken user folders are skipped."""
    entries: list[ModelEntry] = []
    roots = [(BUNDLED_DIR, "bundled")] + ([(user_models_dir(), "user")] if include_user else [])
    for root, source in roots:
        if not root.is_dir():
            continue
        # Dot-folders are unfinished atomic writes (a killed process), never models.
        for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()):
            try:
                entries.append(ModelEntry(folder.name, folder, read_manifest(folder), source))
            except ModelError:
                if source == "bundled":
                    raise
    return entries


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A registry name (``thigh``, ``leg``, a user model) or a package folder → its folder."""
    text = str(name_or_path)
    candidate = Path(name_or_path)
    # A bare name is a registry name (user models shadow bundled ones of the same name); anything
    # with a path separator is a folder, so "./thigh" still reaches a local folder called thigh.
    if os.sep not in text and "/" not in text:
        matches = [e for e in list_models() if e.name == text]
        if matches:
            return next((e for e in matches if e.source == "user"), matches[0]).path
    if (candidate / MANIFEST_NAME).is_file():
        return candidate
    known = ", ".join(e.name for e in list_models()) or "none"
    raise ModelError(f"unknown model {str(name_or_path)!r}: not a model folder, and the registry has {known}")


def check_package(name_or_path: str | os.PathLike[str]) -> Manifest:
    """The manifest of a registry model or package folder, its weights file present and matching the
    manifest's sha256, without loading the weights (no torch): what a GUI checks before starting a job.

    Raises:
        ModelError: unknown model, bad manifest, weights missing or not the ones the manifest names.
    """
    folder = resolve_model_path(name_or_path)
    manifest = read_manifest(folder)
    weights_path = folder / WEIGHTS_NAME
    try:
        digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelError(f"{folder}: {WEIGHTS_NAME} is missing or unreadable ({exc.strerror or exc})") from exc
    if digest != manifest.weights_sha256:
        raise ModelError(f"{weights_path}: sha256 {digest[:12]}… does not match the manifest "
                         f"({manifest.weights_sha256[:12]}…)")
    return manifest
