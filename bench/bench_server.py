"""Federated server benchmarks on loopback (CPU): upload-to-published latency, bytes per
contribution, and a bounded load test of concurrent clients pulling and pushing.

    .venv/bin/python bench/bench_server.py [--clients 50] [--repeats 3] [--workers 1]

Every figure comes with a reference measured in the same run, because timings on shared machines
are noisy: latency against the time one validation scoring of the active model takes (the floor
of any gated merge), load-test latencies against the same requests made by a single client.
Models: the bundled thigh/leg packages when present, otherwise untrained networks of the deployed
size (DEFAULT_UNET_KWARGS; the latency does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from sqlalchemy import select

from dafne_logic.core.client_config import ClientConfig
from dafne_logic.core.labels import BUILTIN_TABLES
from dafne_logic.inference.manifest import Manifest, list_models
from dafne_logic.inference.model_package import ModelPackage, weights_bytes
from dafne_logic.inference.networks import DEFAULT_UNET_KWARGS, build_network, unet_architecture
from dafne_logic.learning.delta import DeltaMetadata, encode_delta, make_delta
from dafne_logic.learning.federated_client import FederatedClient
from dafne_server.db import MergeRun
from dafne_server.storage import Storage
from dafne_server.testing import LocalServer, tiny_package
from dafne_server.validation import make_scorer, phantom_cases

VALIDATION_CASES = 2
VALIDATION_SHAPE = (12, 96, 128)


def deployed_package(region: str) -> tuple[ModelPackage, str]:
    for entry in list_models(include_user=False):
        if entry.manifest.region == region:
            return ModelPackage.load(entry.path), f"bundled {entry.name}"
    table = BUILTIN_TABLES[region]
    arch = unet_architecture(table.n_classes, DEFAULT_UNET_KWARGS)
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in build_network(arch).state_dict().items()}
    return ModelPackage(Manifest(f"bench-{region}", region, "1", arch, table), state), "untrained, deployed size"


def small_delta(state: dict[str, torch.Tensor], seed: int, scale: float = 1e-4) -> bytes:
    """A dense fp16 delta like a fine-tune's (every weight moves a little)."""
    g = torch.Generator().manual_seed(seed)
    return encode_delta(make_delta(state, {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=g)
                                           for k, v in state.items()}))


def merge_seconds(server: LocalServer, family: str) -> tuple[float, float]:
    """Median (merge seconds, scoring seconds) the worker recorded for ``family``."""
    storage = Storage(server.settings)
    try:
        with storage.read() as session:
            runs = [r.detail for r in session.scalars(select(MergeRun).where(MergeRun.family == family))]
    finally:
        storage.dispose()
    return (statistics.median(r["seconds"] for r in runs), statistics.median(r["scoring_seconds"] for r in runs))


def latency(repeats: int, workdir: Path) -> None:
    print("\n== upload-to-published latency (K = 1, validation on "
          f"{VALIDATION_CASES} phantoms of {VALIDATION_SHAPE} voxels) ==")
    packages = {"thigh": deployed_package("thigh"), "leg": deployed_package("leg")}
    server = LocalServer(workdir / "latency", families={r: p for r, (p, _) in packages.items()},
                         merge={"buffer_size": 1},
                         run_args=["--validation-cases", str(VALIDATION_CASES),
                                   "--validation-shape", *map(str, VALIDATION_SHAPE)])
    token = server.add_user("bench")
    server.start()
    try:
        client = FederatedClient(ClientConfig(server.url, token, opt_in=True), backoff_s=0.1)
        t0 = time.perf_counter()
        while any(v["validation_mean_dice"] is None for r in packages for v in client.versions(r) if v["active"]):
            time.sleep(0.2)  # the merge worker scores the active versions once at start-up
        print(f"merge worker ready (validation cases built, active versions scored) {time.perf_counter() - t0:.1f} s "
              "after the API answered")
        for region, (package, origin) in packages.items():
            scorer = make_scorer(phantom_cases(region, VALIDATION_CASES, VALIDATION_SHAPE))
            t0 = time.perf_counter()
            scorer(package)
            scoring_s = time.perf_counter() - t0
            full = len(weights_bytes(package.state_dict))
            times, statuses, sizes = [], [], []
            for i in range(repeats + 1):  # the first also scores the active version once: reported apart
                blob = small_delta(package.state_dict, seed=i)
                sizes.append(len(blob))
                active = [v["number"] for v in client.versions(region) if v["active"]][0]
                t0 = time.perf_counter()
                pushed = client.push(blob, DeltaMetadata(region, str(active), 20, {}))
                info = client.wait_for_update(pushed["id"], timeout_s=600, poll_s=0.05)
                times.append(time.perf_counter() - t0)
                statuses.append(info["status"])
            warm = times[1:]
            merge_s, scoring_s_worker = merge_seconds(server, region)
            print(f"{region:<6} ({origin}, {sum(v.numel() for v in package.state_dict.values()) / 1e6:.2f} M params): "
                  f"first {times[0]:.1f} s, then median {statistics.median(warm):.1f} s (min {min(warm):.1f}, "
                  f"max {max(warm):.1f}) over {len(warm)}; outcomes {statuses}; one validation scoring "
                  f"{scoring_s:.1f} s in this process -> latency / scoring = "
                  f"{statistics.median(warm) / scoring_s:.2f}; "
                  f"inside the worker: merge median {merge_s:.1f} s of which scoring {scoring_s_worker:.1f} s")
            print(f"       bytes per contribution: {statistics.median(sizes) / 1e6:.2f} MB "
                  f"(full fp16 weights {full / 1e6:.2f} MB, ratio {statistics.median(sizes) / full:.2f}; "
                  "the reference tool uploads whole ~106 MB models)")
    finally:
        server.stop()


def load_test(clients: int, workers: int, workdir: Path) -> None:
    print(f"\n== load test: {clients} concurrent clients, each pulls the active package and pushes one delta "
          f"(tiny model, uvicorn workers {workers}, K = 10, validation off) ==")
    package = tiny_package("leg")
    server = LocalServer(workdir / "load", validation="none", families={"leg": package}, merge={"buffer_size": 10},
                         run_args=["--uploads-per-hour", "100000", "--workers", str(workers)])
    tokens = [server.add_user(f"site{i}") for i in range(clients)]
    server.start()

    def one_client(i: int, models_dir: Path) -> tuple[float, float]:
        # each simulated site has its own download folder, as separate machines would
        client = FederatedClient(ClientConfig(server.url, tokens[i], opt_in=True), backoff_s=0.2,
                                 downloads_dir=models_dir / f"downloads-{i}")
        t0 = time.perf_counter()
        client.pull("leg", "1", models_dir=models_dir / f"c{i}-{uuid.uuid4().hex[:6]}")
        t1 = time.perf_counter()
        client.push(small_delta(package.state_dict, seed=1000 + i, scale=1e-2), DeltaMetadata("leg", "1", 5, {}))
        return t1 - t0, time.perf_counter() - t1

    try:
        models = workdir / "client-models"
        single = [one_client(i % clients, models) for i in range(5)]  # reference: one client at a time
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: one_client(i, models), range(clients)))
        wall = time.perf_counter() - t0
        for name, k in (("pull", 0), ("push", 1)):
            values = sorted(r[k] for r in results)
            p95 = values[int(0.95 * (len(values) - 1))]
            ref = statistics.median(r[k] for r in single)
            print(f"{name}: median {statistics.median(values) * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms "
                  f"(single client {ref * 1e3:.0f} ms; p95 / single = {p95 / ref:.1f})")
        print(f"throughput: {clients} clients x (pull + push) in {wall:.1f} s = {clients / wall:.1f} "
              f"pull+push per second; all {len(results)} succeeded")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="dafne-bench-server-") as tmp:
        os.environ["DAFNE_SLICER_HOME"] = str(Path(tmp) / "home")  # downloads stay in the scratch folder
        if not args.skip_latency:
            latency(args.repeats, Path(tmp))
        if not args.skip_load:
            load_test(args.clients, args.workers, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
