"""Procedural phantoms: anatomy (labels, tissues, laterality, legs) and contrast rendering."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import BUILTIN_TABLES
from dafne_logic.phantoms.anatomy import Tissue, phantom_tissue_map
from dafne_logic.phantoms.images import CONTRASTS, INTENSITIES, make_phantom, render_contrast

SHAPE = (7, 224, 224)  # small and fast; the field of view adapts to the body

# Plausible cross-sectional areas (cm²) of each muscle in any slice of a mid-limb phantom.
AREA_CM2 = {
    "thigh": {"vastus lateralis": (12, 45), "vastus medialis": (4, 30), "vastus intermedius": (2, 22),
              "rectus femoris": (0.5, 14), "sartorius": (0.5, 12), "gracilis": (0.5, 12),
              "adductor magnus": (4, 28), "adductor longus": (0.5, 12), "semimembranosus": (2, 20),
              "semitendinosus": (0.8, 10), "biceps femoris long head": (3, 22),
              "biceps femoris short head": (0.8, 12)},
    "leg": {"soleus": (8, 40), "gastrocnemius medialis": (1.5, 22), "gastrocnemius lateralis": (0.5, 12),
            "tibialis anterior": (2.5, 14), "extensor digitorum longus": (1, 10), "peroneus": (2, 12)},
}


def _arrays(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


@pytest.mark.parametrize("region", ["thigh", "leg"])
@pytest.mark.parametrize("seed", [0, 7])
def test_every_muscle_of_both_sides_in_every_slice_with_plausible_area(region, seed):
    anatomy = phantom_tissue_map(region, SHAPE, seed=seed)
    table = BUILTIN_TABLES[region]
    assert anatomy.table == table
    pixel_cm2 = anatomy.spacing[0] * anatomy.spacing[1] / 100.0
    for k in range(SHAPE[0]):
        counts = np.bincount(anatomy.muscles[k].ravel(), minlength=2 * table.n_muscles + 1)
        assert len(counts) == 2 * table.n_muscles + 1, "no value outside the table"
        for label in table.volume_labels():
            low, high = AREA_CM2[region][label.muscle.name]
            area = counts[label.value] * pixel_cm2
            assert low <= area <= high, f"slice {k}: {label.name} {area:.1f} cm²"


@pytest.mark.parametrize("region", ["thigh", "leg"])
def test_muscles_are_muscle_tissue_inside_the_body_and_in_one_piece(region):
    anatomy = phantom_tissue_map(region, SHAPE, seed=3)
    labelled = anatomy.muscles > 0
    assert np.all(anatomy.tissues[labelled] == Tissue.MUSCLE)
    # Muscles lie deep to skin and fat: shrinking the (hole-filled) body by 2 mm keeps every one.
    for k in range(SHAPE[0]):
        body = ndimage.binary_fill_holes(anatomy.tissues[k] != Tissue.BACKGROUND)
        deep = ndimage.binary_erosion(body, iterations=max(1, int(2.0 / anatomy.spacing[0])))
        assert np.all(deep[labelled[k]])
        for value in np.unique(anatomy.muscles[k])[1:]:
            _, n_pieces = ndimage.label(anatomy.muscles[k] == value)
            assert n_pieces == 1, f"label {value} in {n_pieces} pieces in slice {k}"
    assert set(np.unique(anatomy.tissues)) == {int(t) for t in Tissue}, "every tissue class occurs"
    if region == "leg":  # the deep posterior compartment: muscle without a label
        assert np.count_nonzero((anatomy.tissues == Tissue.MUSCLE) & ~labelled) > 0.05 * labelled.sum()


@pytest.mark.parametrize("region", ["thigh", "leg"])
def test_left_and_right_follow_lps_geometry_and_anatomy(region):
    image, labels = make_phantom(region, SHAPE, seed=5)
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert labels.GetSpacing() == image.GetSpacing() and labels.GetOrigin() == image.GetOrigin()
    assert image.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8
    lab = _arrays(labels)
    n = BUILTIN_TABLES[region].n_muscles
    zz, yy, xx = np.nonzero(lab)
    right, left = lab[zz, yy, xx] <= n, lab[zz, yy, xx] > n
    assert xx[right].max() < xx[left].min(), "right leg entirely at smaller x indices"
    # Physical x: the right leg at negative x (patient right in LPS), the midline near x = 0.
    x_mm = image.GetOrigin()[0] + xx * image.GetSpacing()[0]
    assert x_mm[right].max() < 0 < x_mm[left].min()
    assert abs((x_mm.min() + x_mm.max()) / 2) < 0.1 * (x_mm.max() - x_mm.min())

    def centre(name: str, side: str) -> np.ndarray:
        table = BUILTIN_TABLES[region]
        value = table.value_of(table.muscle_index(name), side)
        return np.array([yy[lab[zz, yy, xx] == value].mean(), xx[lab[zz, yy, xx] == value].mean()])

    lateral, medial, anterior, posterior = {
        "thigh": ("vastus lateralis", "gracilis", "rectus femoris", "biceps femoris long head"),
        "leg": ("peroneus", "gastrocnemius medialis", "tibialis anterior", "gastrocnemius lateralis"),
    }[region]
    for side, outward in (("right", -1), ("left", 1)):  # lateral = away from the midline
        assert outward * (centre(lateral, side)[1] - centre(medial, side)[1]) > 0
        assert centre(anterior, side)[0] < centre(posterior, side)[0], "anterior = small y (LPS)"


def test_same_seed_same_arrays_other_seed_other_anatomy():
    a_image, a_labels = make_phantom("thigh", SHAPE, seed=11, noise=0.05, bias=0.3, fat_infiltration=0.2)
    b_image, b_labels = make_phantom("thigh", SHAPE, seed=11, noise=0.05, bias=0.3, fat_infiltration=0.2)
    np.testing.assert_array_equal(_arrays(a_image), _arrays(b_image))
    np.testing.assert_array_equal(_arrays(a_labels), _arrays(b_labels))
    _, c_labels = make_phantom("thigh", SHAPE, seed=12)
    differ = np.mean(_arrays(a_labels) != _arrays(c_labels))
    assert differ > 0.05


def test_anatomy_does_not_depend_on_the_contrast_or_slice_count():
    _, t1 = make_phantom("leg", SHAPE, seed=4, contrast="t1")
    _, stir = make_phantom("leg", SHAPE, seed=4, contrast="stir", noise=0.1, fat_infiltration=0.5)
    np.testing.assert_array_equal(_arrays(t1), _arrays(stir))
    # The middle slice of a slab is the slice a one-slice phantom of the same subject shows.
    single = phantom_tissue_map("leg", (1,) + SHAPE[1:], spacing=(1.2, 1.2, 6.0), seed=4)
    slab = phantom_tissue_map("leg", SHAPE, spacing=(1.2, 1.2, 6.0), seed=4)
    np.testing.assert_array_equal(single.muscles[0], slab.muscles[SHAPE[0] // 2])


def _tissue_means(region: str, contrast: str, **kwargs) -> dict[Tissue, float]:
    anatomy = phantom_tissue_map(region, (3, 160, 160), seed=2)
    image = render_contrast(anatomy.tissues, anatomy.muscles, contrast, np.random.default_rng(0),
                            spacing=anatomy.spacing, **kwargs)
    # Judge tissues away from their borders (the in-plane blur mixes neighbours).
    out = {}
    for tissue in (Tissue.SUBCUTANEOUS_FAT, Tissue.MUSCLE, Tissue.MARROW, Tissue.CORTICAL_BONE):
        core = ndimage.binary_erosion(anatomy.tissues == tissue, iterations=1)
        out[tissue] = float(image[core].mean())
    return out


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_contrast_regimes_order_fat_and_muscle(contrast):
    means = _tissue_means("thigh", contrast, noise=0.02, bias=0.1)
    fat, muscle = means[Tissue.SUBCUTANEOUS_FAT], means[Tissue.MUSCLE]
    if contrast in ("water", "stir"):
        assert fat < 0.3 * muscle  # fat suppressed
        assert means[Tissue.MARROW] < 0.3 * muscle
    elif contrast == "fat":
        assert muscle < 0.3 * fat
    elif contrast == "pd":
        assert muscle < fat < 2.5 * muscle  # bright fat, weaker contrast than T1
    else:
        assert fat > 2 * muscle
    assert means[Tissue.CORTICAL_BONE] < 0.5 * min(fat, muscle) + 0.1


def test_fat_infiltration_brightens_muscle_in_t1_and_darkens_it_in_water():
    clean = _tissue_means("leg", "t1")
    infiltrated = _tissue_means("leg", "t1", fat_infiltration=0.4)
    assert infiltrated[Tissue.MUSCLE] > clean[Tissue.MUSCLE] * 1.4
    assert infiltrated[Tissue.SUBCUTANEOUS_FAT] == pytest.approx(clean[Tissue.SUBCUTANEOUS_FAT], rel=0.05)
    assert _tissue_means("leg", "water", fat_infiltration=0.4)[Tissue.MUSCLE] < 0.8 * _tissue_means("leg", "water")[Tissue.MUSCLE]


def test_noise_is_rician_and_relative_to_muscle():
    anatomy = phantom_tissue_map("leg", (2, 128, 128), seed=1)
    # background beyond the reach of the in-plane blur
    background = ndimage.binary_erosion(anatomy.tissues == Tissue.BACKGROUND, np.ones((1, 3, 3)), iterations=3)
    assert background.sum() > 1000
    quiet = render_contrast(anatomy.tissues, anatomy.muscles, "t1", np.random.default_rng(0), spacing=anatomy.spacing)
    assert np.all(quiet[background] == 0)
    noisy = render_contrast(anatomy.tissues, anatomy.muscles, "t1", np.random.default_rng(0),
                            spacing=anatomy.spacing, noise=0.1)
    # Rician background: magnitude of complex Gaussian noise, mean sigma * sqrt(pi / 2), never negative.
    assert noisy.min() >= 0
    assert noisy[background].mean() == pytest.approx(0.1 * np.sqrt(np.pi / 2), rel=0.1)


def test_bias_field_is_smooth_and_bounded():
    anatomy = phantom_tissue_map("thigh", (4, 128, 128), seed=1)
    args = (anatomy.tissues, anatomy.muscles, "t1")
    flat = render_contrast(*args, np.random.default_rng(3), spacing=anatomy.spacing)
    biased = render_contrast(*args, np.random.default_rng(3), spacing=anatomy.spacing, bias=0.4)
    inside = flat > 0.5
    ratio = biased[inside] / flat[inside]
    assert np.exp(-0.4) - 1e-4 <= ratio.min() and ratio.max() <= np.exp(0.4) + 1e-4
    assert ratio.max() / ratio.min() > 1.2  # the field does vary


def test_thick_slices_blur_along_z_only():
    tissues = np.zeros((9, 32, 32), np.uint8)
    tissues[4, 8:24, 8:24] = Tissue.MUSCLE  # one slice of muscle in air
    muscles = np.zeros_like(tissues)

    def render(thickness: float | None) -> np.ndarray:
        return render_contrast(tissues, muscles, "t1", np.random.default_rng(0), spacing=(1.0, 1.0, 5.0),
                               slice_thickness_mm=thickness)

    sharp, thick = render(None), render(12.0)
    assert np.all(sharp[3] == 0) and np.all(sharp[5] == 0)
    assert thick[3, 16, 16] > 0.1 and thick[3, 16, 16] == pytest.approx(thick[5, 16, 16])
    assert thick[4, 16, 16] < sharp[4, 16, 16]
    assert thick[:, 16, 16].sum() == pytest.approx(sharp[:, 16, 16].sum(), rel=1e-3)  # signal conserved
    assert np.all(thick[:, 0, 0] == 0), "no blur in-plane beyond the point spread"
    np.testing.assert_array_equal(render(5.0), sharp)  # slices no thicker than their spacing: no extra blur


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_leg(side):
    _, labels = make_phantom("thigh", SHAPE, legs=side, seed=6)
    n = BUILTIN_TABLES["thigh"].n_muscles
    values = set(np.unique(_arrays(labels))) - {0}
    expected = set(range(1, n + 1)) if side == "right" else set(range(n + 1, 2 * n + 1))
    assert values == expected


@pytest.mark.parametrize("region", ["thigh", "leg"])
def test_touching_legs_form_one_body(region):
    middle = SHAPE[0] // 2
    for touching, components in ((True, 1), (False, 2)):
        anatomy = phantom_tissue_map(region, SHAPE, seed=8, touching=touching)
        _, n = ndimage.label(anatomy.tissues[middle] != Tissue.BACKGROUND)
        assert n == components, f"touching={touching}"
        # Pressed legs keep all their muscles, and a line of skin separates their insides.
        assert len(np.unique(anatomy.muscles[middle])) == 2 * anatomy.table.n_muscles + 1
        tissues, muscles = anatomy.tissues[middle], anatomy.muscles[middle]
        insides, _ = ndimage.label((tissues != Tissue.BACKGROUND) & (tissues != Tissue.SKIN))
        n = anatomy.table.n_muscles
        right = set(np.unique(insides[(muscles > 0) & (muscles <= n)]))
        left = set(np.unique(insides[muscles > n]))
        assert not right & left


def test_single_slice_phantom():
    image, labels = make_phantom("leg", (1, 160, 200), seed=2, noise=0.05, bias=0.2, slice_thickness_mm=8.0)
    assert image.GetSize() == (200, 160, 1) and labels.GetSize() == (200, 160, 1)
    assert len(np.unique(_arrays(labels))) == 2 * BUILTIN_TABLES["leg"].n_muscles + 1
    assert np.isfinite(_arrays(image)).all()


def test_explicit_spacing_is_physical():
    coarse = phantom_tissue_map("thigh", (1, 200, 200), spacing=(2.0, 2.0, 5.0), seed=3)
    fine = phantom_tissue_map("thigh", (1, 400, 400), spacing=(1.0, 1.0, 5.0), seed=3)
    assert coarse.spacing == (2.0, 2.0, 5.0)
    area = [np.count_nonzero(a.muscles) * a.spacing[0] * a.spacing[1] for a in (coarse, fine)]
    assert area[0] == pytest.approx(area[1], rel=0.05)


def test_intensity_tables_cover_every_tissue_and_custom_tables_work():
    for table in INTENSITIES.values():
        assert table.shape == (len(Tissue),) and table[Tissue.BACKGROUND] == 0
    anatomy = phantom_tissue_map("leg", (1, 96, 96), seed=0)
    custom = np.arange(len(Tissue), dtype=np.float32)
    image = render_contrast(anatomy.tissues, anatomy.muscles, custom, np.random.default_rng(0), spacing=anatomy.spacing)
    assert image[0, 0, 0] == 0 and image.max() > 6


@pytest.mark.parametrize("kwargs, words", [
    ({"region": "arm"}, "unknown phantom region"),
    ({"contrast": "flair"}, "unknown contrast"),
    ({"legs": "both legs"}, "legs must be"),
    ({"shape": (0, 64, 64)}, "shape"),
    ({"spacing": (1.0, -1.0, 5.0)}, "spacing"),
    ({"spacing": (float("nan"), 1.0, 5.0)}, "spacing"),  # passed min(spacing) <= 0: an image of NaN origin
    ({"spacing": (1.0, float("inf"), 5.0)}, "spacing"),
    ({"fat_infiltration": 1.5}, "fat_infiltration"),
    ({"noise": -0.1}, "negative"),
    ({"slice_thickness_mm": 0.0}, "slice thickness"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, words):
    with pytest.raises(InputError, match=words):
        make_phantom(**{"shape": (1, 64, 64), **kwargs})
