"""A real server on a loopback port, for tests, benchmarks and ``make demo``.

    with run_local_server(tmp_dir) as server:
        client = FederatedClient(ClientConfig(server.url, server.admin_token, opt_in=True))

The server runs exactly as in production (``dafne-server run`` in a subprocess with its
merge worker) in its own process group, so :meth:`LocalServer.kill` can SIGKILL all of it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import requests

from dafne_logic.inference.manifest import Manifest
from dafne_logic.inference.model_package import ModelPackage

from .auth import create_user
from .config import ServerSettings
from .runner import prepare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_package(region: str = "leg", seed: int = 0) -> ModelPackage:
    """A 2-level U-Net (4/8 channels) for the region's label table: fast enough for any test."""
    import torch

    from dafne_logic.core.labels import BUILTIN_TABLES
    from dafne_logic.inference.networks import build_network, unet_architecture

    table = BUILTIN_TABLES[region]
    arch = unet_architecture(table.n_classes, {"channels": [4, 8], "strides": [2], "num_res_units": 0})
    torch.manual_seed(seed)
    net = build_network(arch)
    manifest = Manifest(name=f"tiny-{region}", region=region, version="1", architecture=arch, labels=table,
                        provenance={"trained_on": "nothing (random weights, for tests)"})
    return ModelPackage(manifest, {k: v.detach().clone() for k, v in net.state_dict().items()})


class LocalServer:
    """``dafne-server run`` on 127.0.0.1:<free port> over ``data_dir``."""

    def __init__(self, data_dir: str | Path, *, database_url: str = "", validation: str = "phantom",
                 families: dict[str, ModelPackage] | None = None, merge: dict | None = None,
                 run_args: Sequence[str] = (), admin_name: str = "admin",
                 tls: tuple[str, str] | None = None) -> None:
        """``tls``: (certificate, key) PEM files to serve HTTPS (the certificate must name 127.0.0.1)."""
        self.data_dir = Path(data_dir)
        self.tls = tls
        self.database_url = database_url
        self.settings = ServerSettings(data_dir=str(self.data_dir), database_url=database_url, merge=merge or {})
        self.run_args = ["--validation", validation, "--poll-interval", "0.2", *run_args]
        if tls is not None:
            self.run_args += ["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])]
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir / "server.log"
        storage = prepare(self.settings)
        try:
            with storage.session.begin() as session:
                for name, package in (families or {}).items():
                    storage.add_family(session, name, package, "test")
                self.admin_token = create_user(session, admin_name, admin=True, actor="test")
            if families is None:
                storage.seed_bundled("test")
        finally:
            storage.dispose()

    def add_user(self, name: str, admin: bool = False, expires_in_s: float | None = None) -> str:
        """A new user's token, created directly in the database."""
        storage = prepare(self.settings)
        try:
            with storage.session.begin() as session:
                return create_user(session, name, admin, "test", expires_in_s)
        finally:
            storage.dispose()

    def start(self, timeout_s: float = 60.0) -> LocalServer:
        command = [sys.executable, "-m", "dafne_server.cli", "run", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), *self.run_args]
        if self.database_url:
            command += ["--database-url", self.database_url]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/healthz", timeout=1, verify=self.tls[0] if self.tls else True).ok:
                    return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not answer within {timeout_s} s; see {self.log_path}")

    def _signal_group(self, kill: bool) -> None:
        """End the server's process group: at once (``kill``) or politely. Windows has no process
        groups to signal: the API process is ended, and its merge worker follows through its
        lifeline (it exits when its parent's pipe closes)."""
        if self.process is None or self.process.poll() is not None:
            return
        if os.name == "nt":
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the API and merge worker at once (a crash)."""
        self._signal_group(kill=True)
        if self.process is not None:
            self.process.wait()
            time.sleep(0.2)  # let the orphaned merge worker notice, or die with the group

    def stop(self) -> None:
        self._signal_group(kill=False)
        if self.process is not None:
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
            self._signal_group(kill=True)  # a straggling merge worker of the same group


@contextlib.contextmanager
def run_local_server(data_dir: str | Path, **options) -> Iterator[LocalServer]:
    """Start a :class:`LocalServer`, yield it (``.url``, ``.admin_token``, ``.add_user``), stop it."""
    server = LocalServer(data_dir, **options).start()
    try:
        yield server
    finally:
        server.stop()
