"""``dafne-slicer models``: list bundled and user models."""

from __future__ import annotations

import argparse
import json

from dafne_logic.inference.manifest import list_models


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    entries = list_models()
    if args.json:
        print(json.dumps([
            {"name": e.name, "source": e.source, "path": str(e.path), "region": e.manifest.region,
             "version": e.manifest.version, "parent_version": e.manifest.parent_version,
             "labels": [m.name for m in e.manifest.labels.muscles],
             "trained_on": e.manifest.provenance.get("trained_on", "unknown")}
            for e in entries], indent=2))
        return 0
    if not entries:
        print("no models found")
        return 1
    for e in entries:
        m = e.manifest
        print(f"{e.name:<16} {e.source:<8} region={m.region:<6} version={m.version:<10} "
              f"parent={m.parent_version or '-'}  trained on: {m.provenance.get('trained_on', 'unknown')}")
        print(f"{'':<16} labels ({m.labels.n_muscles}): {', '.join(mm.name for mm in m.labels.muscles)}")
    return 0
