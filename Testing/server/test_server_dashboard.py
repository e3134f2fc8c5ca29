"""Dashboard over real HTTP: the login in front of it, the client-reported Dice table behind the
learning curve, plots (drawn once per change of their data), page, security headers."""

from __future__ import annotations

import contextlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from dafne_server.db import UpdateRow, User
from dafne_server.plots import PlotCache, client_dice_table
from dafne_server.storage import Storage


def logged_in(server) -> requests.Session:
    """A browser-like session that logged in with a fresh contributor token."""
    browser = requests.Session()
    reply = browser.post(f"{server.url}/login", data={"token": server.add_user(f"viewer-{uuid.uuid4().hex[:6]}")},
                         timeout=30, allow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/"
    return browser


def test_learning_curve_from_client_dice(sqlite_server):
    storage = Storage(sqlite_server.settings)  # the family "fuzz" never stores updates otherwise
    try:
        with storage.session.begin() as session:
            users = [User(name=f"curve-site{i}-{uuid.uuid4().hex[:4]}") for i in range(3)]
            session.add_all(users)
            session.flush()
            for i, user in enumerate(users):
                for version, dice in ((1, 0.70 + 0.01 * i), (1, 0.72 + 0.01 * i), (2, 0.75 + 0.01 * i), (3, 0.78)):
                    session.add(UpdateRow(id=uuid.uuid4().hex, family="fuzz", user_id=user.id,
                                          idempotency_key=uuid.uuid4().hex, parent_version=version, n_slices=3,
                                          client_dice={"right soleus": dice, "left soleus": dice},
                                          blob_sha256="0" * 64, blob_size=1, norm=0.0, status="merged", reason=""))
        with storage.read() as session:
            table = client_dice_table(session, "fuzz")
    finally:
        storage.dispose()
    assert len(table) == 9  # 3 sites × 3 parent versions, repeated uploads averaged
    first = table[(table["dataset"] == f"site {users[0].id}") & (table["model_version"] == "1")]
    assert first["dice"].item() == pytest.approx(0.71)
    url = sqlite_server.url
    browser = logged_in(sqlite_server)
    curve = browser.get(f"{url}/plots/fuzz/learning-curve.png", timeout=60)
    empty = browser.get(f"{url}/plots/inputs/learning-curve.png", timeout=60)  # no client Dice there yet
    assert curve.status_code == 200 and curve.content.startswith(b"\x89PNG")
    assert len(curve.content) > 2 * len(empty.content)  # a fitted curve, not the "no data yet" card
    assert browser.get(f"{url}/plots/fuzz/nonsense.png", timeout=10).status_code == 404
    assert browser.get(f"{url}/plots/nofamily/versions.png", timeout=10).status_code == 404
    assert "Versions" in browser.get(f"{url}/", timeout=30).text


def test_dashboard_needs_a_login_that_ends_with_its_token(sqlite_server):
    url = sqlite_server.url
    page = requests.get(f"{url}/", timeout=30, allow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert requests.get(f"{url}/plots/leg/versions.png", timeout=30).status_code == 401
    wrong = requests.post(f"{url}/login", data={"token": "dft_1_" + "x" * 43}, timeout=30)
    assert wrong.status_code == 401 and "unknown, expired or revoked" in wrong.text
    assert "set-cookie" not in wrong.headers

    token = sqlite_server.add_user(f"viewer-{uuid.uuid4().hex[:6]}")
    browser = requests.Session()
    login = browser.post(f"{url}/login", data={"token": token}, timeout=30, allow_redirects=False)
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and token.lower() not in cookie
    assert "secure" not in cookie  # plain http on loopback: a Secure cookie would never come back
    # A TLS reverse proxy on this host says https in X-Forwarded-Proto; uvicorn trusts loopback's.
    proxied = requests.post(f"{url}/login", data={"token": token}, headers={"X-Forwarded-Proto": "https"},
                            timeout=30, allow_redirects=False)
    assert "secure" in proxied.headers["set-cookie"].lower()
    assert "Versions" in browser.get(f"{url}/", timeout=30).text
    assert browser.get(f"{url}/plots/leg/versions.png", timeout=60).content.startswith(b"\x89PNG")
    bearer = requests.get(f"{url}/plots/leg/versions.png", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert bearer.status_code == 200  # scripts may send the token instead of logging in

    revoked = requests.delete(f"{url}/v1/admin/tokens/{token.split('_')[1]}", timeout=30,
                              headers={"Authorization": f"Bearer {sqlite_server.admin_token}"})
    assert revoked.status_code == 204
    assert browser.get(f"{url}/", timeout=30, allow_redirects=False).status_code == 303  # the session ended
    browser.cookies.set("dafne_session", "forged", domain="127.0.0.1")
    assert browser.get(f"{url}/plots/leg/versions.png", timeout=30).status_code == 401


def test_security_headers_on_pages_api_and_refusals(sqlite_server):
    url = sqlite_server.url
    for reply in (requests.get(f"{url}/login", timeout=30), requests.get(f"{url}/v1/models", timeout=30),
                  requests.post(f"{url}/v1/models/leg/updates", data=b"x" * 10, timeout=30,
                                headers={"Content-Length": str(10 << 20)})):
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in reply.headers["Content-Security-Policy"]
        assert "Strict-Transport-Security" not in reply.headers  # plain HTTP (see the TLS test)


def test_concurrent_requests_for_a_plot_draw_it_once_until_its_data_changes():
    cache, drawing = PlotCache(), threading.Lock()

    def draw() -> bytes:
        assert drawing.acquire(blocking=False), "two draws at once"  # pyplot is not thread-safe
        try:
            return b"png"
        finally:
            drawing.release()

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _: cache.get("leg", "versions", ((1, 0.5),), draw), range(40))) == {b"png"}
    assert cache.draws == 1
    cache.get("leg", "versions", ((1, 0.5), (2, 0.6)), draw)  # a new version: drawn again
    cache.get("leg", "client-dice", ((1, 0.5),), draw)
    assert cache.draws == 3


def test_requests_do_not_queue_behind_a_drawing_they_do_not_need():
    """While one plot is drawn (matplotlib, a statsmodels fit: seconds), an up-to-date plot is served
    at once and an outdated one gets its previous image, instead of every request waiting its turn."""
    cache = PlotCache()
    cache.get("leg", "versions", ("v1",), lambda: b"versions v1")
    cache.get("leg", "client-dice", ("d1",), lambda: b"dice d1")
    started, release = threading.Event(), threading.Event()

    def slow_draw() -> bytes:
        started.set()
        assert release.wait(10)
        return b"versions v2"

    with ThreadPoolExecutor(1) as pool:
        drawing = pool.submit(cache.get, "leg", "versions", ("v2",), slow_draw)
        assert started.wait(10)
        assert cache.get("leg", "client-dice", ("d1",), lambda: b"never") == b"dice d1"  # up to date: no wait
        assert cache.get("leg", "client-dice", ("d2",), lambda: b"never") == b"dice d1"  # busy: the last image
        release.set()
        assert drawing.result(10) == b"versions v2"
    assert cache.get("leg", "client-dice", ("d2",), lambda: b"dice d2") == b"dice d2"  # free again: drawn anew
    assert cache.draws == 4


@contextlib.contextmanager
def _in_thread(app):
    """``app`` served by uvicorn on a loopback port from a thread of this process."""
    import time

    import uvicorn

    from dafne_server.testing import free_port

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join()


def test_public_dashboard_needs_no_login(tmp_path, tiny_leg):
    from dafne_server.app import create_app
    from dafne_server.config import ServerSettings
    from dafne_server.runner import prepare

    settings = ServerSettings(data_dir=str(tmp_path / "data"), public_dashboard=True)
    storage = prepare(settings)
    with storage.session.begin() as session:
        storage.add_family(session, "leg", tiny_leg, "test")
    storage.dispose()
    with _in_thread(create_app(settings)) as url:
        page = requests.get(f"{url}/", timeout=30, allow_redirects=False)
        assert page.status_code == 200 and "leg" in page.text and "Log out" not in page.text
        assert requests.get(f"{url}/plots/leg/versions.png", timeout=60).status_code == 200
