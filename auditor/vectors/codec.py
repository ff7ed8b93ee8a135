"""Read and write per-layer concept vectors in any supported format: the two entry points.

Everything that comes in is untrusted: `parse_vectors` either returns unit vectors that passed
every check or raises `InvalidInputError` saying what was wrong; no parser's own exception
escapes. The magnitude each vector arrived with is kept in `metadata["original_norms"]` (control
vectors are often not unit length: their strength is folded into the norm, while here it lives in
alpha), and `export_vectors` writes it back, so a file survives parse -> export -> parse unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from auditor.errors import InvalidInputError
from auditor.vectors.common import (
    DEFAULT_MAX_BYTES,
    FORMATS,
    RESERVED_METADATA,
    RawVectors,
    Spec,
    VectorSet,
    arrays_for_export,
    describe,
    positive_int,
    validated_set,
)
from auditor.vectors.gguf_format import read_gguf, write_gguf
from auditor.vectors.json_format import read_json, write_json
from auditor.vectors.safetensors_format import read_safetensors, write_safetensors
from probes.validation import check_layer

Reader = Callable[[bytes, Spec], tuple[RawVectors, dict]]
Writer = Callable[[dict[int, np.ndarray], dict], bytes]

_READERS: dict[str, Reader] = {"json": read_json, "safetensors": read_safetensors, "gguf": read_gguf}
_WRITERS: dict[str, Writer] = {"json": write_json, "safetensors": write_safetensors, "gguf": write_gguf}


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
    spec = Spec(positive_int(d_model, "d_model"), positive_int(n_layers, "n_layers"), layer)
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
        raise InvalidInputError(f"malformed {fmt} payload: {describe(exc)}") from exc
    return validated_set(raw, file_metadata, spec)


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
    arrays = arrays_for_export(vector_set)
    if for_llama_cpp and 0 in arrays:
        raise InvalidInputError(
            "layer 0 cannot be exported for llama.cpp: it never steers block 0 and rejects a "
            "control vector file containing direction.0"
        )
    metadata = {k: v for k, v in vector_set.metadata.items() if k not in RESERVED_METADATA}
    hint = model_hint or metadata.get("model_hint") or ""
    if hint:
        metadata["model_hint"] = str(hint)
    return _WRITERS[fmt](arrays, metadata)
