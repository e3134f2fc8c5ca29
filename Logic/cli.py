"""The ``dafne-slicer`` command line.

Each subcommand lives in its own module under ``dafne_logic.commands`` and exposes
``register(subparsers)``; the module is imported only when its subcommand runs, so
``dafne-slicer --help`` stays fast. The federated server has its own command, ``dafne-server``
(:mod:`dafne_server.cli`).
Errors the user can fix (:class:`DafneError`) print one sentence and exit 2; ``--verbose``
adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import sys
from collections.abc import Sequence

from dafne_logic.core.errors import DafneError

# subcommand -> module under dafne_logic.commands, and its one-line help
COMMANDS: dict[str, tuple[str, str]] = {
    "segment": ("segment", "segment muscles in one or more MR volumes"),
    "models": ("models", "list the bundled and user models"),
    "phantom": ("phantom", "write a procedural thigh or calf phantom (image + label map)"),
    "stats": ("stats", "per-muscle volume and intensity statistics of a segmentation"),
    "train": ("train", "train a model from label maps (synthesis) or image/label pairs"),
    "finetune": ("finetune", "fine-tune a model on a corrected segmentation"),
    "evaluate": ("evaluate", "Dice of model versions against reference segmentations"),
    "report": ("report", "learning-curve fit (mixed model) from an evaluate CSV"),
    "sync": ("sync", "opt-in exchange of model updates with a federated server"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dafne-slicer", description="Thigh and calf muscle segmentation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logging")
    # Also accepted after the subcommand; SUPPRESS keeps the top-level value when it is absent there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"dafne_logic.commands.{module_name}")
        module.register(sub.add_parser(name, help=help_text, description=help_text, parents=[common]))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _printable_anywhere()
    # Import only the module of the subcommand being run.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    return run_parsed(args, f"dafne-slicer {args.command}")


def _printable_anywhere() -> None:
    """Print any path, whatever the console can show: on Windows, output redirected to a file is written
    in the ANSI code page, strictly, so a folder named in Greek stopped a batch at its first case."""
    for stream in (sys.stdout, sys.stderr):  # only where it would raise: POSIX's surrogateescape stays
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


def run_parsed(args: argparse.Namespace, label: str) -> int:
    """Run ``args.func(args)`` and turn what a user can fix into one sentence and exit status 2.

    ``label`` names the command in the message (``dafne-slicer segment``); ``args.verbose`` re-raises
    instead, so the traceback shows. Shared by ``dafne-slicer`` and ``dafne-server``.
    """
    try:
        return int(args.func(args) or 0)
    except DafneError as exc:
        if args.verbose:
            raise
        print(f"{label}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output folder, full disk, missing file
        if args.verbose:
            raise
        where = f" ({exc.filename})" if exc.filename else ""  # atomic writes name their target, not the temporary file
        print(f"{label}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Writes are atomic: the output in progress is not left half-written; those reported done stay.
        print(f"{label}: interrupted; the output in progress was not written (any reported above were)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
