"""Concept directions from paired activations.

Every method takes `pos_acts` and `neg_acts` of shape [n_pairs, d_model] (row i of each is pair i)
and returns a unit vector [d_model] pointing from the negative side toward the positive side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from probes.errors import InvalidInputError
from probes.validation import MIN_NORM, check_paired_activations

METHODS: tuple[str, ...] = ("mean_diff", "logistic", "pca", "lda")


def _unit(direction: torch.Tensor) -> torch.Tensor:
    norm = direction.norm()
    if float(norm) < MIN_NORM:
        raise InvalidInputError("positive and negative activations do not differ: the concept direction is zero")
    return direction / norm


def mean_difference(pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> torch.Tensor:
    """The article's vector: mean of (positive - negative) over pairs, normalised."""
    check_paired_activations(pos_acts, neg_acts)
    return _unit((pos_acts.double() - neg_acts.double()).mean(dim=0)).float()


def pca_direction(pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> torch.Tensor:
    """Top principal component of the paired differences (RepE style), sign-fixed.

    Every other difference is negated before centring, so the concept axis is the direction of
    greatest variance rather than the mean (which centring would otherwise remove). PCA is
    sign-blind; the sign is chosen so that positives score above their negatives on average.
    """
    check_paired_activations(pos_acts, neg_acts)
    diffs = pos_acts.double() - neg_acts.double()  # [n_pairs, d_model]
    if diffs.shape[0] == 1:
        return _unit(diffs[0]).float()
    signs = torch.ones(diffs.shape[0], 1, dtype=diffs.dtype)
    signs[1::2] = -1
    flipped = diffs * signs
    _, _, v_t = torch.linalg.svd(flipped - flipped.mean(dim=0), full_matrices=False)
    direction = v_t[0]
    if float(diffs.mean(dim=0) @ direction) < 0:
        direction = -direction
    return _unit(direction).float()


def logistic_direction(
    pos_acts: torch.Tensor, neg_acts: torch.Tensor, l2: float = 0.1, max_iter: int = 200
) -> torch.Tensor:
    """Weight vector of an L2-regularised logistic regression (positive = 1), normalised.

    Features are centred and divided by one global scale, so the weights stay in the residual
    basis (a per-feature scale would bend the direction). The regulariser matters: with fewer
    pairs than dimensions the classes are separable and unregularised weights diverge.
    """
    check_paired_activations(pos_acts, neg_acts)
    features = torch.cat([pos_acts, neg_acts]).double()  # [2n, d_model]
    labels = torch.cat([torch.ones(len(pos_acts)), torch.zeros(len(neg_acts))]).double()
    features = features - features.mean(dim=0)
    scale = features.std().clamp_min(MIN_NORM)
    features = features / scale
    weights = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        optimiser.zero_grad()
        logits = features @ weights + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss = loss + l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(loss_fn)
    direction = weights.detach()
    if float((pos_acts.double() - neg_acts.double()).mean(dim=0) @ direction) < 0:
        direction = -direction  # degenerate fits only; keeps the sign convention of the others
    return _unit(direction).float()


def shrinkage_lda_direction(pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> torch.Tensor:
    """Fisher's discriminant with a Ledoit-Wolf shrunk within-class covariance, normalised:
    Σ⁻¹ (μ₊ − μ₋). Whitening discounts directions in which texts vary anyway (topic, length,
    register), which the plain mean difference also picks up. With far fewer pairs than
    dimensions the sample covariance is singular; the shrinkage toward a scaled identity is
    chosen analytically (Ledoit & Wolf 2004), no tuning."""
    check_paired_activations(pos_acts, neg_acts)
    pos, neg = pos_acts.double(), neg_acts.double()
    centred = torch.cat([pos - pos.mean(dim=0), neg - neg.mean(dim=0)])  # [2n, d]
    n, d = centred.shape
    sample = centred.T @ centred / n
    mu = torch.trace(sample) / d
    target = mu * torch.eye(d, dtype=sample.dtype)
    delta = (sample - target).pow(2).sum() / d
    # beta: the estimated error of the sample covariance, from the rows' outer products
    row_sq = centred.pow(2).sum(dim=1)  # |x_i|^2
    beta = (row_sq.pow(2).sum() / n - 2 * (centred @ sample * centred).sum() / n + sample.pow(2).sum()) / (n * d)
    shrink = float((beta / delta).clamp(0, 1)) if float(delta) > 0 else 1.0
    covariance = shrink * target + (1 - shrink) * sample
    direction = torch.linalg.solve(covariance, pos.mean(dim=0) - neg.mean(dim=0))
    return _unit(direction).float()


EXTRACTORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean_diff": mean_difference,
    "logistic": logistic_direction,
    "pca": pca_direction,
    "lda": shrinkage_lda_direction,
}


def extract_direction(pos_acts: torch.Tensor, neg_acts: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatch by method name. [n_pairs, d_model] x 2 -> unit [d_model]."""
    try:
        extractor = EXTRACTORS[method]
    except KeyError:
        raise InvalidInputError(f"unknown extraction method {method!r}; choose one of {', '.join(METHODS)}") from None
    return extractor(pos_acts, neg_acts)


def extract_per_layer(pos_acts: torch.Tensor, neg_acts: torch.Tensor, method: str) -> torch.Tensor:
    """[n_layers, n_pairs, d_model] x 2 -> unit directions [n_layers, d_model]."""
    if pos_acts.ndim != 3:
        raise InvalidInputError(
            f"per-layer activations must be [n_layers, n_pairs, d_model], got {tuple(pos_acts.shape)}"
        )
    return torch.stack([extract_direction(p, n, method) for p, n in zip(pos_acts, neg_acts)])
