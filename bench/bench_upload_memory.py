"""Memory an upload can make the API take (issue 14 item 1): the API process's resident memory
under N concurrent hostile uploads, against N concurrent honest uploads in the same run.

    .venv/bin/python bench/bench_upload_memory.py [--uploads 40] [--out bench/results/upload_memory.txt]

Hostile uploads are ~60 kB zlib streams that inflate to 60 MiB: one with a malformed safetensors
header ahead of the zeros (the attack of the review), one with a valid header for the model
followed by the zeros (a bomb that passes the header check). Honest uploads are dense fp16 deltas
of the deployed-size calf network, each from its own user. The figure is the peak RSS above the
idle process (sampled every 5 ms from /proc, so Linux only) and what stays after the burst; read
the ratio hostile / honest, not the megabytes.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from bench_server import deployed_package, small_delta
from safetensors.torch import save as save_safetensors_bytes

from dafne_logic.learning.delta import DeltaMetadata, make_delta
from dafne_server.testing import LocalServer

BOMB_BYTES = 60 << 20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Samples a process's RSS in a thread while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def burst(server: LocalServer, tokens: list[str], blobs: list[bytes]) -> dict[int, int]:
    """All uploads at once, one per user; returns {HTTP status: count}."""
    def one(args: tuple[str, bytes]) -> int:
        token, blob = args
        meta = DeltaMetadata("leg", "0", 4, {}).to_wire(blob, idempotency_key=uuid.uuid4().hex)
        return requests.post(f"{server.url}/v1/models/leg/updates", headers={"Authorization": f"Bearer {token}"},
                             files={"delta": ("d.zz", blob)}, data={"metadata": json.dumps(meta)}, timeout=300).status_code

    with ThreadPoolExecutor(len(blobs)) as pool:
        statuses = list(pool.map(one, zip(tokens, blobs, strict=True)))
    return {s: statuses.count(s) for s in sorted(set(statuses))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=40, help="concurrent uploads per burst")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "upload_memory.txt")
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").is_file():
        print("skipped: resident memory is read from /proc (Linux only)")
        return 0

    package, what = deployed_package("leg")
    package.manifest.version = "0"
    raw = save_safetensors_bytes(make_delta(package.state_dict, package.state_dict))
    header = b"{nonsense" + b" " * 7
    bursts = {
        "honest deltas (reference)": [small_delta(package.state_dict, seed=i) for i in range(args.uploads)],
        "malformed header + 60 MiB": [zlib.compress(struct.pack("<Q", len(header)) + header + bytes(BOMB_BYTES), 9)]
        * args.uploads,
        "valid header + 60 MiB": [zlib.compress(raw + bytes(BOMB_BYTES), 9)] * args.uploads,
    }
    lines = [f"model: {what} ({sum(v.numel() for v in package.state_dict.values()) / 1e6:.2f} M parameters, "
             f"fp16 delta {len(raw) / 2**20:.1f} MiB); {args.uploads} concurrent uploads per burst, one user each"]
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalServer(tmp, families={"leg": package}, validation="none",
                             run_args=["--no-merge-worker", "--uploads-per-hour", "1000",
                                       "--refused-uploads-per-hour", "1000"]).start()
        try:
            admin = {"Authorization": f"Bearer {server.admin_token}"}
            tokens = [requests.post(f"{server.url}/v1/admin/users", json={"name": f"site{i}"}, headers=admin,
                                    timeout=30).json()["token"] for i in range(args.uploads * len(bursts))]
            burst(server, tokens[:1], bursts["honest deltas (reference)"][:1])  # warm-up: imports, norm cache
            pid = server.process.pid
            idle = rss_mb(pid)
            lines.append(f"idle API process after one upload: {idle:.0f} MB")
            growth = {}
            for i, (name, blobs) in enumerate(bursts.items()):
                before = rss_mb(pid)
                with PeakRss(pid) as peak:
                    statuses = burst(server, tokens[i * args.uploads:(i + 1) * args.uploads], blobs)
                time.sleep(1.0)
                growth[name] = peak.peak - before
                lines.append(f"{name:28s} ({len(blobs[0]) / 1e3:7.0f} kB each): peak +{growth[name]:6.0f} MB, "
                             f"{rss_mb(pid) - idle:+6.0f} MB after; statuses {statuses}")
            reference = max(growth["honest deltas (reference)"], 1.0)
            for name in list(bursts)[1:]:
                lines.append(f"ratio {name} / honest: {growth[name] / reference:.2f}")
        finally:
            server.stop()
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"$ python bench/bench_upload_memory.py --uploads {args.uploads}\n{text}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
