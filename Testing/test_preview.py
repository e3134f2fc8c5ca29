"""Preview PNGs: a real picture, radiological orientation, and the host's matplotlib left alone."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from dafne_logic.core.labels import LEG
from dafne_logic.core.preview import render_preview
from dafne_logic.phantoms.images import make_phantom


def test_preview_is_a_png_with_right_leg_colours_on_the_left_and_keeps_the_backend():
    backend = matplotlib.get_backend()
    image, labels = make_phantom("leg", shape=(3, 128, 160), seed=5)
    # Keep only the right leg's soleus (value 1, red) so its place in the picture can be found.
    array = (sitk.GetArrayFromImage(labels) == 1).astype(np.uint8)
    only_right = sitk.GetImageFromArray(array)
    only_right.CopyInformation(labels)
    png = render_preview(image, only_right, LEG, n_slices=1)
    assert matplotlib.get_backend() == backend
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (picture[..., 0] - picture[..., 1] > 60) & (picture[..., 0] - picture[..., 2] > 60)  # soleus is red
    columns = np.nonzero(red.any(axis=0))[0]
    assert columns.size > 0
    assert columns.mean() < picture.shape[1] / 2  # patient right shown on the viewer's left
