"""GGUF control vectors (the llama.cpp / repeng format): decoding and encoding.

The header is walked with bounds checks (`_scan_gguf_header`) before gguf's GGUFReader sees the
file, since the reader trusts the counts a header declares. How tensor `direction.<N>` maps to our
block index is explained at `_GGUF_LAYER_MAPPING` below.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from auditor.errors import InvalidInputError
from auditor.vectors.common import DIRECTION_NAME, RawVectors, Spec, parse_layer_key

# --- GGUF control vectors -----------------------------------------------------------------------
#
# _GGUF_LAYER_MAPPING: tensor `direction.N` <-> our layer N (0-based block index), no offset.
#
# Why, from the code that writes and applies these files:
# - llama.cpp applies them. `common_control_vector_load_one` (common/common.cpp) parses N from
#   the tensor name, rejects N == 0 ("invalid (zero) direction tensor layer index": the whole
#   file is then refused) and stores direction.N at data[n_embd * (N - 1)] ("layer 1 at [0]").
#   `llama_control_vector_apply` (src/llama-adapter.cpp) copies data[n_embd * (il - 1)] into
#   tensors[il] for il = 1 .. n_layer - 1 ("there's never a tensor for layer 0"), and every model
#   graph ends block `il` (0-based loop over the decoder blocks) with
#   `cur = ggml_add(cur, ffn_inp); cur = build_cvec(cur, il); cb(cur, "l_out", il)`.
#   So direction.N is added to the output of 0-based block N, which is exactly
#   blocks.N.hook_resid_post. Block 0 can never be steered by llama.cpp.
# - repeng writes them. `ControlVector.export_gguf` (vgel/repeng, repeng/extract.py) writes
#   `direction.{layer}` for each key of `directions`; those keys index `model.model.layers`
#   (0-based blocks): `ControlModel` adds directions[i] to the output of layers[i], and
#   `batched_get_hiddens` reads `hidden_states[layer + 1]` ("account for embedding hiddens":
#   HF's hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i).
#   Its default layers, range(-1, -num_hidden_layers, -1) normalised to n + i, are blocks
#   n-1 .. 1 -- never block 0, consistent with llama.cpp.
# - Caveat, not a format difference: llama.cpp's own cvector-generator names the vector it
#   extracted from `l_out` of block il `direction.{il + 1}` (pca.hpp / mean.hpp), so its files are
#   read one block before the block they are applied to. We follow where a vector is *applied*,
#   since that is what the file means to every consumer.
#
# Metadata keys (repeng and cvector-generator agree; llama.cpp's loader ignores all metadata):
# general.architecture = "controlvector", controlvector.model_hint (the model's type/arch),
# controlvector.layer_count (number of direction tensors; repeng writes it as uint32).
GGUF_ARCH = "controlvector"
_GGUF_MODEL_HINT = f"{GGUF_ARCH}.model_hint"
_GGUF_LAYER_COUNT = f"{GGUF_ARCH}.layer_count"

# Bounds for the header scan that runs before GGUFReader: the reader loops once per declared item
# and, past the end of the buffer, reads zero-size scalars without complaint, so a 40-byte file
# declaring an array of 2**62 items would hang it. A control vector has no arrays and one tensor
# per layer; these limits are far above anything legitimate.
_GGUF_MAX_TENSORS = 65_536
_GGUF_MAX_KV = 4_096
_GGUF_MAX_ARRAY = 65_536
_GGUF_MAX_DEPTH = 4
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_FLOAT_TYPES = {"F32", "F16", "F64"}


def read_gguf(data: bytes, spec: Spec) -> tuple[RawVectors, dict]:
    _scan_gguf_header(data)
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        reader = GGUFReader(handle)  # memory-maps the open file
        metadata = _gguf_metadata(reader)
        raw = [_gguf_direction(tensor) for tensor in reader.tensors]
        del reader
    return raw, metadata


def _gguf_metadata(reader: Any) -> dict:
    arch = _gguf_field(reader, "general.architecture", str)
    if arch is not None and arch != GGUF_ARCH:
        raise InvalidInputError(f"GGUF general.architecture is {arch!r}, not {GGUF_ARCH!r}: not a control vector file")
    metadata: dict[str, Any] = {}
    hint = _gguf_field(reader, _GGUF_MODEL_HINT, str)
    if hint:
        metadata["model_hint"] = hint
    count = _gguf_field(reader, _GGUF_LAYER_COUNT, int)
    if count is not None:
        metadata["layer_count"] = count
    return metadata


def _gguf_field(reader: Any, key: str, kind: type) -> Any:
    found = reader.get_field(key)
    if found is None:
        return None
    if kind is str:
        if found.types != [GGUFValueType.STRING]:
            raise InvalidInputError(f"GGUF field {key} is not a string")
        return bytes(found.parts[-1]).decode("utf-8")
    if len(found.types) != 1 or found.types[0] not in reader.gguf_scalar_to_np:
        raise InvalidInputError(f"GGUF field {key} is not a number")
    value = found.parts[-1].tolist()[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInputError(f"GGUF field {key} is not an integer")
    return value


def _gguf_direction(tensor: Any) -> tuple[int, np.ndarray]:
    match = DIRECTION_NAME.fullmatch(tensor.name)
    if not match:
        raise InvalidInputError(
            f"unexpected GGUF tensor {tensor.name!r}: a control vector has only direction.<layer> tensors"
        )
    layer = parse_layer_key(match.group(1), f"tensor {tensor.name!r}")  # _GGUF_LAYER_MAPPING
    type_name = tensor.tensor_type.name
    if type_name not in _GGUF_FLOAT_TYPES:
        raise InvalidInputError(f"GGUF tensor {tensor.name!r} has type {type_name}, expected F32")
    ne = [int(n) for n in tensor.shape]  # ggml order: ne[0] is the contiguous dimension
    if any(n != 1 for n in ne[1:]):
        raise InvalidInputError(f"GGUF tensor {tensor.name!r} has shape {ne}, expected a 1-D vector")
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are reported by the caller
        return layer, np.array(tensor.data, dtype=np.float64).reshape(-1)


def _scan_gguf_header(data: bytes) -> None:
    """Walk the GGUF header with bounds checks, so GGUFReader is never handed a header that
    declares more items than the file holds (it would loop over them, reading nothing)."""
    if len(data) < 24 or data[:4] != b"GGUF":
        raise InvalidInputError("malformed gguf payload: missing the GGUF magic and header")
    order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
    version, tensor_count, kv_count = struct.unpack_from(order + "IQQ", data, 4)
    if version not in (2, 3):
        raise InvalidInputError(f"malformed gguf payload: unsupported GGUF version {version}")
    if tensor_count > _GGUF_MAX_TENSORS or kv_count > _GGUF_MAX_KV:
        raise InvalidInputError(
            f"malformed gguf payload: declares {tensor_count} tensors and {kv_count} metadata "
            f"keys (limits {_GGUF_MAX_TENSORS} and {_GGUF_MAX_KV})"
        )
    cursor = _GGUFCursor(data, order, 24)
    for _ in range(kv_count):
        cursor.string()
        cursor.value(cursor.u32(), depth=0)
    for _ in range(tensor_count):
        cursor.string()
        n_dims = cursor.u32()
        if n_dims > 4:
            raise InvalidInputError(f"malformed gguf payload: tensor with {n_dims} dimensions")
        cursor.skip(8 * n_dims + 4 + 8)  # dims, ggml type, data offset


class _GGUFCursor:
    def __init__(self, data: bytes, order: str, pos: int) -> None:
        self.data, self.order, self.pos = data, order, pos

    def skip(self, n: int) -> None:
        if n > len(self.data) - self.pos:
            raise InvalidInputError(f"malformed gguf payload: header runs past the end of the file at byte {self.pos}")
        self.pos += n

    def _unpack(self, fmt: str) -> int:
        start = self.pos
        self.skip(struct.calcsize(fmt))
        return struct.unpack_from(self.order + fmt, self.data, start)[0]

    def u32(self) -> int:
        return self._unpack("I")

    def string(self) -> None:
        self.skip(self._unpack("Q"))

    def value(self, vtype: int, depth: int) -> None:
        if vtype in _GGUF_SCALAR_SIZES:
            self.skip(_GGUF_SCALAR_SIZES[vtype])
        elif vtype == _GGUF_STRING:
            self.string()
        elif vtype == _GGUF_ARRAY and depth < _GGUF_MAX_DEPTH:
            item_type, count = self.u32(), self._unpack("Q")
            if count > _GGUF_MAX_ARRAY:
                raise InvalidInputError(
                    f"malformed gguf payload: metadata array of {count} items (limit {_GGUF_MAX_ARRAY})"
                )
            if item_type in _GGUF_SCALAR_SIZES:
                self.skip(count * _GGUF_SCALAR_SIZES[item_type])
            else:
                for _ in range(count):
                    self.value(item_type, depth + 1)
        else:
            raise InvalidInputError(f"malformed gguf payload: unknown GGUF value type {vtype}")


def write_gguf(arrays: dict[int, np.ndarray], metadata: dict) -> bytes:
    hint = metadata.get("model_hint", "")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vectors.gguf"
        writer = GGUFWriter(path, GGUF_ARCH)  # writes general.architecture = "controlvector"
        # The same keys and types as repeng's ControlVector.export_gguf.
        writer.add_string(_GGUF_MODEL_HINT, str(hint))
        writer.add_uint32(_GGUF_LAYER_COUNT, len(arrays))
        for layer, vector in arrays.items():
            writer.add_tensor(f"direction.{layer}", vector)  # _GGUF_LAYER_MAPPING: no offset
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()
