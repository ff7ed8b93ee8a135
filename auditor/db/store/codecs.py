"""How values are encoded for the database: vectors and per-token traces as float32
little-endian bytes, optional numbers as plain Python floats (drivers reject numpy and torch
scalars)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from auditor.errors import InvalidInputError

VectorLike = torch.Tensor | np.ndarray | Sequence[float]


def as_tensor(values: VectorLike) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu()
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def vector_to_bytes(values: VectorLike) -> bytes:
    """1-D values -> float32 little-endian bytes (explicit '<f4': the format, not the CPU's)."""
    array = as_tensor(values).to(torch.float32).numpy()  # .to first: bf16 has no numpy dtype
    return array.astype("<f4", copy=False).tobytes()


def vector_from_bytes(data: bytes, d_model: int) -> torch.Tensor:
    if len(data) != 4 * d_model:
        raise InvalidInputError(f"stored vector has {len(data)} bytes; d_model {d_model} needs {4 * d_model}")
    return trace_from_bytes(data)


def trace_from_bytes(data: bytes) -> torch.Tensor:
    # astype copies into a writable, native-order array (frombuffer's view is read-only).
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))


def trace_bytes(trace: Any) -> bytes | None:
    """A score row's trace as stored: None, bytes as given, or values encoded."""
    if trace is None or isinstance(trace, bytes):
        return trace
    return vector_to_bytes(trace)


def optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
