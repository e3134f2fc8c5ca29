"""Weight deltas: what a site uploads instead of a whole model.

A delta is ``child - parent`` for every floating tensor of the state dict, stored as fp16
safetensors and compressed with zlib (``.safetensors.zz``). Its small JSON metadata names the
model family and the parent version it applies to. Nothing in a delta can execute code: parsing
decompresses with a hard output limit, reads the safetensors header, and checks every tensor name,
shape, dtype and finiteness against the parent's manifest before any value is used.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dafne_logic.core.errors import ModelError
from dafne_logic.inference.model_package import Manifest, check_tensor_shapes

DELTA_DTYPE = torch.float16
MAX_HEADER_BYTES = 1 << 20  # a thigh model's header is ~10 kB; anything near 1 MB is hostile
DEFAULT_MAX_DELTA_BYTES = 64 << 20  # decompressed size limit


def make_delta(parent: dict[str, torch.Tensor], child: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``child - parent`` per tensor (fp32 arithmetic), cast to fp16. Model packages hold only
    floating tensors (checked on load), so every tensor has a delta."""
    if set(parent) != set(child):
        raise ValueError("parent and child state dicts have different tensor names")
    return {k: (child[k].float() - parent[k].float()).to(DELTA_DTYPE).contiguous() for k in sorted(parent)}


def apply_delta(parent: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``parent + scale * delta`` in fp32; tensors absent from the delta are copied."""
    return {k: (v.float() + scale * delta[k].float()) if k in delta else v.clone() for k, v in parent.items()}


def delta_norm(delta: dict[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of a delta."""
    return float(sum((float((v.float() ** 2).sum()) for v in delta.values()), 0.0) ** 0.5)


def encode_delta(delta: dict[str, torch.Tensor]) -> bytes:
    """Delta → compressed bytes (zlib level 6 over fp16 safetensors)."""
    return zlib.compress(save_safetensors_bytes({k: v.to(DELTA_DTYPE).contiguous() for k, v in delta.items()}), 6)


def _bounded_decompress(blob: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        out = decompressor.decompress(blob, limit)
    except zlib.error as exc:
        raise ModelError(f"delta is not zlib-compressed safetensors ({exc})") from exc
    if decompressor.unconsumed_tail or not decompressor.eof:
        raise ModelError(f"delta decompresses to more than {limit} bytes or is truncated")
    return out


def decode_delta(blob: bytes, manifest: Manifest, max_bytes: int = DEFAULT_MAX_DELTA_BYTES) -> dict[str, torch.Tensor]:
    """Compressed bytes → validated delta for the model described by ``manifest``.

    Raises:
        ModelError: not zlib, oversized, malformed safetensors header, wrong names/shapes/dtype,
            or non-finite values.
    """
    raw = _bounded_decompress(blob, max_bytes)
    if len(raw) < 8:
        raise ModelError("delta is too short to be safetensors")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(raw) - 8:
        raise ModelError(f"delta safetensors header claims {header_len} bytes; refused")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"delta safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelError("delta safetensors header is not a JSON object")
    dtypes = {k: v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    if any(d != "F16" for d in dtypes.values()):
        raise ModelError("delta tensors must all be float16")
    found = {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    check_tensor_shapes(found, manifest.tensors, "delta")
    try:
        tensors = load_safetensors_bytes(raw)
    except Exception as exc:
        raise ModelError(f"delta is not a readable safetensors file ({exc})") from exc
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ModelError(f"delta tensor {name} contains NaN or Inf")
    return tensors


@dataclass
class DeltaMetadata:
    """The JSON that travels with a delta. Nothing in it identifies a patient."""

    family: str  # model family on the server, e.g. "thigh"
    parent_version: str
    n_slices: int  # number of corrected slices trained on
    dice_per_label: dict[str, float]  # automatic vs corrected segmentation, by muscle name
    client_version: str = ""
    parent_sha256: str = ""  # sha256 of the parent's weights file; the server checks it when given

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "parent_version": self.parent_version,
            "n_slices": self.n_slices,
            "dice_per_label": self.dice_per_label,
            "client_version": self.client_version,
            "parent_sha256": self.parent_sha256,
        }
