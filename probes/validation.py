"""Checks on vectors, layers and pairs, shared by extraction, scoring and steering."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from probes.errors import InvalidInputError

# A direction shorter than this carries no information once normalised (and float noise dominates).
MIN_NORM = 1e-8


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise InvalidInputError(f"{what} contains {bad} NaN or Inf value(s)")


def check_vector(vector: torch.Tensor, d_model: int, what: str = "vector") -> torch.Tensor:
    """A usable direction: 1-D, d_model long, finite, non-zero. Returns it as float32."""
    if not isinstance(vector, torch.Tensor):
        vector = torch.as_tensor(vector)
    if vector.ndim != 1:
        raise InvalidInputError(f"{what} must be 1-D, got shape {tuple(vector.shape)}")
    if vector.shape[0] != d_model:
        raise InvalidInputError(f"{what} has dimension {vector.shape[0]} but the model's d_model is {d_model}")
    vector = vector.to(torch.float32)
    check_finite(vector, what)
    if float(vector.norm()) < MIN_NORM:
        raise InvalidInputError(f"{what} is the zero vector: it has no direction")
    return vector


def check_layer(layer: int, n_layers: int) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InvalidInputError(f"layer must be an integer, got {layer!r}")
    if not 0 <= layer < n_layers:
        raise InvalidInputError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    return layer


def check_pairs(positives: Sequence[str], negatives: Sequence[str]) -> None:
    """Contrastive pairs: as many positives as negatives, at least one, no empty text."""
    if len(positives) == 0:
        raise InvalidInputError("no contrastive pairs given: at least one is needed")
    if len(positives) != len(negatives):
        raise InvalidInputError(f"pairs are unequal: {len(positives)} positive vs {len(negatives)} negative texts")
    for side, texts in (("positive", positives), ("negative", negatives)):
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"{side} text #{i} is empty")
    for i, (positive, negative) in enumerate(zip(positives, negatives)):
        if positive.strip() == negative.strip():
            # A pair with no contrast adds nothing but noise to the difference of means.
            raise InvalidInputError(f"pair #{i} has identical positive and negative text")


def check_paired_activations(pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> None:
    """[n, d_model] each, same shape, finite."""
    if pos_acts.ndim != 2 or neg_acts.ndim != 2:
        raise InvalidInputError(
            f"activations must be [n_pairs, d_model], got {tuple(pos_acts.shape)} and {tuple(neg_acts.shape)}"
        )
    if pos_acts.shape != neg_acts.shape:
        raise InvalidInputError(
            f"unequal pairs: positive activations {tuple(pos_acts.shape)} vs negative {tuple(neg_acts.shape)}"
        )
    if pos_acts.shape[0] == 0:
        raise InvalidInputError("no pairs: at least one is needed")
    check_finite(pos_acts, "positive activations")
    check_finite(neg_acts, "negative activations")
