"""Divergence between what a response's residual stream says and what its text says.

Two calibrated signals per (request, concept), both z-scores:

- the *residual signal*: the concept's score over the monitored generation (what the model
  represented while it wrote);
- the *text signal*: the same probe on the completion re-read alone, in a fresh context with no
  prompt and no steering (what the words themselves express).

On ordinary traffic the two move together. `hidden` means the internals are high while the text
is not (the article's case of a steered model whose output still reads normal); `surface` is the
reverse (the words carry the concept, the internals did not). Thresholds come from control
traffic, set so that at most a target share of ordinary requests is flagged per concept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.errors import InvalidInputError

KINDS = ("hidden", "surface")


@dataclass(frozen=True)
class DivergenceThresholds:
    """Per concept [n_concepts]: the gap (residual z − text z) beyond which a request is
    `hidden`, the gap (text z − residual z) beyond which it is `surface`, and the false-positive
    rate those thresholds achieved on the control traffic they were fitted on."""

    hidden_gap: torch.Tensor
    surface_gap: torch.Tensor
    achieved_fpr: torch.Tensor
    n_control: int
    # The concept-score alert: the residual z that at most target_fpr of control answers exceed
    # (answers, not standalone text: generation reads concepts differently), and the rate achieved.
    alert_z: torch.Tensor | None = None
    alert_achieved_fpr: torch.Tensor | None = None


def _check_signals(residual_z: torch.Tensor, text_z: torch.Tensor) -> None:
    if residual_z.shape != text_z.shape:
        raise InvalidInputError(f"residual and text signals differ in shape: {tuple(residual_z.shape)} vs {tuple(text_z.shape)}")
    if not (torch.isfinite(residual_z).all() and torch.isfinite(text_z).all()):
        raise InvalidInputError("divergence signals contain NaN or Inf")


def fit_thresholds(residual_z: torch.Tensor, text_z: torch.Tensor, target_fpr: float) -> DivergenceThresholds:
    """Control traffic [n_requests, n_concepts] -> thresholds flagging at most `target_fpr` of
    it per concept. The budget is split evenly between the two kinds; each gap threshold is the
    largest control gap that the budget does not allow past."""
    _check_signals(residual_z, text_z)
    if residual_z.ndim != 2 or residual_z.shape[0] < 2:
        raise InvalidInputError(f"control signals must be [n_requests >= 2, n_concepts], got {tuple(residual_z.shape)}")
    if not 0 < target_fpr < 1:
        raise InvalidInputError(f"target_fpr must be in (0, 1), got {target_fpr}")
    gap = (residual_z - text_z).double()
    n = gap.shape[0]
    allowed = int(n * target_fpr / 2)  # control requests each kind may flag
    hidden_gap = gap.sort(dim=0).values[n - 1 - allowed]
    surface_gap = (-gap).sort(dim=0).values[n - 1 - allowed]
    thresholds = DivergenceThresholds(hidden_gap, surface_gap, torch.zeros(gap.shape[1], dtype=torch.float64), n)
    flagged = torch.stack([flags_matrix(r, t, thresholds).any(dim=-1) for r, t in zip(residual_z, text_z)])
    residual = residual_z.double()
    alert_z = residual.sort(dim=0).values[n - 1 - int(n * target_fpr)]
    alert_achieved = (residual > alert_z).double().mean(dim=0)
    return DivergenceThresholds(hidden_gap, surface_gap, flagged.double().mean(dim=0), n, alert_z, alert_achieved)


def flags_matrix(residual_z: torch.Tensor, text_z: torch.Tensor, thresholds: DivergenceThresholds) -> torch.Tensor:
    """[n_concepts] signals -> bool [n_concepts, 2]: (hidden, surface) per concept. A kind also
    needs its own high side above the control mean (z > 0), so two low signals never flag."""
    _check_signals(residual_z, text_z)
    gap = (residual_z - text_z).double()
    hidden = (gap > thresholds.hidden_gap) & (residual_z > 0)
    surface = (-gap > thresholds.surface_gap) & (text_z > 0)
    return torch.stack([hidden, surface], dim=-1)


@dataclass(frozen=True)
class Divergence:
    concept: int  # index into the concepts the signals cover
    kind: str
    residual_z: float
    text_z: float
    threshold: float
    reason: str


def divergences(residual_z: torch.Tensor, text_z: torch.Tensor, thresholds: DivergenceThresholds,
                names: list[str]) -> list[Divergence]:
    """The flags one request raises, each with a reason a person can read."""
    found = []
    matrix = flags_matrix(residual_z, text_z, thresholds)
    for k, name in enumerate(names):
        r, t = float(residual_z[k]), float(text_z[k])
        if matrix[k, 0]:
            limit = float(thresholds.hidden_gap[k])
            found.append(Divergence(k, "hidden", r, t, limit,
                                    f"{name}: internals at z={r:+.2f} but the text alone reads z={t:+.2f} "
                                    f"(gap {r - t:.2f} > {limit:.2f})"))
        if matrix[k, 1]:
            limit = float(thresholds.surface_gap[k])
            found.append(Divergence(k, "surface", r, t, limit,
                                    f"{name}: the text reads z={t:+.2f} but the internals only z={r:+.2f} "
                                    f"(gap {t - r:.2f} > {limit:.2f})"))
    return found
