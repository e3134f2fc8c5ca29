"""The output check shared by ``stats`` and ``segment``: one file per output, never an input, never a folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dafne_logic.commands.output_paths import check_outputs
from dafne_logic.core.errors import InputError


def test_distinct_new_files_pass_and_none_is_skipped(tmp_path: Path):
    (tmp_path / "scan.nii.gz").write_bytes(b"x")
    check_outputs([("--csv", tmp_path / "s.csv"), ("--csa", tmp_path / "a.csv"), ("--preview", None)],
                  [tmp_path / "scan.nii.gz", None])


@pytest.mark.parametrize("spelling", ["same", "dotted", "hard link"])
def test_an_input_under_any_spelling_is_refused(tmp_path: Path, spelling: str):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"x")
    if spelling == "hard link":
        os.link(scan, tmp_path / "other.nii.gz")
    output = {"same": scan, "dotted": tmp_path / "sub" / ".." / "scan.nii.gz", "hard link": tmp_path / "other.nii.gz"}[spelling]
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="one of this command's inputs"):
        check_outputs([("--csv", output)], [scan])


def test_an_output_in_an_input_series_folder_is_refused(tmp_path: Path):
    """A DICOM input is its folder: ``--csv series/slice_0000.dcm`` replaced a slice, ``-o series/seg.dcm`` joined it."""
    series = tmp_path / "series"
    series.mkdir()
    (series / "slice_0000.dcm").write_bytes(b"x")
    for name in ("slice_0000.dcm", "seg.dcm"):
        with pytest.raises(InputError, match="lies in the input folder"):
            check_outputs([("-o", series / name)], [series])
    assert [p.name for p in series.iterdir()] == ["slice_0000.dcm"]
    check_outputs([("-o", tmp_path / "seg.dcm")], [series])  # beside it: fine


def test_two_options_on_one_file_and_a_folder_are_refused(tmp_path: Path):
    with pytest.raises(InputError, match="--csv and --csa both name"):
        check_outputs([("--csv", tmp_path / "s.csv"), ("--csa", tmp_path / "s.csv")], [])
    with pytest.raises(InputError, match="is a folder"):
        check_outputs([("--csa", tmp_path)], [])


def test_new_outputs_differing_only_in_letter_case_are_refused_on_every_platform(tmp_path: Path):
    """On a case-insensitive disk (macOS, Windows) the second would replace the first; nothing exists
    yet to compare with samefile, so the names decide."""
    with pytest.raises(InputError, match="differ only in letter case"):
        check_outputs([("--csv", tmp_path / "Stats.csv"), ("--csa", tmp_path / "stats.csv")], [])
    assert not list(tmp_path.iterdir())
    check_outputs([("--csv", tmp_path / "stats.csv"), ("--csa", tmp_path / "stats_csa.csv")], [])  # distinct names pass


def test_on_windows_an_output_held_open_elsewhere_is_refused_before_any_work(tmp_path: Path, monkeypatch):
    """``segment --stats stats.csv`` with the CSV open in Excel: refused up front, not after every case."""
    import dafne_logic.core.atomic as atomic

    held = tmp_path / "stats.csv"
    held.write_text("case\n", encoding="utf-8")
    free = tmp_path / "free.csv"
    free.write_text("case\n", encoding="utf-8")
    real_open = Path.open

    def excel_has_it(self, mode="r", *args, **kwargs):
        if self == held and mode != "r":
            raise PermissionError(13, "The process cannot access the file", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", excel_has_it)
    monkeypatch.setattr(atomic, "WINDOWS", False)
    check_outputs([("--stats", held)], [])  # POSIX renames over it: nothing to refuse
    monkeypatch.setattr(atomic, "WINDOWS", True)
    with pytest.raises(InputError, match="open in another program"):
        check_outputs([("--stats", held)], [])
    check_outputs([("--stats", free), ("--csa", tmp_path / "new.csv")], [])
    assert held.read_text(encoding="utf-8") == free.read_text(encoding="utf-8") == "case\n"  # nothing written


def test_the_write_check_leaves_nothing_and_asks_for_a_folder_where_one_is_to_be_made(tmp_path: Path, monkeypatch):
    check_outputs([("--csv", tmp_path / "s.csv"), ("--csa", tmp_path / "new" / "deeper" / "a.csv")], [])
    assert not list(tmp_path.iterdir())
    real_mkdir = os.mkdir

    def no_new_folders(path, *args, **kwargs):  # stands in for a Windows access list granting files only
        if Path(path).parent == tmp_path:
            raise PermissionError(13, "Access is denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", no_new_folders)
    check_outputs([("--csv", tmp_path / "s.csv")], [])  # a file in the folder: still fine
    with pytest.raises(InputError, match="does not take new folders"):
        check_outputs([("--csa", tmp_path / "new" / "a.csv")], [])
    assert not list(tmp_path.iterdir())


def test_a_write_check_file_held_a_moment_by_another_program_does_not_stop_the_command(tmp_path: Path, monkeypatch):
    real_unlink = os.unlink

    def held(path, *args, **kwargs):  # a virus scanner holding the new file (Windows error 32)
        if Path(path).name.startswith(".dafne-write-check-"):
            raise PermissionError(13, "The process cannot access the file", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", held)
    check_outputs([("--csv", tmp_path / "s.csv")], [])
