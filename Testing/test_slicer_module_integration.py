"""The module's controller driving the REAL dafne_logic (registry, inference, fine-tuning, statistics).

Only MRML is faked (the scene adapter is tested against real MRML with slicer-core); the model is
a tiny untrained U-Net saved as a user model, the volume a small calf phantom.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DafneSlicer"))

from DafneSlicerLib.controller import DafneController  # noqa: E402
from DafneSlicerLib.learning_logic import LearningLogic  # noqa: E402
from DafneSlicerLib.segmentation_logic import SegmentationLogic  # noqa: E402
from DafneSlicerLib.sync_logic import SyncLogic  # noqa: E402
from test_slicer_module_controller import FakeInstall, FakeScene, FakeView, Node, _finish  # noqa: E402

from dafne_logic.finetune import FinetuneConfig  # noqa: E402
from dafne_logic.labels import LEG  # noqa: E402
from dafne_logic.model_package import Manifest, ModelPackage, PreprocessingParams, user_models_dir  # noqa: E402
from dafne_logic.networks import build_network, unet_architecture  # noqa: E402
from dafne_logic.phantoms import make_phantom  # noqa: E402


def _save_tiny_user_model() -> None:
    arch = unet_architecture(LEG.n_classes, {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1})
    manifest = Manifest(name="leg", region="leg", version="1", architecture=arch, labels=LEG,
                        preprocessing=PreprocessingParams(spacing_mm=(2.0, 2.0)), provenance={"trained_on": "nothing"})
    state = {k: v.detach().clone() for k, v in build_network(arch).state_dict().items()}
    ModelPackage(manifest, state).save(user_models_dir() / "tiny-leg")


def test_segment_correct_improve_statistics_with_the_real_logic(tmp_path):
    torch.manual_seed(0)
    _save_tiny_user_model()
    image, truth = make_phantom("leg", shape=(4, 96, 128), seed=5)
    view, scene = FakeView(), FakeScene()
    controller = DafneController(view, scene, FakeInstall(), SegmentationLogic(),
                                 LearningLogic(FinetuneConfig(max_epochs=1, min_steps_per_epoch=1)), SyncLogic(tmp_path / "sync.json"))

    controller.refresh_models()
    names, _ = view.models[-1]
    assert "tiny-leg" in names
    volume = Node("calf phantom", image=image)
    controller.segment(volume, "tiny-leg", "cpu")
    _finish(controller, timeout=300)
    assert not view.errors, view.errors
    segmentation = controller.case.segmentation_node
    assert segmentation.labels.shape == sitk.GetArrayViewFromImage(image).shape
    assert segmentation.labels.max() <= 2 * LEG.n_muscles

    # The user replaces slice 1 by the true muscles and approves slice 2 as it is.
    segmentation.labels[1] = sitk.GetArrayViewFromImage(truth)[1]
    controller.update_review()
    scene.slice_shown = 2
    controller.mark_current_slice()
    controller.improve()
    _finish(controller, timeout=300)
    assert not view.errors, view.errors
    child = controller.case.model_name
    assert child.startswith("leg-1.local-") and (user_models_dir() / child / "delta.json").is_file()
    assert view.models[-1][1] == child and child in view.models[-1][0]  # listed and selected
    assert view.dice[-1] and all(0.0 <= row["dice_automatic"] <= 1.0 for row in view.dice[-1])

    controller.statistics()
    _, rows = scene.tables[-1]
    assert [row["name"] for row in rows] == [label.name for label in LEG.volume_labels()]
    assert sum(row["voxel_count"] for row in rows) == int(np.count_nonzero(segmentation.labels))
