"""Layer sweep: how well a direction fitted on some pairs separates *held-out* pairs, per layer.

The automatic layer choice is made from this score only (never from evaluation data), so the
same pairs that define the concept also pick where it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probes.errors import InvalidInputError
from probes.extraction import extract_direction
from probes.separation import auroc, cohens_d

# AUROCs closer than this are treated as a tie and broken by effect size: held-out pair AUROC
# saturates at 1.0 on many middle layers.
AUROC_TIE = 0.01


@dataclass(frozen=True)
class LayerSeparation:
    layer: int
    auroc: float  # held-out positive vs negative texts, cosine with the fitted direction
    effect_size: float  # Cohen's d of the same held-out scores


def fold_ids(n_pairs: int, n_folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per pair; a pair's two texts are always held out together."""
    if n_pairs < 2:
        raise InvalidInputError("a cross-validated sweep needs at least 2 pairs")
    n_folds = min(n_folds, n_pairs)
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n_pairs) % n_folds)


def _cosine(acts: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(acts.double(), dim=-1) @ direction.double()


def held_out_scores(
    pos_acts: torch.Tensor, neg_acts: torch.Tensor, method: str, n_folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores of every pair's texts under a direction fitted without that pair.

    [n_pairs, d_model] x 2 -> (positive scores [n_pairs], negative scores [n_pairs]).
    """
    folds = fold_ids(len(pos_acts), n_folds, seed)
    pos_scores = np.empty(len(pos_acts))
    neg_scores = np.empty(len(neg_acts))
    for fold in np.unique(folds):
        test = torch.as_tensor(folds == fold)
        direction = extract_direction(pos_acts[~test], neg_acts[~test], method)
        pos_scores[test.numpy()] = _cosine(pos_acts[test], direction).numpy()
        neg_scores[test.numpy()] = _cosine(neg_acts[test], direction).numpy()
    return pos_scores, neg_scores


def sweep_layers(
    pos_acts: torch.Tensor,
    neg_acts: torch.Tensor,
    method: str,
    layers: list[int] | None = None,
    n_folds: int = 5,
    seed: int = 0,
) -> list[LayerSeparation]:
    """[n_layers, n_pairs, d_model] x 2 -> one held-out separation per layer."""
    layers = list(range(pos_acts.shape[0])) if layers is None else layers
    results = []
    for index, layer in enumerate(layers):
        pos_scores, neg_scores = held_out_scores(pos_acts[index], neg_acts[index], method, n_folds, seed)
        labels = np.concatenate([np.ones(len(pos_scores)), np.zeros(len(neg_scores))])
        results.append(
            LayerSeparation(
                layer=layer,
                auroc=auroc(np.concatenate([pos_scores, neg_scores]), labels),
                effect_size=cohens_d(pos_scores, neg_scores),
            )
        )
    return results


# Relative depth searched by the automatic choice. The reference article's guide: the first ~25%
# of layers encode syntax and token identity, the last ~25% prepare the output; stance, mood and
# preference live in between. Without the band a concept named by one word ("Python") is "best"
# read at layer 0, where it is the token itself rather than a disposition.
AUTO_BAND = (0.25, 0.75)


def auto_band_layers(n_layers: int, band: tuple[float, float] = AUTO_BAND) -> range:
    low, high = band
    return range(int(low * n_layers), max(int(high * n_layers), int(low * n_layers) + 1))


def choose_layer(
    results: list[LayerSeparation], n_layers: int | None = None, band: tuple[float, float] | None = AUTO_BAND
) -> int:
    """Best held-out AUROC within the depth band; near-ties go to the larger effect size.

    `band=None` searches every swept layer.
    """
    if band is not None:
        n_layers = n_layers or max(r.layer for r in results) + 1
        allowed = auto_band_layers(n_layers, band)
        results = [r for r in results if r.layer in allowed] or results
    if not results:
        raise InvalidInputError("no layers were swept")
    best_auroc = max(r.auroc for r in results)
    contenders = [r for r in results if r.auroc >= best_auroc - AUROC_TIE]
    return max(contenders, key=lambda r: (r.effect_size, -r.layer)).layer
