"""Atomic writes: all or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from fakes import as_on_windows_python_312

from dafne_logic.core import atomic
from dafne_logic.core.atomic import atomic_directory, atomic_path, atomic_write_text

PACKAGE = {"marker": "manifest.json", "what": "a model package folder"}


def test_output_gets_umask_permissions_not_mkstemp_ones(tmp_path: Path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.csv", "x")
        with atomic_directory(tmp_path / "pkg", **PACKAGE) as folder:
            (folder / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "pkg").stat().st_mode) == 0o755


def test_failure_leaves_target_untouched_and_no_temporary(tmp_path: Path):
    (tmp_path / "out.nii.gz").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz")
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert (tmp_path / "out.nii.gz").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_directory_replaced_only_when_complete(tmp_path: Path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{}")  # an earlier package
    (tmp_path / "m" / "v").write_text("1")
    with pytest.raises(OSError):
        with atomic_directory(tmp_path / "m", **PACKAGE) as folder:
            (folder / "v").write_text("2")
            raise OSError("disk full")
    assert (tmp_path / "m" / "v").read_text() == "1"
    with atomic_directory(tmp_path / "m", **PACKAGE) as folder:
        (folder / "v").write_text("2")
    assert (tmp_path / "m" / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_settings_csv_and_segmentation_writes_work_without_fchmod_and_fchown(tmp_path: Path, monkeypatch):
    import numpy as np
    import SimpleITK as sitk

    from dafne_logic.core.client_config import ClientConfig, load_config, save_config
    from dafne_logic.core.io import write_labels
    from dafne_logic.core.labels import LEG
    from dafne_logic.core.statistics import write_statistics_csv

    as_on_windows_python_312(monkeypatch)

    save_config(ClientConfig("https://dafne.example.org", "secret", opt_in=True), tmp_path / "sync.json")
    assert load_config(tmp_path / "sync.json").token == "secret"
    assert stat.S_IMODE((tmp_path / "sync.json").stat().st_mode) == 0o600  # owner-only from creation on
    write_statistics_csv([{"name": "right soleus", "volume_ml": 1.5}], tmp_path / "stats.csv")
    assert ",right soleus,,,,1.5," in (tmp_path / "stats.csv").read_text()
    labels = sitk.GetImageFromArray(np.full((2, 3, 4), LEG.value_of(1, "right"), np.uint8))
    write_labels(labels, tmp_path / "case.seg.nrrd", LEG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.seg.nrrd", "stats.csv", "sync.json"]


def test_a_failed_write_names_the_target_not_the_temporary_file(tmp_path: Path):
    """os.replace(temporary, target) onto a folder: the error names the file the user asked for."""
    target = tmp_path / "stats.csv"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError) as error:
        atomic_write_text(target, "a,b\n")
    assert error.value.filename == str(target) and not error.value.filename2
    assert isinstance(error.value, (IsADirectoryError, PermissionError, FileExistsError))  # errno kept (POSIX, Windows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.csv"]


def test_errors_about_other_files_keep_their_names(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as error:
        with atomic_path(tmp_path / "out.csv"):
            (tmp_path / "absent").read_text()
    assert error.value.filename == str(tmp_path / "absent")


def test_on_windows_a_file_held_open_elsewhere_is_retried_then_named(tmp_path: Path, monkeypatch):
    """Windows refuses to rename onto a file Excel or a virus scanner holds open: a brief hold is
    waited out; a lasting one ends in an error that names the file and says why."""
    import dafne_logic.core.atomic as atomic

    target = tmp_path / "stats.csv"
    target.write_text("old\n", encoding="utf-8")
    real_replace = os.replace
    refusals = [2]

    def held_open(src, dst):
        if refusals[0] > 0:
            refusals[0] -= 1
            raise PermissionError(13, "Access is denied", str(src), None, str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "WINDOWS", True)
    monkeypatch.setattr(atomic.os, "replace", held_open)
    atomic_write_text(target, "new\n")  # a scanner's brief hold: waited out
    assert target.read_text(encoding="utf-8") == "new\n" and refusals == [0]

    refusals[0] = 10 ** 6  # Excel: held until the user closes it
    monkeypatch.setattr(atomic, "REPLACE_RETRY_S", 0.3)
    with pytest.raises(PermissionError) as caught:
        atomic_write_text(target, "newer\n")
    assert caught.value.filename == str(target) and "another program" in caught.value.strerror
    assert target.read_text(encoding="utf-8") == "new\n" and sorted(tmp_path.iterdir()) == [target]

    monkeypatch.setattr(atomic, "WINDOWS", False)  # elsewhere a refusal is real at once: no waiting
    with pytest.raises(PermissionError) as caught:
        atomic_write_text(target, "newer\n")
    assert "another program" not in str(caught.value)


def _refuse_in(folder: Path, real, exc_for):
    """``os.open``/``os.mkdir`` stand-in: the real call, except in ``folder``, where ``exc_for(path)`` is raised."""
    calls: list[str] = []

    def call(path, *args, **kwargs):
        if Path(path).parent == folder:
            calls.append(str(path))
            exc = exc_for(Path(path))
            if exc is not None:
                raise exc
        return real(path, *args, **kwargs)

    return call, calls


def test_a_folder_denying_new_files_is_refused_at_once_on_windows(tmp_path: Path, monkeypatch):
    """Windows answers an access-list denial with PermissionError, as it answers a name taken by a
    folder; tempfile.mkstemp retries it while os.access (which reads only the read-only flag) says
    yes: 2**31 times on Python 3.12. The denial here stands in for the access list."""
    import dafne_logic.core.atomic as atomic

    monkeypatch.setattr(atomic, "WINDOWS", True)
    denied, calls = _refuse_in(tmp_path, os.open, lambda p: PermissionError(13, "Access is denied", str(p)))
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError):
        atomic.unique_file(tmp_path, ".x-")
    with pytest.raises(PermissionError):
        atomic_write_text(tmp_path / "a.csv", "x")
    assert len(calls) == 2 and not list(tmp_path.iterdir())


def test_a_name_taken_by_a_folder_is_skipped_on_windows(tmp_path: Path, monkeypatch):
    import dafne_logic.core.atomic as atomic

    monkeypatch.setattr(atomic, "WINDOWS", True)
    names = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".x-aaaaaaaaaaaa").mkdir()
    as_windows, _ = _refuse_in(tmp_path, os.open,
                               lambda p: PermissionError(13, "Access is denied", str(p)) if p.is_dir() else None)
    monkeypatch.setattr(os, "open", as_windows)
    assert atomic.unique_file(tmp_path, ".x-").name == ".x-bbbbbbbbbbbb"


@pytest.mark.parametrize("existing", ["case folder", "file", "folder of an unknown kind made meanwhile"])
def test_a_folder_output_never_replaces_what_is_not_an_earlier_output(tmp_path: Path, existing: str):
    """An output folder named after the user's case folder or segmentation file is refused, not replaced."""
    target = tmp_path / "case"
    if existing == "file":
        target.write_text("corrected segmentation")
    elif existing == "case folder":
        target.mkdir()
        (target / "scan.nii.gz").write_text("scan")
    with pytest.raises(FileExistsError) as error:
        with atomic_directory(target, **PACKAGE) as folder:
            (folder / "manifest.json").write_text("{}")
            if existing.startswith("folder"):  # passes the first check, not the one before the rename
                target.mkdir()
                (target / "scan.nii.gz").write_text("scan")
    assert error.value.filename == str(target) and "not a model package folder" in str(error.value)
    assert ("scan" if target.is_dir() else "corrected segmentation") == (
        (target / "scan.nii.gz").read_text() if target.is_dir() else target.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["case"]  # no temporary folder left


def test_an_empty_folder_and_an_earlier_package_are_replaced(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\0")  # a folder made in Finder is still empty
    for name in ("empty", "absent"):
        with atomic_directory(tmp_path / name, **PACKAGE) as folder:
            (folder / "manifest.json").write_text("new")
        assert (tmp_path / name / "manifest.json").read_text() == "new"
    (tmp_path / "Downloads").mkdir()
    (tmp_path / "Downloads" / "desktop.ini").write_text("[.ShellClassInfo]")  # a system folder: never replaced
    with pytest.raises(FileExistsError):
        atomic.check_replaceable(tmp_path / "Downloads", **PACKAGE)


def test_the_earlier_output_is_put_back_when_the_new_one_cannot_take_its_place(tmp_path: Path, monkeypatch):
    target = tmp_path / "thigh-v3"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    real_replace = os.replace

    def replace(source, destination):  # the new folder's rename fails (a file inside held on Windows)
        if Path(destination) == target and Path(source).name.startswith(".thigh-v3-") and "-old-" not in str(source):
            raise PermissionError(13, "in use")
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(PermissionError):
        with atomic_directory(target, **PACKAGE) as folder:
            (folder / "manifest.json").write_text("new")
    assert (target / "manifest.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["thigh-v3"]


def test_on_windows_a_folder_rename_refused_for_a_moment_is_retried(tmp_path: Path, monkeypatch):
    refusals = []
    real_replace = os.replace

    def replace(source, destination):  # a virus scanner holds a new file for the first two tries
        if len(refusals) < 2:
            refusals.append(source)
            raise PermissionError(13, "in use")
        real_replace(source, destination)

    monkeypatch.setattr(atomic, "WINDOWS", True)
    monkeypatch.setattr(atomic.time, "sleep", lambda s: None)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_directory(tmp_path / "pkg", **PACKAGE) as folder:
        (folder / "manifest.json").write_text("new")
    assert len(refusals) == 2 and (tmp_path / "pkg" / "manifest.json").read_text() == "new"
