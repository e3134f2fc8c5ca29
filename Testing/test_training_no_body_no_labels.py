"""No body, no labels: slices beyond the end of the body (noise only) come out empty whatever the
network says there. (Training draws such slices with empty targets: see
``test_synthesis_images.py::test_field_of_view_cut_and_empty_slices_have_no_labels``.)"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dafne_logic.inference.model_package import load_model
from dafne_logic.inference.segment import segment_volume
from dafne_logic.phantoms.images import make_phantom


def test_noise_only_slices_get_no_labels():
    image, _ = make_phantom("leg", shape=(4, 160, 160), contrast="t1", seed=3)
    array = sitk.GetArrayFromImage(image)
    rng = np.random.default_rng(0)
    peak = float(array.max())
    array[2:] = np.abs(rng.normal(0, 0.03 * peak, array[2:].shape))  # beyond the body: noise only
    noisy = sitk.GetImageFromArray(array.astype(np.float32))
    noisy.CopyInformation(image)
    # A model that calls everything soleus: whatever it says on a slice without a body is dropped.
    model = load_model("leg")
    model.state_dict["model.2.1.conv.unit0.conv.bias"] = model.state_dict["model.2.1.conv.unit0.conv.bias"].clone()
    model.state_dict["model.2.1.conv.unit0.conv.bias"][1] += 1000.0
    labels = sitk.GetArrayFromImage(segment_volume(noisy, model, device="cpu"))
    assert labels[:2].any(axis=(1, 2)).all()  # slices with a body: labelled
    assert not labels[2:].any()  # noise only: nothing
