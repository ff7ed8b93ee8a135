"""Divergence between what a response's residual stream says and what its text says, as flags a
person can read.

Two signals per (request, concept), both read against ordinary answers of the same length
(probes.answer_null):

- the *residual signal*: the concept's score over the monitored generation (what the model
  represented while it wrote);
- the *text signal*: the same probe on the completion re-read alone, in a fresh context with no
  prompt and no steering (what the words themselves express).

On ordinary traffic the two move together. `hidden` means the internals are high while the text
is not (the article's case of a steered model whose output still reads normal); `surface` is the
reverse (the words carry the concept, the internals did not). A concept-score *alert*
(`threshold`) is the residual signal alone above its family-wise threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.answer_null import Reading

KINDS = ("hidden", "surface")
ALERT_KIND = "threshold"


@dataclass(frozen=True)
class Divergence:
    concept: int  # index into the concepts the reading covers
    kind: str  # "hidden", "surface", or "threshold" for a concept-score alert
    residual_z: float
    text_z: float | None
    threshold: float  # in the units of the statistic tested (see `reason`)
    reason: str


def divergences(reading: Reading, names: list[str]) -> list[Divergence]:
    """The divergence flags one answer raises, each with a reason a person can read."""
    if reading.gap_z is None or reading.text_z is None:
        return []
    found = []
    limit = reading.divergence_threshold
    for k, name in enumerate(names):
        r, t, gap = float(reading.residual_z[k]), float(reading.text_z[k]), float(reading.gap_z[k])
        if reading.hidden[k]:
            found.append(
                Divergence(
                    k,
                    "hidden",
                    r,
                    t,
                    limit,
                    f"{name}: internals at z={r:+.2f} but the text alone reads z={t:+.2f} "
                    f"(divergence {gap:+.2f} sd > {limit:.2f} at {reading.n_tokens} tokens)",
                )
            )
        if reading.surface[k]:
            found.append(
                Divergence(
                    k,
                    "surface",
                    r,
                    t,
                    limit,
                    f"{name}: the text reads z={t:+.2f} but the internals only z={r:+.2f} "
                    f"(divergence {-gap:+.2f} sd > {limit:.2f} at {reading.n_tokens} tokens)",
                )
            )
    return found


def alerts(reading: Reading, names: list[str]) -> list[Divergence]:
    """Concept-score alerts: the residual z above the family-wise alert threshold."""
    limit = reading.alert_threshold
    return [
        Divergence(
            k,
            ALERT_KIND,
            float(reading.residual_z[k]),
            None if reading.text_z is None else float(reading.text_z[k]),
            limit,
            f"{name}: internals at z={float(reading.residual_z[k]):+.2f} against ordinary answers "
            f"of {reading.n_tokens} tokens (alert above {limit:.2f})",
        )
        for k, name in enumerate(names)
        if reading.alert[k]
    ]
