"""What the module's buttons do, without Qt: validate, start background jobs, update the scene.

The widget owns the Qt objects and passes in a :class:`View` (status line, progress, dialogs) and
a :class:`SceneAdapter` (MRML conversions), together with the logic objects, so tests drive the
whole controller with small fakes (SlicerNNUnet's pattern). Every user-facing failure becomes one
sentence through :meth:`View.show_error`; the scene changes only when a job finished completely.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.atomic import unique_folder
from dafne_logic.core.errors import DafneError, InputError
from dafne_logic.core.labels import LabelTable, nothing_found_hint
from dafne_logic.inference.confidence import Confidence, add_confidence_columns, unsure_muscles

from . import worker
from .install_logic import InstallLogic
from .jobs import KILL_AFTER_S, JobStatus, ProcessJob
from .learning_logic import Improvement, dice_rows
from .review import ReviewTracker, format_slices
from .segmentation_logic import ModelChoice, SegmentationLogic, single_leg_side
from .sync_logic import SyncLogic

log = logging.getLogger(__name__)

INSTALLING = "The required Python packages are being installed; wait for it to finish."
PULLING, PUSHING = "Checking for updates", "Contributing"
# What a cancelled task that talks to the server may have done before Cancel reached it: not "nothing".
CANCELLED_AFTER_CONTACT = {
    PULLING: f"{PULLING} cancelled; a model downloaded before Cancel is kept and listed.",
    PUSHING: f"{PUSHING} cancelled; the update may have reached the server before Cancel. Contribute again to "
             "know: an update the server already has is not sent twice.",
}


class Job(Protocol):
    def poll(self) -> JobStatus: ...
    def cancel(self) -> None: ...


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
    # Quantitative MRI (quantitative_logic in Slicer): maps picked as volume nodes, charts, DICOM SEG.
    def maps_of(self, reference: sitk.Image, volume_node: Any, selection: MapSelection) -> list[Any]: ...  # QuantitativeMap
    def show_fat_fraction_chart(self, rows: list[dict[str, Any]], table: LabelTable, name: str) -> Any: ...
    def show_cross_sectional_areas(self, labels: sitk.Image, table: LabelTable, name: str) -> Any: ...
    def export_dicom_seg(self, volume_node: Any, labels: sitk.Image, table: LabelTable, path: str, model_name: str,
                         model_version: str, corrected: bool) -> list[int]: ...


@dataclass
class MapSelection:
    """Maps picked in the panel (volume nodes, None when not picked), the edge erosion in mm, and
    whether NaN map voxels mean "no value" (left out) rather than an error."""

    water: Any = None
    fat: Any = None
    fat_fraction: Any = None
    others: list[tuple[str, Any]] = field(default_factory=list)  # (column name, volume node)
    erode_mm: float | None = None  # None: dafne_logic.core.quantitative.DEFAULT_ERODE_MM
    # NaN and infinite map voxels (failed fits, background) are left out instead of refused (CLI --nan-as-missing).
    nan_as_missing: bool = False

    @property
    def empty(self) -> bool:
        return self.water is None and self.fat is None and self.fat_fraction is None and not self.others


@dataclass
class Case:
    """One segmented volume: its nodes, the model that segmented it, and the review state."""

    volume_node: Any
    segmentation_node: Any
    model_name: str  # registry name of the model that segmented it, then of its latest improvement
    table: LabelTable
    image: sitk.Image
    tracker: ReviewTracker
    improvements: list[Improvement] = field(default_factory=list)
    statistics: list[dict[str, Any]] = field(default_factory=list)
    statistics_of: str = ""  # digest of the labels the statistics were measured on: an export must match them
    adopted: bool = False  # taken up from a saved segmentation, whose corrections this session cannot see
    confidence: Confidence = field(default_factory=Confidence)  # the automatic segmentation's, per muscle and slice
    contributed: set[str] = field(default_factory=set)  # versions already sent


def _digest(labels: np.ndarray) -> str:
    """A fingerprint of a label array (its voxels and shape), to tell whether it changed."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(labels).tobytes() + str(labels.shape).encode()).hexdigest()


def unsure_muscles_sentence(confidence: dict[int, float], table: LabelTable) -> str:
    """'The model was unsure of ...: check them first. ' (empty when it was sure of every muscle)."""
    names = unsure_muscles(confidence, table)
    if not names:
        return ""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"The model was unsure of {shown}: check {'it' if len(names) == 1 else 'them'} first. "


def least_sure_slices_sentence(confidence: Confidence, count: int = 3) -> str:
    """'It was least sure on slices 12-13, 30: start correcting there. ' (empty without slice figures)."""
    slices = confidence.least_sure_slices(count)
    return f"It was least sure on slices {format_slices(slices)}: start correcting there. " if slices else ""


class DafneController:
    """The state machine behind the module panel (one case, at most one job at a time)."""

    def __init__(self, view: View, scene: SceneAdapter, install: InstallLogic, segmentation: SegmentationLogic,
                 sync: SyncLogic, finetune_config: dict[str, Any] | None = None,
                 start_job: Callable[[str, dict[str, Any]], Job] | None = None):
        """``finetune_config``: fields of ``dafne_logic.learning.finetune.FinetuneConfig`` to override (None: its
        defaults). ``start_job(task, request)`` starts a :mod:`.worker` request; by default in a
        worker process."""
        self.view = view
        self.scene = scene
        self.install = install
        self.segmentation = segmentation
        self.sync = sync
        self.finetune_config = finetune_config
        self._start_job = start_job or (lambda task, request: ProcessJob(task, request).start())
        self.case: Case | None = None
        self.job: Job | None = None
        self._on_done: Callable[[dict[str, Any]], None] | None = None
        self._on_error: Callable[[str], None] | None = None
        self._work_dir: Path | None = None
        self._job_began = 0.0
        self.listed_model: str | None = None  # what the model selector shows as selected after refresh_models
        self.chosen_model: str | None = None  # the user's choice (the parameter node's), kept across refreshes
        self._installing = False  # install.ensure() is running (it lets clicks through, see _ensure_packages)

    # --- jobs -------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.job is not None

    def _run(self, task: str, build_request: Callable[[Path], dict[str, Any]],
             on_done: Callable[[dict[str, Any]], None], on_error: Callable[[str], None] | None = None) -> None:
        """Write the job's inputs into a fresh work folder, start it, and remember what to do with its result
        (``on_error`` additionally receives a failure's message)."""
        # Not tempfile.mkdtemp: on Windows it retries a folder that denies new files 2**31 times (CPython gh-66305).
        work_dir = unique_folder(Path(tempfile.gettempdir()), "dafne-slicer-")
        try:
            self.job = self._start_job(task, build_request(work_dir))
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        self._work_dir, self._on_done, self._on_error, self._job_began = work_dir, on_done, on_error, time.monotonic()
        self.view.set_busy(task)
        self.view.set_progress(0.0, f"{task}...")

    def poll(self) -> bool:
        """Called by the widget's timer: forward progress; on completion apply the result. True while running."""
        if self.job is None:
            return False
        try:
            status = self.job.poll()
        except Exception as exc:  # noqa: BLE001 - a garbled progress line must end the job, not raise from the timer
            log.exception("DafneSlicer: following the running task failed")
            try:
                self.job.cancel()
            except Exception:  # noqa: BLE001 - the job is dropped either way
                log.exception("DafneSlicer: cancelling the task failed")
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            status = JobStatus(0.0, first_line, done=True, error=f"The task stopped: its progress could not be read ({first_line}).")
        if not status.done:
            self.view.set_progress(status.fraction, status.message)
            return True
        task = getattr(self.job, "name", "")
        on_done, on_error, self.job, self._on_done, self._on_error = self._on_done, self._on_error, None, None, None
        self.view.set_busy(None)
        try:
            if status.cancelled:
                self.view.set_status(CANCELLED_AFTER_CONTACT.get(task, status.message))
                if task == PULLING:
                    self.refresh_models()  # a model that arrived before Cancel is there to pick
            elif status.error is not None:
                if status.details:
                    log.error(status.details)
                if on_error is not None:
                    on_error(status.error)
                self.view.show_error(status.error)
            else:
                self.guarded(lambda: on_done(status.result))
        finally:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        return False

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.view.set_progress(self.job.poll().fraction, "cancelling...")

    def shutdown(self, wait_s: float = KILL_AFTER_S + 1.0) -> None:
        """The module is closing (Slicer exits, or the module is reloaded) and poll() will not run again: stop the
        running task and remove its work folder, which holds a copy of the patient's image. Waits at most
        ``wait_s`` seconds (a worker that ignores Cancel is killed after :data:`KILL_AFTER_S`)."""
        job, work_dir, self.job, self._work_dir = self.job, self._work_dir, None, None
        try:
            if job is not None:
                job.cancel()
                deadline = time.monotonic() + wait_s
                while not job.poll().done and time.monotonic() < deadline:
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001 - called while Slicer closes the module: must not raise into it
            log.exception("DafneSlicer: stopping the running task on closing failed")
        finally:
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)

    def scene_closing(self) -> None:
        """The scene is about to close: its nodes go, so the running job is cancelled and the case forgotten."""
        self.case = None
        try:
            self.cancel()
        except Exception:  # noqa: BLE001 - called from the scene's observer: must not raise into Slicer
            log.exception("DafneSlicer: cancelling the running task when the scene closed failed")

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
        if self._installing:
            self.view.set_status(INSTALLING)
            return False
        installing = bool(self.install.missing())
        if not self._ensure_packages():
            self.view.set_status("Nothing was done: the required Python packages are not installed.")
            return False
        if installing:  # the model list needed the packages: fill it now, not after a restart or a click
            self.refresh_models()
        return True

    # --- models -----------------------------------------------------------------------------------

    def model_chosen(self, name: str) -> None:
        """The selector now shows ``name`` (the user's pick, or what a refresh selected)."""
        self.chosen_model = name

    def refresh_models(self, selected: str | None = None) -> None:
        """Fill the model selector (empty with a hint while torch and friends are missing).

        ``selected``: the model to show (a newly pulled one); None keeps the user's choice, so that
        installing the packages or checking for updates never turns a thigh choice into the first
        model of the list (the calf model) without a word.
        """
        selected = selected or self.chosen_model
        if selected:
            self.chosen_model = selected
        missing = self.install.missing()
        self.listed_model = None
        if missing:
            self.view.set_models([], None)
            self.view.set_status(f"Not installed yet: {', '.join(missing)}. Click Install (or Segment) to install.")
            return

        def fill() -> None:
            choices = self.segmentation.list_models()
            names = [choice.name for choice in choices]
            self.listed_model = selected if selected in names else (names[0] if names else None)
            self.view.set_models(choices, selected)
        self.guarded(fill)

    def _ensure_packages(self) -> bool:
        """``install.ensure()``, one at a time. Slicer's pip install pumps Qt events on every line of
        pip's output, so during a download a second click would start a second pip into the same
        site-packages."""
        self._installing = True
        try:
            return self.install.ensure()
        finally:
            self._installing = False

    def install_dependencies(self) -> None:
        if self._installing:
            self.view.set_status(INSTALLING)
            return
        if self.guarded(self._ensure_packages):
            self.view.set_status("All required Python packages are installed.")
            self.refresh_models()

    # --- segment ----------------------------------------------------------------------------------

    def segment(self, volume_node: Any, model_name: str | None, device: str, side: str = "auto") -> None:
        """``side``: the panel's "Single leg side" (auto, right, left), used when one leg is in view."""
        self.guarded(lambda: self._segment(volume_node, model_name, device, side))

    def _segment(self, volume_node: Any, model_name: str | None, device: str, side: str) -> None:
        leg_side = single_leg_side(side)
        image = self.scene.image_of(volume_node)  # validates first: no install prompt for a bad input
        list_was_empty = bool(self.install.missing())  # so the user could not pick a model yet
        if not self._ready():
            return
        if not model_name:
            self.refresh_models()
            if not (list_was_empty and self.listed_model):
                raise InputError("Select a model first.")
            model_name = self.listed_model  # the first click after installing segments with what the list shows
        manifest = self.segmentation.check_model(model_name)  # before any work starts; the worker loads the weights
        volume_name = self.scene.node_name(volume_node)

        def done(result: dict[str, Any]) -> None:
            if not self.scene.node_exists(volume_node):  # deleted, or its scene closed, while the job ran
                self.view.set_status(f"'{volume_name}' was removed from the scene while it was being segmented; "
                                     "its segmentation was not added.")
                return
            labels = worker.labels_of(result)
            node = self.scene.show_labels(labels, manifest.labels, volume_node, f"{volume_name} segmentation",
                                          self._replaceable_segmentation(volume_node))
            automatic = sitk.GetArrayFromImage(labels)
            confidence = worker.confidence_of(result)
            self.case = Case(volume_node, node, model_name, manifest.labels, image, ReviewTracker(automatic),
                             confidence=confidence)
            found = len(set(np.unique(automatic).tolist()) - {0})
            if not found:
                self.view.set_status(f"Segmented '{volume_name}' with {model_name} {manifest.version}. "
                                     f"{nothing_found_hint(manifest.labels.region)}")
            else:
                self.view.set_status(f"Segmented '{volume_name}' with {model_name} {manifest.version}: {found} of "
                                     f"{2 * manifest.labels.n_muscles} muscles found in "
                                     f"{time.monotonic() - self._job_began:.0f} s. "
                                     f"{unsure_muscles_sentence(confidence.per_label, manifest.labels)}"
                                     f"{least_sure_slices_sentence(confidence)}"
                                     "Correct it in the Segment Editor, then click Improve.")
            self.view.set_review_summary(self.case.tracker.summary(automatic))

        self._run("Segmenting", lambda work_dir: worker.segment_request(work_dir, image, model_name, device, leg_side),
                  done)

    def _replaceable_segmentation(self, volume_node: Any) -> Any | None:
        """The case's segmentation of this volume if segmenting again may overwrite it: nothing edited or reviewed."""
        case = self.case
        if case is None or case.volume_node is not volume_node or not self.scene.node_exists(case.segmentation_node):
            return None
        if case.tracker.reviewed:
            return None
        try:
            _, current = self._corrected(case)
        except DafneError:  # no longer readable as this case: keep it, make a new one
            return None
        return None if case.tracker.changed_slices(current) else case.segmentation_node

    # --- correct ----------------------------------------------------------------------------------

    def adopt(self, volume_node: Any, segmentation_node: Any, model_name: str | None) -> None:
        """Continue with an existing segmentation (e.g. saved earlier) of ``volume_node``.

        Its current content counts as the starting point: later edits are "changed" slices, and
        slices corrected before should be marked reviewed.
        """
        def action():
            if segmentation_node is None:
                raise InputError("Select a segmentation to continue with.")
            image = self.scene.image_of(volume_node)
            if not self._ready():
                return
            if not model_name:
                raise InputError("Select the model the segmentation belongs to.")
            table = self.segmentation.check_model(model_name).labels
            corrected = self.scene.labels_of(segmentation_node, volume_node, table)  # checks the grid
            n_labels = 2 * table.n_muscles
            if len(corrected.missing_names) == n_labels:
                raise InputError(f"No segment of '{self.scene.node_name(segmentation_node)}' is named like a label "
                                 f"of model {model_name} (e.g. '{table.volume_labels()[0].name}'); select the model "
                                 "it was made with.")
            current = sitk.GetArrayFromImage(corrected.labels)
            self.case = Case(volume_node, segmentation_node, model_name, table, image, ReviewTracker(current),
                             adopted=True)
            ignored = f" Ignored segments: {', '.join(corrected.unknown_names)}." if corrected.unknown_names else ""
            self.view.set_status(f"Continuing with '{self.scene.node_name(segmentation_node)}' "
                                 f"({n_labels - len(corrected.missing_names)} of {n_labels} labels have a segment).{ignored} "
                                 "Mark the slices you already corrected as reviewed.")
            self.view.set_review_summary(self.case.tracker.summary(current))
        self.guarded(action)

    def _require_case(self) -> Case:
        if (self.case is None or not self.scene.node_exists(self.case.segmentation_node)
                or not self.scene.node_exists(self.case.volume_node)):
            self.case = None
            raise InputError("Segment a volume first.")
        return self.case

    def open_editor(self) -> None:
        def action():
            case = self._require_case()
            self.scene.open_segment_editor(case.segmentation_node, case.volume_node)
        self.guarded(action)

    def _corrected(self, case: Case):
        corrected = self.scene.labels_of(case.segmentation_node, case.volume_node, case.table)
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
            from dafne_logic.core.slice_selection import parse_slice_list

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
        from dafne_logic.core.preprocessing import slice_axis  # scipy: only once the packages are installed

        if slice_axis(case.image) != 2:  # the volume's slices are not its axial ones
            raise InputError("Improve learns from axial slices, and this volume's slices are sagittal or coronal: "
                             "reformat it to axial (e.g. Resample Scalar/Vector/DWI Volume), segment and correct that.")
        corrected, current = self._corrected(case)
        slices = case.tracker.training_slices(current)
        if not slices:
            raise InputError("No corrected or reviewed slices yet: correct the segmentation in the Segment Editor or "
                             "mark slices as reviewed, then click Improve.")
        if not self._ready():
            return

        def request(work_dir: Path) -> dict[str, Any]:
            return worker.finetune_request(work_dir, case.image, corrected.labels, case.model_name, slices,
                                           self.finetune_config)

        def done(result: dict[str, Any]) -> None:
            improvement = worker.improvement_of(result)
            case.improvements.append(improvement)
            case.model_name = improvement.model_name
            self.refresh_models(selected=improvement.model_name)
            rows = dice_rows(improvement)
            self.view.show_dice(rows)
            before = np.mean([r["dice_automatic"] for r in rows]) if rows else float("nan")
            after = np.mean([r["dice_improved"] for r in rows]) if rows else float("nan")
            status = (f"Improved model '{improvement.model_name}' saved and selected; mean Dice on the "
                      f"{improvement.n_slices} corrected slices {before:.3f} -> {after:.3f}.")
            if improvement.held_out_before is not None and improvement.held_out_after is not None:
                status += (f" On the {improvement.n_held_out} corrected leg-slices held out of training: "
                           f"{improvement.held_out_before:.3f} -> {improvement.held_out_after:.3f}.")
            self.view.set_status(status)

        self._run("Improving", request, done)

    # --- statistics -------------------------------------------------------------------------------

    def statistics(self, maps: MapSelection | None = None) -> None:
        """Per-muscle statistics as a table; with maps picked, their columns and a fat-fraction chart."""
        def action():
            from dafne_logic.core.quantitative import DEFAULT_ERODE_MM
            from dafne_logic.core.statistics import muscle_statistics

            case = self._require_case()
            corrected, current = self._corrected(case)
            selection = maps or MapSelection()
            quantities = [] if selection.empty else self.scene.maps_of(case.image, case.volume_node, selection)
            erode_mm = DEFAULT_ERODE_MM if selection.erode_mm is None else selection.erode_mm
            warnings: list[str] = []  # muscles a map gives no value for or covers in part: said in the status line
            case.statistics = muscle_statistics(case.image, corrected.labels, case.table, maps=quantities,
                                                erode_mm=erode_mm, warnings=warnings)
            case.statistics_of = _digest(current)
            if case.confidence.per_label:  # a case adopted from a saved segmentation has no network output to judge
                add_confidence_columns(case.statistics, case.confidence.per_label)
            name = self.scene.node_name(case.volume_node)
            self.scene.show_statistics(case.statistics, f"{name} muscle statistics")
            present = sum(1 for row in case.statistics if row["voxel_count"])
            if any(row.get("fat_fraction_mean") is not None for row in case.statistics):
                self.scene.show_fat_fraction_chart(case.statistics, case.table, f"{name} fat fraction")
                # A scanner map's scale (0-1 or 0-100) is detected: say which, as the command line logs it.
                scale = f" The {quantities[0].note}." if selection.fat_fraction is not None else ""
                self.view.set_status(f"Statistics and fat fraction of {present} muscles shown in the table and chart."
                                     f"{scale}{_sentences(warnings)}")
            else:
                self.view.set_status(f"Statistics of {present} muscles shown in the table.{_sentences(warnings)}")
        self.guarded(action)

    def cross_sectional_areas(self) -> None:
        def action():
            case = self._require_case()
            corrected, _ = self._corrected(case)
            self.scene.show_cross_sectional_areas(corrected.labels, case.table,
                                                  f"{self.scene.node_name(case.volume_node)} cross-sectional area")
            self.view.set_status("Cross-sectional area of each muscle along the leg shown in the table and plot.")
        self.guarded(action)

    def can_export_dicom_seg(self) -> bool:
        """Whether DICOM SEG can be written in this Slicer; if not, the reason is shown (asked before
        the file dialog, so nobody picks a file for an export that cannot run)."""
        from dafne_logic.core.dicom_seg import require_dicom_seg_support

        return self.guarded(lambda: require_dicom_seg_support() or True) is True

    def export_dicom_seg(self, path: str) -> None:
        def action():
            case = self._require_case()
            corrected, current = self._corrected(case)
            # A saved segmentation taken up is usually a corrected one: not declared AUTOMATIC in a clinical export.
            edited = case.adopted or bool(case.tracker.changed_slices(current))
            version = next((c.version for c in self.segmentation.list_models() if c.name == case.model_name), "")
            values = self.scene.export_dicom_seg(case.volume_node, corrected.labels, case.table, path, case.model_name,
                                                 version, edited)
            self.view.set_status(f"DICOM SEG with {len(values)} muscles written to {path}.")
        self.guarded(action)

    def export_statistics(self, path: str) -> None:
        def action():
            from dafne_logic.core.statistics import write_statistics_csv

            case = self._require_case()
            if not case.statistics:
                raise InputError("Compute the statistics first.")
            if _digest(self._corrected(case)[1]) != case.statistics_of:
                raise InputError("The segmentation changed since the statistics were computed: click Statistics "
                                 "again, then export.")
            write_statistics_csv(case.statistics, path)
            self.view.set_status(f"Statistics written to {path}.")
        self.guarded(action)

    # --- share ------------------------------------------------------------------------------------

    def check_for_updates(self) -> None:
        def action():
            if not self._ready():
                return
            families = sorted({choice.family for choice in self.segmentation.list_models()})
            self._run(PULLING,
                      lambda work_dir: worker.pull_request(work_dir, families, self.sync.config_path), self._pulled,
                      self._sync_failed)
        self.guarded(action)

    def _sync_failed(self, message: str) -> None:
        self.view.set_sync_status(f"Failed at {time.strftime('%H:%M')}: {message}")

    def _pulled(self, result: dict[str, Any]) -> None:
        outcome = worker.outcome_of(result)
        self.view.set_sync_status(outcome.message)
        self.refresh_models(selected=self._newer_of_chosen_family(outcome.new_models))

    def _newer_of_chosen_family(self, pulled: tuple[str, ...]) -> str | None:
        """The pulled model of the family the user works with (the last pulled when no model is chosen,
        or the chosen one is gone); None keeps the choice: a new calf version must not replace a thigh one."""
        if not pulled:
            return None
        families = {choice.name: choice.family for choice in self.segmentation.list_models()}
        chosen = families.get(self.chosen_model) if self.chosen_model is not None else None
        if chosen is None:
            return pulled[-1]
        return next((name for name in reversed(pulled) if families.get(name) == chosen), None)

    def contribute(self) -> None:
        def action():
            case = self._require_case()
            pending = [imp for imp in case.improvements if imp.version not in case.contributed]
            if not pending:
                raise InputError("Nothing to contribute yet: click Improve after correcting slices.")
            if not self._ready():
                return
            latest = pending[-1]

            def done(result: dict[str, Any]) -> None:
                case.contributed.add(latest.version)
                self.view.set_sync_status(worker.outcome_of(result).message)

            self._run(PUSHING, lambda work_dir: worker.push_request(work_dir, latest.path, self.sync.config_path),
                      done, self._sync_failed)
        self.guarded(action)


def _sentences(lines: list[str]) -> str:
    """Warning lines appended to a status message, each as a sentence ("" for none)."""
    return "".join(f" {line}." for line in lines)
