"""Model packages: ``manifest.json`` + ``weights.safetensors``, and the registry that finds them.

A package is a folder::

    manifest.json         format, name, region, version, parent version, architecture + kwargs,
                          label table (names, colours, SNOMED CT), preprocessing parameters,
                          provenance, and the sha256, dtype and tensor shapes of the weights
    weights.safetensors   the network's state dict (fp16 or fp32), nothing executable

Loading checks the manifest schema, the sha256 of the weights file and every tensor's name and
shape before any weight reaches a network, and reports each failure as one readable sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dafne_logic.core.atomic import atomic_directory
from dafne_logic.core.errors import ModelError
from dafne_logic.core.labels import LabelTable
from dafne_logic.core.numbers import strict_json
from dafne_logic.core.paths import user_models_dir
from dafne_logic.core.preprocessing import PreprocessingParams
from dafne_logic.inference.networks import build_network, check_architecture

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
        except ValueError as exc:
            raise ModelError(f"{source}: {exc}") from exc
        out_channels = manifest.architecture.get("kwargs", {}).get("out_channels")
        if out_channels != manifest.labels.n_classes:
            raise ModelError(
                f"{source}: network has {out_channels} outputs but the label table needs {manifest.labels.n_classes}"
            )
        return manifest


@dataclass
class ModelPackage:
    """A validated manifest with its weights loaded as float32 CPU tensors."""

    manifest: Manifest
    state_dict: dict[str, torch.Tensor]
    path: Path | None = None

    def __post_init__(self) -> None:
        # The manifest always describes the weights it travels with (names and shapes).
        self.manifest.tensors = {k: list(v.shape) for k, v in self.state_dict.items()}

    @property
    def labels(self) -> LabelTable:
        return self.manifest.labels

    def network(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """A fresh network in eval mode holding these weights, on ``device``."""
        net = build_network(self.manifest.architecture)
        net.load_state_dict(self.state_dict, strict=True)
        return net.to(device).eval()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelPackage:
        """Load a package folder, checking schema, sha256, tensor names and shapes."""
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ModelError(f"{path}: no {MANIFEST_NAME}; not a model package folder")
        manifest = read_manifest(path)
        weights_path = path / WEIGHTS_NAME
        if not weights_path.is_file():
            raise ModelError(f"{path}: {WEIGHTS_NAME} is missing")
        blob = weights_path.read_bytes()
        return cls(manifest, parse_weights(blob, manifest, source=str(weights_path)), path)

    def save(self, path: str | os.PathLike[str], dtype: torch.dtype = torch.float16) -> Path:
        """Write the package atomically (the folder appears complete or not at all)."""
        blob = weights_bytes(self.state_dict, dtype)
        self.manifest.weights_sha256 = hashlib.sha256(blob).hexdigest()
        self.manifest.weights_dtype = str(dtype).removeprefix("torch.")
        self.manifest.tensors = {k: list(v.shape) for k, v in self.state_dict.items()}
        if not self.manifest.created:
            self.manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with atomic_directory(path) as tmp:
            (tmp / WEIGHTS_NAME).write_bytes(blob)
            (tmp / MANIFEST_NAME).write_text(json.dumps(self.manifest.to_json(), indent=2, allow_nan=False) + "\n",
                                              encoding="utf-8")
        self.path = Path(path)
        return self.path


def weights_bytes(state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> bytes:
    """Serialise a state dict as safetensors, floating tensors cast to ``dtype``."""
    tensors = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state_dict.items()
    }
    return save_safetensors_bytes(tensors)


def parse_weights(blob: bytes, manifest: Manifest, source: str = "weights") -> dict[str, torch.Tensor]:
    """Check ``blob`` against the manifest and return float32 tensors.

    Raises:
        ModelError: sha256 mismatch, unreadable safetensors, or tensor names/shapes that differ.
    """
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.weights_sha256:
        raise ModelError(f"{source}: sha256 {digest[:12]}… does not match the manifest ({manifest.weights_sha256[:12]}…)")
    try:
        tensors = load_safetensors_bytes(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise ModelError(f"{source}: not a readable safetensors file ({exc})") from exc
    check_tensor_shapes({k: list(v.shape) for k, v in tensors.items()}, manifest.tensors, source)
    if not all(v.is_floating_point() for v in tensors.values()):
        raise ModelError(f"{source}: every tensor must be floating point (deltas apply to all of them)")
    return {k: v.float() for k, v in tensors.items()}


def check_tensor_shapes(found: dict[str, list[int]], expected: dict[str, list[int]], source: str) -> None:
    """Raise :class:`ModelError` unless ``found`` has exactly the expected names and shapes."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ModelError(f"{source}: tensor names differ from the manifest (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in expected.items():
        if list(found[name]) != list(shape):
            raise ModelError(f"{source}: tensor {name} has shape {list(found[name])}, manifest says {list(shape)}")


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


def find_package(family: str, version: str, weights_sha256: str | None = None) -> ModelPackage | None:
    """The registry's package of ``family`` at ``version`` (and these weights, when given), or None."""
    for entry in list_models():
        manifest = entry.manifest
        if manifest.name == family and manifest.version == version and (
                weights_sha256 is None or manifest.weights_sha256 == weights_sha256):
            return ModelPackage.load(entry.path)
    return None


def load_model(name_or_path: str | os.PathLike[str]) -> ModelPackage:
    """Resolve and load a model package (see :meth:`ModelPackage.load`)."""
    return ModelPackage.load(resolve_model_path(name_or_path))
