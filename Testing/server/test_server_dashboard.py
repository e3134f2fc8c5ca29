"""Dashboard data: the client-reported Dice table behind the learning-curve plot, and the page."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from dafne_server.app import create_app
from dafne_server.config import ServerSettings
from dafne_server.dashboard import client_dice_table
from dafne_server.db import UpdateRow, User
from dafne_server.runner import prepare


def test_learning_curve_from_client_dice(tmp_path, tiny_leg):
    settings = ServerSettings(data_dir=str(tmp_path / "data"))
    storage = prepare(settings)
    with storage.session.begin() as session:
        storage.add_family(session, "leg", tiny_leg, "test")
        users = [User(name=f"site{i}") for i in range(3)]
        session.add_all(users)
        session.flush()
        for i, user in enumerate(users):
            for version, dice in ((1, 0.70 + 0.01 * i), (1, 0.72 + 0.01 * i), (2, 0.75 + 0.01 * i), (3, 0.78)):
                session.add(UpdateRow(id=uuid.uuid4().hex, family="leg", user_id=user.id,
                                      idempotency_key=uuid.uuid4().hex, parent_version=version, n_slices=3,
                                      client_dice={"right soleus": dice, "left soleus": dice}, blob_sha256="0" * 64,
                                      blob_size=1, norm=0.0, status="merged", reason=""))
    with storage.read() as session:
        table = client_dice_table(session, "leg")
    assert len(table) == 9  # 3 sites × 3 parent versions, repeated uploads averaged
    first = table[(table["dataset"] == f"site {users[0].id}") & (table["model_version"] == "1")]
    assert first["dice"].item() == pytest.approx(0.71)
    storage.dispose()
    with TestClient(create_app(settings)) as client:
        png = client.get("/plots/leg/learning-curve.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG") and len(png.content) > 20_000
        assert client.get("/plots/leg/nonsense.png").status_code == 404
        assert client.get("/plots/nofamily/versions.png").status_code == 404
        assert "Versions" in client.get("/").text
