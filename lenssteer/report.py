"""The comparison report: ``report.md``, ``report.json`` and one ``<task>.png`` grouped bar chart per
task, written atomically; the JSON keeps every per-item outcome so any number can be recomputed.
"""

from __future__ import annotations

import importlib.metadata
import io
import math
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lenssteer.io import atomic_directory, atomic_write_json, atomic_write_text
from lenssteer.stats import AGGREGATES, Outcomes, summarize

__all__ = [
    "at_chance",
    "markdown_tables",
    "package_versions",
    "plot_task",
    "write_report",
]


# --------------------------------------------------------------------------------------------------
# Report


def package_versions(
    names: Sequence[str] = (
        "lenssteer",
        "torch",
        "transformers",
        "peft",
        "numpy",
        "lm_eval",
        "py3langid",
    ),
) -> dict[str, str | None]:
    """Installed versions of the packages that can change the numbers (None if not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _columns(metric_table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    languages: list[str] = []
    for cells in metric_table.values():
        for language in cells:
            if language not in AGGREGATES and language not in languages:
                languages.append(language)
    present = [a for a in AGGREGATES if any(a in cells for cells in metric_table.values())]
    return languages + present


def at_chance(
    summary: Mapping[str, Any],
    chance: Mapping[str, float],
    reference_system: str = "base",
    central_language: str | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {metric: {"chance", "language", "at_chance"}}}`` for the tasks in ``chance``.

    A task metric is *at chance* when the reference system's score in the central language (the
    language the model knows best; the ``average`` when there is none) has a 95% interval that
    contains the chance level: nothing a steering method could carry to other languages is there.
    Only 0/1 metrics of tasks with a chance level (``chance``: ``{task: level}``) are judged.
    """
    flags: dict[str, dict[str, dict[str, Any]]] = {}
    for task, level in chance.items():
        for metric, systems in summary.get(task, {}).items():
            cells = systems.get(reference_system) or {}
            column = central_language if central_language in cells else "average"
            cell = cells.get(column) or {}
            low, high = cell.get("low"), cell.get("high")
            if low is None or high is None or math.isnan(low) or math.isnan(high):
                continue
            flags.setdefault(task, {})[metric] = {
                "chance": level,
                "language": column,
                "at_chance": bool(low <= level <= high),
            }
    return flags


def _raw(value: float | None, signed: bool = False) -> str:
    """A continuous metric in its own unit (e.g. nats per byte), not in percent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _continuous(systems: Mapping[str, Mapping[str, Any]]) -> bool:
    """True when a metric's per-language cells are means of continuous values (not 0/1)."""
    return any(
        isinstance(cell, Mapping) and cell.get("interval") == "bootstrap"
        for cells in systems.values()
        for cell in cells.values()
    )


def _diff_text(cell: Mapping[str, Any], fmt=_pct) -> str:
    flag = "" if cell["diff_low"] <= 0 <= cell["diff_high"] else " *"  # interval excludes zero
    text = (
        f"{fmt(cell['diff'], True)} [{fmt(cell['diff_low'], True)}, "
        f"{fmt(cell['diff_high'], True)}]{flag}"
    )
    if cell.get("identical"):
        return f"{fmt(0.0, True)} (the same value on every item)"
    if cell.get("mde") is not None:
        text += f"; MDE {fmt(cell['mde'])}"
        if cell.get("underpowered"):
            text += " (underpowered)"
    return text


def markdown_tables(
    summary: Mapping[str, Any],
    task_notes: Mapping[str, str] | None = None,
    reference_system: str = "base",
    chance_flags: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> str:
    """One score table and one difference table per task metric (percent, 95% intervals).

    Each difference carries its minimum detectable effect (``MDE``, 80% power, alpha 0.05) and
    ``(underpowered)`` where that exceeds 5 points; ``chance_flags`` (:func:`at_chance`) adds an
    "at chance" line to a metric whose reference score in the central language is within its
    interval of chance.
    """
    lines: list[str] = []
    for task, metrics in summary.items():
        lines.append(f"### {task}\n")
        if task_notes and task_notes.get(task):
            lines.append(task_notes[task] + "\n")
        for metric, systems in metrics.items():
            flag = ((chance_flags or {}).get(task) or {}).get(metric)
            if flag and flag["at_chance"]:
                lines.append(
                    f"**at chance**: `{reference_system}` scores {metric} in "
                    f"`{flag['language']}` with a 95% interval that contains chance "
                    f"({_pct(flag['chance'])}%); differences on this metric cannot show "
                    "knowledge carried between languages.\n"
                )
            columns = _columns(systems)
            fmt = _raw if _continuous(systems) else _pct
            unit = "mean per item, own unit" if fmt is _raw else "score %"
            n_by_language = {
                lang: next((c[lang]["n"] for c in systems.values() if lang in c), 0)
                for lang in columns
            }
            header = " | ".join(f"{lang} (n={n_by_language[lang]})" for lang in columns)
            lines.append(f"**{metric}**: {unit} [95% interval]\n")
            lines.append(f"| system | {header} |")
            lines.append("|---" * (len(columns) + 1) + "|")
            for system, cells in systems.items():
                row = []
                for language in columns:
                    cell = cells.get(language)
                    if cell is None or cell.get("score") is None:
                        row.append("n/a")
                    else:
                        row.append(
                            f"{fmt(cell['score'])} [{fmt(cell['low'])}, {fmt(cell['high'])}]"
                        )
                lines.append(f"| {system} | " + " | ".join(row) + " |")
            others = [s for s in systems if s != reference_system]
            if reference_system in systems and others:
                lines.append(
                    f"\n**{metric}**: difference to {reference_system}, "
                    f"{'same unit' if fmt is _raw else 'percentage points'} "
                    "[95% paired bootstrap interval]; MDE: minimum detectable paired effect "
                    "(80% power, alpha 0.05)\n"
                )
                lines.append(f"| system | {' | '.join(columns)} |")
                lines.append("|---" * (len(columns) + 1) + "|")
                for system in others:
                    row = []
                    for language in columns:
                        cell = systems[system].get(language) or {}
                        if cell.get("diff") is None:
                            row.append("n/a")
                        else:
                            row.append(_diff_text(cell, fmt))
                    lines.append(f"| {system} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_task(
    task: str,
    metric: str,
    systems: Mapping[str, Mapping[str, Any]],
    title: str | None = None,
) -> bytes:
    """A grouped bar chart (languages on x, one bar per system, 95% interval whiskers) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    columns = _columns(systems)
    names = list(systems)
    scale = 1.0 if _continuous(systems) else 100.0  # continuous metrics keep their own unit
    width = 0.8 / max(1, len(names))
    figure, axes = plt.subplots(figsize=(max(5.0, 1.1 * len(columns) + 2), 3.8), dpi=90)
    x = np.arange(len(columns))
    for k, system in enumerate(names):
        scores, lows, highs = [], [], []
        for language in columns:
            cell = systems[system].get(language) or {}
            score = cell.get("score")
            if score is None or (isinstance(score, float) and math.isnan(score)):
                scores.append(np.nan)
                lows.append(0.0)
                highs.append(0.0)
            else:
                scores.append(scale * score)
                # A percentile bootstrap interval may, rarely, not contain the estimate: clip.
                lows.append(max(0.0, scale * (score - cell["low"])))
                highs.append(max(0.0, scale * (cell["high"] - score)))
        axes.bar(
            x + (k - (len(names) - 1) / 2) * width,
            scores,
            width,
            yerr=[lows, highs],
            capsize=2,
            label=system,
            error_kw={"elinewidth": 0.8},
        )
    axes.set_xticks(x, columns)
    axes.set_ylabel(f"{metric} (%)" if scale == 100.0 else metric)
    if scale == 100.0:
        axes.set_ylim(0, 100)
    axes.set_title(title or f"{task}: {metric} (95% intervals)", fontsize=10)
    axes.legend(
        fontsize=7,
        ncol=min(len(names), 5),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        frameon=False,
    )
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def cost_table(outcomes: Sequence[Outcomes], timings: Mapping[str, float]) -> str:
    """Markdown table of where a run's time went: ``timings`` (``{"system / task": seconds}``, as
    compare records them) with the items each scored (language x item pairs) and seconds per item."""
    items: dict[str, set[tuple[str, str]]] = {}
    for outcome in outcomes:
        key = f"{outcome.system} / {outcome.task}"
        items.setdefault(key, set()).update((outcome.language, i) for i in outcome.item_ids)
    lines = ["| step | seconds | items scored | seconds per item |", "|---|---|---|---|"]
    for key, seconds in timings.items():
        n = len(items.get(key, ()))
        per_item = f"{seconds / n:.3f}" if n and seconds else "-"
        lines.append(f"| {key} | {seconds:.1f} | {n or '-'} | {per_item} |")
    total = sum(timings.values())
    lines.append(f"| **all steps** | {total:.1f} | | |")
    return "\n".join(lines)


def write_report(
    out: str | Path,
    outcomes: Sequence[Outcomes],
    metadata: Mapping[str, Any],
    reference_system: str = "base",
    primary_metrics: Mapping[str, str] | None = None,
    task_notes: Mapping[str, str] | None = None,
    notes: str = "",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    central_language: str | None = None,
    chance: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and one PNG per task into folder ``out`` (atomically).

    ``primary_metrics`` maps a task to the metric its plot shows (default: its first metric).
    ``chance`` (``{task: chance level}``) enables the "at chance" marks (:func:`at_chance`).
    Returns the JSON document.
    """
    summary = summarize(outcomes, reference_system, confidence, n_resamples, seed, central_language)
    chance_flags = at_chance(summary, chance or {}, reference_system, central_language)
    primary_metrics = dict(primary_metrics or {})
    document = {
        "format": "lenssteer-compare-report",
        "format_version": 1,
        "metadata": dict(metadata),
        "reference_system": reference_system,
        "confidence": confidence,
        "bootstrap": {"resamples": n_resamples, "seed": seed},
        "primary_metrics": {
            task: primary_metrics.get(task, next(iter(metrics)))
            for task, metrics in summary.items()
        },
        "summary": summary,
        "at_chance": chance_flags,
        "outcomes": [asdict(outcome) for outcome in outcomes],
    }
    document = _json_safe(document)
    meta_lines = [
        f"- {key}: {value}"
        for key, value in metadata.items()
        if isinstance(value, (str, int, float)) and not isinstance(value, bool)
    ]
    packages = metadata.get("packages")
    if isinstance(packages, Mapping):
        meta_lines.append(
            "- packages: " + ", ".join(f"{name} {version}" for name, version in packages.items())
        )
    markdown = [
        "# Comparison report\n",
        *meta_lines,
        "",
        "Scores in percent with 95% intervals (Wilson per language; stratified bootstrap for "
        "`average`, over all languages, and `targets`, over all but the central one). Differences to "
        f"`{reference_system}` are paired bootstrap intervals over the same items; `*` marks an "
        "interval that excludes zero. Beside each difference, MDE is the minimum detectable paired "
        "effect at 80% power and alpha 0.05, (z_0.975 + z_0.8) x the standard error of the mean "
        "per-item difference (sd_diff / sqrt(n) for one language); a 0/1 metric whose MDE exceeds "
        "5 points is marked (underpowered): a true effect of a few points there would most likely "
        "go unseen. A task whose reference score in the central language has an interval that "
        "contains chance is marked **at chance**.\n",
    ]
    if notes:
        markdown.append(notes + "\n")
    markdown.append(markdown_tables(summary, task_notes, reference_system, chance_flags))
    timings = metadata.get("timings_seconds")
    if isinstance(timings, Mapping) and timings:
        markdown.append(
            "## Cost\n\nWall seconds per step (a system on a task includes its share of the "
            "generation and scoring; 0 where it reused the base model's rows).\n\n"
            + cost_table(outcomes, timings)
            + "\n"
        )
    with atomic_directory(out) as scratch:
        for task, metric in document["primary_metrics"].items():
            try:
                png = plot_task(task, metric, summary[task][metric])
            except Exception as error:  # a plot must never cost the numbers of a long run
                warnings.warn(f"no plot for {task}: {error!r}", stacklevel=2)
                markdown.append(f"(no plot for {task}: {error!r})\n")
                continue
            (scratch / f"{task}.png").write_bytes(png)
            markdown.append(f"![{task}]({task}.png)\n")
        atomic_write_json(scratch / "report.json", document)
        atomic_write_text(scratch / "report.md", "\n".join(markdown))
    return document
