"""Segmentation speed and memory (issue 2 benchmark).

Segments a bilateral 432×432×40-slice phantom thigh with the bundled thigh model through the whole
``segment_volume`` path (preprocessing, network, mapping back), and in the same run times a
reference network of the size Dafne uses (MONAI 2D U-Net, 32–512 channels, ~6.5 M parameters)
on the very same leg crops (forward passes only). Target: whole path ≤ 0.5× the reference time
on 2 CPU cores; peak memory of the whole path (separate process, max RSS) under 2 GB.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from dafne_logic.model_package import load_model
from dafne_logic.phantoms import make_phantom
from dafne_logic.inference import segment_volume
image, _ = make_phantom("thigh", shape=(40, 432, 432), seed=123)
model = load_model("thigh")
segment_volume(image, model, device=sys.argv[2])  # warm-up (allocator, MKL/oneDNN kernels)
t = time.perf_counter(); segment_volume(image, model, device=sys.argv[2]); t = time.perf_counter() - t
print(json.dumps({"seconds": t, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def time_reference(threads: int, device: str) -> tuple[float, float, int]:
    """Seconds of (ours, reference) forward passes over the same crops, and reference parameter count."""
    from dafne_logic.inference import predict_slices
    from dafne_logic.model_package import load_model
    from dafne_logic.networks import DAFNE_REFERENCE_UNET_KWARGS, build_network, count_parameters, unet_architecture
    from dafne_logic.phantoms import make_phantom
    from dafne_logic.preprocessing import prepare_volume

    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = load_model("thigh")
    image, _ = make_phantom("thigh", shape=(40, 432, 432), seed=123)
    prepared = prepare_volume(image, model.manifest.preprocessing)
    reference = build_network(unet_architecture(model.labels.n_classes, DAFNE_REFERENCE_UNET_KWARGS)).to(dev).eval()
    ours = model.network(dev)
    timings = []
    for net in (ours, reference):
        for leg in prepared.legs:  # warm-up
            for _ in predict_slices(net, leg.image[:8], dev):
                pass
        t = time.perf_counter()
        for leg in prepared.legs:
            for _ in predict_slices(net, leg.image, dev):
                pass
        timings.append(time.perf_counter() - t)
    crops = ", ".join(f"{leg.side} {tuple(leg.image.shape)}" for leg in prepared.legs)
    print(f"crops: {crops}; our network {count_parameters(ours) / 1e6:.2f} M parameters, "
          f"reference {count_parameters(reference) / 1e6:.2f} M")
    return timings[0], timings[1], count_parameters(reference)


def main() -> None:
    threads = 2
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        ours_fwd, ref_fwd, _ = time_reference(threads, device)
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), device], capture_output=True, text=True, check=True)
        whole = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[{device}, {threads} threads] whole segment path: {whole['seconds']:.2f} s, peak RSS {whole['maxrss_mb']:.0f} MB")
        print(f"[{device}] forward passes only: ours {ours_fwd:.2f} s, Dafne-size reference {ref_fwd:.2f} s")
        ratio = whole["seconds"] / ref_fwd
        print(f"[{device}] ratio whole path / reference = {ratio:.2f} (target ≤ 0.5): {'OK' if ratio <= 0.5 else 'MISSED'}")
        print(f"[{device}] peak memory target < 2048 MB: {'OK' if whole['maxrss_mb'] < 2048 else 'MISSED'}")


if __name__ == "__main__":
    main()
