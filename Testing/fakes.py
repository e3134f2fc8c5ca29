"""Small, honest stand-ins for the Slicer module's slow or Slicer-only parts, shared by its tests.

The fakes stand in for MRML (``SceneAdapter``), the network (segmentation/learning/sync), the federated
client's HTTP and Slicer's installers; jobs run on real threads, statistics and CSV export use the
real ``dafne_logic`` code. Real MRML is tested with slicer-core (``Testing/slicer_core``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.errors import Cancelled, InputError, ModelError
from dafne_logic.core.labels import LEG
from dafne_logic.inference.confidence import Confidence
from DafneSlicerLib.controller import DafneController
from DafneSlicerLib.jobs import BackgroundJob
from DafneSlicerLib.learning_logic import Improvement, LearningLogic
from DafneSlicerLib.segmentation_logic import ModelChoice
from DafneSlicerLib.sync_logic import SyncLogic
from DafneSlicerLib.worker import run_request

SHAPE = (5, 12, 16)


class FakeView:
    def __init__(self):
        self.statuses, self.errors, self.busy, self.models, self.summaries, self.dice, self.sync = [], [], [], [], [], [], []
        self.progress = []

    def set_status(self, message):
        self.statuses.append(message)

    def show_error(self, message):
        self.errors.append(message)

    def set_busy(self, task):
        self.busy.append(task)

    def set_progress(self, fraction, message):
        self.progress.append((fraction, message))

    def set_models(self, choices, selected):
        self.models.append(([c.name for c in choices], selected))

    def set_review_summary(self, text):
        self.summaries.append(text)

    def show_dice(self, rows):
        self.dice.append(rows)

    def set_sync_status(self, text):
        self.sync.append(text)


@dataclass
class Node:
    name: str
    image: sitk.Image | None = None  # volumes
    labels: np.ndarray | None = None  # segmentations: what the user sees now
    present: bool = True


class FakeScene:
    """Nodes are plain objects; a segmentation is its label array (real MRML is tested with slicer-core)."""

    def __init__(self):
        self.shown, self.tables, self.editor = [], [], None
        self.slice_shown = 0

    def image_of(self, node):
        if node is None:
            raise InputError("Select an input volume first.")
        return node.image

    def node_name(self, node):
        return node.name

    def node_exists(self, node):
        return node is not None and node.present

    def show_labels(self, labels, table, volume_node, name, segmentation_node):
        node = segmentation_node or Node(name)
        node.labels = sitk.GetArrayFromImage(labels)
        self.shown.append((name, segmentation_node is not None))
        return node

    def labels_of(self, segmentation_node, volume_node, table):
        image = sitk.GetImageFromArray(segmentation_node.labels)
        image.CopyInformation(volume_node.image)
        return SimpleNamespace(labels=image, unknown_names=("tumour",), missing_names=())

    def open_segment_editor(self, segmentation_node, volume_node):
        self.editor = (segmentation_node, volume_node)

    def current_slice(self, volume_node):
        return self.slice_shown

    def show_statistics(self, rows, name):
        self.tables.append((name, rows))


def automatic_labels() -> np.ndarray:
    array = np.zeros(SHAPE, np.uint8)
    array[:, 2:6, 2:6] = LEG.value_of(1, "right")
    array[:, 2:6, 10:14] = LEG.value_of(1, "left")
    return array


class FakeModel:
    def __init__(self, name="leg", version="1"):
        self.labels = LEG
        self.manifest = SimpleNamespace(name=name, version=version, parent_version=None, labels=LEG)


class FakeSegmentation:
    def __init__(self):
        self.calls, self.sides, self.block, self.fail = [], [], None, None
        self.finds_nothing = False  # what a network says of a scan without legs: no muscle anywhere
        # What a network would say of the two soleus muscles automatic_labels() draws: sure of both.
        self.confidence = {LEG.value_of(1, "right"): 0.95, LEG.value_of(1, "left"): 0.93}
        self.slice_confidence = {k: 0.9 for k in range(SHAPE[0])}

    def list_models(self):
        return [ModelChoice("leg", "leg", "leg 1 (bundled)", "1", "bundled", tuple(label.name for label in LEG.volume_labels()))]

    def check_model(self, name):
        return self.load_model(name).manifest

    def load_model(self, name):
        if name == "broken":
            raise ModelError("model 'broken': weights do not match the manifest")
        return FakeModel(name)

    def segment(self, image, model, device, progress, cancel, single_leg_side=None):
        self.calls.append(device)
        self.sides.append(single_leg_side)
        progress(0.5, "segmenting")
        if self.fail is not None:
            raise self.fail
        if self.block is not None:  # wait until cancelled, like a long inference would
            while not cancel():
                self.block.wait(0.01)
            raise Cancelled("segmentation cancelled; nothing was written")
        labels = sitk.GetImageFromArray(automatic_labels() * (not self.finds_nothing))
        labels.CopyInformation(image)
        if self.finds_nothing:
            return labels, Confidence({}, {})
        return labels, Confidence(dict(self.confidence), dict(self.slice_confidence))


class FakeLearning(LearningLogic):
    def __init__(self):
        self.finetuned = []

    def finetune(self, model, image, corrected, slices, progress, cancel, config=None):
        self.finetuned.append((slices, sitk.GetArrayFromImage(corrected)))
        return SimpleNamespace(model=FakeModel(version="1.local-abc"))

    def save(self, result):
        return Improvement("leg-1.local-abc", Path("/models/leg-1.local-abc"), "1.local-abc", "1", 2,
                           {"right soleus": 0.8, "left soleus": math.nan}, {"right soleus": 0.9, "left soleus": math.nan})


class FakeInstall:
    def __init__(self, missing=(), agree=True):
        self._missing, self.agree, self.asked = list(missing), agree, 0

    def missing(self):
        return list(self._missing)

    def ensure(self):
        if not self._missing:
            return True
        self.asked += 1
        if self.agree:
            self._missing = []
        return self.agree


def make_volume() -> Node:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32))
    image.SetSpacing((0.8, 0.8, 5.0))
    return Node("calf", image=image)


def make_controller(**overrides):
    """A controller whose worker requests run on a thread of this process, with the fakes as logic."""
    parts = dict(view=FakeView(), scene=FakeScene(), install=FakeInstall(), segmentation=FakeSegmentation(),
                 learning=FakeLearning(), sync=SyncLogic())
    parts.update(overrides)

    def start_job(task, request):
        return BackgroundJob(task, lambda progress, cancel: run_request(
            request, progress, cancel, parts["segmentation"], parts["learning"], parts["sync"])).start()

    controller = DafneController(parts["view"], parts["scene"], parts["install"], parts["segmentation"], parts["sync"],
                                 start_job=start_job)
    return controller, parts


def finish(controller, timeout: float = 30) -> None:
    assert controller.job is not None
    status = controller.job.wait(timeout)
    assert status.done
    assert controller.poll() is False


def segmented():
    controller, parts = make_controller()
    volume = make_volume()
    controller.segment(volume, "leg", "cpu")
    finish(controller)
    return controller, parts, volume


class FakeClient:
    """The federated client's interface (dafne_logic.learning.federated_client.FederatedClient) without HTTP."""

    pushed: list = []

    def __init__(self, config):
        self.config = config

    def pull(self, family):
        from dafne_logic.core.paths import user_models_dir

        folder = user_models_dir() / f"{family}-v2"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def push_folder(self, folder):
        FakeClient.pushed.append((self.config.server_url, self.config.token, Path(folder).name))
        return {"id": "7", "status": "buffered", "duplicate": False}


@dataclass
class FakePackaging:
    agree: bool = True
    torch: bool = False
    fail: Exception | None = None
    installed: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)

    def confirm(self, question):
        self.calls.append(("confirm", question))
        return self.agree

    def torch_installed(self):
        return self.torch

    def install_torch(self, version_requirement):
        self.calls.append(("torch", version_requirement))
        self.torch = True
        self.installed["torch"] = "2.6.0+cpu"  # what Linux Slicer gets
        return True

    def pip_install(self, requirements, skip):
        self.calls.append(("pip", [str(r) for r in requirements], skip))
        if self.fail:
            raise self.fail
        self.installed.update({r.name: "1.5.2" for r in requirements})

    def version_of(self, name):
        import importlib.metadata

        if name in self.installed:
            return self.installed[name]
        raise importlib.metadata.PackageNotFoundError(name)




def as_on_windows_python_312(monkeypatch) -> None:
    """Make ``os`` look as on Windows Python 3.12 (what Slicer 5.10 ships): no fchmod, no fchown."""
    import os

    monkeypatch.delattr(os, "fchmod", raising=False)
    monkeypatch.delattr(os, "fchown", raising=False)
