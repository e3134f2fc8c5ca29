"""Weight deltas: exact round trip within fp16, and hostile blobs refused before use."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zlib

import pytest
import torch
from safetensors.torch import save as save_safetensors_bytes
from test_model_package import tiny_package

from dafne_logic.core.errors import ModelError
from dafne_logic.learning.delta import DeltaMetadata, apply_delta, decode_delta, decode_delta_stream, encode_delta, make_delta, weights_norm


def _child(parent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in parent.items()}


def test_apply_reproduces_child_within_fp16():
    pkg = tiny_package()
    child = _child(pkg.state_dict)
    delta = decode_delta(encode_delta(make_delta(pkg.state_dict, child)), pkg.manifest)
    rebuilt = apply_delta(pkg.state_dict, delta)
    for k in child:
        assert torch.allclose(rebuilt[k], child[k], atol=5e-5)
    assert weights_norm(delta) > 0


def _raw_safetensors(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x80\x04K\x01.", "zlib"),  # a pickle
        (zlib.compress(b"PK\x03\x04" + b"\0" * 100), "header"),  # a torch zip checkpoint
        (zlib.compress(struct.pack("<Q", 1 << 40) + b"{}"), "header claims"),
        (zlib.compress(_raw_safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)), "float16"),
        (zlib.compress(b"\0" * (1 << 20)), "header is not JSON"),
        (zlib.compress(_raw_safetensors({"x": {"dtype": "F16", "shape": 7, "data_offsets": [0, 14]}})), "valid shape"),
        (zlib.compress(_raw_safetensors({"x": {"dtype": "F16", "shape": None, "data_offsets": [0, 0]}})), "valid shape"),
        (zlib.compress(_raw_safetensors({"x": {"dtype": "F16", "shape": [True], "data_offsets": [0, 2]}})), "valid shape"),
        (zlib.compress(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    ],
)
def test_hostile_blobs_are_refused(blob, message):
    pkg = tiny_package()
    with pytest.raises(ModelError, match=message):
        decode_delta(blob, pkg.manifest, max_bytes=1 << 19)


def test_nan_and_wrong_shape_are_refused():
    pkg = tiny_package()
    manifest = pkg.manifest
    delta = make_delta(pkg.state_dict, _child(pkg.state_dict))
    name = next(iter(delta))
    bad = dict(delta)
    bad[name] = bad[name].clone()
    bad[name].view(-1)[0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        decode_delta(encode_delta(bad), manifest)
    wrong = dict(delta)
    wrong[name] = torch.zeros(3, 3, dtype=torch.float16)
    with pytest.raises(ModelError, match="shape"):
        decode_delta(encode_delta(wrong), manifest)
    missing = dict(delta)
    missing.pop(name)
    with pytest.raises(ModelError, match="names differ"):
        decode_delta(encode_delta(missing), manifest)


def test_norm_of_an_empty_delta_is_zero():
    assert weights_norm({}) == 0.0


def test_bytes_after_the_zlib_stream_are_refused():
    pkg = tiny_package()
    blob = encode_delta(make_delta(pkg.state_dict, _child(pkg.state_dict)))
    decode_delta(blob, pkg.manifest)
    with pytest.raises(ModelError, match="after the end of its zlib stream"):
        decode_delta(blob + b"\x00" * 10, pkg.manifest)
    with pytest.raises(ModelError, match="after the end of its zlib stream"):
        decode_delta(blob + blob, pkg.manifest)  # a second, complete zlib stream


def test_a_bomb_behind_a_valid_header_is_refused_without_inflating_it():
    """A valid header followed by far more data than it describes: refused after reading about the
    model's own size (the header is checked first), not after inflating the bomb."""
    pkg = tiny_package()
    raw = save_safetensors_bytes(make_delta(pkg.state_dict, _child(pkg.state_dict)))
    bomb = zlib.compress(raw + b"\0" * (60 << 20), 9)
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match="more data than its safetensors header describes"):
            decode_delta(bomb, pkg.manifest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(raw) + (1 << 20)  # the old decoder inflated all 60 MiB first


def test_streamed_decoding_returns_the_bytes_it_read():
    pkg = tiny_package()
    blob = encode_delta(make_delta(pkg.state_dict, _child(pkg.state_dict)))
    tensors, read = decode_delta_stream(io.BytesIO(blob), pkg.manifest)
    assert read == blob and set(tensors) == set(pkg.state_dict)


def test_metadata_round_trips_over_the_wire_and_bad_fields_are_named():
    meta = DeltaMetadata("leg", "3", 5, {"right soleus": 0.9, "left soleus": float("nan")}, "0.1", "a" * 64)
    wire = meta.to_wire(b"delta")
    assert wire["dice_per_label"] == {"right soleus": 0.9} and len(wire["idempotency_key"]) == 40
    assert wire == meta.to_wire(b"delta") != meta.to_wire(b"other")  # the key follows the content
    parsed, key = DeltaMetadata.from_wire(json.dumps(wire))
    assert key == wire["idempotency_key"] and parsed.parent_sha256 == "a" * 64 and parsed.n_slices == 5
    for change, field in [({"n_slices": 0}, "n_slices"), ({"n_slices": True}, "n_slices"),
                          ({"dice_per_label": {"x": 7.0}}, "Dice"), ({"idempotency_key": "short"}, "idempotency_key"),
                          ({"dice_per_label": {"x": 10 ** 400}}, "Dice"),  # float() of it overflows: a 422, not a 500
                          ({"extra": 1}, "extra"), ({"parent_sha256": "no"}, "parent_sha256"),
                          ({"parent_version": "1.local-ab"}, "parent_version"),
                          ({"parent_version": "1\n"}, "parent_version"),  # "$" alone would let the newline through
                          ({"idempotency_key": "abcdefgh03\n"}, "idempotency_key"),
                          ({"client_version": "\ud800"}, "client_version"),  # the database could not store it: a 500
                          ({"client_version": "a\u0000b"}, "client_version"),
                          ({"dice_per_label": {"x\u0007": 0.5}}, "Dice")]:
        with pytest.raises(ValueError, match=field):
            DeltaMetadata.from_wire(json.dumps({**wire, **change}))
    with pytest.raises(ValueError, match="not valid JSON"):
        DeltaMetadata.from_wire("[" * 100_000)
