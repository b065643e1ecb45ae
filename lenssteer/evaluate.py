"""Scoring, confidence intervals and the comparison report.

What is measured:

* **Option log-likelihood.** For a prompt (the *context*) and a candidate answer (the
  *continuation*), the sum of the log-probabilities of the continuation's tokens, each given the
  context and the continuation tokens before it: ``log p(c_1..c_n | x) = sum_i log p(c_i | x,
  c_<i)``. A multiple-choice item is answered by the option with the highest score. Two scores are
  kept for every option: the sum (``acc``) and the sum divided by the option's length in UTF-8 bytes
  (``acc_norm``, lm-evaluation-harness' convention, which removes the bias of the sum towards short
  options). For single-letter options the two agree. Which one a task reports as primary is part of
  the task's definition (see :mod:`lenssteer.task_registry`).
* **Greedy generation**: the model's own answer to a prompt, decoded greedily with a plain
  generation config (no sampling, no repetition penalty), and the language that an offline
  language-identification model (``py3langid``) assigns to it.

Scoring is batched with padding on either side; positions come from the attention mask, so a batch
gives the same numbers as one item at a time, and left and right padding agree (tests check both).
Identical model inputs are run once (the four letter options of a question share one forward
pass), and with left padding only the logits of the scored positions are computed.

Intervals (all 95% by default): a proportion of one language gets a **Wilson score interval**; an
average over languages and any difference between two systems get a **percentile bootstrap**,
resampling items (within each language, stratified) and, for differences, resampling the *same*
items for both systems (paired), which is valid because every system is scored on identical items.

The report (``report.md``, ``report.json``, one ``<task>.png`` grouped bar chart per task) is written
atomically; the JSON keeps every per-item outcome so any number can be recomputed.
"""

from __future__ import annotations

import importlib.metadata
import io
import math
import platform
import statistics
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lenssteer.forward import cache_in_call, hidden_states_of_call
from lenssteer.hooks import position_ids_from_mask
from lenssteer.io import atomic_directory, atomic_write_json, atomic_write_text
from lenssteer.models import ModuleNames, find_decoder_layers

__all__ = [
    "EncodedRequest",
    "LowerLayerReplay",
    "at_chance",
    "Outcomes",
    "ScoringRequest",
    "bootstrap_mean_interval",
    "detect_language",
    "encode_requests",
    "generate_greedy",
    "loglikelihoods",
    "minimum_detectable_effect",
    "package_versions",
    "paired_bootstrap_difference",
    "stratified_bootstrap_mean",
    "strip_copied",
    "summarize",
    "wilson_interval",
    "write_report",
]

PaddingSide = Literal["left", "right"]


# --------------------------------------------------------------------------------------------------
# Log-likelihood scoring


@dataclass(frozen=True)
class ScoringRequest:
    """Score ``continuation`` after ``context``.

    ``context`` is the full prompt text. ``add_special_tokens`` says whether the tokenizer adds its
    special tokens (BOS) to the context: ``False`` for text that already went through a chat
    template (it carries them), ``True`` for raw text. The continuation never gets special tokens.
    """

    context: str
    continuation: str
    add_special_tokens: bool = False


@dataclass(frozen=True)
class EncodedRequest:
    """Token ids of a context and a continuation (both non-empty)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]
    continuation_bytes: int = 1


def _continuation_tokens(tokenizer, context: str, continuation: str) -> list[int]:
    """The continuation's tokens as they follow the context: split from the joint encoding.

    When the boundary merges (the context's last token changes), the continuation is encoded
    alone. The same rule as :mod:`lenssteer.transplant`, so every system scores the same tokens.
    """
    if not continuation:
        return []
    joint = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    plain = tokenizer(context, add_special_tokens=False)["input_ids"]
    if joint[: len(plain)] == plain and len(joint) > len(plain):
        return list(joint[len(plain) :])
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def encode_requests(
    tokenizer, requests: Sequence[ScoringRequest | EncodedRequest]
) -> list[EncodedRequest]:
    """Token ids of each context and of its continuation (the continuation's tokens are scored).

    Already encoded requests pass through unchanged.
    """
    encoded = []
    for number, request in enumerate(requests, 1):
        if isinstance(request, EncodedRequest):
            if not request.context or not request.continuation:
                raise ValueError(f"request {number}: empty context or continuation")
            encoded.append(request)
            continue
        context = tokenizer(request.context, add_special_tokens=request.add_special_tokens)[
            "input_ids"
        ]
        continuation = _continuation_tokens(tokenizer, request.context, request.continuation)
        if not context:
            raise ValueError(f"request {number}: the context is empty after tokenization")
        if not continuation:
            raise ValueError(
                f"request {number}: the continuation {request.continuation!r} has no tokens"
            )
        encoded.append(
            EncodedRequest(
                tuple(context),
                tuple(continuation),
                max(1, len(request.continuation.encode("utf-8"))),
            )
        )
    return encoded


def _pad(
    rows: Sequence[Sequence[int]], pad_id: int, side: PaddingSide
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if side == "left":
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        else:
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
    return ids, mask


def _forward_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep: int,
) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all positions if ``keep == 0``). ``(b, keep|seq, V)``."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
    if keep:
        try:
            return model(**kwargs, logits_to_keep=keep).logits[:, -keep:]
        except TypeError:  # a model without logits_to_keep
            pass
    logits = model(**kwargs).logits
    return logits[:, -keep:] if keep else logits


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[ScoringRequest | EncodedRequest],
    batch_size: int = 8,
    padding_side: PaddingSide = "left",
    progress: bool = False,
    description: str = "score",
) -> list[tuple[float, int]]:
    """``(sum of log-probs, number of tokens)`` of each request's continuation given its context.

    The model sees ``context + continuation[:-1]``; identical inputs (e.g. the same question with
    different one-token options) are run once. Batches are sorted by length to keep padding small,
    and results come back in request order. Log-softmax is taken in float32.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_requests(tokenizer, requests)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Group requests by the exact model input.
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, request in enumerate(encoded):
        model_input = (request.context + request.continuation)[:-1]
        groups.setdefault(model_input, []).append(index)
    inputs = sorted(groups, key=len, reverse=True)  # longest first: memory problems show early
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    with tqdm(total=len(encoded), desc=description, unit="req", disable=not progress) as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            ids, mask = _pad(chunk, pad_id, padding_side)
            longest_continuation = max(
                len(encoded[i].continuation) for row in chunk for i in groups[row]
            )
            keep = longest_continuation if padding_side == "left" else 0
            logits = _forward_logits(model, ids.to(device), mask.to(device), keep)
            for row_index, row in enumerate(chunk):
                end = logits.shape[1] if padding_side == "left" else len(row)
                for request_index in groups[row]:
                    target = encoded[request_index].continuation
                    n = len(target)
                    row_logits = logits[row_index, end - n : end].float()
                    log_probs = torch.log_softmax(row_logits, dim=-1)
                    picked = log_probs.gather(
                        -1, torch.tensor(target, device=log_probs.device).unsqueeze(-1)
                    )
                    results[request_index] = (float(picked.sum()), n)
                bar.update(len(groups[row]))
    return results


# --------------------------------------------------------------------------------------------------
# Sharing the unchanged bottom of the network between systems


class LowerLayerReplay:
    """Run the layers below a top-layer edit once, and reuse their output for every such system.

    A Lens adapter on the top 2 layers, or a hook on them, leaves everything below unchanged, so
    for the same inputs the output of decoder layer ``first_changed_layer - 1`` is the same as the
    unsteered model's. Inside :meth:`record`, each forward call's output of that layer is stored,
    in call order; inside :meth:`replay`, the same forward calls (same inputs, same batches, same
    order) skip layers ``0 .. first_changed_layer - 1`` and take the stored output instead. The
    result is exact (tests compare against the full computation); a replayed call whose shape does
    not match the stored one, a different number of calls, or a call that carries a KV cache is an
    error, never a silent reuse.
    Only layers that return a plain tensor (every transformers 5 decoder) can be replayed;
    otherwise :attr:`supported` turns False and callers compute in full.
    """

    def __init__(
        self, model: nn.Module, first_changed_layer: int, module_names: ModuleNames | None = None
    ) -> None:
        self.layers = find_decoder_layers(model, module_names)
        if not 0 < first_changed_layer < len(self.layers):
            raise ValueError(
                f"first_changed_layer must be in 1..{len(self.layers) - 1}, got {first_changed_layer}"
            )
        self.boundary = first_changed_layer - 1
        self.outputs: list[torch.Tensor] = []
        self.supported = True
        self.recorded = False

    @contextmanager
    def record(self) -> Iterator[None]:
        """Store the boundary layer's output of every forward call in the block."""
        self.outputs = []

        def keep(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self.outputs.append(output.detach().clone())
            else:
                self.supported = False

        handle = self.layers[self.boundary].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
        self.recorded = True

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Skip the layers up to the boundary; feed the stored outputs back in call order."""
        if not (self.recorded and self.supported):
            raise RuntimeError("nothing to replay: record() a pass of the same inputs first")
        position = {"next": 0}

        layer = self.layers[0]

        def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
            if cache_in_call(args, kwargs) is not None:
                # Skipped layers would leave their part of the cache empty: refuse, never guess.
                raise RuntimeError("a forward call with a KV cache cannot be replayed")
            return hidden_states_of_call(layer, args, kwargs)

        def passthrough(*args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_of(args, kwargs)

        def emit(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = hidden_of(args, kwargs)
            index = position["next"]
            if index >= len(self.outputs):
                raise RuntimeError(
                    f"replay out of step: forward call {index + 1}, but only "
                    f"{len(self.outputs)} were recorded"
                )
            stored = self.outputs[index]
            if stored.shape != hidden.shape:
                raise RuntimeError(
                    f"replay out of step: call {index + 1} has shape {tuple(hidden.shape)}, the "
                    f"recorded one {tuple(stored.shape)}"
                )
            position["next"] = index + 1
            return stored.to(hidden.device, hidden.dtype)

        patched = list(self.layers[: self.boundary + 1])
        for layer in patched[:-1]:
            layer.forward = passthrough
        patched[-1].forward = emit
        try:
            yield
        finally:
            for layer in patched:
                del layer.forward  # the class's own forward again
        if position["next"] != len(self.outputs):
            raise RuntimeError(
                f"replay out of step: {position['next']} forward calls replayed, "
                f"{len(self.outputs)} recorded"
            )


# --------------------------------------------------------------------------------------------------
# Greedy generation and its language


def _greedy_config(model: nn.Module, tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    add_special_tokens: bool = False,
    progress: bool = False,
    description: str = "generate",
) -> list[str]:
    """Greedy answers (new tokens only, special tokens dropped) to ``prompts``, in order.

    Batches are left-padded (generation continues at the right edge); the generation config is a
    fresh greedy one, so a model's default sampling or repetition penalty does not apply.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = _greedy_config(model, tokenizer, max_new_tokens)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    encoded = [
        tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] for prompt in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    answers = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=description, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _pad([encoded[i] for i in chunk], pad_id, "left")
            output = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
            )
            new_tokens = output[:, ids.shape[1] :]
            for row, index in enumerate(chunk):
                answers[index] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
            bar.update(len(chunk))
    return answers


def strip_copied(answer: str, source: str, min_chars: int = 12) -> str:
    """``answer`` without the passages it copies from ``source`` (the prompt's text).

    Removes the whole source and each of its clauses (split at sentence and clause punctuation)
    of at least ``min_chars`` characters wherever they appear verbatim, so that a model that only
    repeats the prompt is not credited with answering in its language.
    """
    import re

    pieces = [source, *re.split(r"[.;:!?,\u060c\u061b\u06d4\u3002]+\s*", source)]
    for piece in sorted({p.strip() for p in pieces}, key=len, reverse=True):
        if len(piece) >= min_chars:
            answer = answer.replace(piece, " ")
    return " ".join(answer.split())


def detect_language(text: str) -> str | None:
    """ISO 639-1 code that ``py3langid`` (offline, model inside the wheel) assigns.

    ``None`` for a text without a single letter (empty, punctuation, digits).
    """
    if not text or not any(ch.isalpha() for ch in text):
        return None
    try:
        import py3langid
    except ImportError as error:  # pragma: no cover - an install problem
        raise RuntimeError(
            "language identification needs py3langid: pip install 'lenssteer[eval]'"
        ) from error
    return str(py3langid.classify(text)[0])


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
