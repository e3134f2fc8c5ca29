"""Network construction from a manifest's ``architecture`` entry.

Only architectures listed in :data:`ARCHITECTURES` can be built: a manifest names one and gives
its keyword arguments; nothing from a model file is ever executed. The tensor names of the
MONAI ``UNet`` (``model.0.conv.unit0.conv.weight`` ...) have been stable across MONAI 1.x, and
the manifest lists every tensor name and shape so a mismatch is caught before loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dafne_logic.core.errors import InputError
from dafne_logic.inference.manifest import check_architecture

# Our deployed network (the shipped base models): small enough to fine-tune on a laptop CPU
# (~1.6 M parameters). One residual unit per level (0.84 M) runs ~1.5x faster on 2 CPU cores
# (instance norm dominates) but the base models would need retraining to use it.
DEFAULT_UNET_KWARGS: dict[str, Any] = {
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
}

# The size of network Dafne uses (2D U-Net, 32-512 channels, ~6.5 M parameters): benchmark reference.
DAFNE_REFERENCE_UNET_KWARGS: dict[str, Any] = {
    "channels": [32, 64, 128, 256, 512],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
}


def _unet2d(in_channels: int, out_channels: int, channels: list[int], strides: list[int],
            num_res_units: int = 2, dropout: float = 0.0) -> nn.Module:
    """MONAI 2D U-Net with instance normalisation (never batch norm: it breaks federated averaging
    and one-case fine-tuning, whose batch statistics differ from site to site)."""
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=Norm.INSTANCE,
        dropout=dropout,
    )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"unet2d": _unet2d}  # their arguments: manifest.ALLOWED_KWARGS


def build_network(architecture: dict[str, Any]) -> nn.Module:
    """Instantiate ``{"name": ..., "kwargs": {...}}`` from the allow-list, weights uninitialised.

    Raises:
        ValueError: see :func:`check_architecture`, or arguments the network rejects.
    """
    check_architecture(architecture)
    name = architecture["name"]
    try:
        return ARCHITECTURES[name](**architecture.get("kwargs", {}))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(f"architecture {name!r} rejects its arguments: {exc}") from exc


def unet_architecture(n_classes: int, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Manifest entry for a one-channel 2D U-Net with ``n_classes`` outputs."""
    return {
        "name": "unet2d",
        "kwargs": {"in_channels": 1, "out_channels": n_classes, **(kwargs or DEFAULT_UNET_KWARGS)},
    }


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are checked.

    Raises:
        InputError: an unknown device name, or CUDA asked for where there is none.
    """

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but CUDA is not available here; choose the CPU "
                             "(--device cpu, or Device: cpu in Slicer)")
        if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device(device)
    raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
