"""Cosine scores of residual streams against a bank of concept directions.

One batched matmul scores every concept at every monitored layer for every token:
resid [n_layers, n_tokens, d_model] x directions [n_layers, n_concepts, d_model]
-> scores [n_layers, n_tokens, n_concepts].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.errors import InvalidInputError

EPS = 1e-6


def unit_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor / tensor.norm(dim=-1, keepdim=True).clamp_min(EPS)


def cosine_scores(resid: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_tokens, d_model] x [n_layers, n_concepts, d_model] -> [n_layers, n_tokens, n_concepts].

    `directions` must already be unit rows (the bank stores them that way), so only the
    residuals are normalised here.
    """
    if resid.ndim != 3 or directions.ndim != 3:
        raise InvalidInputError(
            f"expected resid [layers, tokens, d_model] and directions [layers, concepts, d_model], "
            f"got {tuple(resid.shape)} and {tuple(directions.shape)}"
        )
    if resid.shape[0] != directions.shape[0] or resid.shape[2] != directions.shape[2]:
        raise InvalidInputError(
            f"resid {tuple(resid.shape)} and directions {tuple(directions.shape)} disagree on layers or d_model"
        )
    directions = directions.to(device=resid.device, dtype=resid.dtype)
    return torch.bmm(unit_rows(resid), directions.transpose(1, 2))


@dataclass(frozen=True)
class Aggregates:
    """Per (layer, concept) summaries over a span of token positions, each [n_layers, n_concepts]."""

    mean: torch.Tensor
    max: torch.Tensor
    last: torch.Tensor
    n_tokens: int


def aggregate(scores: torch.Tensor, start: int = 0, stop: int | None = None) -> Aggregates:
    """Summarise scores [n_layers, n_tokens, n_concepts] over positions start..stop-1."""
    span = scores[:, start:stop]
    if span.shape[1] == 0:
        raise InvalidInputError(f"no token positions in span {start}:{stop} to aggregate")
    return Aggregates(mean=span.mean(dim=1), max=span.amax(dim=1), last=span[:, -1], n_tokens=span.shape[1])


def masked_mean(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of per-token scores [n_layers, batch, pos, n_concepts] over kept positions [batch, pos].

    -> [n_layers, batch, n_concepts]. Used for scoring many padded texts at once.
    """
    weights = keep.to(scores.dtype)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.einsum("lbpk,bp->lbk", scores, weights)
