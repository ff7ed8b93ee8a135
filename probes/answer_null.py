"""What an ordinary answer of n tokens reads, for every n, and family-wise alert thresholds on it.

A served or audited answer is read against ordinary *answers of the same length*, not against
standalone neutral text: an answer's score is a mean over its tokens, and the null distribution
of a mean over n tokens narrows as n grows, so one threshold for all lengths flags short answers
for being short. Long control answers give free samples at every shorter length: the prefix of
an n-token control answer is exactly what the model would have served with `max_tokens = n`
(greedy decoding, causal attention), so one control answer of 128 tokens scores 128 lengths.

Per length n and concept k the null holds the mean and standard deviation of three statistics
over the control answers that reach n tokens:

- residual: the mean cosine of the generation's residual stream (what the model represented);
- text: the mean cosine of the answer re-read alone (what the words say);
- gap: residual z − text z, the divergence statistic (`hidden` high, `surface` low).

**The guarantee is per request and family-wise.** A request is tested for every active concept
and both divergence kinds at once, so the budget is not spent per test: each request is reduced
to one number, the largest standardised divergence over all concepts and kinds (the largest
residual z, for concept-score alerts), and the threshold at length n is an order statistic of
that maximum over the control answers. Under exchangeability of control and live answers the
share of ordinary requests raising *any* flag is then at most `target_fpr`, and the order
statistic is chosen so that this holds with probability `confidence` over the draw of the
control set (a training-conditional, "PAC" bound), not just on average: a threshold that sits at
the largest control value promises nothing when the set is small.

Lengths reached by too few control answers to certify a threshold are read at the longest length
that has enough; the null of a mean narrows with length, so reading a longer answer against a
shorter length's spread errs towards fewer flags.

Size: one statistical procedure (prefix means, per-length statistics, the family-wise order
statistic and its PAC bound, held-out-group statistics, serialisation of the fitted null) whose
steps share their array shapes; split, each piece would be unreadable without the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from probes.errors import InvalidInputError

MIN_STD = 1e-6
# Lengths at which the distribution of each concept's residual z is kept for percentiles.
PERCENTILE_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


# ---- binomial tail arithmetic (exact, no scipy) ----


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(k: int, n: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound on a rate observed as k of n (exact, Clopper–Pearson):
    the largest p for which seeing k or fewer has probability at least 1 − level."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    low, high = k / n, 1.0
    for _ in range(60):  # bisection on P(X <= k | p) = 1 - sf(k + 1)
        mid = (low + high) / 2
        if 1.0 - binomial_sf(k + 1, n, mid) > 1.0 - level:
            low = mid
        else:
            high = mid
    return high


def pac_rank(n: int, target_fpr: float, confidence: float) -> int:
    """The largest j such that thresholding at the j-th largest of n exchangeable control values
    flags at most `target_fpr` of future values with probability >= `confidence`; 0 if no order
    statistic can promise that with n values (then the caller uses the largest value and reports
    the rate it can promise instead)."""
    # The exceedance probability of the j-th largest is Beta(j, n - j + 1); P(it <= fpr) equals
    # P(Binomial(n, fpr) >= j), which falls as j grows.
    j = 0
    while j < n and binomial_sf(j + 1, n, target_fpr) >= confidence:
        j += 1
    return j


# ---- prefix statistics of control answers ----


def prefix_means(traces: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token traces [n_answers, max_len, K] (anything past an answer's length ignored) ->
    the mean over each answer's first n tokens for n = 1..max_len, [n_answers, max_len, K];
    NaN where an answer is shorter than n."""
    _, max_len, _ = traces.shape  # [n_answers, max_len, K]
    positions = torch.arange(1, max_len + 1)
    valid = positions.unsqueeze(0) <= lengths.unsqueeze(1)  # [N, T]
    cumulative = torch.where(valid.unsqueeze(-1), traces.double(), 0.0).cumsum(dim=1)
    means = cumulative / positions.view(1, -1, 1)
    return torch.where(valid.unsqueeze(-1), means, torch.nan)


def carried_prefix_means(traces: torch.Tensor, lengths: torch.Tensor, read_lengths: torch.Tensor) -> torch.Tensor:
    """Prefix means of traces that may end before the statistic does: a text re-read has no
    token for the EOS that ended its answer, so at lengths in (length, read_length] the answer's
    text reads its whole text. -> [n_answers, max_len, K], NaN past read_lengths (and everywhere
    for an answer with no text)."""
    means = prefix_means(traces, lengths)
    max_len = traces.shape[1]
    last = (lengths.clamp(1, max_len) - 1).view(-1, 1, 1).expand(-1, 1, traces.shape[2])
    held = means.gather(1, last)  # [N, 1, K]: each answer's mean over its whole text
    positions = torch.arange(1, max_len + 1).view(1, -1, 1)
    carried = torch.where(positions > lengths.view(-1, 1, 1), held, means)
    keep = (positions <= read_lengths.view(-1, 1, 1)) & (lengths.view(-1, 1, 1) > 0)
    return torch.where(keep, carried, torch.nan)


def _nan_mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, T, K] with NaN gaps -> mean, std (ddof 1), count over dim 0."""
    present = ~values.isnan()
    count = present.sum(dim=0)  # [T, K]
    filled = torch.where(present, values, 0.0)
    mean = filled.sum(dim=0) / count.clamp_min(1)
    square = torch.where(present, (values - mean) ** 2, 0.0).sum(dim=0)
    std = (square / (count - 1).clamp_min(1)).sqrt().clamp_min(MIN_STD)
    return mean, std, count


# ---- the fitted null ----


@dataclass(frozen=True)
class Reading:
    """One answer (or a batch of answers of one length) read against the null at its length;
    every tensor is [n_concepts] ([..., n_concepts] for a batch)."""

    n_tokens: int
    length_used: int  # the null length it was read at (capped at the certified maximum)
    status: str  # "ok" or "insufficient_tokens" (no flag, no alert: too short to say anything)
    residual_z: torch.Tensor
    percentile: torch.Tensor
    text_z: torch.Tensor | None
    gap_z: torch.Tensor | None  # standardised residual z − text z
    hidden: torch.Tensor  # bool
    surface: torch.Tensor  # bool
    alert: torch.Tensor  # bool
    divergence_threshold: float
    alert_threshold: float

    @property
    def flagged(self) -> bool:
        return bool(self.hidden.any() or self.surface.any())

    def any_flag(self) -> torch.Tensor:
        """Bool over the leading dims: does each answer raise any divergence flag."""
        return (self.hidden | self.surface).any(dim=-1)


@dataclass(frozen=True)
class LengthNull:
    """The null of ordinary answers at lengths 1..max_length for K concepts, with per-length
    family-wise thresholds. Arrays indexed by length − 1."""

    target_fpr: float
    confidence: float
    min_tokens: int
    n_answers: torch.Tensor  # [T] control answers reaching each length
    residual_mean: torch.Tensor  # [T, K]
    residual_std: torch.Tensor
    text_mean: torch.Tensor
    text_std: torch.Tensor
    gap_mean: torch.Tensor
    gap_std: torch.Tensor
    divergence_threshold: torch.Tensor  # [T]: on the largest standardised gap of a request
    alert_threshold: torch.Tensor  # [T]: on the largest residual z of a request
    divergence_rate: torch.Tensor  # [T]: share of control answers over it (in sample)
    alert_rate: torch.Tensor
    certified_length: int  # longest length with enough control answers; longer ones read here
    threshold_method: str = "in_sample"  # or "held_out_group" (see fit_length_null)
    percentile_lengths: tuple[int, ...] = ()
    percentile_reference: torch.Tensor | None = None  # [G, n_answers, K] sorted residual z, NaN-padded
    extra: dict = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return int(self.n_answers.shape[0])

    @property
    def n_concepts(self) -> int:
        return int(self.residual_mean.shape[1])

    def length_index(self, n_tokens: int) -> int:
        return max(1, min(n_tokens, self.certified_length)) - 1

    def upper_bounds(self, level: float = 0.95) -> tuple[list[float], list[float]]:
        """Clopper–Pearson upper bounds on the divergence and alert rates at every length."""
        out = ([], [])
        for t in range(self.max_length):
            n = int(self.n_answers[t])
            for rates, bounds in ((self.divergence_rate, out[0]), (self.alert_rate, out[1])):
                bounds.append(clopper_pearson_upper(round(float(rates[t]) * n), n, level))
        return out

    def summary(self) -> dict:
        """Headline figures of the fit: for each family, the worst length between `min_tokens`
        and the certified length (the highest in-sample rate) with its Clopper–Pearson 95 %
        upper bound."""
        out = {
            "target_fpr": self.target_fpr,
            "confidence": self.confidence,
            "min_tokens": self.min_tokens,
            "certified_length": self.certified_length,
            "threshold_method": self.threshold_method,
            "n_answers": int(self.n_answers[self.length_index(self.min_tokens)]),
            "n_answers_at_certified_length": int(self.n_answers[self.length_index(self.certified_length)]),
        }
        for family, rates in (("divergence", self.divergence_rate), ("alert", self.alert_rate)):
            worst = (0.0, 0.0, 0)
            for t in range(min(self.min_tokens, self.certified_length) - 1, self.certified_length):
                n = int(self.n_answers[t])
                rate = float(rates[t])
                bound = clopper_pearson_upper(round(rate * n), n)
                worst = max(worst, (bound, rate, t + 1))
            out[f"{family}_achieved_fpr"], out[f"{family}_upper_95"], out[f"{family}_worst_length"] = (
                worst[1],
                worst[0],
                worst[2],
            )
        return out

    def read(self, residual_mean: torch.Tensor, n_tokens: int, text_mean: torch.Tensor | None = None) -> Reading:
        """An answer's mean cosine per concept [K] over its n_tokens (and, for divergence, the
        mean cosine of the answer re-read alone) -> its reading at that length. Leading batch
        dimensions ([..., K]) read many answers of the same length at once."""
        if residual_mean.shape[-1:] != (self.n_concepts,):
            raise InvalidInputError(f"expected [{self.n_concepts}] residual means, got {tuple(residual_mean.shape)}")
        t = self.length_index(n_tokens)
        residual_z = (residual_mean.double() - self.residual_mean[t]) / self.residual_std[t]
        percentile = self._percentile(residual_z, n_tokens)
        none = torch.zeros(residual_mean.shape, dtype=torch.bool)
        text_z = gap_z = None
        hidden = surface = none
        if text_mean is not None:
            text_z = (text_mean.double() - self.text_mean[t]) / self.text_std[t]
            gap_z = (residual_z - text_z - self.gap_mean[t]) / self.gap_std[t]
        divergence_threshold = float(self.divergence_threshold[t])
        alert_threshold = float(self.alert_threshold[t])
        if n_tokens < self.min_tokens:
            return Reading(
                n_tokens,
                t + 1,
                "insufficient_tokens",
                residual_z,
                percentile,
                text_z,
                gap_z,
                none,
                none,
                none,
                divergence_threshold,
                alert_threshold,
            )
        if gap_z is not None:
            hidden = (gap_z > divergence_threshold) & (residual_z > 0)
            surface = (-gap_z > divergence_threshold) & (text_z > 0)
        alert = residual_z > alert_threshold
        return Reading(
            n_tokens,
            t + 1,
            "ok",
            residual_z,
            percentile,
            text_z,
            gap_z,
            hidden,
            surface,
            alert,
            divergence_threshold,
            alert_threshold,
        )

    def _percentile(self, residual_z: torch.Tensor, n_tokens: int) -> torch.Tensor:
        if self.percentile_reference is None or not self.percentile_lengths:
            return torch.full_like(residual_z, torch.nan)
        n = max(1, min(n_tokens, self.certified_length))
        g = max(i for i, length in enumerate(self.percentile_lengths) if length <= n)
        reference = self.percentile_reference[g]  # [n_answers, K], NaN-padded
        present = ~reference.isnan()
        z = residual_z.unsqueeze(-2)  # [..., 1, K]
        below = ((reference < z) & present).sum(dim=-2).double()
        equal = ((reference == z) & present).sum(dim=-2).double()
        return (below + 0.5 * equal) / present.sum(dim=0).clamp_min(1)


def divergence_statistic(residual_z: torch.Tensor, text_z: torch.Tensor, gap_z: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [...]: the largest standardised divergence over concepts and both kinds, each
    kind counted only where its own high side is above the ordinary mean (two low signals
    never flag)."""
    hidden = torch.where(residual_z > 0, gap_z, -torch.inf)
    surface = torch.where(text_z > 0, -gap_z, -torch.inf)
    return torch.maximum(hidden, surface).amax(dim=-1)


def _statistics(residual: torch.Tensor, text: torch.Tensor | None, rows: torch.Tensor):
    """Prefix means [N, T, K] (text: the re-reads, or None) standardised by the moments of the
    answers in `rows` -> (moments, residual z [N, T, K], alert statistic [N, T], divergence
    statistic [N, T] or None). Every answer is standardised, in `rows` or not."""
    r_mean, r_std, count = _nan_mean_std(residual[rows])
    residual_z = (residual - r_mean) / r_std
    moments = {
        "residual_mean": r_mean,
        "residual_std": r_std,
        "count": count,
        "text_mean": torch.zeros_like(r_mean),
        "text_std": torch.ones_like(r_std),
        "gap_mean": torch.zeros_like(r_mean),
        "gap_std": torch.ones_like(r_std),
    }
    divergence = None
    if text is not None:
        t_mean, t_std, _ = _nan_mean_std(text[rows])
        text_z = (text - t_mean) / t_std
        gap = residual_z - text_z
        g_mean, g_std, _ = _nan_mean_std(gap[rows])
        gap_z = (gap - g_mean) / g_std
        divergence = divergence_statistic(residual_z, text_z, gap_z)
        divergence = torch.where(residual_z[..., 0].isnan() | text_z[..., 0].isnan(), torch.nan, divergence)
        moments.update(text_mean=t_mean, text_std=t_std, gap_mean=g_mean, gap_std=g_std)
    alert_stat = residual_z.amax(dim=-1)  # NaN propagates where the answer is too short
    return moments, residual_z, alert_stat, divergence


def _family_threshold(values: torch.Tensor, target_fpr: float, confidence: float) -> tuple[float, float]:
    """values [N] of one length -> (threshold, share of values strictly above it)."""
    values = values[~values.isnan()]
    n = int(values.numel())
    ordered = values.sort(descending=True).values
    j = max(1, pac_rank(n, target_fpr, confidence))  # 0: no rank promises the target; use the largest
    threshold = float(ordered[j - 1])
    if math.isinf(threshold):
        threshold = -1e9 if threshold < 0 else threshold
    return threshold, float((values > threshold).double().mean())


def certifiable(n_answers: int, target_fpr: float, confidence: float) -> bool:
    return pac_rank(n_answers, target_fpr, confidence) >= 1


def minimum_answers(target_fpr: float, confidence: float) -> int:
    """The fewest exchangeable answers for which any threshold can promise `target_fpr` with
    `confidence`: (1 - fpr)^n <= 1 - confidence (about 230 for 1 % at 90 %)."""
    return math.ceil(math.log(1 - confidence) / math.log1p(-target_fpr))


def fit_length_null(
    residual_traces: torch.Tensor,
    lengths: torch.Tensor,
    target_fpr: float,
    text_traces: torch.Tensor | None = None,
    confidence: float = 0.9,
    min_tokens: int = 4,
    max_length: int | None = None,
    text_lengths: torch.Tensor | None = None,
    groups: Sequence | None = None,
) -> LengthNull:
    """Control answers' per-token traces [n_answers, max_len, K] and their lengths [n_answers]
    -> the length-aware null with family-wise thresholds at `target_fpr`.

    `text_traces` are the same answers re-read alone (same layout); without them the null holds
    the concept-score alert only (divergence thresholds are +inf). `text_lengths` (default:
    `lengths`) counts each re-read's tokens, which can be fewer (no EOS token in the text).

    `groups` labels each answer's kind of request (the control set's categories). With two or
    more groups the thresholds are set on held-out-group statistics: each answer is read against
    the null of the other groups, so a threshold also covers the shift between kinds of request,
    which live traffic of a kind the control set lacks would bring. Means and spreads (the
    units of every reported z) still come from all answers."""
    if residual_traces.ndim != 3:
        raise InvalidInputError(f"traces must be [n_answers, max_len, n_concepts], got {tuple(residual_traces.shape)}")
    if text_traces is not None and text_traces.shape != residual_traces.shape:
        raise InvalidInputError("residual and text traces differ in shape")
    if not 0 < target_fpr < 1 or not 0 < confidence < 1:
        raise InvalidInputError("target_fpr and confidence must lie in (0, 1)")
    lengths = lengths.long()
    if residual_traces.shape[0] < 2 or int(lengths.max()) < 1:
        raise InvalidInputError("a length-aware null needs at least two non-empty control answers")
    max_len = min(residual_traces.shape[1], max_length or residual_traces.shape[1])
    residual_traces, lengths = residual_traces[:, :max_len], lengths.clamp_max(max_len)
    for traces, counts in ((residual_traces, lengths), (text_traces, text_lengths)):
        if traces is None:
            continue
        valid = torch.arange(1, max_len + 1).unsqueeze(0) <= (lengths if counts is None else counts.long()).unsqueeze(1)
        if not torch.isfinite(traces[:, :max_len][valid]).all():
            raise InvalidInputError("control traces contain NaN or Inf")

    residual = prefix_means(residual_traces, lengths)  # [N, T, K]
    text = None
    if text_traces is not None:
        read = lengths if text_lengths is None else text_lengths.long().clamp_max(max_len)
        text = carried_prefix_means(text_traces[:, :max_len], read, lengths)
    everyone = torch.ones(residual.shape[0], dtype=torch.bool)
    moments, residual_z, alert_stat, divergence = _statistics(residual, text, everyone)
    n_answers = moments["count"][:, 0]
    method = "in_sample"
    if groups is not None and len(set(groups)) > 1:
        # Thresholds from each answer read against a null fitted without its group: the
        # statistic then carries the shift a group the control set never had would bring.
        method = "held_out_group"
        if len(groups) != residual.shape[0]:
            raise InvalidInputError(f"{len(groups)} group labels for {residual.shape[0]} answers")
        index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        group_ids = torch.tensor([index[g] for g in groups])
        for g in group_ids.unique():
            mine = group_ids == g
            _, _, held_alert, held_divergence = _statistics(residual, text, ~mine)
            alert_stat[mine] = held_alert[mine]
            if divergence is not None:
                divergence[mine] = held_divergence[mine]

    certified = [t + 1 for t in range(max_len) if certifiable(int(n_answers[t]), target_fpr, confidence)]
    certified_length = max(certified) if certified else max_len
    div_threshold, div_rate = (
        torch.full((max_len,), math.inf, dtype=torch.float64),
        torch.zeros(max_len, dtype=torch.float64),
    )
    alert_threshold, alert_rate = (
        torch.full((max_len,), math.inf, dtype=torch.float64),
        torch.zeros(max_len, dtype=torch.float64),
    )
    for t in range(max_len):
        if int(n_answers[t]) < 2:
            continue
        alert_threshold[t], alert_rate[t] = _family_threshold(alert_stat[:, t], target_fpr, confidence)
        if divergence is not None:
            div_threshold[t], div_rate[t] = _family_threshold(divergence[:, t], target_fpr, confidence)

    grid = tuple(length for length in PERCENTILE_LENGTHS if length <= max_len)
    reference = residual_z[:, [length - 1 for length in grid]].permute(1, 0, 2)  # [G, N, K]
    reference = reference.sort(dim=1).values  # NaN sorts last
    return LengthNull(
        target_fpr=target_fpr,
        confidence=confidence,
        min_tokens=max(1, min_tokens),
        n_answers=n_answers,
        residual_mean=moments["residual_mean"],
        residual_std=moments["residual_std"],
        text_mean=moments["text_mean"],
        text_std=moments["text_std"],
        gap_mean=moments["gap_mean"],
        gap_std=moments["gap_std"],
        threshold_method=method,
        divergence_threshold=div_threshold,
        alert_threshold=alert_threshold,
        divergence_rate=div_rate,
        alert_rate=alert_rate,
        certified_length=certified_length,
        percentile_lengths=grid,
        percentile_reference=reference,
    )


# ---- storage as plain JSON (the null is a few hundred kB) ----


def null_to_dict(null: LengthNull) -> dict:
    def listed(tensor: torch.Tensor | None):
        if tensor is None:
            return None
        return [None if math.isnan(v) else (1e308 if v == math.inf else v) for v in tensor.flatten().tolist()]

    return {
        "target_fpr": null.target_fpr,
        "confidence": null.confidence,
        "min_tokens": null.min_tokens,
        "certified_length": null.certified_length,
        "threshold_method": null.threshold_method,
        "shape": [null.max_length, null.n_concepts],
        "n_answers": null.n_answers.tolist(),
        **{
            name: listed(getattr(null, name))
            for name in (
                "residual_mean",
                "residual_std",
                "text_mean",
                "text_std",
                "gap_mean",
                "gap_std",
                "divergence_threshold",
                "alert_threshold",
                "divergence_rate",
                "alert_rate",
            )
        },
        "percentile_lengths": list(null.percentile_lengths),
        "percentile_shape": list(null.percentile_reference.shape) if null.percentile_reference is not None else None,
        "percentile_reference": listed(null.percentile_reference),
    }


def null_from_dict(data: dict) -> LengthNull:
    t, k = data["shape"]

    def tensor(name: str, shape) -> torch.Tensor:
        values = [math.nan if v is None else (math.inf if v >= 1e308 else v) for v in data[name]]
        return torch.tensor(values, dtype=torch.float64).reshape(shape)

    reference = None
    if data.get("percentile_reference") is not None:
        reference = tensor("percentile_reference", data["percentile_shape"])
    return LengthNull(
        target_fpr=data["target_fpr"],
        confidence=data["confidence"],
        min_tokens=data["min_tokens"],
        n_answers=torch.tensor(data["n_answers"], dtype=torch.long),
        residual_mean=tensor("residual_mean", (t, k)),
        residual_std=tensor("residual_std", (t, k)),
        text_mean=tensor("text_mean", (t, k)),
        text_std=tensor("text_std", (t, k)),
        gap_mean=tensor("gap_mean", (t, k)),
        gap_std=tensor("gap_std", (t, k)),
        divergence_threshold=tensor("divergence_threshold", (t,)),
        alert_threshold=tensor("alert_threshold", (t,)),
        divergence_rate=tensor("divergence_rate", (t,)),
        alert_rate=tensor("alert_rate", (t,)),
        certified_length=data["certified_length"],
        threshold_method=data.get("threshold_method", "in_sample"),
        percentile_lengths=tuple(data["percentile_lengths"]),
        percentile_reference=reference,
    )
