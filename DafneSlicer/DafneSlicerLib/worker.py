"""Long tasks (segment, fine-tune, pull, push) as requests a separate Python process runs.

A Python thread inside Slicer competes with the GUI thread for the GIL; a worker process
(``PythonSlicer -m DafneSlicerLib.worker request.json``) runs at full speed and cannot take
Slicer down with it. Requests and results are JSON; images travel as ``.nrrd`` files in the
job's work folder. The worker never imports slicer or qt. :func:`run_request` is also what the
in-process runner of the tests calls.

The worker stops (its atomic writes removing their temporary outputs) when asked in any of the
ways that reach it behind Slicer's launcher: a ``cancel`` file in the work folder, SIGTERM or
SIGINT, end-of-file on stdin when the request says ``stop_when_stdin_closes`` and the GUI's first
line arrived on it (the GUI closed it, or the GUI process is gone), or a broken stdout (nobody
reads its progress any more).

Protocol on stdout, one line each: ``DAFNE {"progress": f, "message": m}`` while running,
``DAFNE {"committing": true}`` when it starts saving a result it will report even if cancelled,
then ``DAFNE {"result": {...}}`` or ``DAFNE {"error": sentence, "details": traceback | null}``.
"""

from __future__ import annotations

import _thread
import json
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import SimpleITK as sitk

from dafne_logic.core.errors import DafneError
from dafne_logic.inference.confidence import Confidence

from .jobs import CANCEL_FILE, CancelCheck, ProgressCallback
from .learning_logic import Improvement, LearningLogic
from .segmentation_logic import SegmentationLogic
from .sync_logic import SyncLogic, SyncOutcome

MARK = "DAFNE "
STDIN_HELLO = b"dafne-worker-stdin"  # the GUI's first line on the worker's stdin: this pipe is the GUI's


class _Termination:
    """Requests to stop (SIGTERM, SIGINT, the cancel file, stdin closing) as SystemExit in the main
    thread, so ``atomic_path``/``atomic_directory`` remove their temporary outputs; ignored once a
    result is being committed, so an output saved is always reported."""

    POLL_S = 0.1  # how often the watcher looks for the cancel file

    def __init__(self) -> None:
        self.committing = False
        self.requested = False
        self.announce: Callable[[], None] = lambda: None  # tells the GUI that a result is being committed

    def install(self) -> None:
        self.committing = self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)  # also what request_stop() raises in the main thread

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True
        if not self.committing:
            raise SystemExit(128 + signum)

    def request_stop(self) -> None:
        """From any thread: stop the main thread at its next Python instruction (unless committing)."""
        if not self.requested:
            self.requested = True
            _thread.interrupt_main(signal.SIGINT)

    def watch(self, cancel_file: Path, stdin: BinaryIO | None) -> None:
        """Start daemon threads that call :meth:`request_stop` when ``cancel_file`` appears or ``stdin``
        (a binary stream; None: not watched) reaches end-of-file."""
        def watch_file() -> None:
            while not cancel_file.exists():
                threading.Event().wait(self.POLL_S)
            self.request_stop()

        def watch_stdin(stream: BinaryIO) -> None:
            # Only a stdin that is the GUI's pipe counts: a launcher may hand the interpreter an empty or
            # closed stdin of its own, whose end-of-file means nothing.
            if stream.readline().rstrip() != STDIN_HELLO:
                return
            while stream.read(1 << 16):
                pass
            self.request_stop()

        threading.Thread(target=watch_file, name="dafne-cancel-file", daemon=True).start()
        if stdin is not None:
            threading.Thread(target=watch_stdin, args=(stdin,), name="dafne-stdin", daemon=True).start()

    def commit(self) -> None:
        """From now on the task finishes and reports its result even if cancelled."""
        self.committing = True
        self.announce()


TERMINATION = _Termination()


# --- requests (built in Slicer) ------------------------------------------------------------------


def segment_request(work_dir: Path, image: sitk.Image, model_name: str, device: str,
                    single_leg_side: str | None = None) -> dict[str, Any]:
    sitk.WriteImage(image, str(work_dir / "image.nrrd"))
    return {"task": "segment", "work_dir": str(work_dir), "model": model_name, "device": device,
            "single_leg_side": single_leg_side}


def finetune_request(work_dir: Path, image: sitk.Image, corrected: sitk.Image, model_name: str, slices: list[int],
                     config: dict[str, Any] | None) -> dict[str, Any]:
    sitk.WriteImage(image, str(work_dir / "image.nrrd"))
    sitk.WriteImage(corrected, str(work_dir / "corrected.nrrd"), useCompression=True)
    return {"task": "finetune", "work_dir": str(work_dir), "model": model_name, "slices": list(slices),
            "config": config}


def pull_request(work_dir: Path, families: list[str], config_path: Path | None) -> dict[str, Any]:
    return {"task": "pull", "work_dir": str(work_dir), "families": list(families),
            "config_path": str(config_path) if config_path else None}


def push_request(work_dir: Path, model_dir: Path, config_path: Path | None) -> dict[str, Any]:
    return {"task": "push", "work_dir": str(work_dir), "model_dir": str(model_dir),
            "config_path": str(config_path) if config_path else None}


# --- results (read back in Slicer) ---------------------------------------------------------------


def labels_of(result: dict[str, Any]) -> sitk.Image:
    return sitk.ReadImage(result["labels"])


def confidence_of(result: dict[str, Any]) -> Confidence:
    """How sure the segmentation was of each muscle and slice (empty if nothing came back)."""
    def numbers(key: str) -> dict[int, float]:
        return {int(k): float(v) for k, v in (result.get(key) or {}).items()}

    return Confidence(numbers("confidence"), numbers("slice_confidence"))


def improvement_of(result: dict[str, Any]) -> Improvement:
    data = dict(result["improvement"])
    data["path"] = Path(data["path"])
    return Improvement(**data)


def outcome_of(result: dict[str, Any]) -> SyncOutcome:
    outcome = dict(result["outcome"])
    outcome["new_models"] = tuple(outcome.get("new_models", ()))  # a JSON list on the way back
    return SyncOutcome(**outcome)


# --- running -------------------------------------------------------------------------------------


def run_request(request: dict[str, Any], progress: ProgressCallback, cancel: CancelCheck,
                segmentation: SegmentationLogic | None = None, learning: LearningLogic | None = None,
                sync: SyncLogic | None = None) -> dict[str, Any]:
    """Do what ``request`` asks; returns the JSON-able result. Logic objects may be replaced (tests)."""
    work_dir = Path(request["work_dir"])
    task = request["task"]
    if task == "segment":
        segmentation = segmentation or SegmentationLogic()
        model = segmentation.load_model(request["model"])
        labels, confidence = segmentation.segment(sitk.ReadImage(str(work_dir / "image.nrrd")), model, request["device"],
                                                  progress, cancel, single_leg_side=request.get("single_leg_side"))
        sitk.WriteImage(labels, str(work_dir / "labels.nrrd"), useCompression=True)
        return {"labels": str(work_dir / "labels.nrrd"),
                "confidence": {str(k): v for k, v in confidence.per_label.items()},
                "slice_confidence": {str(k): v for k, v in confidence.per_slice.items()}}
    if task == "finetune":
        if learning is None:
            from dafne_logic.learning.finetune import FinetuneConfig

            learning = LearningLogic(FinetuneConfig(**request["config"]) if request["config"] else None)
        model = (segmentation or SegmentationLogic()).load_model(request["model"])
        result = learning.finetune(model, sitk.ReadImage(str(work_dir / "image.nrrd")),
                                   sitk.ReadImage(str(work_dir / "corrected.nrrd")), request["slices"], progress, cancel)
        TERMINATION.commit()  # the saved model must reach the GUI
        improvement = learning.save(result)
        return {"improvement": {**asdict(improvement), "path": str(improvement.path)}}
    if task not in ("pull", "push"):
        raise ValueError(f"unknown task {task!r}")
    sync = sync or SyncLogic(Path(request["config_path"]) if request["config_path"] else None)
    if task == "pull":
        return {"outcome": asdict(sync.pull(request["families"], progress, cancel))}
    return {"outcome": asdict(sync.push(Path(request["model_dir"]), progress, cancel))}


def main(argv: list[str]) -> int:
    protocol = sys.stdout
    sys.stdout = sys.stderr  # stray prints of libraries go to the log, not into the protocol

    def send(message: dict[str, Any]) -> None:
        try:
            protocol.write(MARK + json.dumps(message) + "\n")
            protocol.flush()
        except (OSError, ValueError):  # nobody reads any more (the GUI is gone): stop unless committing
            TERMINATION.requested = True
            if not TERMINATION.committing:
                raise SystemExit(1) from None

    TERMINATION.install()
    TERMINATION.announce = lambda: send({"committing": True})
    try:
        request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        TERMINATION.watch(Path(request["work_dir"]) / CANCEL_FILE,
                          sys.stdin.buffer if request.get("stop_when_stdin_closes") and sys.stdin else None)
        result = run_request(request, lambda f, m: send({"progress": float(f), "message": str(m)}),
                             lambda: TERMINATION.requested)
        send({"result": result})
        return 0
    except DafneError as exc:
        send({"error": str(exc), "details": None})
    except Exception as exc:  # noqa: BLE001 - report everything to the GUI, which shows one line
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        send({"error": first, "details": traceback.format_exc()})
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
