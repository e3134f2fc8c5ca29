"""Writing and reading label maps and Slicer segmentations: names, colours, terminology, geometry, atomicity."""

from __future__ import annotations

import json

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from test_io_support import assert_same_geometry, make_image, make_labels

from dafne_logic.core import io as dio
from dafne_logic.core.errors import InputError
from dafne_logic.core.io import match_label_name, read_segmentation, write_labels
from dafne_logic.core.labels import LEG, THIGH

ABSENT = (5, 17)  # right sartorius and left gracilis own no voxel


@pytest.fixture
def thigh_labels():
    return make_labels(make_image(), THIGH, absent=ABSENT)


def _lps_positions(matrix: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (matrix[:3, :3] @ ijk.T).T + matrix[:3, 3]


def test_seg_nrrd_read_by_slicerio_keeps_names_colours_terminology_and_geometry(tmp_path, thigh_labels):
    path = tmp_path / "out.seg.nrrd"
    assert write_labels(thigh_labels, path, THIGH) == [path]
    segmentation = slicerio.read_segmentation(str(path))
    segments = {s["name"]: s for s in segmentation["segments"]}
    assert list(segments) == [label.name for label in THIGH.volume_labels()]  # every label, absent ones too
    voxels = segmentation["voxels"]
    assert voxels.ndim == 3  # one layer
    expected = sitk.GetArrayFromImage(thigh_labels)
    for label in THIGH.volume_labels():
        segment = segments[label.name]
        assert segment["labelValue"] == label.value and segment.get("layer", 0) == 0
        np.testing.assert_allclose(segment["color"], [c / 255 for c in label.muscle.color], atol=1e-6)
        term = segment["terminology"]
        assert term["category"][:2] == ["SCT", "123037004"]
        assert term["type"] == ["SCT", label.muscle.code.value, label.muscle.code.meaning]
        assert term["typeModifier"][:2] == ["SCT", {"right": "24028007", "left": "7771000"}[label.side]]
        # Same physical voxels: slicerio's (i, j, k) through its IJK→LPS vs SimpleITK's index → point.
        ours = np.argwhere(expected == label.value)[:, ::-1]  # (k, j, i) → (i, j, k)
        theirs = np.argwhere(voxels == segment["labelValue"])
        assert len(theirs) == len(ours) == (0 if label.value in ABSENT else 3)
        ours_lps = np.array([thigh_labels.TransformIndexToPhysicalPoint([int(v) for v in idx]) for idx in ours])
        if len(ours):
            np.testing.assert_allclose(sorted(map(tuple, _lps_positions(segmentation["ijkToLPS"], theirs))),
                                       sorted(map(tuple, ours_lps)), atol=1e-6)
    assert segments["right sartorius"]["extent"] == [0, -1, 0, -1, 0, -1]


def test_seg_nrrd_read_by_itk_is_the_label_map_on_the_same_grid(tmp_path, thigh_labels):
    """An independent reader (ITK's NRRD reader) sees the same voxels at the same physical places."""
    path = tmp_path / "out.seg.nrrd"
    write_labels(thigh_labels, path, THIGH)
    read = sitk.ReadImage(str(path))
    assert_same_geometry(read, thigh_labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(thigh_labels))


def test_seg_nrrd_terminology_entry_is_slicer_tag_format(tmp_path, thigh_labels):
    path = tmp_path / "out.seg.nrrd"
    write_labels(thigh_labels, path, THIGH)
    header = nrrd.read_header(str(path))
    assert header["Segment0_Name"] == "right vastus lateralis"
    assert header["Segment0_Tags"] == (
        "TerminologyEntry:Segmentation category and type - DafneSlicer muscles"
        "~SCT^123037004^Anatomical Structure~SCT^1403006^Vastus lateralis muscle~SCT^24028007^Right"
        "~Anatomic codes - DICOM master list~^^~^^|")
    assert header["Segment12_Tags"].split("~")[3] == "SCT^7771000^Left"
    assert header["space"] == "left-posterior-superior"


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha",
                                    ".SEG.NRRD", ".NII.GZ", ".MHA"])  # the writer is chosen from the lower-case name
def test_write_then_read_segmentation_round_trips(tmp_path, thigh_labels, suffix):
    path = tmp_path / f"labels{suffix}"
    write_labels(thigh_labels, path, THIGH)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it
    labels, unknown = read_segmentation(path, THIGH)
    assert unknown == []
    assert_same_geometry(labels, thigh_labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(thigh_labels))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_label_map_gets_json_label_table(tmp_path, thigh_labels, suffix):
    path = tmp_path / f"case 1{suffix}"
    written = write_labels(thigh_labels, path, THIGH)
    table_path = tmp_path / "case 1.json"
    assert written == [path, table_path]
    data = json.loads(table_path.read_text())
    assert data["region"] == "thigh" and len(data["labels"]) == 24
    entry = data["labels"]["13"]
    assert entry["name"] == "left vastus lateralis" and entry["side"] == "left"
    assert entry["color"] == list(THIGH.muscles[0].color)
    assert entry["terminology"]["type"][1] == "1403006" and entry["terminology"]["typeModifier"][1] == "7771000"
    stored = sitk.ReadImage(str(path))
    assert stored.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(stored, thigh_labels)


def test_segments_matched_by_name_not_value_order_or_layer(tmp_path, thigh_labels):
    """A segmentation edited in Slicer: renamed segments, other order and label values, two layers, extras."""
    path = tmp_path / "ours.seg.nrrd"
    write_labels(thigh_labels, path, THIGH)
    segmentation = slicerio.read_segmentation(str(path))
    voxels = segmentation["voxels"]
    layers = np.zeros((2,) + voxels.shape, dtype=np.uint8)
    renamed = {"right vastus lateralis": "Vastus_Lateralis_R", "left vastus lateralis": "vastus lateralis left",
               "left soleus": "Soleus_L"}
    segments = []
    for new_value, segment in enumerate(reversed(segmentation["segments"]), start=40):
        layer = new_value % 2  # alternate layers
        layers[layer][voxels == segment["labelValue"]] = new_value
        segments.append(dict(segment, labelValue=new_value, layer=layer,
                             name=renamed.get(segment["name"], segment["name"].upper())))
    tumour = np.zeros(voxels.shape, dtype=bool)
    tumour[-1, -1, -1] = True  # a voxel no muscle owns
    layers[1][tumour] = 99
    segments.append({"id": "extra", "name": "Tumour", "labelValue": 99, "layer": 1})
    segmentation.update(voxels=layers, segments=segments)
    edited = tmp_path / "edited.seg.nrrd"
    slicerio.write_segmentation(str(edited), segmentation)

    labels, unknown = read_segmentation(edited, THIGH)
    assert unknown == ["Tumour"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(thigh_labels))
    assert_same_geometry(labels, thigh_labels)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_label_map_with_plain_name_json_like_the_real_data(tmp_path, encoding):
    """Values of another convention, named "Soleus_R" etc., become our volume labels; the JSON may start
    with the byte-order mark Windows editors write (PowerShell's ``Out-File -Encoding utf8``)."""
    reference = make_image(shape_zyx=(2, 4, 5))
    voxels = np.zeros((2, 4, 5), dtype=np.uint8)
    voxels[0, 0, :3] = 1  # Soleus_R
    voxels[1, 3, 4] = 2  # Soleus_L
    voxels[0, 2, 2] = 9  # Extensor Longus Digitorum_R
    voxels[1, 1, 1] = 13  # unnamed in the JSON
    image = sitk.GetImageFromArray(voxels)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(tmp_path / "case_labels.nii.gz"))
    (tmp_path / "case_labels.json").write_text(json.dumps(
        {"1": "Soleus_R", "2": "Soleus_L", "9": "Extensor Longus Digitorum_R", "20": "Fat"}), encoding=encoding)
    labels, unknown = read_segmentation(tmp_path / "case_labels.nii.gz", LEG)
    assert unknown == ["Fat"]
    expected = np.zeros_like(voxels)
    expected[0, 0, :3] = LEG.value_of(1, "right")
    expected[1, 3, 4] = LEG.value_of(1, "left")
    expected[0, 2, 2] = LEG.value_of(LEG.muscle_index("extensor digitorum longus"), "right")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)


def test_label_map_without_json_is_taken_as_volume_labels(tmp_path):
    voxels = np.array([[[0, 1, 12, 13, 200]]], dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / "plain.nrrd"))
    labels, unknown = read_segmentation(tmp_path / "plain.nrrd", LEG)
    assert unknown == ["label value 13", "label value 200"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), [[[0, 1, 12, 0, 0]]])


@pytest.mark.parametrize("name, expected", [
    ("right vastus lateralis", 1), ("vastus lateralis left", 13), ("Vastus_Lateralis_L", 13),
    ("VASTUS-LATERALIS-R", 1), ("Long head of biceps femoris muscle.r", 11), ("Biceps Femoris Short Head_L", 24),
    ("vastus lateralis", None), ("Segment_1", None), ("right soleus", None), ("left", None),
])
def test_match_label_name_thigh(name, expected):
    assert match_label_name(name, THIGH) == expected


def test_match_label_name_reads_every_name_of_the_real_calf_data(shared_data):
    names = json.loads((shared_data / "calf_slices" / "pd_example_labels.json").read_text())
    matched = {value: match_label_name(name, LEG) for value, name in names.items()}
    assert sorted(matched.values()) == list(range(1, 13))
    assert matched["1"] == LEG.value_of(1, "right") and matched["2"] == LEG.value_of(1, "left")


def test_real_calf_label_map_reads_with_every_label_matched(shared_data):
    path = shared_data / "calf_slices" / "pd_example_labels.nii.gz"
    labels, unknown = read_segmentation(path, LEG)
    assert unknown == []
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    ours = sitk.GetArrayFromImage(labels)
    names = json.loads((shared_data / "calf_slices" / "pd_example_labels.json").read_text())
    for value, name in names.items():
        assert np.array_equal(ours == match_label_name(name, LEG), raw == int(value)), name


def test_unknown_extension_rejected_before_anything_is_computed(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("labels were processed before the extension was checked")

    monkeypatch.setattr(dio, "_label_array", must_not_run)
    with pytest.raises(InputError, match=r"\.seg\.nrrd"):
        write_labels(make_labels(make_image(), LEG), tmp_path / "out.png", LEG)
    assert list(tmp_path.iterdir()) == []


def test_label_values_outside_the_table_are_refused(tmp_path):
    labels = make_labels(make_image(), THIGH)  # values up to 24, the leg table has 12
    with pytest.raises(InputError, match="0..12"):
        write_labels(labels, tmp_path / "out.seg.nrrd", LEG)
    assert list(tmp_path.iterdir()) == []


def _write_half_then_fail(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"NRRD0004\npartial")
    raise OSError("disk full")


def test_failed_seg_nrrd_write_leaves_no_file_and_keeps_the_old_one(tmp_path, thigh_labels, monkeypatch):
    monkeypatch.setattr(slicerio, "write_segmentation", _write_half_then_fail)
    with pytest.raises(OSError):
        write_labels(thigh_labels, tmp_path / "new.seg.nrrd", THIGH)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.seg.nrrd"
    old.write_bytes(b"previous result")
    with pytest.raises(OSError):
        write_labels(thigh_labels, old, THIGH)
    assert [p.name for p in tmp_path.iterdir()] == ["old.seg.nrrd"] and old.read_bytes() == b"previous result"


def test_failed_label_map_write_leaves_neither_image_nor_json(tmp_path, thigh_labels, monkeypatch):
    monkeypatch.setattr(dio.sitk, "WriteImage", lambda image, path, *a, **k: _write_half_then_fail(path))
    with pytest.raises(OSError):
        write_labels(thigh_labels, tmp_path / "out.nii.gz", THIGH)
    assert list(tmp_path.iterdir()) == []


def test_failed_label_table_write_leaves_no_image(tmp_path, thigh_labels, monkeypatch):
    def broken_table(table):
        raise RuntimeError("cannot build the label table")

    monkeypatch.setattr(dio, "label_table_json", broken_table)
    with pytest.raises(RuntimeError):
        write_labels(thigh_labels, tmp_path / "out.nrrd", THIGH)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, expected", [
    (b"", "could not be read"), (b"NRRD0004\ntype: nonsense\n\n", "could not be read"),
])
def test_unreadable_segmentation_is_an_input_error(tmp_path, content, expected):
    path = tmp_path / "broken.seg.nrrd"
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected):
        read_segmentation(path, THIGH)
    with pytest.raises(InputError, match="does not exist"):
        read_segmentation(tmp_path / "missing.seg.nrrd", THIGH)


@pytest.mark.parametrize("name, expected", [
    ("Soleus_R", ("soleus", "right")), ("L soleus", ("soleus", "left")), ("soleus.r", ("soleus", "right")),
    ("Gastrocnemius Medialis Lt", ("gastrocnemius medialis", "left")), ("right Tibia", ("tibia", "right")),
    ("Tibia", ("tibia", None)), ("R", ("r", None)),
])
def test_split_side_finds_the_side_word_first_or_last(name, expected):
    """One parser of side words serves segment-name matching and training label tables."""
    from dafne_logic.core.io import split_side

    assert split_side(name) == expected


def test_a_label_table_saved_with_a_byte_order_mark_loads(tmp_path):
    from dafne_logic.core.labels import LabelTable

    path = tmp_path / "table.json"
    path.write_text(json.dumps(THIGH.to_json()), encoding="utf-8-sig")  # what Windows editors often write
    assert LabelTable.load(str(path)) == THIGH


def _raw_seg_nrrd(path, voxels, segments: list[dict], directions=None):
    """A ``.seg.nrrd`` written field by field (pynrrd), as other Slicer versions and tools write them."""
    four_d = voxels.ndim == 4
    spatial = np.array(directions if directions is not None else [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 5.0]])
    header = {"type": "unsigned char", "dimension": voxels.ndim, "space": "left-posterior-superior",
              "kinds": (["list"] if four_d else []) + ["domain"] * 3,
              "space directions": np.vstack([[np.nan] * 3, spatial]) if four_d else spatial,
              "space origin": np.zeros(3), "encoding": "raw"}
    for index, fields in enumerate(segments):
        for key, value in fields.items():
            header[f"Segment{index}_{key}"] = value
    nrrd.write(str(path), voxels, header)


def test_a_seg_nrrd_of_slicer_before_4_11_has_one_segment_per_layer(tmp_path):
    """No Layer and no LabelValue fields: each layer is a segment drawn with 1. Read as layer 0 for all,
    the first layer took the last segment's name and the others were lost."""
    voxels = np.zeros((3, 10, 10, 4), np.uint8)
    voxels[0, 1:4, 1:4] = voxels[1, 5:8, 1:4] = voxels[2, 1:4, 5:8] = 1
    names = ["right vastus lateralis", "left vastus lateralis", "right sartorius"]
    _raw_seg_nrrd(tmp_path / "old.seg.nrrd", voxels, [{"ID": f"S{i}", "Name": n} for i, n in enumerate(names)])
    labels, unknown = read_segmentation(tmp_path / "old.seg.nrrd", THIGH)
    read = sitk.GetArrayFromImage(labels).transpose(2, 1, 0)  # (i, j, k) as the file
    assert unknown == []
    for layer, name in enumerate(names):
        assert set(np.unique(read[voxels[layer] == 1])) == {match_label_name(name, THIGH)}, name


def test_overlapping_layers_are_reported_not_silently_merged(tmp_path, caplog):
    voxels = np.zeros((2, 10, 10, 4), np.uint8)
    voxels[0, 2:8, 2:8] = 1
    voxels[1, 4:6, 4:6] = 1  # inside the first: 2 × 2 voxels on each of 4 slices
    names = ["right vastus lateralis", "right vastus intermedius"]
    _raw_seg_nrrd(tmp_path / "overlap.seg.nrrd", voxels,
                  [{"ID": f"S{i}", "Name": n, "Layer": str(i), "LabelValue": "1"} for i, n in enumerate(names)])
    with caplog.at_level("WARNING"):
        read_segmentation(tmp_path / "overlap.seg.nrrd", THIGH)
    assert "16 voxels belong to segments of several layers" in caplog.text


@pytest.mark.parametrize("damage, message", [
    ("nan", "non-integer values"), ("fraction", "non-integer values"), ("axes", "not independent"),
])
def test_a_damaged_seg_nrrd_is_one_sentence(tmp_path, damage, message):
    voxels = np.zeros((10, 10, 4), np.float32 if damage != "axes" else np.uint8)
    voxels[1:4, 1:4] = 1
    if damage == "nan":
        voxels[0, 0, 0] = np.nan
    elif damage == "fraction":
        voxels[5, 5, 1] = 1.7
    directions = [[1.0, 0, 0], [1.0, 0, 0], [0, 0, 5.0]] if damage == "axes" else None
    path = tmp_path / "damaged.seg.nrrd"
    _raw_seg_nrrd(path, voxels, [{"ID": "S0", "Name": "right sartorius", "Layer": "0", "LabelValue": "1"}], directions)
    if damage != "axes":  # pynrrd writes the type from the array
        path.write_bytes(path.read_bytes().replace(b"type: unsigned char", b"type: float", 1))
    with pytest.raises(InputError, match=message):
        read_segmentation(path, THIGH)


def test_a_complex_label_map_is_one_sentence(tmp_path):
    image = sitk.GetImageFromArray(np.ones((3, 4, 5), np.complex64))
    sitk.WriteImage(image, str(tmp_path / "complex.nrrd"))
    with pytest.raises(InputError, match="non-integer values"):
        read_segmentation(tmp_path / "complex.nrrd", THIGH)
