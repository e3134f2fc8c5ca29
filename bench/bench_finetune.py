"""Fine-tuning speed and delta size (issue 4 benchmark).

One corrected bilateral thigh case (a 40-slice 432×432 phantom, every slice corrected: both legs,
80 leg-slices) is fine-tuned with ``finetune_on_corrections`` and its default settings (whole path:
preprocessing, agreement inference, training with augmentation and held-out early stopping).
In the same run, on the very same leg-slices, the reference recipe is timed: a network of the
size Dafne uses (MONAI 2D U-Net 32–512, ~6.5 M parameters), 5 epochs, batch 5, Adam 1e-3, Dice +
cross-entropy (training loop only, no preparation). Target: ours ≤ 30 s on 2 CPU cores; the
delta of the thigh model ≤ 5 MB.

The parent is the bundled thigh model when present (``--model`` to choose), else an untrained
network of the default size (then early stopping rarely triggers: a worst case for time).
The case uses the "pd" contrast, which the bundled thigh model did not train on as such.

Usage: nice -n 10 python bench/bench_finetune.py [--threads 2] [--model thigh] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def parent_model(name: str):
    from dafne_logic.core.errors import ModelError
    from dafne_logic.core.labels import THIGH
    from dafne_logic.inference.manifest import Manifest
    from dafne_logic.inference.model_package import ModelPackage, load_model
    from dafne_logic.inference.networks import build_network, unet_architecture

    try:
        return load_model(name), f"{name} (bundled/registry)"
    except ModelError:
        arch = unet_architecture(THIGH.n_classes)
        torch.manual_seed(0)
        state = {k: v.detach().clone() for k, v in build_network(arch).state_dict().items()}
        return ModelPackage(Manifest("thigh", "thigh", "0", arch, THIGH), state), "untrained default-size network"


def time_reference(data, n_classes: int, seed: int = 0) -> tuple[float, int]:
    """Seconds for Dafne's recipe on the same leg-slices, and its parameter count."""
    from dafne_logic.inference.networks import DAFNE_REFERENCE_UNET_KWARGS, build_network, count_parameters, unet_architecture
    from dafne_logic.training.trainer import default_loss

    torch.manual_seed(seed)
    net = build_network(unet_architecture(n_classes, DAFNE_REFERENCE_UNET_KWARGS)).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = default_loss(n_classes)
    generator = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    for _ in range(5):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), 5):
            batch = order[start:start + 5]
            loss = loss_fn(net(data.images[batch]), data.targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - began, count_parameters(net)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="thigh")
    parser.add_argument("--contrast", default="pd")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dafne_logic.core.preprocessing import prepare_volume
    from dafne_logic.inference.networks import count_parameters
    from dafne_logic.learning.finetune import finetune_on_corrections
    from dafne_logic.learning.finetune_slices import collect_training_slices
    from dafne_logic.phantoms.images import make_phantom

    model, source = parent_model(args.model)
    image, labels = make_phantom("thigh", shape=(40, 432, 432), contrast=args.contrast, seed=321)
    began = time.perf_counter()
    result = finetune_on_corrections(model, image, labels)
    ours = time.perf_counter() - began
    report = result.report
    data = collect_training_slices(prepare_volume(image, model.manifest.preprocessing, labels, model.labels),
                                   model.labels, None)
    reference, reference_params = time_reference(data, model.labels.n_classes)
    delta_mb = len(result.delta_bytes()) / 1e6
    figures = {
        "parent": source,
        "parent_version": model.manifest.version,
        "threads": args.threads,
        "leg_slices": len(data),
        "crop": list(data.images.shape[2:]),
        "our_parameters": count_parameters(model.network()),
        "reference_parameters": reference_params,
        "our_seconds": ours,
        "our_epochs": report["epochs"],
        "our_stop_reason": report["stop_reason"],
        "reference_seconds": reference,
        "ratio_ours_over_reference": ours / reference,
        "delta_megabytes": delta_mb,
        "weights_megabytes_fp16": sum(v.numel() * 2 for v in result.model.state_dict.values()) / 1e6,
        "dice_on_corrected_slices_before": report["mean_dice_before"],
        "dice_on_corrected_slices_after": report["mean_dice_after"],
    }
    print(f"parent: {source}, version {model.manifest.version}; {args.threads} threads")
    print(f"case: 40-slice bilateral thigh phantom ({args.contrast}), {len(data)} leg-slices of "
          f"{tuple(data.images.shape[2:])} px")
    print(f"ours:      {ours:6.1f} s whole path ({figures['our_parameters'] / 1e6:.2f} M parameters, "
          f"{report['epochs']} epochs, {report['stop_reason']})  target <= 30 s: "
          f"{'met' if ours <= 30 else 'NOT met'}")
    print(f"reference: {reference:6.1f} s training loop ({reference_params / 1e6:.2f} M parameters, "
          f"5 epochs, batch 5, Adam 1e-3)")
    print(f"ratio ours / reference: {ours / reference:.2f}")
    print(f"delta: {delta_mb:.2f} MB (fp16 + zlib; target <= 5 MB); the whole fp16 model is "
          f"{figures['weights_megabytes_fp16']:.2f} MB")
    before, after = report["mean_dice_before"], report["mean_dice_after"]
    if not (math.isnan(before) or math.isnan(after)):
        print(f"mean Dice on the corrected slices: {before:.3f} before, {after:.3f} after")
    if args.json:
        from dafne_logic.core.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
