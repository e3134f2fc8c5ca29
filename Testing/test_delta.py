"""Weight deltas: exact round trip within fp16, and hostile blobs refused before use."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from test_model_package import tiny_package

from dafne_logic.core.errors import ModelError
from dafne_logic.learning.delta import apply_delta, decode_delta, delta_norm, encode_delta, make_delta


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
    assert delta_norm(delta) > 0


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
        (zlib.compress(b"\0" * (1 << 20)), "more than"),
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
    assert delta_norm({}) == 0.0
