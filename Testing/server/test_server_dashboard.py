"""Dashboard over real HTTP: the client-reported Dice table behind the learning curve, plots, page."""

from __future__ import annotations

import uuid

import pytest
import requests

from dafne_server.dashboard import client_dice_table
from dafne_server.db import UpdateRow, User
from dafne_server.storage import Storage


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
    curve = requests.get(f"{url}/plots/fuzz/learning-curve.png", timeout=60)
    empty = requests.get(f"{url}/plots/inputs/learning-curve.png", timeout=60)  # no client Dice there yet
    assert curve.status_code == 200 and curve.content.startswith(b"\x89PNG")
    assert len(curve.content) > 2 * len(empty.content)  # a fitted curve, not the "no data yet" card
    assert requests.get(f"{url}/plots/fuzz/nonsense.png", timeout=10).status_code == 404
    assert requests.get(f"{url}/plots/nofamily/versions.png", timeout=10).status_code == 404
    assert "Versions" in requests.get(f"{url}/", timeout=30).text
