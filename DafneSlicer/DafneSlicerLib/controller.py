"""What the module's buttons do, without Qt: validate, start background jobs, update the scene.

The widget owns the Qt objects and passes in a :class:`View` (status line, progress, dialogs) and
a :class:`SceneAdapter` (MRML conversions), together with the logic objects, so tests drive the
whole controller with small fakes (SlicerNNUnet's pattern). Every user-facing failure becomes one
sentence through :meth:`View.show_error`; the scene changes only when a job finished completely.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import SimpleITK as sitk

from dafne_logic.errors import DafneError, InputError
from dafne_logic.labels import LabelTable

from .install_logic import InstallLogic
from .jobs import BackgroundJob, JobFunction
from .learning_logic import Improvement, LearningLogic, dice_rows
from .review import ReviewTracker, format_slices
from .segmentation_logic import ModelChoice, SegmentationLogic
from .sync_logic import SyncLogic

log = logging.getLogger(__name__)


class View(Protocol):
    def set_status(self, message: str) -> None: ...
    def show_error(self, message: str) -> None: ...
    def set_busy(self, task: str | None) -> None: ...  # None: idle (Cancel hidden, buttons enabled)
    def set_progress(self, fraction: float, message: str) -> None: ...
    def set_models(self, choices: list[ModelChoice], selected: str | None) -> None: ...
    def set_review_summary(self, text: str) -> None: ...
    def show_dice(self, rows: list[dict[str, object]]) -> None: ...
    def set_sync_status(self, text: str) -> None: ...


class SceneAdapter(Protocol):
    """MRML operations (``mrml_conversion`` in Slicer); nodes are opaque to the controller."""

    def image_of(self, volume_node: Any) -> sitk.Image: ...
    def node_name(self, node: Any) -> str: ...
    def node_exists(self, node: Any) -> bool: ...
    def show_labels(self, labels: sitk.Image, table: LabelTable, volume_node: Any, name: str,
                    segmentation_node: Any | None) -> Any: ...
    def labels_of(self, segmentation_node: Any, volume_node: Any, table: LabelTable) -> Any: ...  # CorrectedLabels
    def open_segment_editor(self, segmentation_node: Any, volume_node: Any) -> None: ...
    def current_slice(self, volume_node: Any) -> int: ...
    def show_statistics(self, rows: list[dict[str, Any]], name: str) -> Any: ...


@dataclass
class Case:
    """One segmented volume: its nodes, the model that segmented it, and the review state."""

    volume_node: Any
    segmentation_node: Any
    model_name: str
    model: Any  # dafne_logic.model_package.ModelPackage
    image: sitk.Image
    tracker: ReviewTracker
    improvements: list[Improvement] = field(default_factory=list)
    statistics: list[dict[str, Any]] = field(default_factory=list)
    contributed: set[str] = field(default_factory=set)  # versions already sent


class DafneController:
    """The state machine behind the module panel (one case, at most one job at a time)."""

    def __init__(self, view: View, scene: SceneAdapter, install: InstallLogic, segmentation: SegmentationLogic,
                 learning: LearningLogic, sync: SyncLogic,
                 start_job: Callable[[str, JobFunction], BackgroundJob] | None = None):
        self.view = view
        self.scene = scene
        self.install = install
        self.segmentation = segmentation
        self.learning = learning
        self.sync = sync
        self._start_job = start_job or (lambda name, function: BackgroundJob(name, function).start())
        self.case: Case | None = None
        self.job: BackgroundJob | None = None
        self._on_done: Callable[[Any], None] | None = None
        self._job_began = 0.0

    # --- jobs -------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.job is not None

    def _run(self, task: str, function: JobFunction, on_done: Callable[[Any], None]) -> None:
        self.view.set_busy(task)
        self.view.set_progress(0.0, f"{task}...")
        self._on_done = on_done
        self._job_began = time.monotonic()
        self.job = self._start_job(task, function)

    def poll(self) -> bool:
        """Called by the widget's timer: forward progress; on completion apply the result. True while running."""
        if self.job is None:
            return False
        status = self.job.poll()
        if not status.done:
            self.view.set_progress(status.fraction, status.message)
            return True
        on_done, self.job, self._on_done = self._on_done, None, None
        self.view.set_busy(None)
        if status.cancelled:
            self.view.set_status(status.message)
        elif status.error is not None:
            if status.details:
                log.error(status.details)
            self.view.show_error(status.error)
        else:
            self.guarded(lambda: on_done(status.result))
        return False

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.view.set_progress(self.job.poll().fraction, "cancelling...")

    def guarded(self, action: Callable[[], Any]) -> Any:
        """Run a step; a DafneError (or any failure) becomes one message and leaves the state as it was."""
        try:
            return action()
        except DafneError as exc:
            self.view.show_error(str(exc))
        except Exception as exc:  # noqa: BLE001 - never leave the panel half-updated
            log.exception("DafneSlicer step failed")
            self.view.show_error(f"Unexpected error: {(str(exc).splitlines() or [type(exc).__name__])[0]}")
        return None

    def _ready(self) -> bool:
        if self.busy:
            self.view.set_status("Wait for the running task to finish or cancel it.")
            return False
        if not self.install.ensure():
            self.view.set_status("Nothing was done: the required Python packages are not installed.")
            return False
        return True

    # --- models -----------------------------------------------------------------------------------

    def refresh_models(self, selected: str | None = None) -> None:
        """Fill the model selector (empty with a hint while torch and friends are missing)."""
        missing = self.install.missing()
        if missing:
            self.view.set_models([], None)
            self.view.set_status(f"Not installed yet: {', '.join(missing)}. Click Install (or Segment) to install.")
            return
        self.guarded(lambda: self.view.set_models(self.segmentation.list_models(), selected))

    def install_dependencies(self) -> None:
        if self.guarded(self.install.ensure):
            self.view.set_status("All required Python packages are installed.")
            self.refresh_models()

    # --- segment ----------------------------------------------------------------------------------

    def segment(self, volume_node: Any, model_name: str | None, device: str) -> None:
        self.guarded(lambda: self._segment(volume_node, model_name, device))

    def _segment(self, volume_node: Any, model_name: str | None, device: str) -> None:
        image = self.scene.image_of(volume_node)  # validates first: no install prompt for a bad input
        if not self._ready():
            return
        if not model_name:
            self.refresh_models()
            raise InputError("Select a model first.")
        model = self.segmentation.load_model(model_name)
        volume_name = self.scene.node_name(volume_node)

        def work(progress, cancel):
            return self.segmentation.segment(image, model, device, progress, cancel)

        def done(labels: sitk.Image) -> None:
            previous = None
            if self.case is not None and self.case.volume_node is volume_node and self.scene.node_exists(
                    self.case.segmentation_node):
                previous = self.case.segmentation_node
            node = self.scene.show_labels(labels, model.labels, volume_node, f"{volume_name} segmentation", previous)
            automatic = sitk.GetArrayFromImage(labels)
            self.case = Case(volume_node, node, model_name, model, image, ReviewTracker(automatic))
            found = len(set(np.unique(automatic).tolist()) - {0})
            self.view.set_status(f"Segmented '{volume_name}' with {model_name} {model.manifest.version}: {found} of "
                                 f"{2 * model.labels.n_muscles} muscles found in {time.monotonic() - self._job_began:.0f} s. "
                                 "Correct it in the Segment Editor, then click Improve.")
            self.view.set_review_summary(self.case.tracker.summary(automatic))

        self._run("Segmenting", work, done)

    # --- correct ----------------------------------------------------------------------------------

    def _require_case(self) -> Case:
        if self.case is None or not self.scene.node_exists(self.case.segmentation_node):
            self.case = None
            raise InputError("Segment a volume first.")
        return self.case

    def open_editor(self) -> None:
        def action():
            case = self._require_case()
            self.scene.open_segment_editor(case.segmentation_node, case.volume_node)
        self.guarded(action)

    def _corrected(self, case: Case):
        corrected = self.scene.labels_of(case.segmentation_node, case.volume_node, case.model.labels)
        return corrected, sitk.GetArrayFromImage(corrected.labels)

    def update_review(self) -> None:
        """Recompute changed slices after an edit (the widget calls this, debounced, on segmentation changes)."""
        def action():
            if self.case is None or self.busy or not self.scene.node_exists(self.case.segmentation_node):
                return
            corrected, current = self._corrected(self.case)
            text = self.case.tracker.summary(current)
            if corrected.unknown_names:
                text += f" Ignored segments (not in the model's labels): {', '.join(corrected.unknown_names)}."
            self.view.set_review_summary(text)
        self.guarded(action)

    def mark_current_slice(self, reviewed: bool = True) -> None:
        def action():
            case = self._require_case()
            k = self.scene.current_slice(case.volume_node)
            self._mark(case, [k], reviewed)
        self.guarded(action)

    def mark_slices(self, text: str, reviewed: bool = True) -> None:
        def action():
            from dafne_logic.slice_selection import parse_slice_list

            case = self._require_case()
            slices = parse_slice_list(text)
            if slices == "auto":
                raise InputError("Give slice numbers like '3,5,10-14'.")
            self._mark(case, slices, reviewed)
        self.guarded(action)

    def _mark(self, case: Case, slices: list[int], reviewed: bool) -> None:
        try:
            case.tracker.mark_reviewed(slices, reviewed)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        self.view.set_status(f"Slices {format_slices(slices)} marked {'reviewed' if reviewed else 'not reviewed'}.")
        self.update_review()

    # --- improve ----------------------------------------------------------------------------------

    def improve(self) -> None:
        self.guarded(self._improve)

    def _improve(self) -> None:
        case = self._require_case()
        corrected, current = self._corrected(case)
        slices = case.tracker.training_slices(current)
        if not slices:
            raise InputError("No corrected or reviewed slices yet: correct the segmentation in the Segment Editor or "
                             "mark slices as reviewed, then click Improve.")
        if not self._ready():
            return

        def work(progress, cancel):
            return self.learning.finetune(case.model, case.image, corrected.labels, slices, progress, cancel)

        def done(result) -> None:
            improvement = self.learning.save(result)
            case.improvements.append(improvement)
            case.model, case.model_name = result.model, improvement.model_name
            self.refresh_models(selected=improvement.model_name)
            rows = dice_rows(improvement)
            self.view.show_dice(rows)
            before = np.mean([r["dice_automatic"] for r in rows]) if rows else float("nan")
            after = np.mean([r["dice_improved"] for r in rows]) if rows else float("nan")
            self.view.set_status(f"Improved model '{improvement.model_name}' saved and selected; mean Dice on the "
                                 f"{improvement.n_slices} corrected slices {before:.3f} -> {after:.3f}.")

        self._run("Improving", work, done)

    # --- statistics -------------------------------------------------------------------------------

    def statistics(self) -> None:
        def action():
            from dafne_logic.statistics import muscle_statistics

            case = self._require_case()
            corrected, _ = self._corrected(case)
            case.statistics = muscle_statistics(case.image, corrected.labels, case.model.labels)
            self.scene.show_statistics(case.statistics, f"{self.scene.node_name(case.volume_node)} muscle statistics")
            present = sum(1 for row in case.statistics if row["voxel_count"])
            self.view.set_status(f"Statistics of {present} muscles shown in the table.")
        self.guarded(action)

    def export_statistics(self, path: str) -> None:
        def action():
            from dafne_logic.statistics import write_statistics_csv

            case = self._require_case()
            if not case.statistics:
                raise InputError("Compute the statistics first.")
            write_statistics_csv(case.statistics, path)
            self.view.set_status(f"Statistics written to {path}.")
        self.guarded(action)

    # --- share ------------------------------------------------------------------------------------

    def check_for_updates(self) -> None:
        def action():
            if not self._ready():
                return
            families = sorted({choice.family for choice in self.segmentation.list_models()})
            self._run("Checking for updates", lambda progress, cancel: self.sync.pull(families, progress, cancel),
                      self._pulled)
        self.guarded(action)

    def _pulled(self, outcome) -> None:
        self.view.set_sync_status(outcome.message)
        self.refresh_models(selected=outcome.model_name)

    def contribute(self) -> None:
        def action():
            case = self._require_case()
            pending = [imp for imp in case.improvements if imp.version not in case.contributed]
            if not pending:
                raise InputError("Nothing to contribute yet: click Improve after correcting slices.")
            if not self._ready():
                return
            latest = pending[-1]

            def done(outcome) -> None:
                case.contributed.add(latest.version)
                self.view.set_sync_status(outcome.message)

            self._run("Contributing", lambda progress, cancel: self.sync.push(latest.path, progress, cancel), done)
        self.guarded(action)
