"""Scoring: option log-likelihoods, greedy generation and its language.

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

Confidence intervals and the summary of outcomes are in :mod:`lenssteer.stats`; the comparison
report in :mod:`lenssteer.report`; the shared lower layers (:class:`LowerLayerReplay`, re-exported
here) in :mod:`lenssteer.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lenssteer.forward import (
    LowerLayerReplay,
    contiguous_head_input,
    input_dtype,
    pack_continuations,
    packable_length,
    packing_works,
)
from lenssteer.hooks import position_ids_from_mask
from lenssteer.models import pad_token_id

__all__ = [
    "EncodedRequest",
    "LowerLayerReplay",
    "ScoringRequest",
    "detect_language",
    "encode_requests",
    "generate_greedy",
    "loglikelihoods",
    "strip_copied",
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


def continuation_tokens(tokenizer, context: str, continuation: str) -> list[int]:
    """The continuation's tokens as they follow the context: split from the joint encoding.

    When the boundary merges (the context's last token changes), the continuation is encoded
    alone. Every system (XTransplant's scoring too) takes a continuation's tokens from here, so
    all score the same tokens.
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
        continuation = continuation_tokens(tokenizer, request.context, request.continuation)
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
    position_ids: torch.Tensor,
    keep: int,
) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all positions if ``keep == 0``). ``(b, keep|seq, V)``."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": False,
    }
    if keep:
        try:
            with contiguous_head_input(model):
                return model(**kwargs, logits_to_keep=keep).logits[:, -keep:]
        except TypeError:  # a model without logits_to_keep
            pass
    logits = model(**kwargs).logits
    return logits[:, -keep:] if keep else logits


def _row_inputs(
    rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    pad_id: int,
    padding_side: PaddingSide,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[list[range]]]:
    """Model inputs of ``(context, blocks)`` rows: a plain 2D mask when no row has a block."""
    if any(block for _, blocks in rows for block in blocks):
        packed = pack_continuations(rows, pad_id, dtype, padding_side)
        return (
            packed.input_ids,
            packed.attention_mask,
            packed.position_ids,
            packed.context_end,
            packed.block_columns,
        )
    ids, mask = _pad([context for context, _ in rows], pad_id, padding_side)
    width = ids.shape[1]
    ends = [width - 1 if padding_side == "left" else len(c) - 1 for c, _ in rows]
    columns = [
        [range(end + 1, end + 1)] * len(blocks) for end, (_, blocks) in zip(ends, rows, strict=True)
    ]
    return ids, mask, position_ids_from_mask(mask), ends, columns


@dataclass
class _Row:
    """One model input: a context and the continuation blocks packed after it, each with the
    requests it scores."""

    context: tuple[int, ...]
    blocks: list[tuple[tuple[int, ...], list[int]]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(block) for block, _ in self.blocks)


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

    Each continuation is scored as the model sees ``context + continuation[:-1]``. Requests that
    share a context share one row: the context runs once and each distinct continuation follows
    it as its own block, masked from the others (:func:`lenssteer.forward.pack_continuations`;
    four MMLU options cost one forward pass, not four). Where the model does not honour such a
    mask, or a row would outgrow a sliding window, identical inputs are still run once. Batches
    are sorted by length to keep padding small, and results come back in request order.
    Log-softmax is taken in float32.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_requests(tokenizer, requests)
    pad_id = pad_token_id(tokenizer)
    pack = packing_works(model)
    window = packable_length(model)
    # context -> block (the continuation minus its last token) -> the requests scored from it
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for index, request in enumerate(encoded):
        context, block = request.context, request.continuation[:-1]
        if not pack:  # one row per exact model input
            context, block = context + block, ()
        groups.setdefault(context, {}).setdefault(block, []).append(index)
    rows: list[_Row] = []
    for context, blocks in groups.items():
        if window is not None and len(context) + sum(map(len, blocks)) > window:
            rows.extend(_Row(context + block, [((), indices)]) for block, indices in blocks.items())
        else:
            rows.append(_Row(context, list(blocks.items())))
    # Packed rows and plain rows go in separate batches (a plain row may be longer than a window
    # and needs the model's own masks); longest first, so memory problems show early.
    chunks = []
    for packed in (True, False):
        kind = [row for row in rows if any(block for block, _ in row.blocks) == packed]
        kind.sort(key=lambda row: row.length, reverse=True)
        chunks += [kind[start : start + batch_size] for start in range(0, len(kind), batch_size)]
    device = next(model.parameters()).device
    dtype = input_dtype(model)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    with tqdm(total=len(encoded), desc=description, unit="req", disable=not progress) as bar:
        for chunk in chunks:
            layout = [(row.context, [block for block, _ in row.blocks]) for row in chunk]
            ids, mask, positions, ends, columns = _row_inputs(layout, pad_id, padding_side, dtype)
            needed = []  # (request, row, the columns whose logits predict its continuation)
            for r, (row, end, block_columns) in enumerate(zip(chunk, ends, columns, strict=True)):
                for (_, indices), cols in zip(row.blocks, block_columns, strict=True):
                    for index in indices:
                        head = len(encoded[index].continuation) - len(cols)  # from the context
                        needed.append((index, r, [*range(end - head + 1, end + 1), *cols]))
            keep = ids.shape[1] - min(cols[0] for _, _, cols in needed)
            logits = _forward_logits(
                model, ids.to(device), mask.to(device), positions.to(device), keep
            )
            offset = ids.shape[1] - logits.shape[1]
            for index, r, cols in needed:
                target = torch.tensor(encoded[index].continuation, device=logits.device)
                log_probs = torch.log_softmax(logits[r, [c - offset for c in cols]].float(), -1)
                results[index] = (float(log_probs.gather(-1, target[:, None]).sum()), len(target))
            bar.update(len(needed))
    return results


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
        pad_token_id=pad_token_id(tokenizer),
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
            with contiguous_head_input(model):  # the prefill reads the last position only
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
