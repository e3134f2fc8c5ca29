"""The module's controller and logic objects with the slow or Slicer-only parts replaced by the small
fakes of ``fakes.py``; jobs run on real threads, statistics and CSV export use the real ``dafne_logic`` code.
"""

from __future__ import annotations

import csv
import importlib.metadata
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from fakes import (
    SHAPE,
    FakeClient,
    FakeInstall,
    FakePackaging,
    FakeScene,
    FakeSegmentation,
    FakeView,
    Node,
    automatic_labels,
    finish,
    make_controller,
    make_volume,
    segmented,
)
from packaging.requirements import Requirement

from dafne_logic.core.errors import Cancelled, InputError
from dafne_logic.core.labels import LEG
from DafneSlicerLib.controller import CANCELLED_AFTER_CONTACT, PULLING, DafneController
from DafneSlicerLib.install_logic import (
    NEVER_INSTALL,
    DependencyError,
    InstallLogic,
    is_satisfied,
    read_requirements,
    unusable_here,
)
from DafneSlicerLib.jobs import BackgroundJob, JobStatus
from DafneSlicerLib.learning_logic import Improvement, LearningLogic, dice_rows
from DafneSlicerLib.review import ReviewTracker, format_slices
from DafneSlicerLib.segmentation_logic import ModelChoice
from DafneSlicerLib.sync_logic import WHAT_IS_SENT, ShareError, SyncLogic

# --- segment -------------------------------------------------------------------------------------


def test_segment_runs_in_background_then_shows_a_named_segmentation(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    controller, parts = make_controller()
    volume = make_volume()
    controller.segment(volume, "leg", "cpu")
    assert controller.busy and parts["view"].busy == ["Segmenting"]
    assert parts["scene"].shown == []  # nothing in the scene until the job finished
    finish(controller)
    view = parts["view"]
    assert view.busy == ["Segmenting", None] and not view.errors
    assert parts["scene"].shown == [("calf segmentation", False)]
    assert parts["segmentation"].calls == ["cpu"] and parts["segmentation"].sides == [None]
    assert "2 of 12 muscles found" in view.statuses[-1]
    assert view.summaries[-1] == "Changed slices: none. Reviewed: none."
    assert controller.case.model_name == "leg"
    assert list(tmp_path.iterdir()) == []  # the job's work folder (image and labels files) is gone


def test_a_scan_without_muscle_says_so_instead_of_asking_for_corrections():
    controller, parts = make_controller()
    parts["segmentation"].finds_nothing = True
    controller.segment(make_volume(), "leg", "cpu")
    finish(controller)
    status = parts["view"].statuses[-1]
    assert "No muscle was found" in status and "calves" in status and "Improve" not in status
    assert not parts["view"].errors and controller.case is not None  # the empty segmentation is there to draw in


def test_segmenting_again_replaces_an_untouched_segmentation_but_never_corrections():
    controller, parts, volume = segmented()
    first = controller.case.segmentation_node
    controller.segment(volume, "leg", "auto")
    finish(controller)
    assert controller.case.segmentation_node is first
    assert parts["scene"].shown[-1] == ("calf segmentation", True)
    first.labels[0, 0, 0] = LEG.value_of(2, "left")  # the user corrected something
    controller.segment(volume, "leg", "auto")
    finish(controller)
    assert controller.case.segmentation_node is not first and first.labels[0, 0, 0] == LEG.value_of(2, "left")
    assert parts["scene"].shown[-1] == ("calf segmentation", False)
    second = controller.case.segmentation_node
    controller.mark_slices("1")  # reviewed counts as work too
    controller.segment(volume, "leg", "auto")
    finish(controller)
    assert controller.case.segmentation_node is not second


@pytest.mark.parametrize("volume, model, message", [
    (None, "leg", "Select an input volume first."),
    ("volume", None, "Select a model first."),
    ("volume", "broken", "model 'broken': weights do not match the manifest"),
])
def test_bad_segment_input_is_one_message_and_no_job(volume, model, message):
    controller, parts = make_controller()
    controller.segment(make_volume() if volume else None, model, "auto")
    assert parts["view"].errors == [message]
    assert controller.job is None and parts["scene"].shown == [] and controller.case is None


def test_a_volume_removed_during_segmentation_gets_no_result_and_is_no_case():
    controller, parts = make_controller()
    volume = make_volume()
    controller.segment(volume, "leg", "cpu")
    volume.present = False  # the user deleted it while the job ran
    finish(controller)
    assert parts["scene"].shown == [] and controller.case is None and not parts["view"].errors
    assert "was removed from the scene" in parts["view"].statuses[-1]


def test_a_case_whose_volume_is_gone_is_no_case():
    controller, parts, volume = segmented()
    volume.present = False
    controller.improve()
    assert parts["view"].errors[-1] == "Segment a volume first." and controller.case is None


def test_a_job_whose_progress_cannot_be_read_ends_with_one_message_and_the_panel_idle():
    _, parts = make_controller()

    class GarbledJob:
        cancelled = False

        def poll(self):
            raise ValueError("Expecting value: line 1 column 1 (char 0)")

        def cancel(self):
            self.cancelled = True

    job = GarbledJob()
    controller = DafneController(parts["view"], parts["scene"], parts["install"], parts["segmentation"], parts["sync"],
                                 start_job=lambda task, request: job)
    controller.segment(make_volume(), "leg", "cpu")
    assert controller.job is job and parts["view"].busy == ["Segmenting"]
    assert controller.poll() is False and controller.job is None and job.cancelled
    assert parts["view"].errors == ["The task stopped: its progress could not be read "
                                    "(Expecting value: line 1 column 1 (char 0))."]
    assert parts["view"].busy[-1] is None


def test_declined_installation_changes_nothing():
    install = FakeInstall(missing=["torch>=2.4"], agree=False)
    controller, parts = make_controller(install=install)
    controller.segment(make_volume(), "leg", "auto")
    assert install.asked == 1 and controller.job is None
    assert "not installed" in parts["view"].statuses[-1]
    controller.refresh_models()
    assert parts["view"].models[-1] == ([], None)  # no model list without torch, and a hint
    assert "Click Install" in parts["view"].statuses[-1]



@pytest.mark.parametrize("side, expected", [("auto", None), ("right", "right"), ("left", "left")])
def test_single_leg_side_reaches_the_segmentation_through_the_worker_request(side, expected):
    controller, parts = make_controller()
    controller.segment(make_volume(), "leg", "cpu", side)
    finish(controller)
    assert parts["segmentation"].sides == [expected] and not parts["view"].errors


def test_unknown_single_leg_side_is_refused_before_any_work():
    controller, parts = make_controller()
    controller.segment(make_volume(), "leg", "cpu", "middle")
    assert controller.job is None and parts["segmentation"].calls == []
    assert parts["view"].errors == ["Single leg side must be one of auto, right, left, not 'middle'."]

def test_first_segment_after_installing_fills_the_model_list_and_uses_its_selection():
    install = FakeInstall(missing=["torch>=2.4"], agree=True)
    controller, parts = make_controller(install=install)
    controller.refresh_models()  # the panel opened before the packages were there: nothing to select
    assert parts["view"].models == [([], None)]
    controller.segment(make_volume(), None, "cpu")
    finish(controller)
    assert install.asked == 1 and parts["view"].models[1] == (["leg"], None)  # filled right after installing
    assert parts["scene"].shown and not parts["view"].errors and controller.case.model_name == "leg"


class TwoModels(FakeSegmentation):
    """The registry lists bundled models by folder name: the calf model ("leg") comes first."""

    def list_models(self):
        mine = ModelChoice("leg-mine", "leg", "leg-mine 1.local-abc (user)", "1.local-abc", "user",
                           tuple(label.name for label in LEG.volume_labels()))
        return [*super().list_models(), mine]


def test_the_users_model_choice_survives_installing_and_checking_for_updates(monkeypatch):
    """Installing the packages, or checking for updates with nothing new, used to select the first
    model of the list (the calf model), and the next Segment used it without a word."""
    import dafne_logic.learning.federated_client

    install = FakeInstall(missing=["torch>=2.4"], agree=True)
    controller, parts = make_controller(install=install, segmentation=TwoModels())
    controller.refresh_models("leg-mine")  # the panel opens with the parameter node's choice, packages missing
    controller.segment(make_volume(), None, "cpu")  # the first click installs, then segments
    finish(controller)
    assert parts["view"].models[-1] == (["leg", "leg-mine"], "leg-mine") and controller.case.model_name == "leg-mine"

    monkeypatch.setattr(dafne_logic.learning.federated_client, "FederatedClient", FakeClient)
    from dafne_logic.core.paths import user_models_dir

    (user_models_dir() / "leg-v2").mkdir(parents=True)  # the server's version is already here: nothing new
    controller.sync.save(True, "https://dafne.example.org/", " secret ")
    controller.check_for_updates()
    finish(controller)
    assert parts["view"].sync[-1].startswith("Up to date") and parts["view"].models[-1][1] == "leg-mine"
    controller.install_dependencies()
    assert parts["view"].models[-1][1] == "leg-mine"
    controller.model_chosen("leg")  # the user picks another: refreshes keep that one
    controller.refresh_models()
    assert parts["view"].models[-1][1] == "leg"


def test_a_new_version_of_another_family_does_not_replace_the_users_choice(monkeypatch):
    """A new calf version pulled while the user works on thighs used to become the selected model."""
    import dafne_logic.learning.federated_client

    class ThighAndCalf(FakeSegmentation):
        def list_models(self):
            thigh = ModelChoice("thigh", "thigh", "thigh 6 (bundled)", "6", "bundled", ("right vastus lateralis",))
            pulled = ModelChoice("leg-v2", "leg", "leg-v2 2 (user)", "2", "user", ("right soleus",))
            return [*super().list_models(), pulled, thigh]

    from dafne_logic.core.paths import user_models_dir

    monkeypatch.setattr(dafne_logic.learning.federated_client, "FederatedClient", FakeClient)
    (user_models_dir() / "thigh-v2").mkdir(parents=True)  # the thigh family is up to date
    controller, parts = make_controller(segmentation=ThighAndCalf())
    controller.refresh_models("thigh")
    controller.sync.save(True, "https://dafne.example.org/", "secret")
    controller.check_for_updates()  # downloads leg-v2
    finish(controller)
    assert parts["view"].sync[-1] == "Downloaded leg-v2." and parts["view"].models[-1][1] == "thigh"
    controller.model_chosen("leg")  # the same family, even when another one updated too: the new one is shown
    assert controller._newer_of_chosen_family(("leg-v2", "thigh-v9")) == "leg-v2"
    controller.model_chosen("deleted-model")  # the chosen model is gone: the last pulled is shown
    assert controller._newer_of_chosen_family(("leg-v2", "thigh-v9")) == "thigh-v9"


def test_a_cancelled_check_for_updates_does_not_claim_that_nothing_changed(tmp_path):
    """Cancel can reach the worker after a model folder was downloaded (or an update posted): the
    message says what may have happened, and the list shows what arrived."""
    class CancelledWorker:  # what a worker process reports when Cancel stopped it
        def __init__(self, name):
            self.name = name

        def poll(self):
            return JobStatus(0.5, f"{self.name} cancelled; nothing was changed", done=True, cancelled=True)

    view = FakeView()
    controller = DafneController(view, FakeScene(), FakeInstall(), FakeSegmentation(), SyncLogic(tmp_path / "sync.json"),
                                 start_job=lambda task, request: CancelledWorker(task))
    controller.sync.save(True, "https://dafne.example.org/", "secret")
    listed = len(view.models)
    controller.check_for_updates()
    assert controller.poll() is False
    assert view.statuses[-1] == CANCELLED_AFTER_CONTACT[PULLING] and "is kept" in view.statuses[-1]
    assert len(view.models) == listed + 1  # refreshed: a model downloaded before Cancel is there to pick


def test_clicks_while_packages_install_start_no_second_install():
    """Slicer's pip install processes Qt events while pip prints, so Install or Segment can be
    clicked again during the download: those clicks must wait, not start a second pip."""
    class ClickingInstall(FakeInstall):
        def ensure(self):
            if self._missing and self.asked == 0:
                controller.install_dependencies()  # clicks arriving while pip runs
                controller.segment(make_volume(), "leg", "auto")
            return super().ensure()

    install = ClickingInstall(missing=["torch>=2.4"], agree=True)
    controller, parts = make_controller(install=install)
    controller.segment(make_volume(), "leg", "auto")
    finish(controller)
    assert install.asked == 1 and len(parts["scene"].shown) == 1 and not parts["view"].errors
    assert any("being installed" in status for status in parts["view"].statuses)


def test_installation_on_first_use_then_segment():
    install = FakeInstall(missing=["torch>=2.4"], agree=True)
    controller, parts = make_controller(install=install)
    controller.segment(make_volume(), "leg", "auto")
    finish(controller)
    assert install.asked == 1 and parts["scene"].shown


@pytest.mark.parametrize("stop", ["cancel", "scene_closing"])  # Cancel, or the scene closing under the job
def test_cancel_stops_the_job_and_leaves_the_scene_untouched(stop):
    segmentation = FakeSegmentation()
    segmentation.block = threading.Event()
    controller, parts = make_controller(segmentation=segmentation)
    controller.segment(make_volume(), "leg", "auto")
    getattr(controller, stop)()
    finish(controller)
    assert parts["scene"].shown == [] and controller.case is None and not parts["view"].errors
    assert "cancelled" in parts["view"].statuses[-1]
    assert parts["view"].busy[-1] is None


def test_closing_the_module_during_a_task_stops_it_and_removes_the_copy_of_the_image(tmp_path, monkeypatch):
    """Slicer exiting, or the module reloaded, stops the poll timer: the work folder (an uncompressed copy
    of the patient's scan) must go then, not stay in the temp folder."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    segmentation = FakeSegmentation()
    segmentation.block = threading.Event()
    controller, parts = make_controller(segmentation=segmentation)
    controller.segment(make_volume(), "leg", "auto")
    job = controller.job
    assert [p.name.startswith("dafne-slicer-") for p in tmp_path.iterdir()] == [True]
    controller.shutdown()
    assert job.poll().cancelled and controller.job is None and list(tmp_path.iterdir()) == []
    assert parts["scene"].shown == []


@pytest.mark.parametrize("failure, expected", [
    (InputError("the volume holds no legs"), "the volume holds no legs"),
    (RuntimeError("CUDA out of memory\nmore"), "Segmenting failed: CUDA out of memory"),
])
def test_failures_in_the_worker_become_one_message(failure, expected):
    segmentation = FakeSegmentation()
    segmentation.fail = failure
    controller, parts = make_controller(segmentation=segmentation)
    controller.segment(make_volume(), "leg", "auto")
    finish(controller)
    assert parts["view"].errors == [expected] and parts["scene"].shown == []


def test_second_task_while_busy_is_refused():
    segmentation = FakeSegmentation()
    segmentation.block = threading.Event()
    controller, parts = make_controller(segmentation=segmentation)
    controller.segment(make_volume(), "leg", "auto")
    controller.segment(make_volume(), "leg", "auto")
    assert "Wait for the running task" in parts["view"].statuses[-1]
    controller.cancel()
    finish(controller)


# --- correct, review, improve --------------------------------------------------------------------


def test_edits_and_reviewed_slices_drive_improve():
    controller, parts, volume = segmented()
    case = controller.case
    controller.open_editor()
    assert parts["scene"].editor == (case.segmentation_node, volume)

    case.segmentation_node.labels[2, 7:9, 7:9] = LEG.value_of(2, "right")  # the user paints on slice 2
    controller.update_review()
    assert parts["view"].summaries[-1].startswith("Changed slices: 2. Reviewed: none.")
    assert "Ignored segments (not in the model's labels): tumour." in parts["view"].summaries[-1]
    parts["scene"].slice_shown = 4
    controller.mark_current_slice()
    controller.mark_slices("0-1")
    controller.mark_slices("1", reviewed=False)
    assert parts["view"].summaries[-1].startswith("Changed slices: 2. Reviewed: 0, 4.")

    controller.improve()
    finish(controller)
    slices, corrected = parts["learning"].finetuned[0]
    assert slices == [0, 2, 4]
    np.testing.assert_array_equal(corrected, case.segmentation_node.labels)
    view = parts["view"]
    assert view.dice[-1] == [{"muscle": "right soleus", "dice_automatic": 0.8, "dice_improved": 0.9}]
    assert view.models[-1] == (["leg"], "leg-1.local-abc")  # the improved version is selected
    assert "0.800 -> 0.900" in view.statuses[-1] and not view.errors
    assert "held out" not in view.statuses[-1]  # the fake improvement held no slice out
    assert case.model_name == "leg-1.local-abc"


def test_improve_without_corrections_or_case_explains_what_to_do():
    controller, parts = make_controller()
    controller.improve()
    assert parts["view"].errors == ["Segment a volume first."]
    controller, parts, _ = segmented()
    controller.improve()
    assert parts["view"].errors[-1].startswith("No corrected or reviewed slices yet")
    assert controller.job is None


def test_improve_on_a_sagittal_volume_says_why_before_any_work():
    """Fine-tuning learns from axial slices; the slices the user marked are sagittal ones."""
    controller, parts, volume = segmented()
    sagittal = sitk.Image(controller.case.image)
    sagittal.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))  # k runs along patient x
    controller.case.image = sagittal
    controller.case.segmentation_node.labels[2, 7:9, 7:9] = LEG.value_of(2, "right")
    controller.improve()
    assert parts["view"].errors[-1].startswith("Improve learns from axial slices")
    assert controller.job is None and parts["learning"].finetuned == []


def test_bad_slice_marks_are_refused():
    controller, parts, _ = segmented()
    controller.mark_slices("3-1")
    controller.mark_slices("9")
    controller.mark_slices("auto")
    assert len(parts["view"].errors) == 3
    assert "outside 0-4" in parts["view"].errors[1]
    assert controller.case.tracker.reviewed == set()


def test_adopting_a_saved_segmentation_starts_a_case_from_its_content():
    controller, parts = make_controller()
    volume = make_volume()
    saved = Node("calf saved", labels=automatic_labels())
    saved.labels[1, 0, 0] = LEG.value_of(6, "left")
    controller.adopt(volume, None, "leg")
    assert parts["view"].errors == ["Select a segmentation to continue with."]
    controller.adopt(volume, saved, "leg")
    assert not parts["view"].errors[1:]
    assert "12 of 12 labels have a segment" in parts["view"].statuses[-1]
    assert "Ignored segments: tumour." in parts["view"].statuses[-1]
    assert parts["view"].summaries[-1] == "Changed slices: none. Reviewed: none."
    saved.labels[3, 9, 9] = LEG.value_of(2, "right")
    controller.update_review()
    assert parts["view"].summaries[-1].startswith("Changed slices: 3.")
    assert controller.case.segmentation_node is saved and controller.case.model_name == "leg"


def test_adopting_a_segmentation_of_another_model_is_refused():
    class OtherNames(FakeScene):
        def labels_of(self, segmentation_node, volume_node, table):
            result = super().labels_of(segmentation_node, volume_node, table)
            return SimpleNamespace(labels=result.labels * 0, unknown_names=("Liver", "Spleen"),
                                   missing_names=tuple(label.name for label in table.volume_labels()))

    controller, parts = make_controller(scene=OtherNames())
    controller.adopt(make_volume(), Node("abdomen", labels=np.zeros(SHAPE, np.uint8)), "leg")
    assert parts["view"].errors == ["No segment of 'abdomen' is named like a label of model leg (e.g. 'right soleus'); "
                                    "select the model it was made with."]
    assert controller.case is None


def test_removed_segmentation_ends_the_case():
    controller, parts, _ = segmented()
    controller.case.segmentation_node.present = False
    controller.open_editor()
    assert parts["view"].errors == ["Segment a volume first."] and controller.case is None


# --- statistics ----------------------------------------------------------------------------------


def test_statistics_table_and_csv_export(tmp_path):
    controller, parts, volume = segmented()
    controller.export_statistics(str(tmp_path / "early.csv"))
    assert parts["view"].errors == ["Compute the statistics first."]
    controller.statistics()
    name, rows = parts["scene"].tables[-1]
    assert name == "calf muscle statistics" and len(rows) == 12
    soleus = next(r for r in rows if r["name"] == "right soleus")
    assert soleus["voxel_count"] == 5 * 4 * 4
    assert soleus["volume_ml"] == pytest.approx(80 * 0.8 * 0.8 * 5.0 / 1000)
    controller.export_statistics(str(tmp_path / "stats.csv"))
    with open(tmp_path / "stats.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 12 and written[0]["name"] == "right soleus"
    controller.case.segmentation_node.labels[:] = 0  # an edit after Statistics: the table is stale now
    controller.export_statistics(str(tmp_path / "stale.csv"))
    assert "changed since the statistics" in parts["view"].errors[-1] and not (tmp_path / "stale.csv").exists()


def test_muscles_the_model_was_unsure_of_are_named_and_marked_for_review(tmp_path):
    """The network's confidence comes back from the worker: the status names the unsure muscles and
    the statistics table marks them; a case adopted from a saved segmentation has no such columns."""
    controller, parts = make_controller()
    parts["segmentation"].confidence[LEG.value_of(1, "left")] = 0.6
    parts["segmentation"].slice_confidence = {0: 0.9, 1: 0.6, 2: 0.95, 3: 0.5, 4: 0.92}
    volume = make_volume()
    controller.segment(volume, "leg", "cpu")
    finish(controller)
    assert "The model was unsure of left soleus: check it first." in parts["view"].statuses[-1]
    assert "It was least sure on slices 0-1, 3: start correcting there." in parts["view"].statuses[-1]
    controller.statistics()
    rows = {row["name"]: row for row in parts["scene"].tables[-1][1]}
    assert (rows["left soleus"]["review"], rows["left soleus"]["confidence"]) == (True, 0.6)
    assert (rows["right soleus"]["review"], rows["right soleus"]["confidence"]) == (False, 0.95)
    assert rows["right tibialis anterior"]["review"] is None  # not segmented: nothing to judge
    controller.export_statistics(str(tmp_path / "stats.csv"))
    with open(tmp_path / "stats.csv", newline="") as f:
        written = {row["name"]: row for row in csv.DictReader(f)}
    assert written["left soleus"]["review"] == "True" and written["left soleus"]["confidence"] == "0.6"
    sure, sure_parts, _ = segmented()
    assert "unsure" not in sure_parts["view"].statuses[-1]
    assert "least sure on slices 0-2" in sure_parts["view"].statuses[-1]  # all alike: still three to start with
    controller.adopt(volume, controller.case.segmentation_node, "leg")
    controller.statistics()
    assert all("review" not in row for row in parts["scene"].tables[-1][1])


# --- share ---------------------------------------------------------------------------------------


def test_contribute_needs_an_improvement_and_opt_in():
    controller, parts, _ = segmented()
    controller.contribute()
    assert parts["view"].errors[-1].startswith("Nothing to contribute yet")
    controller.case.segmentation_node.labels[1] = 0
    controller.improve()
    finish(controller)
    controller.contribute()
    finish(controller)
    assert parts["view"].errors[-1] == "Sharing is off: tick 'Share my improvements' first (nothing was sent)."
    assert parts["view"].sync[-1].endswith("Sharing is off: tick 'Share my improvements' first (nothing was sent).")



def test_pull_and_push_go_through_the_client_once_opted_in(monkeypatch):
    import dafne_logic.learning.federated_client

    monkeypatch.setattr(dafne_logic.learning.federated_client, "FederatedClient", FakeClient)
    controller, parts, _ = segmented()
    controller.sync.save(True, "https://dafne.example.org/", " secret ")
    controller.check_for_updates()
    finish(controller)
    assert parts["view"].sync[-1] == "Downloaded leg-v2." and parts["view"].models[-1][1] == "leg-v2"
    controller.check_for_updates()
    finish(controller)
    assert parts["view"].sync[-1] == "Up to date (leg)."
    controller.case.segmentation_node.labels[1] = 0
    controller.improve()
    finish(controller)
    controller.contribute()
    finish(controller)
    assert FakeClient.pushed == [("https://dafne.example.org", "secret", "leg-1.local-abc")]
    assert parts["view"].sync[-1] == "Contributed leg-1.local-abc: update 7 is buffered."
    controller.contribute()  # the same version is not sent twice
    assert parts["view"].errors[-1].startswith("Nothing to contribute yet")


def test_server_refusing_the_token_is_one_message(tmp_path):
    """The real client against a loopback server that answers 401, through the controller."""
    import http.server
    import json as json_module

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json_module.dumps({"detail": "invalid or revoked token"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        controller, parts = make_controller(sync=SyncLogic(tmp_path / "sync.json"))
        controller.sync.save(True, f"http://127.0.0.1:{server.server_port}", "wrong")
        controller.check_for_updates()
        finish(controller)
    finally:
        server.shutdown()
    assert len(parts["view"].errors) == 1
    assert "401" in parts["view"].errors[0] and "invalid or revoked token" in parts["view"].errors[0]
    assert "wrong" not in parts["view"].errors[0]  # the token never shows up in messages
    assert parts["view"].sync[-1].startswith("Failed at ") and "401" in parts["view"].sync[-1]


def test_share_settings_default_off_owner_only_and_url_checked(tmp_path):
    sync = SyncLogic(tmp_path / "sync.json")
    config = sync.load()
    assert (config.opt_in, config.server_url, config.token) == (False, "", "")
    with pytest.raises(ShareError, match="https://"):
        sync.save(True, "http://dafne.example.org", "t")
    assert not (tmp_path / "sync.json").exists()
    sync.save(True, "http://localhost:8000", "t")
    assert (tmp_path / "sync.json").stat().st_mode & 0o077 == 0
    config = sync.load()
    assert (config.opt_in, config.server_url, config.token) == (True, "http://localhost:8000", "t")
    sync.save(True, "", "")
    with pytest.raises(ShareError, match="server URL and your token"):
        sync._client()
    sync.save(True, "http://localhost:8000", "\ufeffdft_1_pasted ")  # from a Windows editor: the mark goes
    assert sync.load().token == "dft_1_pasted"
    with pytest.raises(ShareError, match="copy it again"):
        sync.save(True, "http://localhost:8000", "dft_1_…")  # cut short with an ellipsis
    assert sync.load().token == "dft_1_pasted"
    assert "never leave this computer" in WHAT_IS_SENT and "Nothing is sent while the box is unticked" in WHAT_IS_SENT


# --- install logic -------------------------------------------------------------------------------


def _install(packaging):
    return InstallLogic(packaging, [Requirement("monai>=1.5"), Requirement("colorama; platform_system == 'Nope'")],
                        version_of=packaging.version_of)


def test_install_asks_once_then_installs_torch_and_pip_packages_without_slicers_own():
    packaging = FakePackaging()
    install = _install(packaging)
    assert install.missing() == ["torch>=2.4", "monai>=1.5"]
    assert install.ensure() is True
    kinds = [c[0] for c in packaging.calls]
    assert kinds == ["confirm", "torch", "pip"]
    assert "torch>=2.4" in packaging.calls[0][1] and "numpy" in packaging.calls[0][1]
    assert packaging.calls[2][1] == ["monai<1.6,>=1.5"] and packaging.calls[2][2] == NEVER_INSTALL  # torch 2.6
    assert set(NEVER_INSTALL) >= {"numpy", "vtk", "SimpleITK", "pydicom", "requests", "torch"}
    assert install.missing() == [] and install.ensure() is True and len(packaging.calls) == 3  # no second prompt


def test_first_install_asks_once_the_pytorch_extension_does_not_ask_again(monkeypatch):
    """The module's question lists torch; PyTorchUtils is told not to ask a second time."""
    import importlib
    import sys
    from types import ModuleType

    torch_calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):  # noqa: N802 - the PyTorch extension's name
            torch_calls.append(kwargs)
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    monkeypatch.setitem(sys.modules, "slicer", ModuleType("slicer"))  # what the module imports; unused here
    monkeypatch.delitem(sys.modules, "DafneSlicerLib.slicer_packaging", raising=False)
    slicer_packaging = importlib.import_module("DafneSlicerLib.slicer_packaging")
    questions = []

    class Packaging(slicer_packaging.SlicerPackaging):
        def confirm(self, question):
            questions.append(question)
            return True

        def torch_installed(self):
            return bool(torch_calls)

        def pip_install(self, requirements, skip):
            pass

    install = InstallLogic(Packaging(), [], version_of=lambda name: "2.6.0")
    assert install.ensure() is True
    assert len(questions) == 1 and "torch>=2.4" in questions[0]
    assert torch_calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.4"}]


@pytest.mark.parametrize("has_pip_ensure", [True, False])
def test_packages_install_through_pip_ensure_where_slicer_has_it(monkeypatch, has_pip_ensure):
    """Slicer >= 5.12 has slicer.packaging.pip_ensure (dependencies walked, Slicer's own skipped);
    5.10 has only slicer.util.pip_install, so the packages go without their dependencies."""
    import importlib
    import sys
    from types import ModuleType

    from packaging.requirements import Requirement

    calls = []
    slicer_module = ModuleType("slicer")
    slicer_module.util = SimpleNamespace(pip_install=lambda args: calls.append(("pip_install", args)))
    monkeypatch.setitem(sys.modules, "slicer", slicer_module)
    if has_pip_ensure:
        packaging_module = ModuleType("slicer.packaging")
        packaging_module.pip_ensure = lambda requirements, **kwargs: calls.append(("pip_ensure", requirements, kwargs))
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging_module)
        slicer_module.packaging = packaging_module
    else:
        monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    monkeypatch.delitem(sys.modules, "DafneSlicerLib.slicer_packaging", raising=False)
    slicer_packaging = importlib.import_module("DafneSlicerLib.slicer_packaging")
    requirements = [Requirement("monai>=1.5"), Requirement("tqdm>=4.60")]

    slicer_packaging.SlicerPackaging().pip_install(requirements, ("numpy", "torch"))

    if has_pip_ensure:
        assert calls == [("pip_ensure", requirements, {"skip_packages": ["numpy", "torch"], "prompt_install": False,
                                                       "requester": "DafneSlicer"})]
    else:
        assert calls == [("pip_install", ["--no-deps", "monai>=1.5", "tqdm>=4.60"])]


def test_install_declined_or_offline():
    packaging = FakePackaging(agree=False)
    assert _install(packaging).ensure() is False and [c[0] for c in packaging.calls] == ["confirm"]
    offline = FakePackaging(fail=OSError("Could not fetch URL https://pypi.org/simple/monai/: connection error"))
    with pytest.raises(DependencyError, match="Check the internet connection .* click again to retry"):
        _install(offline).ensure()


def test_monai_and_highdicom_are_held_below_what_slicers_torch_and_pydicom_cannot_run():
    from DafneSlicerLib.install_logic import fit_to_installed

    def installed(**versions):
        def version_of(name):
            if name not in versions:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        return version_of

    assert str(fit_to_installed(Requirement("monai>=1.5"), installed(torch="2.6.0+cu124"))) == "monai<1.6,>=1.5"
    assert str(fit_to_installed(Requirement("monai>=1.5"), installed(torch="2.9.1"))) == "monai>=1.5"
    assert str(fit_to_installed(Requirement("scipy>=1.10"), installed(torch="2.4.0"))) == "scipy>=1.10"
    # Slicer 5.10 ships pydicom 2.4.4: highdicom 0.23+ needs pydicom 3.
    assert str(fit_to_installed(Requirement("highdicom>=0.22"), installed(pydicom="2.4.4"))) == "highdicom<0.23,>=0.22"
    assert str(fit_to_installed(Requirement("highdicom>=0.22"), installed(pydicom="3.0.1"))) == "highdicom>=0.22"
    assert str(fit_to_installed(Requirement("highdicom>=0.22"), installed())) == "highdicom>=0.22"


@pytest.mark.parametrize("numpy, highdicom", [("2.3.4", None), ("1.26.4", "highdicom<0.23,>=0.22")])
def test_first_install_beside_slicers_pydicom_2(numpy, highdicom):
    """What pip is asked for in a Slicer with torch 2.6 and pydicom 2.4.4 (Slicer 5.10): never pydicom;
    highdicom 0.22 with numpy 1, and no highdicom at all with numpy 2 (no release runs there)."""
    packaging = FakePackaging(torch=True, installed={"torch": "2.6.0", "pydicom": "2.4.4", "numpy": numpy})
    install = InstallLogic(packaging, read_requirements(), version_of=packaging.version_of)
    listed = install.missing()
    try:
        install.ensure()
    except DependencyError:
        pass  # the fake installs every package as version 1.5.2, too old for some requirements
    (requested,) = [call[1] for call in packaging.calls if call[0] == "pip"]
    assert "monai<1.6,>=1.5" in requested
    assert [r for r in requested if r.startswith("highdicom")] == ([highdicom] if highdicom else [])
    assert not [r for r in requested if r.split("<")[0].split(">")[0] in ("pydicom", "torch", "numpy")]
    assert ("highdicom>=0.22" in listed) == (highdicom is not None)
    assert (not unusable_here(Requirement("highdicom>=0.22"), packaging.version_of)) == (highdicom is not None)


def test_requirements_file_and_version_checks():
    requirements = read_requirements()
    assert any(r.name == "monai" for r in requirements)
    assert is_satisfied(Requirement("packaging>=1"))
    assert not is_satisfied(Requirement("packaging>=999"))
    assert not is_satisfied(Requirement("surely-not-installed-dafne-package"))
    assert is_satisfied(Requirement("anything; platform_system == 'Nope'"))


# --- review, jobs, learning ----------------------------------------------------------------------


def test_review_tracker_and_slice_ranges():
    automatic = automatic_labels()
    tracker = ReviewTracker(automatic)
    current = automatic.copy()
    current[3, 0, 0] = 1
    current[4, 0, 0] = 1
    assert tracker.changed_slices(current) == [3, 4]
    tracker.mark_reviewed([0, 1])
    assert tracker.training_slices(current) == [0, 1, 3, 4]
    assert tracker.summary(current) == "Changed slices: 3-4. Reviewed: 0-1."
    with pytest.raises(ValueError, match="outside 0-4"):
        tracker.mark_reviewed([5])
    with pytest.raises(ValueError, match="do not match"):
        tracker.changed_slices(current[:2])
    assert format_slices([9, 1, 2, 3, 7, 10]) == "1-3, 7, 9-10" and format_slices([]) == "none"


def test_background_job_result_progress_and_cancel():
    job = BackgroundJob("adding", lambda progress, cancel: (progress(0.5, "half"), 42)[1]).start()
    status = job.wait(5)
    assert status.done and status.result == 42 and status.error is None
    gate = threading.Event()

    def slow(progress, cancel):
        progress(0.3, "working")
        gate.set()
        while not cancel():
            threading.Event().wait(0.01)
        raise Cancelled("slow cancelled; nothing was changed")

    job = BackgroundJob("slow", slow).start()
    gate.wait(5)
    assert job.poll().message == "working" and not job.poll().done
    job.cancel()
    status = job.wait(5)
    assert status.cancelled and status.result is None and status.fraction == pytest.approx(0.3)


def test_improve_reports_the_held_out_slices_apart(monkeypatch):
    controller, parts, volume = segmented()
    held = Improvement("leg-1.local-abc", Path("/models/leg-1.local-abc"), "1.local-abc", "1", 6,
                       {"right soleus": 0.8}, {"right soleus": 0.95}, 2, 0.81, 0.86)
    monkeypatch.setattr(parts["learning"], "save", lambda result: held)
    controller.mark_slices("0-4")
    controller.improve()
    finish(controller)
    status = parts["view"].statuses[-1]
    assert "0.800 -> 0.950" in status and "On the 2 corrected leg-slices held out of training: 0.810 -> 0.860." in status


def test_dice_rows_skip_labels_absent_from_both():
    improvement = Improvement("m", Path("m"), "1.local-x", "1", 3, {"a": 0.5, "b": math.nan}, {"a": 0.75, "b": math.nan})
    assert dice_rows(improvement) == [{"muscle": "a", "dice_automatic": 0.5, "dice_improved": 0.75}]


def test_learning_save_names_the_child_after_family_and_version(tmp_path, monkeypatch):
    monkeypatch.setenv("DAFNE_SLICER_HOME", str(tmp_path))
    saved = []

    class Result:
        model = SimpleNamespace(manifest=SimpleNamespace(name="thigh", version="3.local-1a2b3c4d", parent_version="3"))
        report = {"n_slices": 4, "dice_before": {"right sartorius": 0.7}, "dice_after": {"right sartorius": 0.8}}

        def save(self, path):
            saved.append(path)
            return path

    improvement = LearningLogic().save(Result())
    assert improvement.model_name == "thigh-3.local-1a2b3c4d"
    assert saved == [tmp_path / "models" / "thigh-3.local-1a2b3c4d"]
    assert (improvement.parent_version, improvement.n_slices) == ("3", 4)


# --- worker processes ----------------------------------------------------------------------------


def _process_job(tmp_path, request, python=None):
    from DafneSlicerLib.jobs import ProcessJob

    return ProcessJob("Segmenting", {"work_dir": str(tmp_path), **request}, python=python).start()


@pytest.mark.slow  # a worker process importing torch and MONAI
def test_worker_process_reports_a_readable_error(tmp_path):
    sitk.WriteImage(make_volume().image, str(tmp_path / "image.nrrd"))
    status = _process_job(tmp_path, {"task": "segment", "model": "no-such-model", "device": "cpu"}).wait(120)
    assert status.done and not status.cancelled
    assert "no-such-model" in status.error and status.details is None  # a DafneError: one sentence


def test_worker_process_unexpected_failure_and_crash(tmp_path):
    status = _process_job(tmp_path, {"task": "draw"}).wait(120)
    assert status.error == "Segmenting failed: unknown task 'draw'" and "Traceback" in status.details
    status = _process_job(tmp_path, {"task": "segment"}, python="/bin/false").wait(30)  # exits 1, says nothing
    assert status.error.startswith("Segmenting stopped unexpectedly (exit code 1)")


def test_worker_process_cancel_terminates_it(tmp_path):
    sitk.WriteImage(make_volume().image, str(tmp_path / "image.nrrd"))
    job = _process_job(tmp_path, {"task": "segment", "model": "leg", "device": "cpu"})
    job.cancel()
    status = job.wait(60)
    assert status.cancelled and "cancelled; nothing was changed" in status.message
    assert not (tmp_path / "labels.nrrd").exists()


def test_the_worker_runs_under_pythonslicer_and_never_under_the_slicer_application(monkeypatch):
    """Inside Slicer sys.executable is the application: without PythonSlicer, say so instead of
    starting a second Slicer. Outside Slicer (scripts, tests) this interpreter runs the worker."""
    import shutil
    import sys

    from dafne_logic.core.errors import DafneError
    from DafneSlicerLib.jobs import worker_python

    monkeypatch.setattr(shutil, "which", lambda name: "/opt/Slicer/bin/PythonSlicer" if name == "PythonSlicer" else None)
    assert worker_python() == "/opt/Slicer/bin/PythonSlicer"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "slicer", SimpleNamespace())  # slicer-core: no application
    assert worker_python() == sys.executable
    monkeypatch.setitem(sys.modules, "slicer", SimpleNamespace(app=object()))
    with pytest.raises(DafneError, match="PythonSlicer"):
        worker_python()

