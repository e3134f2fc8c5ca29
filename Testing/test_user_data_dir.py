"""The user data folder: each platform's usual place, and a one-time move from the old place."""

from __future__ import annotations

import os
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


def test_a_copy_across_disks_that_fails_half_way_leaves_no_partial_folder_and_the_old_data(tmp_path, monkeypatch):
    """Across file systems the move is a copy: one failing half-way must not leave a partial new
    folder, which would exist and so hide the old data for good."""
    import errno
    import shutil

    old = _old_data(tmp_path)
    target = tmp_path / "Local" / "DafneSlicer"

    def no_rename(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def copy_half(src, dst, **kwargs):
        Path(dst).mkdir(parents=True)
        (Path(dst) / "sync.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", no_rename)
    monkeypatch.setattr(shutil, "copytree", copy_half)
    assert move_legacy_data(old, target) is False
    assert not target.exists() and not list(target.parent.iterdir()) and (old / "sync.json").read_text() == '{"opt_in": true}'
    monkeypatch.undo()
    monkeypatch.setattr(os, "rename", no_rename)  # a second disk with room: the copy lands, then the old folder goes
    assert move_legacy_data(old, target) is True
    assert (target / "sync.json").read_text() == '{"opt_in": true}' and not old.exists()
