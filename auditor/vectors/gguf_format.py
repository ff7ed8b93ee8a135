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
from auditor.vectors.common import DIRECTION_NAME, RawVectors, Spec, check_dimension, parse_layer_key
from auditor.vectors.metadata import MAX_METADATA_CHARS, MAX_METADATA_ENTRIES

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

# The header scan that runs before GGUFReader bounds what the reader will walk: it loops once per
# declared item and, past the end of the buffer, reads zero-size scalars without complaint (a
# 40-byte file declaring an array of 2**62 items hung it), and it builds numpy views for every
# array item (a 4 MiB file of big arrays took 11 s and +790 MiB). So: at most one tensor per layer,
# the shared metadata bounds (auditor.vectors.metadata) on keys and on bytes of keys and strings,
# and no arrays at all. No control-vector writer emits an array: repeng's export_gguf and
# llama.cpp's cvector-generator write general.architecture, controlvector.model_hint (string) and
# controlvector.layer_count (uint32 / int32), and other writers add at most scalar flags.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_FLOAT_TYPES = {"F32", "F16", "F64"}


def read_gguf(data: bytes, spec: Spec) -> tuple[RawVectors, dict]:
    _scan_gguf_header(data, spec)
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        reader = GGUFReader(handle)  # memory-maps the open file
        metadata = _gguf_metadata(reader)
        raw = [_gguf_direction(tensor, spec.d_model) for tensor in reader.tensors]
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


def _gguf_direction(tensor: Any, d_model: int) -> tuple[int, np.ndarray]:
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
    check_dimension(layer, ne[0], d_model)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are reported by the caller
        return layer, np.array(tensor.data, dtype=np.float64).reshape(-1)


def _scan_gguf_header(data: bytes, spec: Spec) -> None:
    """Walk the GGUF header with bounds checks, so GGUFReader is only handed a header the size of
    a control vector's: no more items than the file holds, no arrays, bounded metadata."""
    if len(data) < 24 or data[:4] != b"GGUF":
        raise InvalidInputError("malformed gguf payload: missing the GGUF magic and header")
    order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
    version, tensor_count, kv_count = struct.unpack_from(order + "IQQ", data, 4)
    if version not in (2, 3):
        raise InvalidInputError(f"malformed gguf payload: unsupported GGUF version {version}")
    if tensor_count > spec.n_layers:
        raise InvalidInputError(
            f"GGUF file declares {tensor_count} tensors, more than one per layer of a {spec.n_layers}-layer model"
        )
    if kv_count > MAX_METADATA_ENTRIES:
        raise InvalidInputError(f"GGUF file declares {kv_count} metadata keys; the limit is {MAX_METADATA_ENTRIES}")
    cursor = _GGUFCursor(data, order, 24)
    for _ in range(kv_count):
        key = cursor.string()
        vtype = cursor.u32()
        if vtype == _GGUF_ARRAY:
            raise InvalidInputError(
                f"GGUF metadata arrays are not accepted ({key.decode('utf-8', 'replace')!r}): a control vector has none"
            )
        cursor.value(vtype)
    if cursor.text_bytes > MAX_METADATA_CHARS:
        raise InvalidInputError(
            f"GGUF metadata holds {cursor.text_bytes:,} bytes of keys and strings, more than the limit of "
            f"{MAX_METADATA_CHARS:,}"
        )
    for _ in range(tensor_count):
        cursor.string()
        n_dims = cursor.u32()
        if n_dims > 4:
            raise InvalidInputError(f"malformed gguf payload: tensor with {n_dims} dimensions")
        cursor.skip(8 * n_dims + 4 + 8)  # dims, ggml type, data offset


class _GGUFCursor:
    def __init__(self, data: bytes, order: str, pos: int) -> None:
        self.data, self.order, self.pos = data, order, pos
        self.text_bytes = 0  # of metadata keys and string values read so far

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

    def string(self) -> bytes:
        length = self._unpack("Q")
        start = self.pos
        self.skip(length)
        self.text_bytes += length
        return self.data[start : start + min(length, 200)]  # enough to name a key in a message

    def value(self, vtype: int) -> None:
        if vtype in _GGUF_SCALAR_SIZES:
            self.skip(_GGUF_SCALAR_SIZES[vtype])
        elif vtype == _GGUF_STRING:
            self.string()
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
