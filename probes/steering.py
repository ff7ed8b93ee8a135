"""Steering: add alpha * v to the residual stream at one layer over a token scope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from probes.errors import InvalidInputError
from probes.validation import check_finite

Scope = Literal["all", "generated"]
SCOPES: tuple[str, ...] = ("all", "generated")


@dataclass(frozen=True)
class Steering:
    """One injection. `delta` is the vector actually added ([d_model], alpha already applied).

    `start_position` is the first absolute position that is steered: 0 for scope `all`; for
    scope `generated` the last prompt position, whose residual produces the first new token (as
    in the reference article, which steers the position that is about to predict).
    """

    layer: int
    delta: torch.Tensor
    start_position: int = 0


def steering_delta(direction: torch.Tensor, alpha: float, reference_norm: float | None = None) -> torch.Tensor:
    """alpha * unit(direction); with `reference_norm`, alpha is relative to the layer's typical
    residual norm (alpha=0.5 adds half a typical residual's length)."""
    if not isinstance(alpha, (int, float)) or alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise InvalidInputError(f"alpha must be a finite number, got {alpha!r}")
    check_finite(direction, "steering vector")
    norm = direction.norm()
    if float(norm) == 0:
        raise InvalidInputError("steering vector is the zero vector")
    scale = float(alpha) * (float(reference_norm) if reference_norm is not None else 1.0)
    return direction / norm * scale


def start_position(scope: str, prompt_length: int) -> int:
    if scope not in SCOPES:
        raise InvalidInputError(f"unknown steering scope {scope!r}; choose one of {', '.join(SCOPES)}")
    return 0 if scope == "all" else max(prompt_length - 1, 0)


def apply_steering(resid: torch.Tensor, steering: Steering, offset: int) -> torch.Tensor:
    """Add the delta to resid [batch, pos, d_model] whose first position is absolute `offset`."""
    first = max(steering.start_position - offset, 0)
    if first >= resid.shape[1]:
        return resid
    resid = resid.clone()
    resid[:, first:] += steering.delta.to(device=resid.device, dtype=resid.dtype)
    return resid


def typical_norm(acts: torch.Tensor, keep: torch.Tensor) -> float:
    """Median residual norm over kept positions (sink excluded): acts [batch, pos, d_model]."""
    norms = acts.norm(dim=-1)[keep.bool()]
    if norms.numel() == 0:
        raise InvalidInputError("no positions to measure a typical residual norm on")
    return float(norms.median())
