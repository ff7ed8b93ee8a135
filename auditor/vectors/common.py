"""What every vector format shares: the VectorSet, the spec a payload is checked against, the
checks themselves (in and out), and telling formats apart.

A vector set maps a layer -- the 0-based TransformerLens block index, whose
`blocks.{layer}.hook_resid_post` the vector is read from or added to -- to a 1-D float32 direction
of length d_model. A format's reader only decodes (layer, values) pairs and the file's metadata;
`validated_set` turns them into unit vectors that passed every check, keeping the magnitude each
arrived with in `metadata["original_norms"]`. `arrays_for_export` is the way back: each vector at
its original norm, checked as strictly as on the way in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, NamedTuple

import numpy as np
import torch

from auditor.errors import InvalidInputError
from auditor.schemas import unstorable
from auditor.vectors.metadata import check_metadata
from probes.validation import MIN_NORM

FORMATS = ("json", "safetensors", "gguf")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

LAYER_KEY = re.compile(r"-?[0-9]+")
DIRECTION_NAME = re.compile(r"direction\.(.*)", re.DOTALL)  # safetensors and GGUF tensor names
RESERVED_METADATA = ("original_norms",)  # recomputed from the data on every parse
_EXTENSIONS = {".json": "json", ".safetensors": "safetensors", ".gguf": "gguf"}

# What a format's reader returns before validation: (layer, values) in file order.
RawVectors = list[tuple[int, np.ndarray]]


@dataclass(frozen=True)
class VectorSet:
    """Per-layer unit directions: {layer: float32 tensor [d_model]} plus free-form metadata."""

    vectors: dict[int, torch.Tensor]
    metadata: dict = field(default_factory=dict)


class Spec(NamedTuple):
    """The model a payload must fit, and the layer a payload that names none belongs to."""

    d_model: int
    n_layers: int
    layer: int | None


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


# --- on the way in ---------------------------------------------------------------------------------


def validated_set(raw: RawVectors, file_metadata: dict, spec: Spec) -> VectorSet:
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
        vectors[layer], norms[layer] = unit_vector(layer, values, spec.d_model)
    # Metadata is stored as the concept's provenance (JSON) and served back by every concept
    # listing: bounded in depth, entries and size (auditor.vectors.metadata), and free of what
    # Postgres refuses (text with a NUL or an unpaired surrogate, NaN or infinity).
    check_metadata(file_metadata)
    if problem := unstorable(file_metadata, "the file's metadata", finite=True):
        raise InvalidInputError(problem)
    metadata = dict(file_metadata)
    metadata["original_norms"] = {layer: norms[layer] for layer in sorted(norms)}
    ordered = {layer: vectors[layer] for layer in sorted(vectors)}
    return VectorSet(vectors=ordered, metadata=metadata)


def unit_vector(layer: int, values: np.ndarray, d_model: int) -> tuple[torch.Tensor, float]:
    values = np.asarray(values)
    if values.ndim != 1:
        raise InvalidInputError(f"layer {layer}: vector must be 1-D, got shape {list(values.shape)}")
    check_dimension(layer, values.shape[0], d_model)
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


def check_dimension(layer: int, length: int, d_model: int) -> None:
    """Readers call this before converting a tensor, so a wrong-sized one is refused before it is
    copied (a 64 MiB tensor became 128 MiB of float64 before the check)."""
    if length != d_model:
        raise InvalidInputError(f"layer {layer}: vector has dimension {length}, expected d_model={d_model}")


def parse_layer_key(key: Any, where: str) -> int:
    """A layer named by text (a JSON key, a tensor-name suffix): decimal digits, optional '-'."""
    if not isinstance(key, str) or not LAYER_KEY.fullmatch(key):
        raise InvalidInputError(f"{where}: layer {key!r} is not an integer")
    return int(key)


def positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


# --- on the way out --------------------------------------------------------------------------------


def arrays_for_export(vector_set: VectorSet) -> dict[int, np.ndarray]:
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
            raise InvalidInputError(f"layer {layer}: not a vector ({describe(exc)})") from exc
        d_model = d_model if d_model is not None else (values.shape[0] if values.ndim else 0)
        unit, own_norm = unit_vector(layer, values.numpy(), d_model)
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
