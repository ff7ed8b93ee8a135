"""Per-request monitoring: score a generation's response span against the concept bank."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from auditor.errors import InvalidInputError
from probes.calibration import percentiles, z_scores
from probes.scoring import Aggregates, aggregate, cosine_scores
from workers.monitoring.concepts import ConceptBank
from workers.runtime.generate import Generation


@dataclass
class RequestScores:
    """Scores of one response: every concept at every monitored layer."""

    concepts: list[str]
    layers: list[int]
    per_token: torch.Tensor  # [n_layers, n_response_tokens, n_concepts] raw cosine
    aggregates: Aggregates  # mean / max / last, each [n_layers, n_concepts]
    z_mean: torch.Tensor | None  # calibrated z-score of the mean, [n_layers, n_concepts]
    percentile_mean: torch.Tensor | None

    def at(self, concept: str, layer: int) -> dict:
        k, li = self.concepts.index(concept), self.layers.index(layer)
        row = {
            "concept": concept,
            "layer": layer,
            "mean": float(self.aggregates.mean[li, k]),
            "max": float(self.aggregates.max[li, k]),
            "last": float(self.aggregates.last[li, k]),
        }
        if self.z_mean is not None:
            row["z"] = float(self.z_mean[li, k])
            row["percentile"] = float(self.percentile_mean[li, k])
        return row


def score_resid(bank: ConceptBank, resid: torch.Tensor, start: int) -> RequestScores:
    """resid [n_layers, n_positions, d_model] captured at bank.layers; score positions start.."""
    if resid.shape[0] != len(bank.layers):
        raise InvalidInputError(f"residuals cover {resid.shape[0]} layers but the bank monitors {len(bank.layers)}")
    return score_cosines(bank, cosine_scores(resid.float(), bank.directions)[:, start:])  # one matmul


def score_cosines(bank: ConceptBank, scores: torch.Tensor) -> RequestScores:
    """Per-token cosines [n_layers, n_response_tokens, n_concepts] of an answer span -> its scores."""
    agg = aggregate(scores)
    z = pct = None
    if bank.calibration is not None:
        z = z_scores(bank.calibration, agg.mean)
        pct = percentiles(bank.calibration, agg.mean)
    return RequestScores(bank.names, bank.layers, scores, agg, z, pct)


def score_generation(bank: ConceptBank, generation: Generation) -> RequestScores:
    if generation.resid is None:
        raise InvalidInputError("this generation was not monitored (no residuals captured)")
    return score_resid(bank, generation.resid, generation.response_start)
