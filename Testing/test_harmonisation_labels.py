"""Label harmonisation: schemes matched by name, legs split by geometry, partial-label loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import LEG, THIGH
from dafne_logic.training.harmonisation import (
    BONE,
    HOLE,
    HOLE_LARGEST,
    MUSCLE_BASE,
    GroupRegistry,
    PartialLabelLoss,
    find_label_maps,
    load_label_map,
    subject_id,
)

CANVAS = (64, 64)


def write_map(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 5.0), direction=None, origin=None) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    image.SetOrigin(origin if origin is not None else (-(array.shape[2] - 1), -(array.shape[1] - 1), 0.0))
    sitk.WriteImage(image, str(path))
    return path


def two_thighs(n_slices: int = 2) -> np.ndarray:
    """(z, y, x) 11-label map: each leg a ring of four muscles around an empty 'femur' hole;
    the right leg (small x) has sartorius (1) on its lateral side, the left leg gracilis (7)."""
    volume = np.zeros((n_slices, 40, 80), np.uint8)
    yy, xx = np.mgrid[:40, :80]
    for cx, lateral, extra in ((18, -1, 1), (62, 1, 7)):  # the left leg is the mirror image of the right
        r = np.hypot(yy - 20, xx - cx)
        ring = (r > 4) & (r < 14)
        angle = np.arctan2(yy - 20, -lateral * (xx - cx))
        volume[:, ring & (angle < -1.5)] = 3  # vastus lateralis
        volume[:, ring & (angle >= -1.5) & (angle < 0)] = 2  # rectus femoris
        volume[:, ring & (angle >= 0) & (angle < 1.5)] = 6  # adductor magnus
        volume[:, ring & (angle >= 1.5)] = 10  # semimembranosus
        volume[:, (np.abs(xx - cx) < 2) & (np.abs(yy - 37) < 2)] = extra
    return volume


def test_thigh11_legs_split_by_geometry_and_names(tmp_path: Path):
    registry = GroupRegistry(THIGH.n_classes)
    slices = load_label_map(write_map(tmp_path / "THIGH_007_0001.nii.gz", two_thighs()), THIGH, registry, 2.0, CANVAS)
    assert [(s.subject, s.side) for s in slices] == [("THIGH_007", "right"), ("THIGH_007", "left")] * 2
    right, left = slices[0], slices[1]
    assert THIGH.muscle_index("sartorius") in np.unique(right.target)
    assert THIGH.muscle_index("gracilis") not in np.unique(right.target)
    assert THIGH.muscle_index("gracilis") in np.unique(left.target)
    # Targets and tissues agree on labelled muscles.
    labelled = right.target > 0
    assert np.array_equal(right.tissue[labelled & (right.tissue >= MUSCLE_BASE)] - MUSCLE_BASE,
                          right.target[labelled & (right.tissue >= MUSCLE_BASE)])
    # The unlabelled femur hole is the largest hole; the absent adductor longus makes it ambiguous.
    assert HOLE_LARGEST in np.unique(right.tissue)
    ambiguous = frozenset({0, THIGH.muscle_index("adductor longus")})
    assert registry.groups == [ambiguous]
    assert set(np.unique(right.target[right.tissue == HOLE_LARGEST])) == {THIGH.n_classes}
    # The left leg is mirrored: its vastus lateralis lies on the same canvas side as the right leg's.
    vl = THIGH.muscle_index("vastus lateralis")
    assert np.nonzero(right.target == vl)[1].mean() == pytest.approx(np.nonzero(left.target == vl)[1].mean(), abs=1.5)


def test_flipped_array_gives_the_same_legs(tmp_path: Path):
    """Left and right come from the direction matrix, not from the array side."""
    volume = two_thighs()
    plain = load_label_map(write_map(tmp_path / "a.nii.gz", volume), THIGH, GroupRegistry(THIGH.n_classes), 2.0, CANVAS)
    flipped = write_map(tmp_path / "b.nii.gz", volume[:, ::-1, ::-1], direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1),
                        origin=(79 - 79.0, 39 - 39.0, 0.0))
    other = load_label_map(flipped, THIGH, GroupRegistry(THIGH.n_classes), 2.0, CANVAS)
    assert [s.side for s in other] == [s.side for s in plain]
    for a, b in zip(plain, other, strict=True):
        assert np.array_equal(a.target, b.target)


def musclemap_folder(tmp_path: Path, encoding: str = "utf-8") -> Path:
    folder = tmp_path / "musclemap"
    folder.mkdir()
    entries = [{"region": "leg", "anatomy": a, "side": s, "value": v} for a, s, v in [
        ("soleus", "left", 8131), ("soleus", "right", 8132), ("gastrocnemius", "left", 8141),
        ("gastrocnemius", "right", 8142), ("tibia", "right", 8152), ("deep posterior compartment", "right", 8112),
        ("anterior compartment", "right", 8102)]]
    (folder / "table.json").write_text(json.dumps({"labels": entries}), encoding=encoding)
    volume = np.zeros((1, 40, 80), np.int16)
    volume[0, 10:30, 5:15] = 8132  # right soleus: small LPS x = patient right
    volume[0, 10:30, 15:25] = 8142
    volume[0, 5:10, 5:25] = 8102
    volume[0, 12:16, 26:30] = 8152
    volume[0, 30:34, 5:25] = 8112
    volume[0, 10:30, 55:65] = 8131
    volume[0, 10:30, 65:75] = 8141
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(image, str(folder / "dseg.nii.gz"))
    return folder


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])  # -sig: the table saved by a Windows editor
def test_musclemap_coarse_groups_bones_and_other_muscles(tmp_path: Path, encoding: str):
    registry = GroupRegistry(LEG.n_classes)
    slices = load_label_map(find_label_maps([musclemap_folder(tmp_path, encoding)])[0], LEG, registry, 2.0, CANVAS,
                            min_classes=2)
    gastrocnemius = frozenset({LEG.muscle_index("gastrocnemius medialis"), LEG.muscle_index("gastrocnemius lateralis")})
    # The anterior compartment also holds extensor hallucis longus and peroneus tertius, background for the
    # network (the Visible Human maps label them apart): its pixels may be background too.
    anterior = frozenset({0, LEG.muscle_index("tibialis anterior"), LEG.muscle_index("extensor digitorum longus")})
    assert gastrocnemius in registry.groups and anterior in registry.groups
    right = next(s for s in slices if s.side == "right")
    codes = set(np.unique(right.target).tolist())
    assert {LEG.muscle_index("soleus"), LEG.n_classes + registry.groups.index(gastrocnemius)} <= codes
    assert BONE in right.tissue and 7 in right.tissue  # tibia and an unlabelled muscle
    assert set(np.unique(right.target[right.tissue == BONE])) == {0}
    assert {s.side for s in slices} == {"right", "left"}


def test_bad_label_maps_are_named(tmp_path: Path):
    empty = write_map(tmp_path / "empty.nii.gz", np.zeros((2, 10, 10)))
    with pytest.raises(InputError, match="empty.nii.gz: the label map is empty"):
        load_label_map(empty, THIGH, GroupRegistry(THIGH.n_classes), 2.0, CANVAS)
    odd = write_map(tmp_path / "odd.nii.gz", np.full((2, 10, 10), 40))
    with pytest.raises(InputError, match=r"odd.nii.gz: no label table beside it"):
        load_label_map(odd, THIGH, GroupRegistry(THIGH.n_classes), 2.0, CANVAS)
    named = write_map(tmp_path / "named.nii.gz", two_thighs())
    (tmp_path / "named.json").write_text(json.dumps({"1": "Soleus_R", "2": "Soleus_L"}))
    with pytest.raises(InputError, match=r"label values \[3, 6, 7, 10\] are not named"):
        load_label_map(named, THIGH, GroupRegistry(THIGH.n_classes), 2.0, CANVAS)
    (tmp_path / "named.json").write_text(json.dumps({str(v): f"Soleus_{'R' if v % 2 else 'L'}" for v in range(1, 12)}))
    with pytest.raises(InputError, match="names no muscle of the thigh table"):  # a calf muscle: other muscle
        load_label_map(named, THIGH, GroupRegistry(THIGH.n_classes), 2.0, CANVAS)
    (tmp_path / "named.json").write_text(json.dumps({str(v): f"Cortex_{'R' if v % 2 else 'L'}" for v in range(1, 12)}))
    with pytest.raises(InputError, match="not muscles of the thigh table"):
        load_label_map(named, THIGH, GroupRegistry(THIGH.n_classes), 2.0, CANVAS)
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((2, 10, 10)).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    with pytest.raises(InputError, match="image.nii.gz holds non-integer values"):
        load_label_map(tmp_path / "image.nii.gz", THIGH, GroupRegistry(THIGH.n_classes), 2.0, CANVAS)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="no label maps found"):
        find_label_maps([tmp_path / "nothing"])
    with pytest.raises(InputError, match="does not exist"):
        find_label_maps([tmp_path / "missing"])


def test_subject_ids():
    assert subject_id(Path("Training/T1/THIGH_022_0002.nii.gz")) == "THIGH_022"
    assert subject_id(Path("calf/t1_example_labels.nii.gz")) == "t1_example"
    assert subject_id(Path("HV003_3_0001.nii.gz")) == "HV003_3"


def test_partial_label_loss_sums_fine_classes_inside_a_group():
    group = frozenset({2, 3})
    loss = PartialLabelLoss(4, [group])
    target = torch.full((1, 4, 4), 4)  # every pixel: "class 2 or 3"
    target[0, 0] = 1  # plus a row of class 1 so Dice has something to see

    def logits_for(c: int) -> torch.Tensor:
        out = torch.full((1, 4, 4, 4), -8.0)
        out[:, c] = 8.0
        out[0, :, 0] = -8.0
        out[0, 1, 0] = 8.0
        return out

    as_2, as_3, as_0 = loss(logits_for(2), target), loss(logits_for(3), target), loss(logits_for(0), target)
    assert float(as_2) == pytest.approx(float(as_3), abs=1e-5)
    assert float(as_0) > float(as_2) + 1.0
    # Gradients flow to the group members jointly: raising class 2's logit from a neutral start helps.
    neutral = torch.zeros(1, 4, 4, 4, requires_grad=True)
    loss(neutral, target).backward()
    assert neutral.grad[0, 2, 1:].mean() < 0 and neutral.grad[0, 3, 1:].mean() < 0
    assert neutral.grad[0, 0, 1:].mean() > 0


def test_partial_label_loss_without_groups_is_dice_ce():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    ours = PartialLabelLoss(3)(logits, target)
    monai = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, target[:, None])
    assert float(ours) == pytest.approx(float(monai), rel=1e-4)


def test_ambiguity_group_with_background_leaves_the_choice_free():
    loss = PartialLabelLoss(3, [frozenset({0, 2})])
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[0, :2] = 1
    target[0, 2:] = 3  # "background or class 2"
    a = torch.full((1, 3, 4, 4), -8.0)
    a[0, 1, :2] = 8.0
    b = a.clone()
    a[0, 0, 2:] = 8.0
    b[0, 2, 2:] = 8.0
    assert float(loss(a, target)) == pytest.approx(float(loss(b, target)), abs=1e-4)


def test_real_thigh_map_gives_both_legs(shared_data: Path):
    path = shared_data / "thigh_label_maps" / "Training" / "T1" / "THIGH_003_0002.nii.gz"
    slices = load_label_map(path, THIGH, GroupRegistry(THIGH.n_classes), 1.25, (224, 224))
    sides = {s.side for s in slices}
    assert sides == {"right", "left"}
    classes = set(np.unique(np.concatenate([s.target.ravel() for s in slices])).tolist())
    assert {THIGH.muscle_index(n) for n in ("vastus lateralis", "gracilis", "biceps femoris short head")} <= classes
    assert THIGH.muscle_index("adductor longus") not in classes
    for s in slices:  # the leg lies inside its canvas, not cut by it
        assert not s.tissue[0].any() and not s.tissue[-1].any() and not s.tissue[:, 0].any() and not s.tissue[:, -1].any()
    assert HOLE in np.unique(np.concatenate([s.tissue.ravel() for s in slices]))


def visible_human_like(tmp_path: Path) -> Path:
    """Two calves named the Visible Human way (side first): soleus and a ring of peroneus longus
    (no brevis), tibialis posterior and a thigh muscle (other muscles), a fibula; the gastrocnemius
    medialis only on the right leg (a missing mesh on the left)."""
    volume = np.zeros((2, 60, 120), np.uint8)
    yy, xx = np.mgrid[:60, :120]
    for offset, side_value in ((0, 1), (60, 0)):  # right leg at small x (LPS), odd values = right
        cx = 30 + offset
        volume[:, 15:45, cx - 12:cx + 2] = 1 + (1 - side_value)  # soleus 1 / 2
        volume[:, 15:45, cx + 2:cx + 8] = 3 + (1 - side_value)  # peroneus longus 3 / 4
        volume[:, 5:12, cx - 12:cx + 8] = 5 + (1 - side_value)  # tibialis posterior 5 / 6
        volume[:, 48:52, cx - 12:cx + 8] = 9 + (1 - side_value)  # vastus lateralis 9 / 10 (other muscle here)
        volume[:, 20:24, cx + 10:cx + 13] = 11 + (1 - side_value)  # fibula 11 / 12
    volume[:, 15:45, 10:18][volume[:, 15:45, 10:18] == 1] = 7  # right gastrocnemius medialis only
    names = {1: "right soleus", 2: "left soleus", 3: "right peroneus longus", 4: "left peroneus longus",
             5: "right tibialis posterior", 6: "left tibialis posterior", 7: "right gastrocnemius medialis",
             9: "right vastus lateralis", 10: "left vastus lateralis", 11: "right fibula", 12: "left fibula"}
    path = write_map(tmp_path / "VHX_legs_labels.nii.gz", volume, spacing=(1.0, 1.0, 2.0))
    (tmp_path / "VHX_legs_labels.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
    return path


def test_visible_human_names_parts_other_muscles_and_missing_structures(tmp_path: Path):
    registry = GroupRegistry(LEG.n_classes)
    slices = load_label_map(visible_human_like(tmp_path), LEG, registry, 1.0, (96, 96), min_classes=2)
    right = next(s for s in slices if s.side == "right")
    left = next(s for s in slices if s.side == "left")
    peroneus, medialis = LEG.muscle_index("peroneus"), LEG.muscle_index("gastrocnemius medialis")
    # peroneus longus is the model's peroneus; tibialis posterior and vastus lateralis are other muscle.
    assert peroneus in right.target and peroneus in left.target
    assert set(np.unique(right.target[right.tissue == 7]).tolist()) == {0}  # Tissue.MUSCLE, background target
    assert (right.tissue == 7).sum() == 7 * 20 + 4 * 20 and BONE in right.tissue  # both other muscles
    # Without a brevis the peroneus is incomplete: beside it and the fibula, background is unknown.
    absent = {LEG.muscle_index(n) for n in ("gastrocnemius lateralis", "tibialis anterior", "extensor digitorum longus")}
    right_group = frozenset({0, peroneus} | absent)
    left_group = right_group | {medialis}  # and the left leg lacks the gastrocnemius medialis
    assert set(registry.groups) == {right_group, left_group}
    right_code = LEG.n_classes + registry.groups.index(right_group)
    left_code = LEG.n_classes + registry.groups.index(left_group)
    assert right_code in right.target and left_code not in right.target
    # The missing structure may lie anywhere near the left leg: unknown all around it, never background there.
    rows, cols = np.nonzero(left.tissue)
    ring = left.target[rows.min() - 5, cols.min():cols.max()]  # 5 mm in front of the leg
    assert set(ring.tolist()) == {left_code}
    assert left.target[0, 0] == 0  # far from the leg: background
    # On the right leg the unknown band hugs the peroneus and fibula only, not the far side of the soleus.
    r_rows, r_cols = np.nonzero(right.tissue)
    assert right.target[(r_rows.min() + r_rows.max()) // 2, r_cols.min() - 5] == 0
    assert right.target[(r_rows.min() + r_rows.max()) // 2, r_cols.max() + 5] == right_code


def test_visible_human_names_fit_the_thigh_table_too(tmp_path: Path):
    """For the thigh model the calf muscles (peroneus longus included) are other muscle."""
    registry = GroupRegistry(THIGH.n_classes)
    slices = load_label_map(visible_human_like(tmp_path), THIGH, registry, 1.0, (96, 96), min_classes=1)
    assert {s.side for s in slices} == {"right", "left"}
    codes = set(np.unique(np.concatenate([s.target.ravel() for s in slices])).tolist())
    assert THIGH.muscle_index("vastus lateralis") in codes and MUSCLE_BASE + 0 not in codes


def test_real_visible_human_maps(shared_data: Path):
    path = shared_data / "visible_human_label_maps" / "VHF_legs_labels.nii.gz"
    registry = GroupRegistry(LEG.n_classes)
    calves = load_label_map(path, LEG, registry, 1.0, (192, 192), min_classes=2)
    assert {s.side for s in calves} == {"right", "left"} and len(calves) > 300
    classes = set(np.unique(np.concatenate([s.target.ravel() for s in calves])).tolist())
    assert set(range(1, LEG.n_classes)) <= classes  # all six calf muscles, peroneus from peroneus longus
    assert registry.groups == [frozenset({0, LEG.muscle_index("peroneus")})]  # no brevis mesh
    thigh_registry = GroupRegistry(THIGH.n_classes)
    thighs = load_label_map(path, THIGH, thigh_registry, 1.25, (224, 224))
    long_head = THIGH.muscle_index("biceps femoris long head")
    # The female right biceps femoris long head mesh is missing: unknown on the right leg only.
    assert thigh_registry.groups == [frozenset({0, long_head})]
    code = THIGH.n_classes
    assert any(code in s.target for s in thighs if s.side == "right")
    assert not any(code in s.target for s in thighs if s.side == "left")
    assert any(long_head in s.target for s in thighs if s.side == "left")
    assert THIGH.muscle_index("adductor longus") in set(np.unique(np.concatenate([s.target.ravel() for s in thighs])))
