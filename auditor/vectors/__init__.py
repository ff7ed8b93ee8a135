"""Read and write per-layer concept vectors as JSON, safetensors or GGUF control vectors.

A vector set maps a layer -- the 0-based TransformerLens block index, whose
`blocks.{layer}.hook_resid_post` the vector is read from or added to -- to a 1-D float32 direction
of length d_model. Everything that comes in is untrusted: `parse_vectors` either returns unit
vectors that passed every check or raises `InvalidInputError` saying what was wrong; no parser's
own exception escapes. The magnitude each vector arrived with is kept in
`metadata["original_norms"]` (control vectors are often not unit length: their strength is
folded into the norm, while here it lives in alpha), and `export_vectors` writes it back, so a
file survives parse -> export -> parse unchanged.

GGUF layer numbering (how `direction.<N>` maps to our block index) is explained at
`_GGUF_LAYER_MAPPING` below.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, NamedTuple

import numpy as np
import torch

from auditor.errors import InvalidInputError
from auditor.schemas import unstorable
from probes.validation import MIN_NORM, check_layer

FORMATS = ("json", "safetensors", "gguf")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_EXTENSIONS = {".json": "json", ".safetensors": "safetensors", ".gguf": "gguf"}
_LAYER_KEY = re.compile(r"-?[0-9]+")
_DIRECTION_NAME = re.compile(r"direction\.(.*)", re.DOTALL)
_RESERVED_METADATA = ("original_norms",)  # recomputed from the data on every parse

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


@dataclass(frozen=True)
class VectorSet:
    """Per-layer unit directions: {layer: float32 tensor [d_model]} plus free-form metadata."""

    vectors: dict[int, torch.Tensor]
    metadata: dict = field(default_factory=dict)


class _Spec(NamedTuple):
    d_model: int
    n_layers: int
    layer: int | None


# --- public API -----------------------------------------------------------------------------------


def parse_vectors(
    data: bytes,
    fmt: str,
    *,
    d_model: int,
    n_layers: int,
    layer: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> VectorSet:
    """Decode and validate a vector set. Raises InvalidInputError naming what was wrong.

    `layer` says which layer a payload that does not name its own belongs to (a bare JSON list,
    a safetensors `vector` tensor); it must agree with a JSON {"layer": L, "vector": [...]}.
    """
    spec = _Spec(_positive_int(d_model, "d_model"), _positive_int(n_layers, "n_layers"), layer)
    if layer is not None:
        check_layer(layer, spec.n_layers)
    if fmt not in _READERS:
        raise InvalidInputError(f"unknown vector format {fmt!r}: expected one of {FORMATS}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise InvalidInputError(f"payload is {len(data)} bytes, larger than the limit of {max_bytes} bytes")
    try:
        raw, file_metadata = _READERS[fmt](data, spec)
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"malformed {fmt} payload: {_describe(exc)}") from exc
    return _validated_set(raw, file_metadata, spec)


def export_vectors(vector_set: VectorSet, fmt: str, *, model_hint: str = "", for_llama_cpp: bool = False) -> bytes:
    """Encode a vector set; `parse_vectors` reads the result back to the same set.

    Each vector is written at its original norm (metadata["original_norms"], else its own norm),
    so the file carries the strength it came with. `model_hint` (default: metadata["model_hint"])
    names the model the vectors belong to. GGUF tensors are `direction.<layer>`, which llama.cpp
    adds to the output of that same block; llama.cpp cannot steer block 0 and refuses a whole file
    that contains direction.0, so `for_llama_cpp=True` rejects a set that has layer 0.
    """
    if fmt not in _WRITERS:
        raise InvalidInputError(f"unknown vector format {fmt!r}: expected one of {FORMATS}")
    if not isinstance(vector_set, VectorSet):
        raise InvalidInputError(f"expected a VectorSet, got {type(vector_set).__name__}")
    if not isinstance(model_hint, str):
        raise InvalidInputError(f"model_hint must be a string, got {type(model_hint).__name__}")
    arrays = _arrays_for_export(vector_set)
    if for_llama_cpp and 0 in arrays:
        raise InvalidInputError(
            "layer 0 cannot be exported for llama.cpp: it never steers block 0 and rejects a "
            "control vector file containing direction.0"
        )
    metadata = {k: v for k, v in vector_set.metadata.items() if k not in _RESERVED_METADATA}
    hint = model_hint or metadata.get("model_hint") or ""
    if hint:
        metadata["model_hint"] = str(hint)
    return _WRITERS[fmt](arrays, metadata)


def sniff_format(filename: str | None, data: bytes) -> str:
    """The format of a payload: by file extension, else by magic bytes, else JSON."""
    if filename:
        fmt = _EXTENSIONS.get(PurePath(filename).suffix.lower())
        if fmt:
            return fmt
    head = bytes(data[:9])
    if head[:4] == b"GGUF":
        return "gguf"
    if len(data) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len <= len(data):
            return "safetensors"
    return "json"


# --- validation shared by every format -----------------------------------------------------------


def _validated_set(raw: list[tuple[int, np.ndarray]], file_metadata: dict, spec: _Spec) -> VectorSet:
    if not raw:
        raise InvalidInputError("the payload contains no vectors")
    vectors: dict[int, torch.Tensor] = {}
    norms: dict[int, float] = {}
    for layer, values in raw:
        if layer in vectors:
            raise InvalidInputError(f"duplicate vectors for layer {layer}")
        if not 0 <= layer < spec.n_layers:
            raise InvalidInputError(
                f"layer {layer} is out of range [0, {spec.n_layers}) for a {spec.n_layers}-layer model"
            )
        vectors[layer], norms[layer] = _unit_vector(layer, values, spec.d_model)
    # Metadata is stored as the concept's provenance (JSON): text with a NUL or an unpaired
    # surrogate, and NaN or infinity, would fail that write (Postgres refuses all of them).
    if problem := unstorable(file_metadata, "the file's metadata", finite=True):
        raise InvalidInputError(problem)
    metadata = dict(file_metadata)
    metadata["original_norms"] = {layer: norms[layer] for layer in sorted(norms)}
    ordered = {layer: vectors[layer] for layer in sorted(vectors)}
    return VectorSet(vectors=ordered, metadata=metadata)


def _unit_vector(layer: int, values: np.ndarray, d_model: int) -> tuple[torch.Tensor, float]:
    values = np.asarray(values)
    if values.ndim != 1:
        raise InvalidInputError(f"layer {layer}: vector must be 1-D, got shape {list(values.shape)}")
    if values.shape[0] != d_model:
        raise InvalidInputError(f"layer {layer}: vector has dimension {values.shape[0]}, expected d_model={d_model}")
    with np.errstate(over="ignore", invalid="ignore"):
        as_f32 = values.astype(np.float32)  # a float64 beyond float32's range becomes inf here
    finite = np.isfinite(as_f32)
    if not finite.all():
        first = int(np.argmin(finite))
        raise InvalidInputError(
            f"layer {layer}: vector contains {int((~finite).sum())} NaN or Inf value(s) "
            f"(first at index {first}: {as_f32[first]})"
        )
    wide = as_f32.astype(np.float64)  # float32 squares overflow near 1e19
    norm = float(np.linalg.norm(wide))
    if norm < MIN_NORM:
        raise InvalidInputError(
            f"layer {layer}: vector norm {norm:.3g} is zero or below {MIN_NORM:g}: it has no direction"
        )
    unit = (wide / norm).astype(np.float32)
    return torch.from_numpy(unit), norm


def _parse_layer_key(key: Any, where: str) -> int:
    """A layer named by text (a JSON key, a tensor-name suffix): decimal digits, optional '-'."""
    if not isinstance(key, str) or not _LAYER_KEY.fullmatch(key):
        raise InvalidInputError(f"{where}: layer {key!r} is not an integer")
    return int(key)


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


# --- JSON ----------------------------------------------------------------------------------------


class _JSONObject(dict):
    """A decoded JSON object that remembers its key/value pairs in order, duplicates included."""

    pairs: list[tuple[str, Any]]


def _json_object(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    obj.pairs = pairs
    return obj


def _read_json(data: bytes, spec: _Spec) -> tuple[list[tuple[int, np.ndarray]], dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"malformed JSON: not UTF-8 (bad byte at offset {exc.start})") from exc
    try:
        doc = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidInputError("malformed JSON: nested too deeply") from None

    if isinstance(doc, list):
        if spec.layer is None:
            raise InvalidInputError("a bare JSON list is a single vector: pass layer= to say which layer it is for")
        return [(spec.layer, _json_numbers(doc, f"layer {spec.layer}"))], {}
    if not isinstance(doc, dict):
        raise InvalidInputError(f"JSON must be a list of numbers or an object, got {_json_type(doc)}")
    _reject_duplicate_keys(doc, "the top-level JSON object")
    metadata = _json_metadata(doc)
    if "vectors" in doc:
        vectors = doc["vectors"]
        if not isinstance(vectors, dict):
            raise InvalidInputError(
                f'"vectors" must be an object mapping layer to a list of numbers, got {_json_type(vectors)}'
            )
        raw = [
            (_parse_layer_key(key, '"vectors"'), _json_numbers(value, f"layer {key}")) for key, value in vectors.pairs
        ]
        return raw, metadata
    if "vector" in doc:
        layer = _json_single_layer(doc, spec)
        return [(layer, _json_numbers(doc["vector"], f"layer {layer}"))], metadata
    raise InvalidInputError('JSON object must have "vectors" ({"<layer>": [...]}) or "layer" and "vector"')


def _json_single_layer(doc: dict, spec: _Spec) -> int:
    if "layer" not in doc:
        if spec.layer is None:
            raise InvalidInputError('a JSON "vector" needs a "layer" (or pass layer=)')
        return spec.layer
    layer = doc["layer"]
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InvalidInputError(f'"layer": {json.dumps(layer)} is not an integer')
    if spec.layer is not None and spec.layer != layer:
        raise InvalidInputError(f"the payload says layer {layer} but layer={spec.layer} was given")
    return layer


def _json_metadata(doc: dict) -> dict:
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidInputError(f'"metadata" must be an object, got {_json_type(metadata)}')
    return dict(metadata)


def _json_numbers(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise InvalidInputError(f"{where}: expected a list of numbers, got {_json_type(value)}")
    numbers = np.empty(len(value), dtype=np.float64)
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise InvalidInputError(
                f"{where}: element {i} is {_json_type(item)} {json.dumps(item)[:40]}, expected a number"
            )
        try:
            numbers[i] = item
        except OverflowError:
            numbers[i] = math.inf  # an integer too large for a float; reported as Inf below
    return numbers


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _reject_duplicate_keys(obj: _JSONObject, where: str) -> None:
    seen: set[str] = set()
    for key, _ in obj.pairs:
        if key in seen:
            raise InvalidInputError(f"duplicate key {key!r} in {where}")
        seen.add(key)


def _write_json(arrays: dict[int, np.ndarray], metadata: dict) -> bytes:
    doc = {
        "vectors": {str(layer): vector.tolist() for layer, vector in arrays.items()},
        "metadata": metadata,
    }
    try:
        return json.dumps(doc, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata cannot be written as JSON: {_describe(exc)}") from exc


# --- safetensors ---------------------------------------------------------------------------------


def _read_safetensors(data: bytes, spec: _Spec) -> tuple[list[tuple[int, np.ndarray]], dict]:
    from safetensors.torch import load

    metadata = _safetensors_metadata(data)
    tensors = load(data)
    if "vector" in tensors:
        if len(tensors) > 1:
            raise InvalidInputError(
                'a safetensors "vector" must be the only tensor; found also '
                f"{sorted(n for n in tensors if n != 'vector')[:5]}"
            )
        if spec.layer is None:
            raise InvalidInputError('a safetensors "vector" needs layer= to say which layer')
        return [(spec.layer, _tensor_values(tensors["vector"], "vector", ndim=1))], metadata

    raw: list[tuple[int, np.ndarray]] = []
    if "directions" in tensors:
        raw += _directions_rows(tensors["directions"], spec)
    for name in sorted(tensors, key=_natural_key):
        if name == "directions":
            continue
        match = _DIRECTION_NAME.fullmatch(name)
        if not match:
            raise InvalidInputError(
                f"unexpected safetensors tensor {name!r}: expected direction.<layer>, "
                '"directions" [n_layers, d_model] or a single "vector"'
            )
        layer = _parse_layer_key(match.group(1), f"tensor {name!r}")
        raw.append((layer, _tensor_values(tensors[name], name, ndim=1)))
    return raw, metadata


def _safetensors_metadata(data: bytes) -> dict:
    if len(data) < 8:
        raise InvalidInputError(f"malformed safetensors payload: only {len(data)} bytes")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise InvalidInputError(
            f"malformed safetensors payload: header length {header_len} exceeds the {len(data) - 8} bytes that follow"
        )
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    if not isinstance(header, dict):
        raise InvalidInputError("malformed safetensors payload: header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise InvalidInputError("malformed safetensors payload: __metadata__ is not an object")
    return dict(metadata)


def _directions_rows(tensor: torch.Tensor, spec: _Spec) -> list[tuple[int, np.ndarray]]:
    values = _tensor_values(tensor, "directions", ndim=2)
    if values.shape[0] != spec.n_layers:
        raise InvalidInputError(
            f'"directions" has {values.shape[0]} rows, expected one per layer (n_layers={spec.n_layers})'
        )
    return [(layer, values[layer]) for layer in range(values.shape[0])]


def _tensor_values(tensor: torch.Tensor, name: str, *, ndim: int) -> np.ndarray:
    if not tensor.dtype.is_floating_point:
        raise InvalidInputError(f"tensor {name!r} has dtype {tensor.dtype}, expected floats")
    if tensor.ndim != ndim:
        raise InvalidInputError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {ndim}-D")
    return tensor.detach().to("cpu", torch.float64).numpy()


def _natural_key(name: str) -> tuple[int, str]:
    match = _DIRECTION_NAME.fullmatch(name)
    suffix = match.group(1) if match else ""
    return (int(suffix), name) if _LAYER_KEY.fullmatch(suffix) else (0, name)


def _write_safetensors(arrays: dict[int, np.ndarray], metadata: dict) -> bytes:
    from safetensors.torch import save

    header_metadata = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"metadata key {key!r} is not a string")
        try:
            header_metadata[key] = value if isinstance(value, str) else json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"metadata {key!r} cannot be written: {_describe(exc)}") from exc
    tensors = {f"direction.{layer}": torch.from_numpy(vector.copy()) for layer, vector in arrays.items()}
    return save(tensors, metadata=header_metadata or None)


# --- GGUF ----------------------------------------------------------------------------------------


def _read_gguf(data: bytes, spec: _Spec) -> tuple[list[tuple[int, np.ndarray]], dict]:
    from gguf import GGUFReader

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
    from gguf import GGUFValueType

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
    match = _DIRECTION_NAME.fullmatch(tensor.name)
    if not match:
        raise InvalidInputError(
            f"unexpected GGUF tensor {tensor.name!r}: a control vector has only direction.<layer> tensors"
        )
    layer = _parse_layer_key(match.group(1), f"tensor {tensor.name!r}")  # _GGUF_LAYER_MAPPING
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


def _write_gguf(arrays: dict[int, np.ndarray], metadata: dict) -> bytes:
    from gguf import GGUFWriter

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


# --- export helpers ------------------------------------------------------------------------------


def _arrays_for_export(vector_set: VectorSet) -> dict[int, np.ndarray]:
    """float32 vectors at their original norms, checked as strictly as on the way in."""
    if not isinstance(vector_set.vectors, dict) or not vector_set.vectors:
        raise InvalidInputError("the vector set contains no vectors")
    norms = vector_set.metadata.get("original_norms") or {}
    if not isinstance(norms, dict):
        raise InvalidInputError("metadata['original_norms'] must map layer to norm")
    arrays: dict[int, np.ndarray] = {}
    d_model = None
    for layer in sorted(vector_set.vectors, key=_sort_key):
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise InvalidInputError(f"layer {layer!r} is not a non-negative integer")
        try:
            values = torch.as_tensor(vector_set.vectors[layer]).detach().to("cpu", torch.float64)
        except Exception as exc:
            raise InvalidInputError(f"layer {layer}: not a vector ({_describe(exc)})") from exc
        d_model = d_model if d_model is not None else (values.shape[0] if values.ndim else 0)
        unit, own_norm = _unit_vector(layer, values.numpy(), d_model)
        target = norms.get(layer, norms.get(str(layer), own_norm))
        if (
            isinstance(target, bool)
            or not isinstance(target, (int, float))
            or not math.isfinite(target)
            or target < MIN_NORM
        ):
            raise InvalidInputError(f"layer {layer}: original norm {target!r} is not usable")
        arrays[layer] = (unit.numpy().astype(np.float64) * float(target)).astype(np.float32)
    return arrays


def _sort_key(layer: Any) -> tuple[int, Any]:
    return (0, layer) if isinstance(layer, int) else (1, str(layer))


_READERS = {"json": _read_json, "safetensors": _read_safetensors, "gguf": _read_gguf}
_WRITERS = {"json": _write_json, "safetensors": _write_safetensors, "gguf": _write_gguf}
