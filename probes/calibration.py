"""Turn raw cosine scores into z-scores and percentiles against neutral reference text.

Raw cosines are not comparable across concepts or layers (each direction sits at a different
angle to the residual stream's mean), so every score is read against the distribution the same
concept/layer produces on ordinary text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.errors import InvalidInputError

MIN_STD = 1e-6


@dataclass(frozen=True)
class Calibration:
    mean: torch.Tensor  # [n_layers, n_concepts]
    std: torch.Tensor  # [n_layers, n_concepts]
    reference: torch.Tensor  # sorted reference scores [n_reference, n_layers, n_concepts]

    @property
    def n_reference(self) -> int:
        return self.reference.shape[0]

    def rows(self, layer_rows: list[int]) -> Calibration:
        """The calibration of these rows of the layer axis only, in this order."""
        return Calibration(self.mean[layer_rows], self.std[layer_rows], self.reference[:, layer_rows])


def fit_calibration(reference_scores: torch.Tensor) -> Calibration:
    """Reference scores [n_texts, n_layers, n_concepts] from neutral text -> Calibration."""
    if reference_scores.ndim != 3 or reference_scores.shape[0] < 2:
        raise InvalidInputError(
            "calibration needs reference scores [n_texts >= 2, n_layers, n_concepts], got "
            f"{tuple(reference_scores.shape)}"
        )
    if not torch.isfinite(reference_scores).all():
        raise InvalidInputError("calibration reference scores contain NaN or Inf")
    reference = reference_scores.double()
    return Calibration(
        mean=reference.mean(dim=0),
        std=reference.std(dim=0).clamp_min(MIN_STD),
        reference=reference.sort(dim=0).values,
    )


def z_scores(calibration: Calibration, scores: torch.Tensor) -> torch.Tensor:
    """scores [..., n_layers, n_concepts] -> standard deviations above the neutral mean."""
    return (scores.double() - calibration.mean) / calibration.std


def percentiles(calibration: Calibration, scores: torch.Tensor) -> torch.Tensor:
    """scores [..., n_layers, n_concepts] -> fraction of neutral reference scores below, in [0, 1].

    Ties count half, so a score equal to every reference value sits at 0.5.
    """
    reference = calibration.reference  # [n_ref, L, K]
    flat = scores.double().reshape(-1, *reference.shape[1:])  # [m, L, K]
    below = (reference.unsqueeze(0) < flat.unsqueeze(1)).sum(dim=1)
    equal = (reference.unsqueeze(0) == flat.unsqueeze(1)).sum(dim=1)
    fraction = (below + 0.5 * equal) / reference.shape[0]
    return fraction.reshape(scores.shape)


def fpr_thresholds(calibration: Calibration, target_fpr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (layer, concept), the lowest reference score that at most `target_fpr` of the reference
    set exceeds, and the fraction that actually exceeds it (the achieved false-positive rate,
    which differs from the target when the reference set is small or has ties).

    A score is flagged when it is strictly above its threshold. -> (thresholds, achieved), each
    [n_layers, n_concepts].
    """
    if not 0 < target_fpr < 1:
        raise InvalidInputError(f"target_fpr must be in (0, 1), got {target_fpr}")
    reference = calibration.reference  # sorted along dim 0
    n = reference.shape[0]
    # Allow floor(n * fpr) reference scores above the threshold: the threshold is the score at
    # sorted index n - 1 - floor(n * fpr).
    allowed = int(n * target_fpr)
    thresholds = reference[n - 1 - allowed]
    achieved = (reference > thresholds.unsqueeze(0)).double().mean(dim=0)
    return thresholds, achieved
