"""bench/device/pack.py: a large wheel is rewritten with LZMA, member for member, and still reads back."""

from __future__ import annotations

import zipfile
from pathlib import Path

from bench_scripts import load_bench_script


def test_repacked_wheel_holds_the_same_files_smaller(tmp_path: Path):
    pack = load_bench_script("device/pack")
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    payload = (b"0123456789abcdef" * 4096) + bytes(range(256)) * 64
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("demo/_lib.so", payload)
        archive.writestr("demo-1.0.dist-info/RECORD", "demo/_lib.so,sha256=x,1\n")
    before = wheel.stat().st_size
    pack.repack_lzma(wheel)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.namelist() == ["demo/_lib.so", "demo-1.0.dist-info/RECORD"]
        assert archive.read("demo/_lib.so") == payload
        assert all(info.compress_type == zipfile.ZIP_LZMA for info in archive.infolist())
    assert wheel.stat().st_size < before / 10
    assert not list(tmp_path.glob("*.lzma-tmp"))  # replaced in place, nothing left beside it
