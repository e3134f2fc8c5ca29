"""Run every ``bench/bench_*.py`` in turn (``make bench``); each prints its own figures and ratios.

What each script prints is also saved as ``bench/results/<script>.txt`` (with the commit and the
date it was measured at), so every figure quoted in the docs can be traced to a saved run.

Usage: python bench/run_all.py [NAME ...]   (NAME filters, e.g. ``segment``)
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    # Saved results are what a run changes: only changes elsewhere make the figures' code uncertain.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                            ":(top,exclude)bench/results"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return (done.stdout.strip() or "unknown") + (" (uncommitted changes)" if dirty else "")


def run(script: Path) -> int:
    """Run one benchmark, echo its output and save it under ``bench/results/``; returns its exit status."""
    header = (f"# {script.name} at commit {_commit()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{platform.machine()} {platform.system()}, Python {platform.python_version()}\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    output = done.stdout + (f"\n[stderr]\n{done.stderr}" if done.returncode else "")
    print(output, end="", flush=True)
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"{script.stem}.txt"
    partial = target.with_suffix(".txt.partial")
    partial.write_text(header + output, encoding="utf-8")
    partial.replace(target)
    return done.returncode


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(a in s.stem for a in argv)]
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        if run(script) != 0:
            failed.append(script.stem)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
