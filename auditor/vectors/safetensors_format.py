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
from auditor.vectors.common import DIRECTION_NAME, LAYER_KEY, RawVectors, Spec, describe, parse_layer_key


def read_safetensors(data: bytes, spec: Spec) -> tuple[RawVectors, dict]:
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


def _directions_rows(tensor: torch.Tensor, spec: Spec) -> RawVectors:
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
