"""Pooling per-token residuals into one vector per text.

The first position of a sequence is an attention sink (in SmolLM2 its residual norm is ~100x
every other token's at middle layers), so it is never pooled: callers prepend a fixed token and
`mean` pooling starts after it.
"""

from __future__ import annotations

from typing import Literal

import torch

from probes.errors import InvalidInputError

Pooling = Literal["last", "mean"]
POOLINGS: tuple[str, ...] = ("last", "mean")


def pool(acts: torch.Tensor, mask: torch.Tensor, method: str, skip_first: int = 1) -> torch.Tensor:
    """Pool `acts` [..., batch, pos, d_model] over positions where `mask` [batch, pos] is 1.

    Rows are right-padded. `last` takes each row's last real token (the article's choice); `mean`
    averages the real tokens after the first `skip_first` (the sink). Returns [..., batch, d_model].
    """
    if method not in POOLINGS:
        raise InvalidInputError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")
    mask = mask.to(acts.dtype)
    lengths = mask.sum(dim=-1).long()  # [batch]
    if bool((lengths <= skip_first).any()):
        raise InvalidInputError("a text has no tokens left to pool after the attention-sink position")
    if method == "last":
        index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, acts.shape[-1])  # [batch, 1, d_model]
        index = index.expand(*acts.shape[:-3], -1, -1, -1)
        return acts.gather(-2, index).squeeze(-2)
    weights = mask.clone()
    weights[:, :skip_first] = 0
    weights = weights / weights.sum(dim=-1, keepdim=True)  # [batch, pos]
    return torch.einsum("...bpd,bp->...bd", acts, weights)


def token_mask(mask: torch.Tensor, skip_first: int = 1) -> torch.Tensor:
    """The positions that per-token statistics may use: real tokens after the sink."""
    keep = mask.clone().bool()
    keep[:, :skip_first] = False
    return keep
