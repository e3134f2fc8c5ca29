"""Model packages: ``manifest.json`` + ``weights.safetensors``, loaded and saved (the manifest and the
registry that finds packages: :mod:`dafne_logic.inference.manifest`).

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dafne_logic.core.atomic import atomic_directory
from dafne_logic.core.errors import ModelError
from dafne_logic.core.labels import LabelTable
from dafne_logic.inference.manifest import MANIFEST_NAME, WEIGHTS_NAME, Manifest, list_models, read_manifest, resolve_model_path
from dafne_logic.inference.networks import build_network

PACKAGE_FOLDER = "a model package folder"  # what an output folder that may be replaced holds (see atomic_directory)


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
        state_dict = parse_weights(blob, manifest, source=str(weights_path))
        check_network_fits(manifest, state_dict, str(path))
        return cls(manifest, state_dict, path)

    def save(self, path: str | os.PathLike[str], dtype: torch.dtype = torch.float16) -> Path:
        """Write the package atomically (the folder appears complete or not at all)."""
        blob = weights_bytes(self.state_dict, dtype)
        self.manifest.weights_sha256 = hashlib.sha256(blob).hexdigest()
        self.manifest.weights_dtype = str(dtype).removeprefix("torch.")
        self.manifest.tensors = {k: list(v.shape) for k, v in self.state_dict.items()}
        if not self.manifest.created:
            self.manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with atomic_directory(path, marker=MANIFEST_NAME, what=PACKAGE_FOLDER) as tmp:
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


def check_network_fits(manifest: Manifest, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`ModelError` unless the manifest's network takes exactly these tensors.

    The network is built on PyTorch's meta device (shapes, no memory), so a package whose
    architecture cannot be built or does not match its weights is refused when loaded, not when
    Segment is pressed.
    """
    try:
        with torch.device("meta"):
            net = build_network(manifest.architecture)
    except ValueError as exc:
        raise ModelError(f"{source}: {exc}") from exc
    expected = {k: list(v.shape) for k, v in net.state_dict().items()}
    found = {k: list(v.shape) for k, v in state_dict.items()}
    if found != expected:
        name = min(set(found) ^ set(expected)) if set(found) != set(expected) else \
            min(k for k in expected if found[k] != expected[k])
        raise ModelError(f"{source}: the weights do not fit the manifest's architecture (tensor {name}: "
                         f"weights {found.get(name, 'missing')}, network {expected.get(name, 'none')})")


def check_tensor_shapes(found: dict[str, list[int]], expected: dict[str, list[int]], source: str) -> None:
    """Raise :class:`ModelError` unless ``found`` has exactly the expected names and shapes."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ModelError(f"{source}: tensor names differ from the manifest (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in expected.items():
        if list(found[name]) != list(shape):
            raise ModelError(f"{source}: tensor {name} has shape {list(found[name])}, manifest says {list(shape)}")


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
