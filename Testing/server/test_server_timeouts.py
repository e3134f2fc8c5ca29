"""Slow clients on loopback: header and body deadlines, and the connection limit (bounded: ten
connections, a few seconds)."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from dafne_server.testing import LocalServer


def _open(server: LocalServer, first_bytes: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(first_bytes)
    sock.settimeout(0.01)
    return sock


def _closed_by_server(sock: socket.socket, replies: list[bytes]) -> bool:
    """Drip one more byte; True once the server has answered or closed the connection."""
    try:
        sock.send(b"x")
        data = sock.recv(4096)
    except TimeoutError:
        return False
    except OSError:  # reset or broken pipe: closed
        return True
    replies.append(data)
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_leg):
    server = LocalServer(tmp_path_factory.mktemp("slow"), validation="none", families={"leg": tiny_leg},
                         run_args=["--header-timeout", "2", "--body-timeout", "2", "--max-connections", "10"])
    server.start()
    yield server
    server.stop()


def test_slow_headers_and_slow_bodies_are_cut_off_and_connections_are_limited(server):
    socks: list[socket.socket] = []
    try:
        slow_headers = [_open(server, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ") for _ in range(5)]
        upload_head = (f"POST /v1/models/leg/updates HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Authorization: Bearer {server.admin_token}\r\n"
                       "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
        slow_bodies = [_open(server, upload_head.encode()) for _ in range(5)]
        socks = slow_headers + slow_bodies
        time.sleep(0.3)
        # ten connections open: the eleventh request is refused at once, not queued
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 503

        opened = time.monotonic()
        closed_at: dict[int, float] = {}
        replies: list[bytes] = []
        while len(closed_at) < len(socks) and time.monotonic() - opened < 10:
            for i, sock in enumerate(socks):
                if i not in closed_at and _closed_by_server(sock, replies):
                    closed_at[i] = time.monotonic() - opened
            time.sleep(0.2)  # a byte every 0.2 s: far below any honest client's rate
        assert len(closed_at) == len(socks), f"still open after 10 s: {sorted(set(range(10)) - set(closed_at))}"
        assert max(closed_at.values()) < 6  # 2 s deadlines, with slack for a busy machine
        assert sum(r.startswith(b"HTTP/1.1 408") for r in replies) >= 5
        assert requests.get(f"{server.url}/healthz", timeout=10).ok  # the slots are free again
    finally:
        for sock in socks:
            sock.close()


def test_oversized_headers_are_refused(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for _ in range(100):  # 100 kB of headers, well within the header deadline
                sock.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        except OSError:
            pass  # the server may close before we finish
        assert sock.recv(4096).startswith(b"HTTP/1.1 431")
