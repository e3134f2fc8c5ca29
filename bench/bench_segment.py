"""Segmentation speed and memory (issue 2 benchmark).

Segments a bilateral 432×432×40-slice phantom thigh with the bundled thigh model through the whole
``segment_volume`` path (preprocessing, network, mapping back), and in the same process, runs
interleaved, times a reference network of the size Dafne uses (MONAI 2D U-Net, 32–512 channels,
~6.5 M parameters) on the very same leg crops (forward passes only). Target: whole path ≤ 0.5× the
reference time on 2 CPU cores; peak memory of the whole path (own process, max RSS) under 2 GB.
Also timed: the whole path with each muscle's confidence (``segment_with_confidence``, what
``segment --stats`` and the Slicer module run), as a ratio to the plain path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from dafne_logic.inference.model_package import load_model
from dafne_logic.phantoms.images import make_phantom
from dafne_logic.inference.segment import segment_volume
image, _ = make_phantom("thigh", shape=(40, 432, 432), seed=123)
model = load_model("thigh")
segment_volume(image, model, device=sys.argv[2])
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def compare(threads: int, device: str, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds of the whole path and of the reference network, interleaved so
    that both see the same load on a shared machine."""
    from dafne_logic.core.preprocessing import prepare_volume
    from dafne_logic.inference.model_package import load_model
    from dafne_logic.inference.networks import DAFNE_REFERENCE_UNET_KWARGS, build_network, count_parameters, unet_architecture
    from dafne_logic.inference.segment import predict_slices, segment_volume, segment_with_confidence
    from dafne_logic.phantoms.images import make_phantom

    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = load_model("thigh")
    image, _ = make_phantom("thigh", shape=(40, 432, 432), seed=123)
    prepared = prepare_volume(image, model.manifest.preprocessing)
    reference = build_network(unet_architecture(model.labels.n_classes, DAFNE_REFERENCE_UNET_KWARGS)).to(dev).eval()
    ours = model.network(dev)

    def forward_only(net: torch.nn.Module) -> None:
        for leg in prepared.legs:
            for _ in predict_slices(net, leg.image, dev):
                pass

    runs = {"whole path": lambda: segment_volume(image, model, device=device),
            "whole path with confidence": lambda: segment_with_confidence(image, model, device=device),
            "our network, forward only": lambda: forward_only(ours),
            "reference network, forward only": lambda: forward_only(reference)}
    for run in runs.values():  # warm-up: allocator, oneDNN kernels
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    crops = ", ".join(f"{leg.side} {tuple(leg.image.shape)}" for leg in prepared.legs)
    print(f"crops (slices, H, W): {crops}; our network {count_parameters(ours) / 1e6:.2f} M parameters, "
          f"reference {count_parameters(reference) / 1e6:.2f} M")
    return best


def main() -> None:
    threads = 2
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        best = compare(threads, device)
        for name, seconds in best.items():
            print(f"[{device}, {threads} threads] {name}: {seconds:.2f} s (best of 3)")
        ratio = best["whole path"] / best["reference network, forward only"]
        print(f"[{device}] ratio whole path / reference = {ratio:.2f} (target ≤ 0.5): {'OK' if ratio <= 0.5 else 'MISSED'}")
        print(f"[{device}] ratio with confidence / whole path = {best['whole path with confidence'] / best['whole path']:.2f}")
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), device], capture_output=True, text=True, check=True)
        whole = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[{device}] peak memory of the whole path (own process, max RSS): {whole['maxrss_mb']:.0f} MB "
              f"(target < 2048 MB): {'OK' if whole['maxrss_mb'] < 2048 else 'MISSED'}")


if __name__ == "__main__":
    main()
