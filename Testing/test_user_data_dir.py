"""The user data folder: each platform's usual place, and a one-time move from the old place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dafne_logic.core.paths import legacy_data_dir, move_legacy_data, platform_data_dir, user_data_dir, user_models_dir

HOME = Path("/home/ada")


@pytest.mark.parametrize("platform, environ, expected", [
    ("win32", {"LOCALAPPDATA": r"C:\Users\ada\AppData\Local"}, Path(r"C:\Users\ada\AppData\Local") / "dafne-slicer"),
    ("win32", {}, HOME / "AppData" / "Local" / "dafne-slicer"),
    ("darwin", {"XDG_DATA_HOME": "/ignored"}, HOME / "Library" / "Application Support" / "dafne-slicer"),
    ("linux", {}, HOME / ".local" / "share" / "dafne-slicer"),
    ("linux", {"XDG_DATA_HOME": "/data/ada"}, Path("/data/ada/dafne-slicer")),
])
def test_each_platform_gets_its_usual_application_data_folder(platform, environ, expected):
    assert platform_data_dir(platform, environ, HOME) == expected


def _old_data(home: Path) -> Path:
    old = legacy_data_dir(home)
    (old / "models" / "thigh-v3").mkdir(parents=True)
    (old / "models" / "thigh-v3" / "manifest.json").write_text("{}")
    (old / "sync.json").write_text('{"opt_in": true}')
    return old


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_data_of_the_old_place_moves_once_to_the_platform_folder(tmp_path, monkeypatch, platform):
    monkeypatch.delenv("DAFNE_SLICER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    monkeypatch.setattr(sys, "platform", platform)
    old = _old_data(tmp_path)
    new = user_data_dir()
    assert new == platform_data_dir(platform, {"LOCALAPPDATA": str(tmp_path / "Local")}, tmp_path)
    assert not old.exists() and (new / "sync.json").read_text() == '{"opt_in": true}'
    assert (user_models_dir() / "thigh-v3" / "manifest.json").is_file()
    _old_data(tmp_path)  # an old folder reappearing later (an old version run again) is not merged in
    assert user_data_dir() == new and old.exists() and (new / "models" / "thigh-v3").is_dir()


def test_nothing_moves_on_linux_or_when_overridden_or_when_the_new_place_exists(tmp_path, monkeypatch):
    old = _old_data(tmp_path)
    monkeypatch.setenv("DAFNE_SLICER_HOME", str(tmp_path / "elsewhere"))
    assert user_data_dir() == tmp_path / "elsewhere" and old.exists()
    monkeypatch.delenv("DAFNE_SLICER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert user_data_dir() == old and (old / "sync.json").exists()
    (tmp_path / "new").mkdir()
    assert move_legacy_data(old, tmp_path / "new") is False and old.exists()
