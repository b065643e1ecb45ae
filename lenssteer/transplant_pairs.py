"""The XTransplant grid: every ``(source, target)`` layer pair of :mod:`lenssteer.transplant` scored
at once, read as accuracy, upper bound, control and pair selection, and the runs on a task.

What it measures, on a multiple-choice task scored by the log-likelihood of each option:

- accuracy of each ``(s, t)`` pair, as a heatmap over the grid;
- the *instance-aware upper bound*: the share of items that at least one pair answers correctly. It
  is optimistic by construction: with dozens of tries on four options, the union approaches 100% by
  luck alone, so we report beside it a control with the same number of tries in which the donor is
  a random other item;
- *pair selection*: the best single pair chosen on a dev split and applied to held-out items, which
  is what a user could deploy.

The grid is fast: donors run once per item for all layers and both granularities; the recipient's
prompt minus its last token runs once, and each pair (batched, on a copy of that KV cache) only
costs the last token plus the answer tokens.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lenssteer.forward import PrefixCache, contiguous_head_input, run_prefix
from lenssteer.io import (
    atomic_directory,
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    check_writable,
)
from lenssteer.models import (
    ModuleNames,
    find_decoder_layers,
    resolve_layers,
)
from lenssteer.stats import wilson_interval
from lenssteer.transplant import (
    GRANULARITIES,
    DonorActivations,
    _check_granularity,
    _continuation_ids,
    _device,
    _encode_one,
    _layer_index,
    _logits_kwargs,
    _score_rows,
    record_donor_activations,
    transplant_generate,
    transplant_loglikelihoods,
    transplanted,
)

__all__ = [
    "GRID_MODES",
    "GridScores",
    "accuracy",
    "answer_probability",
    "dev_heldout_split",
    "format_grid_summary",
    "grid_pairs",
    "load_selected_pairs",
    "plot_accuracy_heatmap",
    "run_transplant",
    "run_transplant_grid",
    "save_selected_pairs",
    "select_pair",
    "summarize_grid",
    "transplant_grid",
]

GRID_MODES = ("overall", "target-first", "explicit")


# --------------------------------------------------------------------------------------------------
# The fast grid


def _layers(spec: str | int | Sequence[int], n_layers: int) -> list[int]:
    """A layer spec (``"top:4"``, ``"all"``, ``"0,4,-1"``) or indices, resolved against the model."""
    return resolve_layers(spec if isinstance(spec, (str, int)) else list(spec), n_layers)


def grid_pairs(
    mode: str,
    n_layers: int,
    sources: str | Sequence[int] | None = None,
    targets: str | Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """``(source, target)`` pairs, ordered by target then source.

    ``overall``: every pair; ``target-first``: target 0, every source (the paper's cheap mode);
    ``explicit``: ``sources x targets``. In the first two, ``sources``/``targets`` restrict the
    range when given. Each is a list of layer indices or a layer spec (``"top:4"``, ``"all"``,
    ``"0,4,-1"``; :func:`lenssteer.models.resolve_layers`), resolved against ``n_layers``.
    """
    if mode not in GRID_MODES:
        raise ValueError(f"unknown grid mode {mode!r}; choose one of {', '.join(GRID_MODES)}")
    all_layers = list(range(n_layers))
    src = _layers(sources, n_layers) if sources is not None else all_layers
    if mode == "target-first":
        if targets is not None and _layers(targets, n_layers) != [0]:
            raise ValueError("grid mode 'target-first' fixes the target layer at 0")
        tgt = [0]
    elif mode == "explicit":
        if sources is None or targets is None:
            raise ValueError("grid mode 'explicit' needs both sources and targets")
        tgt = _layers(targets, n_layers)
    else:
        tgt = _layers(targets, n_layers) if targets is not None else all_layers
    return [(s, t) for t in tgt for s in src]


@dataclass
class GridScores:
    """Option log-likelihoods of one granularity over a grid of (source, target) pairs.

    ``base``: ``(n_items, n_options)`` unpatched; ``transplant``: ``(n_items, n_pairs, n_options)``
    with each item's own donor; ``control``: the same with a random other item as donor
    (``control_donors``: ``(n_items, n_pairs)`` its index), or ``None``.
    """

    granularity: str
    pairs: list[tuple[int, int]]
    base: torch.Tensor
    transplant: torch.Tensor
    control: torch.Tensor | None = None
    control_donors: torch.Tensor | None = None


def _random_other_items(n_items: int, n_tries: int, seed: int) -> torch.Tensor:
    """``(n_items, n_tries)``: for each item, random indices of *other* items."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_items - 1, (n_items, n_tries), generator=generator)
    return draws + (draws >= torch.arange(n_items).unsqueeze(1)).long()


@torch.no_grad()
def transplant_grid(
    model: nn.Module,
    tokenizer,
    recipient_prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    donor_activations: DonorActivations,
    pairs: Sequence[tuple[int, int]],
    control: bool = True,
    seed: int = 0,
    chunk_size: int = 64,
    add_special_tokens: bool | None = None,
    names: ModuleNames | None = None,
    progress: bool = False,
) -> dict[str, GridScores]:
    """Score every (source, target) pair on every item, reusing the recipient's KV cache.

    ``donor_activations``: from :func:`record_donor_activations` over *all* layers,
    ``{granularity: (n_items, n_layers, hidden)}``, item ``i`` aligned with ``recipient_prompts[i]``;
    every granularity in it is scored. Per item, the prompt minus its last token runs once; then
    rows (unpatched, each pair with the item's donor, each pair with a random other item's donor
    when ``control``), ``chunk_size`` at a time, run on copies of that cache, each computing only
    the last prompt token (patched) and the option tokens. Gives the same numbers as
    :func:`transplant_loglikelihoods` per pair.
    """
    n_items = len(recipient_prompts)
    if len(continuations) != n_items:
        raise ValueError(f"got {len(continuations)} continuation lists for {n_items} prompts")
    if not donor_activations:
        raise ValueError("donor_activations is empty")
    n_layers = len(find_decoder_layers(model, names))
    for granularity, values in donor_activations.items():
        _check_granularity(granularity)
        if values.dim() != 3 or values.shape[0] != n_items or values.shape[1] != n_layers:
            raise ValueError(
                f"donor_activations[{granularity!r}] must be (n_items={n_items}, "
                f"n_layers={n_layers}, hidden) over all layers, got {tuple(values.shape)}"
            )
    pairs = [(_layer_index(model, s, names), _layer_index(model, t, names)) for s, t in pairs]
    if not pairs:
        raise ValueError("no (source, target) pairs to score")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    control = control and n_items > 1
    others = _random_other_items(n_items, len(pairs), seed) if control else None
    device = _device(model)
    granularities = list(donor_activations)
    prompts = [_encode_one(tokenizer, p, add_special_tokens) for p in recipient_prompts]
    conts = [
        [_continuation_ids(tokenizer, p, c) for c in options]
        for p, options in zip(recipient_prompts, continuations, strict=True)
    ]
    n_options = max(len(options) for options in conts)
    base = torch.full((n_items, n_options), -math.inf)
    shape = (n_items, len(pairs), n_options)
    results = {
        g: GridScores(
            granularity=g,
            pairs=list(pairs),
            base=base,
            transplant=torch.full(shape, -math.inf),
            control=torch.full(shape, -math.inf) if control else None,
            control_donors=others,
        )
        for g in granularities
    }
    sources = torch.tensor([s for s, _ in pairs])
    for i in tqdm(range(n_items), desc="grid", unit="item", disable=not progress):
        prefix = _prompt_prefix(model, prompts[i][:-1], device)
        # One row per (granularity, donor, pair), plus one unpatched row; rows of every kind share
        # forward passes, since a few-token pass costs about one read of the weights.
        rows: list[_Row] = [_Row(None, None, 0)]
        destinations: list[tuple[torch.Tensor, int] | None] = [None]
        for granularity in granularities:
            values = donor_activations[granularity]
            groups = [(results[granularity].transplant, values[i, sources])]  # (n_pairs, hidden)
            if control:
                groups.append((results[granularity].control, values[others[i], sources]))
            for table, activations in groups:
                for k, (_, target) in enumerate(pairs):
                    rows.append(_Row(granularity, activations[k], target))
                    destinations.append((table, k))
        n = len(conts[i])
        for start in range(0, len(rows), chunk_size):
            scores = _score_on_cache(
                model,
                prefix,
                prompts[i][-1],
                conts[i],
                rows[start : start + chunk_size],
                names=names,
                device=device,
            )
            for destination, row_scores in zip(
                destinations[start : start + chunk_size], scores, strict=True
            ):
                if destination is None:
                    base[i, :n] = row_scores
                else:
                    table, k = destination
                    table[i, k, :n] = row_scores
    return results


@dataclass(frozen=True)
class _Row:
    """One row of a grid pass: unpatched when ``granularity`` is None."""

    granularity: str | None
    activation: torch.Tensor | None  # (hidden,)
    target_layer: int


def _prompt_prefix(model: nn.Module, prefix: list[int], device: torch.device) -> PrefixCache | None:
    """Run the prompt minus its last token once (None when that is empty)."""
    if not prefix:
        return None
    input_ids = torch.tensor([prefix], device=device)
    return run_prefix(
        model,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        position_ids=torch.arange(len(prefix), device=device).unsqueeze(0),
        **_logits_kwargs(model, 1),
    )


def _score_on_cache(
    model: nn.Module,
    prefix: PrefixCache | None,
    last: int,
    conts: list[list[int]],
    rows: Sequence[_Row],
    *,
    names: ModuleNames | None,
    device: torch.device,
) -> torch.Tensor:
    """``(len(rows), n_options)`` option log-likelihoods, each row patched as it says.

    All rows run in one pass on copies of the prefix cache (so they never see each other's keys):
    the last prompt token, patched, then each option minus its last token.
    """
    single = all(len(c) == 1 for c in conts)
    repeat = 1 if single else len(conts)  # model rows per grid row
    if single:  # every option is one token: read them all from the last token's logits
        sequences = [[last]] * len(rows)
    else:
        sequences = [[last, *c[:-1]] for _ in rows for c in conts]
    width = max(len(seq) for seq in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    new_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for index, seq in enumerate(sequences):
        input_ids[index, : len(seq)] = torch.tensor(seq)
        new_mask[index, : len(seq)] = 1
    position_ids = torch.arange(width, device=device).unsqueeze(0).expand(len(sequences), -1)
    new_mask = new_mask.to(device)
    forward = dict(attention_mask=new_mask, position_ids=position_ids, use_cache=True)
    if prefix is not None:
        forward = prefix.continuing(model, new_mask, position_ids)
    prefix_len = prefix.length if prefix is not None else 0
    with ExitStack() as stack:
        for granularity in GRANULARITIES:
            members = [r for r, row in enumerate(rows) if row.granularity == granularity]
            if not members:
                continue
            hidden = rows[members[0]].activation.shape[-1]
            activations = torch.zeros(len(rows), hidden)
            positions = torch.full((len(rows),), -1, dtype=torch.long)  # -1: leave the row alone
            targets = torch.full((len(rows),), rows[members[0]].target_layer, dtype=torch.long)
            for r in members:
                activations[r] = rows[r].activation
                positions[r] = prefix_len
                targets[r] = rows[r].target_layer
            stack.enter_context(
                transplanted(
                    model,
                    activations.repeat_interleave(repeat, dim=0),
                    positions.repeat_interleave(repeat, dim=0),
                    targets.repeat_interleave(repeat, dim=0),
                    granularity,
                    names,
                )
            )
        with contiguous_head_input(model):
            logits = model(input_ids=input_ids.to(device), **forward).logits.cpu()
    if single:
        log_probs = torch.log_softmax(logits[:, 0].float(), dim=-1)
        return log_probs[:, torch.tensor([c[0] for c in conts])]
    targets_ids = [c for _ in rows for c in conts]
    scores = _score_rows(logits, targets_ids, [0] * len(sequences))
    return scores.view(len(rows), len(conts))


# --------------------------------------------------------------------------------------------------
# Reading a grid: accuracy, upper bound, control, pair selection


def accuracy(scores: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Whether the top-scoring option is the answer: ``scores (..., n_options)`` -> bool ``(...)``.

    ``answers``: ``(n_items,)``; the item axis of ``scores`` comes first.
    """
    answers = answers.long().view(-1, *([1] * (scores.dim() - 2)))
    return scores.argmax(dim=-1) == answers


def answer_probability(scores: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Probability of the answer among the options (softmax over option scores): ``(...)``.

    A finer signal than accuracy on small samples: it moves even when the top option does not.
    """
    answers = answers.long().view(-1, *([1] * (scores.dim() - 2)), 1)
    probabilities = torch.softmax(scores.float(), dim=-1)
    return probabilities.gather(-1, answers.expand(*scores.shape[:-1], 1)).squeeze(-1)


def select_pair(correct: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> int:
    """Index of the most accurate pair over items (``correct``: bool ``(n_items, n_pairs)``).

    Ties: lowest target layer, then deepest source layer, as the paper's code does.
    """
    if correct.shape[1] != len(pairs) or not pairs:
        raise ValueError(f"correct has {correct.shape[1]} pairs, pairs lists {len(pairs)}")
    hits = correct.sum(dim=0).tolist()
    return max(range(len(pairs)), key=lambda k: (hits[k], -pairs[k][1], pairs[k][0]))


def dev_heldout_split(
    n_items: int, dev_fraction: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of item indices into (dev, held-out), both sorted.

    Drawn by :func:`lenssteer.sampling.split_ids` (the rule every lenssteer sample follows) over
    the indices, salt ``"transplant-dev"``.
    """
    from lenssteer.sampling import split_ids

    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    if n_items < 2:
        raise ValueError("pair selection needs at least 2 items")
    n_dev = min(n_items - 1, max(1, round(n_items * dev_fraction)))
    dev, held = split_ids([str(i) for i in range(n_items)], [n_dev, None], seed, "transplant-dev")
    return (
        torch.tensor(sorted(int(i) for i in dev), dtype=torch.long),
        torch.tensor(sorted(int(i) for i in held), dtype=torch.long),
    )


def summarize_grid(
    scores: GridScores,
    answers: torch.Tensor,
    dev_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy numbers of one grid: base, every pair, best pair, upper bound, control, selection.

    Accuracies are fractions; ``*_ci`` are 95% Wilson intervals; ``*_answer_probability`` is the
    mean probability of the right option among the options. The selection picks a pair on a
    seeded dev split and reports it on the held-out rest against the base model there.
    """
    answers = answers.long()
    n = len(answers)
    base = accuracy(scores.base, answers)
    pair_correct = accuracy(scores.transplant, answers)  # (n_items, n_pairs)
    best = select_pair(pair_correct, scores.pairs)
    pair_accuracy = pair_correct.float().mean(dim=0)
    summary: dict[str, Any] = {
        "granularity": scores.granularity,
        "n_items": n,
        "n_pairs": len(scores.pairs),
        "pairs": [list(p) for p in scores.pairs],
        "pair_accuracy": [round(float(a), 4) for a in pair_accuracy],
        "base_accuracy": float(base.float().mean()),
        "base_accuracy_ci": wilson_interval(int(base.sum()), n),
        "best_pair": list(scores.pairs[best]),
        "best_pair_accuracy": float(pair_accuracy[best]),
        "best_pair_accuracy_ci": wilson_interval(int(pair_correct[:, best].sum()), n),
        "upper_bound": float(pair_correct.any(dim=1).float().mean()),
        "base_answer_probability": float(answer_probability(scores.base, answers).mean()),
        "pair_answer_probability": [
            round(float(p), 4) for p in answer_probability(scores.transplant, answers).mean(dim=0)
        ],
        "base_correct": "".join("1" if c else "0" for c in base.tolist()),
        "pair_correct": ["".join("1" if c else "0" for c in row) for row in pair_correct.tolist()],
    }
    if scores.control is not None:
        control_correct = accuracy(scores.control, answers)
        summary["control_upper_bound"] = float(control_correct.any(dim=1).float().mean())
        summary["control_mean_pair_accuracy"] = float(control_correct.float().mean())
        summary["control_answer_probability"] = float(
            answer_probability(scores.control, answers).mean()
        )
    if n >= 2:
        dev, held = dev_heldout_split(n, dev_fraction, seed)
        chosen = select_pair(pair_correct[dev], scores.pairs)
        summary["selection"] = {
            "dev_items": len(dev),
            "heldout_items": len(held),
            "pair": list(scores.pairs[chosen]),
            "dev_accuracy": float(pair_correct[dev, chosen].float().mean()),
            "heldout_accuracy": float(pair_correct[held, chosen].float().mean()),
            "heldout_base_accuracy": float(base[held].float().mean()),
        }
    return summary


def save_selected_pairs(path: str | Path, selected: dict[str, Any]) -> None:
    """Write chosen pairs (``{language: {granularity: {...}}}`` plus metadata) as JSON, atomically."""
    atomic_write_json(path, {"format": "lenssteer-transplant-pairs", "version": 1, **selected})


def load_selected_pairs(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_selected_pairs`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != "lenssteer-transplant-pairs":
        raise ValueError(f"{path} is not a lenssteer transplant pair file")
    return data


def plot_accuracy_heatmap(
    pair_accuracy: Sequence[float],
    pairs: Sequence[tuple[int, int]],
    path: str | Path,
    title: str = "",
    base_accuracy: float | None = None,
) -> None:
    """A PNG heatmap of accuracy over (source, target); pairs not in the grid stay blank.

    Sources run up the y axis and targets along x; a grid with one target (``target-first``) is
    drawn as a horizontal strip with sources along x. Drawn on an Agg canvas without touching the
    global matplotlib backend; written atomically.
    """
    import io
    import textwrap

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sources = sorted({s for s, _ in pairs})
    targets = sorted({t for _, t in pairs})
    grid = np.full((len(sources), len(targets)), np.nan)
    for (s, t), value in zip(pairs, pair_accuracy, strict=True):
        grid[sources.index(s), targets.index(t)] = value
    strip = len(targets) == 1
    if strip:  # rows = targets, columns = sources
        grid = grid.T
    rows, columns = grid.shape
    row_labels, column_labels = (targets, sources) if strip else (sources, targets)
    width = min(12.0, max(4.8, 2.8 + 0.32 * columns))
    height = min(10.0, max(2.8, 1.8 + 0.22 * rows))
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(
        grid, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest"
    )
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label("accuracy")
    if base_accuracy is not None:
        colorbar.ax.axhline(base_accuracy, color="red", linewidth=2)
    step_x, step_y = max(1, columns // 16), max(1, rows // 16)
    axes.set_xticks(range(0, columns, step_x), [str(c) for c in column_labels[::step_x]])
    axes.set_yticks(range(0, rows, step_y), [str(r) for r in row_labels[::step_y]])
    source_label, target_label = "source layer s (donor)", "target layer t (recipient)"
    axes.set_xlabel(source_label if strip else target_label)
    axes.set_ylabel(target_label if strip else source_label)
    if base_accuracy is not None:
        title = f"{title}; base {base_accuracy:.3f} (red line on the colour bar)"
    axes.set_title(textwrap.fill(title, width=int(width * 11)), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(path)


# --------------------------------------------------------------------------------------------------
# Runs on a task (the CLI calls these)


def _task_prompts(tokenizer, items, chat_template):
    from lenssteer.mmlu import format_multiple_choice

    formatted = [format_multiple_choice(tokenizer, item, chat_template) for item in items]
    return [f.text for f in formatted], [f.continuations for f in formatted]


def _aligned_items(task: str, donor_language: str, recipient_languages: Sequence[str], limit, seed):
    from lenssteer.mmlu import align_items, load_task, sample_items

    lists = align_items(
        load_task(task, donor_language), *(load_task(task, lang) for lang in recipient_languages)
    )
    if not lists[0]:
        raise ValueError(
            f"task {task!r} has no items aligned across {donor_language}, "
            f"{', '.join(recipient_languages)}"
        )
    return [sample_items(items, limit, seed) for items in lists]


def run_transplant(
    model_name: str,
    task: str = "mmlu-translated",
    donor_language: str = "en",
    recipient_language: str = "de",
    granularity: str = "ffn",
    source_layer: int = 3,
    target_layer: int = 0,
    generate: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    chat_template: bool | None = None,
    names: ModuleNames | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    dtype: str | torch.dtype = "float32",
    command: str | None = None,
) -> dict[str, Any]:
    """One pair on a task: base vs transplanted accuracy (and greedy outputs with ``generate``).

    ``dtype``: the weights' dtype (``"auto"``: bfloat16 where the device computes it natively).
    ``command``: the command line that ran this (the CLI's), recorded in the result.
    """
    from lenssteer.models import load_model, model_identity

    if out is not None:  # checked before any work
        if Path(out).is_dir():
            raise ValueError(f"--out {out} is a folder; give a file name for the JSON result")
        check_writable(out)

    granularity = _check_granularity(granularity)
    tokenizer, model = load_model(model_name, dtype)
    donors, recipients = _aligned_items(task, donor_language, [recipient_language], limit, seed)
    donor_prompts, _ = _task_prompts(tokenizer, donors, chat_template)
    recipient_prompts, continuations = _task_prompts(tokenizer, recipients, chat_template)
    answers = torch.tensor([item.answer for item in recipients])
    started = time.perf_counter()
    common = dict(batch_size=batch_size, names=names, progress=progress)
    base = transplant_loglikelihoods(
        model, tokenizer, donor_prompts, recipient_prompts, continuations, None, None, **common
    )
    patched = transplant_loglikelihoods(
        model,
        tokenizer,
        donor_prompts,
        recipient_prompts,
        continuations,
        source_layer,
        target_layer,
        granularity,
        **common,
    )
    base_ok, patched_ok = accuracy(base, answers), accuracy(patched, answers)
    n = len(answers)
    result: dict[str, Any] = {
        "model": model_identity(model),
        "task": task,
        "donor_language": donor_language,
        "recipient_language": recipient_language,
        "granularity": granularity,
        "source_layer": _layer_index(model, source_layer, names),
        "target_layer": _layer_index(model, target_layer, names),
        "n_items": n,
        "item_ids": [item.id for item in recipients],
        "base_accuracy": float(base_ok.float().mean()),
        "base_accuracy_ci": wilson_interval(int(base_ok.sum()), n),
        "transplant_accuracy": float(patched_ok.float().mean()),
        "transplant_accuracy_ci": wilson_interval(int(patched_ok.sum()), n),
        "changed_answers": int((base.argmax(-1) != patched.argmax(-1)).sum()),
        "command": command,
    }
    if generate:
        result["generations"] = [
            {"id": item.id, "base": b, "transplant": t}
            for item, b, t in zip(
                recipients,
                transplant_generate(
                    model,
                    tokenizer,
                    donor_prompts,
                    recipient_prompts,
                    None,
                    None,
                    max_new_tokens=generate,
                    **common,
                ),
                transplant_generate(
                    model,
                    tokenizer,
                    donor_prompts,
                    recipient_prompts,
                    source_layer,
                    target_layer,
                    granularity,
                    max_new_tokens=generate,
                    **common,
                ),
                strict=True,
            )
        ]
    result["seconds"] = round(time.perf_counter() - started, 1)
    if out is not None:
        atomic_write_json(out, result)
    return result


def run_transplant_grid(
    model_name: str,
    out_dir: str | Path,
    task: str = "mmlu-translated",
    donor_language: str = "en",
    recipient_languages: Sequence[str] = ("de",),
    granularities: Sequence[str] = ("ffn",),
    mode: str = "target-first",
    sources: str | Sequence[int] | None = None,
    targets: str | Sequence[int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    dev_fraction: float = 0.5,
    control: bool = True,
    batch_size: int = 8,
    chunk_size: int = 64,
    chat_template: bool | None = None,
    names: ModuleNames | None = None,
    command: str | None = None,
    progress: bool = True,
    overwrite: bool = True,
    dtype: str | torch.dtype = "float32",
) -> dict[str, Any]:
    """The grid on a task for each recipient language; writes ``grid.json``, ``selected_pairs.json``,
    ``summary.md``, and per grid ``heatmap_<lang>_<granularity>.png`` and the raw option scores
    ``scores_<lang>_<granularity>.safetensors`` into ``out_dir``.

    Donors are recorded once and shared by all recipient languages. Returns the JSON content.
    The arguments and ``out_dir`` are checked before any model work (a file, a non-empty folder
    that is not a grid result, an input folder, an unwritable place, and with
    ``overwrite=False`` an existing grid result are refused). The result folder is written beside
    ``out_dir`` and replaces it in one rename, so it never mixes new files with an old grid.
    ``dtype``: the weights' dtype (``"bfloat16"`` or ``"float32"``, the default).
    """
    from lenssteer.models import load_model, model_identity

    granularities = [_check_granularity(g) for g in granularities]
    recipient_languages = list(recipient_languages)
    if not recipient_languages:
        raise ValueError("give at least one recipient language")
    repeated = sorted({x for x in recipient_languages if recipient_languages.count(x) > 1})
    if repeated:
        raise ValueError(f"recipient language(s) {', '.join(repeated)} given more than once")
    if not (isinstance(dev_fraction, (int, float)) and 0 < dev_fraction < 1):
        raise ValueError(f"--dev-fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    out_dir = Path(out_dir)
    check_output_folder(
        out_dir,
        "grid.json",
        "transplant-grid result",
        [model_name, task],
        overwrite=overwrite,
    )
    started = time.perf_counter()
    tokenizer, model = load_model(model_name, dtype)
    n_layers = len(find_decoder_layers(model, names))
    pairs = grid_pairs(mode, n_layers, sources, targets)
    donors, *recipient_lists = _aligned_items(
        task, donor_language, recipient_languages, limit, seed
    )
    donor_prompts, _ = _task_prompts(tokenizer, donors, chat_template)
    donor_activations = record_donor_activations(
        model,
        tokenizer,
        donor_prompts,
        None,
        granularities,
        batch_size,
        names=names,
        progress=progress,
    )
    identity = model_identity(model)
    result: dict[str, Any] = {
        "model": identity,
        "task": task,
        "donor_language": donor_language,
        "recipient_languages": recipient_languages,
        "granularities": granularities,
        "mode": mode,
        "n_layers": n_layers,
        "n_items": len(donors),
        "item_ids": [item.id for item in donors],
        "seed": seed,
        "dev_fraction": dev_fraction,
        "command": command,
        "languages": {},
    }
    selected: dict[str, Any] = {"model": identity, "task": task, "donor_language": donor_language}
    if len(donors) >= 2:  # the items the pairs were chosen on (a comparison refuses to score them)
        dev_indices, _ = dev_heldout_split(len(donors), dev_fraction, seed)
        selected["dev_item_ids"] = [donors[int(i)].id for i in dev_indices]
    heatmaps: list[tuple[Any, ...]] = []  # written at the end, with everything else
    raw_scores: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    for language, items in zip(recipient_languages, recipient_lists, strict=True):
        prompts, continuations = _task_prompts(tokenizer, items, chat_template)
        answers = torch.tensor([item.answer for item in items])
        grids = transplant_grid(
            model,
            tokenizer,
            prompts,
            continuations,
            donor_activations,
            pairs,
            control=control,
            seed=seed,
            chunk_size=chunk_size,
            names=names,
            progress=progress,
        )
        result["languages"][language] = {}
        selected[language] = {}
        for granularity, scores in grids.items():
            summary = summarize_grid(scores, answers, dev_fraction, seed)
            heatmap = f"heatmap_{language}_{granularity}.png"
            heatmaps.append(
                (
                    summary["pair_accuracy"],
                    scores.pairs,
                    heatmap,
                    f"{identity['model']}: {donor_language}->{language}, {granularity}, "
                    f"{len(items)} items",
                    summary["base_accuracy"],
                )
            )
            summary["heatmap"] = heatmap
            summary["scores"] = f"scores_{language}_{granularity}.safetensors"
            raw = {"base": scores.base, "transplant": scores.transplant, "answers": answers}
            if scores.control is not None:
                raw.update(control=scores.control, control_donors=scores.control_donors)
            raw_scores[summary["scores"]] = (raw, {"pairs": json.dumps(scores.pairs)})
            result["languages"][language][granularity] = summary
            selection = summary.get("selection", {})
            selected[language][granularity] = {
                "source_layer": selection.get("pair", summary["best_pair"])[0],
                "target_layer": selection.get("pair", summary["best_pair"])[1],
                **{k: v for k, v in selection.items() if k != "pair"},
            }
    result["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_directory(out_dir, marker="grid.json", what="transplant-grid result") as scratch:
        for accuracy, pairs_, name, title, base_accuracy in heatmaps:
            plot_accuracy_heatmap(accuracy, pairs_, scratch / name, title, base_accuracy)
        for name, (raw, metadata) in raw_scores.items():
            atomic_save_tensors(raw, scratch / name, metadata)
        save_selected_pairs(scratch / "selected_pairs.json", selected)
        atomic_write_text(scratch / "summary.md", format_grid_summary(result))
        atomic_write_json(scratch / "grid.json", result)
    return result


def format_grid_summary(result: dict[str, Any]) -> str:
    """A Markdown report of :func:`run_transplant_grid`'s result."""
    lines = [
        f"# XTransplant grid: {result['model']['model']} on {result['task']}",
        "",
        f"Donor language {result['donor_language']}; mode {result['mode']} "
        f"({result['n_layers']} layers); {result['n_items']} aligned items per language; "
        f"{result.get('seconds', '?')} s.",
        "",
        "| recipient | granularity | base | best pair (s,t) | best pair | upper bound "
        "| random-donor bound | held-out: chosen pair | held-out: pair | held-out: base |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    def with_ci(value: float, ci: Sequence[float]) -> str:
        return f"{pct(value)} [{pct(ci[0])}, {pct(ci[1])}]"

    for language, grids in result["languages"].items():
        for granularity, s in grids.items():
            sel = s.get("selection", {})
            lines.append(
                f"| {language} | {granularity} | {with_ci(s['base_accuracy'], s['base_accuracy_ci'])} "
                f"| ({s['best_pair'][0]},{s['best_pair'][1]}) "
                f"| {with_ci(s['best_pair_accuracy'], s['best_pair_accuracy_ci'])} "
                f"| {pct(s['upper_bound'])} | {pct(s.get('control_upper_bound'))} "
                f"| {tuple(sel['pair']) if sel else '-'} | {pct(sel.get('heldout_accuracy'))} "
                f"| {pct(sel.get('heldout_base_accuracy'))} |"
            )
    lines += [
        "",
        "| recipient | granularity | p(answer): base | best pair | mean over pairs "
        "| mean over random-donor pairs |",
        "|---|---|---|---|---|---|",
    ]
    for language, grids in result["languages"].items():
        for granularity, s in grids.items():
            best = s["pairs"].index(s["best_pair"])
            pair_probability = s["pair_answer_probability"]
            lines.append(
                f"| {language} | {granularity} | {s['base_answer_probability']:.3f} "
                f"| {pair_probability[best]:.3f} "
                f"| {sum(pair_probability) / len(pair_probability):.3f} "
                f"| {s.get('control_answer_probability', float('nan')):.3f} |"
            )
    lines += [
        "",
        "Accuracy in %, with 95% Wilson intervals. Upper bound: share of items that at least one "
        "pair answers correctly; the random-donor bound is the same union with a random other "
        "item as donor (same number of tries), i.e. what chance alone gives. Held-out: the pair "
        "chosen on a dev split (ties: lowest target, deepest source) evaluated on the other items. "
        "p(answer): mean probability of the right option among the options (softmax of their "
        "log-likelihoods), a finer signal than accuracy on small samples.",
        "",
    ]
    for language, grids in result["languages"].items():
        for granularity, s in grids.items():
            lines.append(f"![{language} {granularity}]({s['heatmap']})")
    if result.get("command"):
        lines += ["", "Command:", "", f"    {result['command']}"]
    return "\n".join(lines) + "\n"
