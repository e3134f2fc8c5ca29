"""Dashboard plots under concurrent requests (CPU, loopback): what the plot cache buys.

    .venv/bin/python bench/bench_dashboard.py [--requests 40] [--updates 300]

A server holds ``--updates`` client-reported Dice values (10 sites, 3 model versions); then
``--requests`` clients ask at once for the family's learning-curve plot, the costliest (a mixed
model fit plus matplotlib). Reference, measured in the same run: one request for the same plot
right after its data changed (a full draw). Without the cache every concurrent request drew
the plot itself; with it one draws and the others read the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from dafne_server.db import UpdateRow, User
from dafne_server.storage import Storage
from dafne_server.testing import LocalServer, tiny_package


def add_client_dice(storage: Storage, n: int) -> None:
    with storage.session.begin() as session:
        users = [User(name=f"bench-site-{uuid.uuid4().hex[:6]}") for _ in range(10)]
        session.add_all(users)
        session.flush()
        for i in range(n):
            dice = 0.7 + 0.02 * (i % 3) + 0.001 * (i % 10)
            session.add(UpdateRow(id=uuid.uuid4().hex, family="leg", user_id=users[i % 10].id,
                                  idempotency_key=uuid.uuid4().hex, parent_version=1 + i % 3, n_slices=3,
                                  client_dice={"right soleus": dice, "left soleus": dice}, blob_sha256="0" * 64,
                                  blob_size=1, norm=0.0, status="merged", reason=""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--updates", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalServer(Path(tmp) / "data", validation="none", families={"leg": tiny_package("leg")})
        storage = Storage(server.settings)
        add_client_dice(storage, args.updates)
        server.start()
        try:
            url = f"{server.url}/plots/leg/learning-curve.png"
            auth = {"Authorization": f"Bearer {server.admin_token}"}
            requests.get(url, headers=auth, timeout=300).raise_for_status()  # imports, first fit
            add_client_dice(storage, 1)  # the data changed: the next request draws again
            t0 = time.perf_counter()
            requests.get(url, headers=auth, timeout=300).raise_for_status()
            draw = time.perf_counter() - t0

            def one(_: int) -> float:
                t = time.perf_counter()
                requests.get(url, headers=auth, timeout=300).raise_for_status()
                return time.perf_counter() - t

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.requests) as pool:
                times = sorted(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t0
        finally:
            server.stop()
            storage.dispose()
    p95 = times[int(0.95 * (len(times) - 1))]
    print(f"reference: one learning-curve request after its data changed (a full draw): {draw:.2f} s")
    print(f"{args.requests} concurrent requests, data unchanged: median {statistics.median(times) * 1e3:.0f} ms, "
          f"p95 {p95 * 1e3:.0f} ms ({p95 / draw:.2f} x one draw), all {wall:.2f} s "
          f"({wall / (args.requests * draw):.3f} x drawing each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
