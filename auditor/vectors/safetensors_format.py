"""Vector sets as safetensors: decoding and encoding.

Accepted tensors: `direction.<layer>` (one 1-D vector per layer, what is written), a
`directions` matrix [n_layers, d_model] (row i is layer i), or a single `vector` for the layer the
caller names. The header's `__metadata__` (string to string) is the set's metadata; non-string
values are written as JSON text.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load, save

from auditor.errors import InvalidInputError
from auditor.vectors.common import (
    DIRECTION_NAME,
    LAYER_KEY,
    RawVectors,
    Spec,
    check_dimension,
    describe,
    parse_layer_key,
)
from auditor.vectors.metadata import MAX_ESCAPED_METADATA_BYTES

# A header entry for one tensor ('"direction.12":{"dtype":"F32","shape":[4096],"data_offsets":[...]}')
# is under 100 bytes; a header past what one tensor per layer and the metadata can take is refused
# before Python's json decodes it.
_HEADER_BYTES_PER_TENSOR = 256


def read_safetensors(data: bytes, spec: Spec) -> tuple[RawVectors, dict]:
    metadata = _safetensors_metadata(data, spec)
    tensors = load(data)
    if "vector" in tensors:
        if len(tensors) > 1:
            raise InvalidInputError(
                'a safetensors "vector" must be the only tensor; found also '
                f"{sorted(n for n in tensors if n != 'vector')[:5]}"
            )
        if spec.layer is None:
            raise InvalidInputError('a safetensors "vector" needs layer= to say which layer')
        return [(spec.layer, _tensor_values(tensors["vector"], "vector", spec, layer=spec.layer))], metadata

    raw: RawVectors = []
    if "directions" in tensors:
        raw += _directions_rows(tensors["directions"], spec)
    for name in sorted(tensors, key=_natural_key):
        if name == "directions":
            continue
        match = DIRECTION_NAME.fullmatch(name)
        if not match:
            raise InvalidInputError(
                f"unexpected safetensors tensor {name!r}: expected direction.<layer>, "
                '"directions" [n_layers, d_model] or a single "vector"'
            )
        layer = parse_layer_key(match.group(1), f"tensor {name!r}")
        raw.append((layer, _tensor_values(tensors[name], name, spec, layer=layer)))
    return raw, metadata


def _safetensors_metadata(data: bytes, spec: Spec) -> dict:
    if len(data) < 8:
        raise InvalidInputError(f"malformed safetensors payload: only {len(data)} bytes")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise InvalidInputError(
            f"malformed safetensors payload: header length {header_len} exceeds the {len(data) - 8} bytes that follow"
        )
    limit = _HEADER_BYTES_PER_TENSOR * spec.n_layers + MAX_ESCAPED_METADATA_BYTES
    if header_len > limit:
        raise InvalidInputError(
            f"safetensors header is {header_len:,} bytes, more than the {limit:,} that {spec.n_layers} "
            "vectors and their metadata can take"
        )
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    if not isinstance(header, dict):
        raise InvalidInputError("malformed safetensors payload: header is not a JSON object")
    n_tensors = sum(1 for name in header if name != "__metadata__")
    if n_tensors > spec.n_layers:  # at most one vector per layer, or one "directions" matrix
        raise InvalidInputError(
            f"safetensors file has {n_tensors} tensors, more than one per layer of a {spec.n_layers}-layer model"
        )
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise InvalidInputError("malformed safetensors payload: __metadata__ is not an object")
    for key, value in metadata.items():
        if not isinstance(value, str):  # the format's rule; safetensors' own loader refuses it too
            raise InvalidInputError(f"safetensors __metadata__ {key!r} is not a string")
    return dict(metadata)


def _directions_rows(tensor: torch.Tensor, spec: Spec) -> RawVectors:
    values = _tensor_values(tensor, "directions", spec, layer=0, ndim=2)  # row 0's size is every row's
    if values.shape[0] != spec.n_layers:
        raise InvalidInputError(
            f'"directions" has {values.shape[0]} rows, expected one per layer (n_layers={spec.n_layers})'
        )
    return [(layer, values[layer]) for layer in range(values.shape[0])]


def _tensor_values(tensor: torch.Tensor, name: str, spec: Spec, *, layer: int, ndim: int = 1) -> np.ndarray:
    if not tensor.dtype.is_floating_point:
        raise InvalidInputError(f"tensor {name!r} has dtype {tensor.dtype}, expected floats")
    if tensor.ndim != ndim:
        raise InvalidInputError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {ndim}-D")
    check_dimension(layer, tensor.shape[-1], spec.d_model)
    return tensor.detach().to("cpu", torch.float64).numpy()


def _natural_key(name: str) -> tuple[int, str]:
    match = DIRECTION_NAME.fullmatch(name)
    suffix = match.group(1) if match else ""
    return (int(suffix), name) if LAYER_KEY.fullmatch(suffix) else (0, name)


def write_safetensors(arrays: dict[int, np.ndarray], metadata: dict) -> bytes:
    header_metadata = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"metadata key {key!r} is not a string")
        try:
            header_metadata[key] = value if isinstance(value, str) else json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"metadata {key!r} cannot be written: {describe(exc)}") from exc
    tensors = {f"direction.{layer}": torch.from_numpy(vector.copy()) for layer, vector in arrays.items()}
    return save(tensors, metadata=header_metadata or None)
