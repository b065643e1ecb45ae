"""Confidence intervals, power and the per-task summary of a comparison's outcomes.

Intervals (all 95% by default): a proportion of one language gets a **Wilson score interval**; an
average over languages and any difference between two systems get a **percentile bootstrap**,
resampling items (within each language, stratified) and, for differences, resampling the *same*
items for both systems (paired), which is valid because every system is scored on identical items.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AGGREGATES",
    "Outcomes",
    "UNDERPOWERED_ABOVE",
    "bootstrap_mean_interval",
    "minimum_detectable_effect",
    "paired_bootstrap_difference",
    "stratified_bootstrap_mean",
    "summarize",
    "wilson_interval",
]


# --------------------------------------------------------------------------------------------------
# Intervals


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``(nan, nan)`` when ``n == 0``)."""
    if n == 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return (float(low), float(high))


def stratified_bootstrap_mean(
    groups: Sequence[Sequence[float]],
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the average of group means; items resampled within each group.

    With one group this is the ordinary percentile bootstrap of a mean.
    """
    arrays = [np.asarray(group, dtype=np.float64) for group in groups]
    if not arrays or any(a.size == 0 for a in arrays):
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for values in arrays:
        picks = rng.integers(0, values.size, size=(n_resamples, values.size))
        total += values[picks].mean(axis=1)
    estimate = float(np.mean([a.mean() for a in arrays]))
    return (estimate, *_percentiles(total / len(arrays), confidence))


def bootstrap_mean_interval(
    values: Sequence[float], n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap interval of a mean."""
    return stratified_bootstrap_mean([values], n_resamples, seed, confidence)


def paired_bootstrap_difference(
    system: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``(difference, low, high)`` of ``mean(system) - mean(reference)``, items paired.

    Both arguments are lists of groups (languages) of per-item values in the same item order; the
    statistic is the average over groups of the mean per-item difference, and each resample draws
    the same items for both systems.
    """
    if len(system) != len(reference):
        raise ValueError(f"{len(system)} groups against {len(reference)}")
    differences = []
    for number, (a, b) in enumerate(zip(system, reference, strict=True), 1):
        if len(a) != len(b):
            raise ValueError(
                f"group {number}: {len(a)} items against {len(b)}: a paired difference needs "
                "the same items for both systems"
            )
        differences.append(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return stratified_bootstrap_mean(differences, n_resamples, seed, confidence)


def minimum_detectable_effect(
    differences: Sequence[Sequence[float]], alpha: float = 0.05, power: float = 0.8
) -> float:
    """Smallest true paired difference a two-sided test at ``alpha`` detects with ``power``.

    ``differences``: groups (languages) of per-item differences ``system - reference`` on the same
    items. The statistic is the average over the ``G`` groups of the mean difference, whose
    standard error is ``se = sqrt(sum_g sd_g^2 / n_g) / G`` (``sd_g``: sample standard deviation,
    ``ddof=1``, of group ``g``'s per-item differences). Then

        MDE = (z_{1 - alpha/2} + z_{power}) * se

    which for one group is the textbook paired formula ``(z_{1-a/2} + z_power) * sd_diff /
    sqrt(n)``: 2.80 standard errors at alpha 0.05 and 80% power. The variance is the observed
    paired variance, so two systems that agree on almost every item have a small MDE. ``nan`` when
    a group has fewer than 2 items.
    """
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    arrays = [np.asarray(group, dtype=np.float64) for group in differences]
    if not arrays or any(a.size < 2 for a in arrays):
        return math.nan
    variance = sum(float(a.var(ddof=1)) / a.size for a in arrays) / len(arrays) ** 2
    normal = statistics.NormalDist()
    multiplier = normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)
    return multiplier * math.sqrt(variance)


UNDERPOWERED_ABOVE = 0.05  # a difference of proportions whose MDE exceeds 5 points is underpowered


# --------------------------------------------------------------------------------------------------
# Outcomes and summaries


@dataclass
class Outcomes:
    """Per-item results of one system on one task metric in one language.

    ``values`` are per-item scores in ``item_ids`` order (0/1 for accuracy). ``details`` holds
    per-item extras for the record (chosen option, generated text, detected language, ...).
    """

    task: str
    metric: str
    system: str
    language: str
    item_ids: list[str]
    values: list[float]
    details: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.values):
            raise ValueError(f"{len(self.item_ids)} item ids for {len(self.values)} values")

    @property
    def binary(self) -> bool:
        return all(v in (0.0, 1.0) for v in self.values)


def _score_cell(outcomes: Outcomes, confidence: float, n_resamples: int, seed: int) -> dict:
    n = len(outcomes.values)
    if n == 0:
        return {"score": None, "low": None, "high": None, "n": 0, "interval": None}
    if outcomes.binary:
        successes = int(sum(outcomes.values))
        low, high = wilson_interval(successes, n, confidence)
        return {
            "score": successes / n,
            "low": low,
            "high": high,
            "n": n,
            "interval": "wilson",
        }
    mean, low, high = bootstrap_mean_interval(outcomes.values, n_resamples, seed, confidence)
    return {"score": mean, "low": low, "high": high, "n": n, "interval": "bootstrap"}


AGGREGATES = ("average", "targets")


def summarize(
    outcomes: Sequence[Outcomes],
    reference_system: str = "base",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    central_language: str | None = None,
) -> dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]]:
    """``{task: {metric: {system: {language | "average" | "targets": cell}}}}``.

    A cell has ``score``, ``low``, ``high``, ``n`` (items) and, for systems other than the
    reference, ``diff``, ``diff_low``, ``diff_high`` against the reference on the same items,
    ``mde`` (:func:`minimum_detectable_effect` of the paired per-item differences, 80% power,
    alpha 0.05) and ``underpowered`` (a 0/1 metric whose ``mde`` exceeds 5 points). The
    ``"average"`` cell averages the language scores (every language weighs the same) with a
    stratified bootstrap interval; it covers the languages that every system has. With
    ``central_language``, ``"targets"`` does the same over the other languages (only where the
    central language is among them, else it would repeat ``"average"``).
    """
    table: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    index: dict[tuple[str, str, str, str], Outcomes] = {}
    for outcome in outcomes:
        key = (outcome.task, outcome.metric, outcome.system, outcome.language)
        if key in index:
            raise ValueError(f"outcomes given twice for {key}")
        index[key] = outcome
    for (task, metric, system, language), outcome in index.items():
        cells = table.setdefault(task, {}).setdefault(metric, {}).setdefault(system, {})
        cells[language] = _score_cell(outcome, confidence, n_resamples, seed)
    for task, metrics in table.items():
        for metric, systems in metrics.items():
            first = next(iter(systems.values()))
            common = set.intersection(*(set(cells) for cells in systems.values()))
            languages = [lang for lang in first if lang in common]  # first system's order
            aggregates = {"average": languages}
            if central_language in languages and len(languages) > 1:
                aggregates["targets"] = [lang for lang in languages if lang != central_language]
            reference = systems.get(reference_system)
            for system, cells in systems.items():
                for name, langs in aggregates.items():
                    groups = [index[(task, metric, system, lang)].values for lang in langs]
                    if not langs:
                        continue
                    mean, low, high = stratified_bootstrap_mean(
                        groups, n_resamples, seed, confidence
                    )
                    cells[name] = {
                        "score": mean,
                        "low": low,
                        "high": high,
                        "n": sum(len(g) for g in groups),
                        "interval": "stratified bootstrap",
                        "languages": langs,
                    }
                if reference is None or system == reference_system:
                    continue
                for column in [*languages, *aggregates]:
                    if column not in cells:
                        continue
                    langs = aggregates.get(column, [column])
                    mine = [index[(task, metric, system, lang)] for lang in langs]
                    theirs = [index[(task, metric, reference_system, lang)] for lang in langs]
                    for a, b in zip(mine, theirs, strict=True):
                        if a.item_ids != b.item_ids:
                            raise ValueError(
                                f"{task}/{metric}/{a.language}: {system} and {reference_system} "
                                "were scored on different items"
                            )
                    diff, low, high = paired_bootstrap_difference(
                        [a.values for a in mine],
                        [b.values for b in theirs],
                        n_resamples,
                        seed,
                        confidence,
                    )
                    mde = minimum_detectable_effect(
                        [np.subtract(a.values, b.values) for a, b in zip(mine, theirs, strict=True)]
                    )
                    binary = all(o.binary for o in (*mine, *theirs))
                    cells[column].update(
                        {
                            "diff": diff,
                            "diff_low": low,
                            "diff_high": high,
                            "mde": mde,
                            "underpowered": bool(binary and not mde <= UNDERPOWERED_ABOVE),
                            "identical": all(
                                a.values == b.values for a, b in zip(mine, theirs, strict=True)
                            ),
                        }
                    )
    return table
