"""Weight deltas: what a site uploads instead of a whole model, and the metadata that travels with it.

A delta is ``child - parent`` for every floating tensor of the state dict, stored as fp16
safetensors and compressed with zlib (``delta.safetensors.zz``). Its small JSON metadata
(``delta.json`` on disk, the ``metadata`` form field on the wire) names the model family and the
parent version it applies to. This module is the one home of that format: the fine-tuning step
writes it, the client sends it and the server parses it with the same code.

Nothing in a delta can execute code, and a hostile one cannot make the reader allocate more than
the model's own size: decoding inflates only the safetensors header first, checks every tensor
name, shape and dtype against the parent's manifest, then inflates exactly the bytes that header
implies (nothing after the zlib stream), and checks finiteness before any value is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import IO, Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dafne_logic.core.errors import ModelError
from dafne_logic.inference.manifest import Manifest
from dafne_logic.inference.model_package import check_tensor_shapes

DELTA_NAME = "delta.safetensors.zz"  # what `finetune` writes and `sync push` uploads
DELTA_METADATA_NAME = "delta.json"
DELTA_DTYPE = torch.float16
MAX_HEADER_BYTES = 1 << 20  # a thigh model's header is ~10 kB; anything near 1 MB is hostile
DEFAULT_MAX_DELTA_BYTES = 64 << 20  # decompressed size limit
_READ_CHUNK = 64 << 10  # compressed bytes read at a time
_FOREIGN_FORMATS = {  # leading bytes of things that are not a delta, for a clearer refusal
    b"\x80": "a Python pickle",
    b"PK\x03\x04": "a zip archive (e.g. a torch checkpoint)",
    b"\x89HDF": "an HDF5 file (e.g. a Keras model)",
}


def make_delta(parent: dict[str, torch.Tensor], child: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``child - parent`` per tensor (fp32 arithmetic), cast to fp16. Model packages hold only
    floating tensors (checked on load), so every tensor has a delta."""
    if set(parent) != set(child):
        raise ValueError("parent and child state dicts have different tensor names")
    return {k: (child[k].float() - parent[k].float()).to(DELTA_DTYPE).contiguous() for k in sorted(parent)}


def apply_delta(parent: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``parent + scale * delta`` in fp32; tensors absent from the delta are copied."""
    return {k: (v.float() + scale * delta[k].float()) if k in delta else v.clone() for k, v in parent.items()}


def weights_norm(tensors: dict[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors (a delta's, or a model's weights), computed in fp32.

    The one norm of both sides of the upload check: the client's report and the server's bound.
    """
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in tensors.values()])))


def encode_delta(delta: dict[str, torch.Tensor]) -> bytes:
    """Delta → compressed bytes (zlib level 6 over fp16 safetensors)."""
    return zlib.compress(save_safetensors_bytes({k: v.to(DELTA_DTYPE).contiguous() for k, v in delta.items()}), 6)


class _Inflater:
    """Inflate a zlib stream read from ``source`` in chunks, never holding more output than asked for.

    ``compressed`` keeps every byte read (what the server stores); it never exceeds what the
    requested output needs plus one read chunk.
    """

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.decompressor = zlib.decompressobj()
        self.compressed = bytearray()
        self.out = bytearray()
        self._pending = b""  # compressed input not yet consumed because the output was full

    def inflate_to(self, size: int) -> None:
        """Grow ``out`` to ``size`` bytes (fewer only when the stream ends first)."""
        while len(self.out) < size and not self.decompressor.eof:
            if not self._pending:
                self._pending = self.source.read(_READ_CHUNK)
                if not self._pending:
                    break
                if not self.compressed:
                    _refuse_foreign(self._pending)
                self.compressed += self._pending
            try:
                self.out += self.decompressor.decompress(self._pending, size - len(self.out))
            except zlib.error as exc:
                raise ModelError(f"delta is not zlib-compressed safetensors ({exc})") from exc
            self._pending = self.decompressor.unconsumed_tail

    def finish(self) -> None:
        """Require the zlib stream to end here, without another byte of output and nothing after it."""
        end = len(self.out)
        self.inflate_to(end + 1)  # the end-of-stream marker and checksum may still be unread
        if len(self.out) > end:
            raise ModelError("delta holds more data than its safetensors header describes")
        if not self.decompressor.eof:
            raise ModelError("delta is truncated (its zlib stream does not end)")
        if self.decompressor.unused_data or self.source.read(1):
            raise ModelError("delta has bytes after the end of its zlib stream; refused")


def _refuse_foreign(head: bytes) -> None:
    for magic, what in _FOREIGN_FORMATS.items():
        if head.startswith(magic):
            raise ModelError(f"delta is {what}, not zlib-compressed safetensors")


def _read_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ModelError(f"delta safetensors header is not JSON ({why})") from None
    if not isinstance(header, dict):
        raise ModelError("delta safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def _tensor_shapes(header: dict[str, Any]) -> dict[str, list[int]]:
    """Names → shapes of a header's tensors, each entry checked for type and dtype."""
    shapes = {}
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
            raise ModelError(f"delta tensor {name[:80]!r} has no valid shape (a list of non-negative integers)")
        if entry.get("dtype") != "F16":
            raise ModelError("delta tensors must all be float16")
        shapes[name] = shape
    return shapes


def decode_delta(blob: bytes | IO[bytes], manifest: Manifest,
                 max_bytes: int = DEFAULT_MAX_DELTA_BYTES) -> dict[str, torch.Tensor]:
    """Compressed bytes (or a binary file positioned at them) → validated delta for ``manifest``'s model.

    Memory stays bounded by the model's own fp16 size: the header is checked before the tensors
    are inflated, and no more than the header implies is inflated.

    Raises:
        ModelError: not zlib, oversized, malformed safetensors header, wrong names/shapes/dtype,
            bytes after the zlib stream, or non-finite values.
    """
    source = io.BytesIO(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else blob
    return decode_delta_stream(source, manifest, max_bytes)[0]


def decode_delta_stream(source: IO[bytes], manifest: Manifest,
                        max_bytes: int = DEFAULT_MAX_DELTA_BYTES) -> tuple[dict[str, torch.Tensor], bytes]:
    """Like :func:`decode_delta`, reading ``source`` in chunks; also returns the compressed bytes read."""
    inflater = _Inflater(source)
    inflater.inflate_to(8)
    if len(inflater.out) < 8:
        raise ModelError("delta is too short to be safetensors")
    (header_len,) = struct.unpack("<Q", inflater.out[:8])
    if header_len > MAX_HEADER_BYTES:
        raise ModelError(f"delta safetensors header claims {header_len} bytes; refused")
    inflater.inflate_to(8 + header_len)
    if len(inflater.out) < 8 + header_len:
        raise ModelError(f"delta safetensors header claims {header_len} bytes; refused (the delta is shorter)")
    found = _tensor_shapes(_read_header(bytes(inflater.out[8:8 + header_len])))
    check_tensor_shapes(found, manifest.tensors, "delta")
    total = 8 + header_len + sum(2 * math.prod(shape) for shape in found.values())
    if total > max_bytes:
        raise ModelError(f"delta decompresses to more than {max_bytes} bytes")
    inflater.inflate_to(total)
    inflater.finish()
    if len(inflater.out) != total:
        raise ModelError("delta is shorter than its safetensors header describes")
    try:
        tensors = load_safetensors_bytes(bytes(inflater.out))
    except Exception as exc:  # the Rust parser's own errors: offsets that overlap or leave gaps
        raise ModelError(f"delta is not a readable safetensors file ({exc})") from exc
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ModelError(f"delta tensor {name} contains NaN or Inf")
    return tensors, bytes(inflater.compressed)


# --- metadata -------------------------------------------------------------------------------------

_SERVER_VERSION = re.compile(r"^[0-9]{1,9}$")
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{8,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_SLICES = 100_000
MAX_LABELS = 256
MAX_NAME_CHARS = 64  # family and client version
MAX_LABEL_CHARS = 128


@dataclass
class DeltaMetadata:
    """The JSON that travels with a delta. Nothing in it identifies a patient.

    On disk (``delta.json``) it is :meth:`to_json`; on the wire it is :meth:`to_wire`, which the
    server parses back with :meth:`from_wire`.
    """

    family: str  # model family on the server, e.g. "thigh"
    parent_version: str
    n_slices: int  # number of corrected slices trained on
    dice_per_label: dict[str, float]  # automatic vs corrected segmentation, by muscle name (NaN: label absent)
    client_version: str = ""
    parent_sha256: str = ""  # sha256 of the parent's weights file; the server checks it when given

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "parent_version": self.parent_version,
            "n_slices": self.n_slices,
            "dice_per_label": self.dice_per_label,
            "client_version": self.client_version,
            "parent_sha256": self.parent_sha256,
        }

    @classmethod
    def from_json(cls, data: Any) -> DeltaMetadata:
        """Read ``delta.json`` (fields this version does not know are ignored).

        Raises:
            ValueError: naming the first missing field or field of the wrong type (a hand-edited file).
        """
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for name in ("family", "parent_version", "n_slices", "dice_per_label"):
            if name not in data:
                raise ValueError(f"{name}: field required")
        for name in ("family", "parent_version", "client_version", "parent_sha256"):
            if not isinstance(data.get(name, ""), str):
                raise ValueError(f"{name}: not text")
        n_slices = data["n_slices"]
        if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 0:
            raise ValueError("n_slices: not a whole number of slices")
        dice = data["dice_per_label"]
        # NaN (written as NaN, or null by a strict JSON tool) marks a label absent from the case.
        if not isinstance(dice, dict) or not all(
                isinstance(v, float) and math.isnan(v) or v is None or _is_number(v) and 0.0 <= v <= 1.0
                for v in dice.values()):
            raise ValueError("dice_per_label: not an object of Dice values in [0, 1] by muscle name")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "dice_per_label"},
                   dice_per_label={str(k): math.nan if v is None else float(v) for k, v in dice.items()})

    def to_wire(self, delta_blob: bytes, idempotency_key: str | None = None) -> dict[str, Any]:
        """The upload's ``metadata`` field. Labels absent from the case (NaN Dice) are not sent.

        The idempotency key defaults to a digest of the delta and this metadata, so the same
        delta pushed twice is one update.
        """
        wire: dict[str, Any] = {
            "parent_version": self.parent_version,
            "n_slices": int(self.n_slices),
            "dice_per_label": {k: float(v) for k, v in self.dice_per_label.items() if not math.isnan(v)},
            "family": self.family,
            "client_version": self.client_version[:MAX_NAME_CHARS],
        }
        if self.parent_sha256:
            wire["parent_sha256"] = self.parent_sha256
        if idempotency_key is None:
            digest = hashlib.sha256(delta_blob)
            digest.update(json.dumps(wire, sort_keys=True).encode("utf-8"))
            idempotency_key = digest.hexdigest()[:40]
        return {**wire, "idempotency_key": idempotency_key}

    @classmethod
    def from_wire(cls, text: str | bytes) -> tuple[DeltaMetadata, str]:
        """Parse and check an upload's ``metadata`` field; returns it and its idempotency key.

        ``family`` may be left out (then ``""``): the upload's URL names it.

        Raises:
            ValueError: one sentence naming the first field that is wrong.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError("metadata: not valid JSON") from None
        if not isinstance(data, dict):
            raise ValueError("metadata: not a JSON object")
        fields = {*cls.__dataclass_fields__, "idempotency_key"}
        extra = sorted(set(data) - fields)
        if extra:
            raise ValueError(f"metadata: extra fields are not allowed: {extra[:3]}")
        for name in ("parent_version", "n_slices", "idempotency_key"):
            if name not in data:
                raise ValueError(f"metadata: {name}: field required")

        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"metadata: {name}: {what}")

        def text_field(name: str, pattern: re.Pattern | None = None, max_chars: int = MAX_NAME_CHARS) -> str:
            value = data.get(name)
            if value is None and name in ("family", "client_version", "parent_sha256"):
                return ""
            if not isinstance(value, str):
                raise ValueError(f"metadata: {name}: not a string")
            # fullmatch: "$" alone lets a trailing newline through; isprintable: no control characters or lone
            # surrogates, which a database refuses with an error instead of a clear 422.
            check(name, len(value) <= max_chars and value.isprintable()
                  and (pattern is None or not value or pattern.fullmatch(value) is not None),
                  f"not a valid value{f' (pattern {pattern.pattern})' if pattern else ' (printable text)'}")
            return value

        version, key = text_field("parent_version", _SERVER_VERSION), text_field("idempotency_key", _IDEMPOTENCY_KEY, 128)
        check("parent_version", bool(version), "required")
        n_slices = data["n_slices"]
        check("n_slices", isinstance(n_slices, int) and not isinstance(n_slices, bool) and 1 <= n_slices <= MAX_SLICES,
              f"must be an integer from 1 to {MAX_SLICES}")
        dice = data.get("dice_per_label", {})
        check("dice_per_label", isinstance(dice, dict) and len(dice) <= MAX_LABELS, f"at most {MAX_LABELS} labels")
        check("dice_per_label", all(len(k) <= MAX_LABEL_CHARS and k.isprintable() and _is_number(v) and 0.0 <= v <= 1.0
                                    for k, v in dice.items()),
              f"Dice values must be finite, in [0, 1], with label names of at most {MAX_LABEL_CHARS} printable characters")
        metadata = cls(family=text_field("family"), parent_version=version, n_slices=n_slices,
                       dice_per_label={k: float(v) for k, v in dice.items()},
                       client_version=text_field("client_version"), parent_sha256=text_field("parent_sha256", _SHA256))
        return metadata, key


def _is_number(value: Any) -> bool:
    """A finite int or float (not bool). A JSON integer of hundreds of digits is not: float() of it overflows."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
