"""Scoring with a frozen model: the LM head's input made contiguous (what lenssteer does,
:func:`lenssteer.forward.contiguous_head_input`) against the head called on the model's own
sliced hidden states (the plain way, and what any caller of ``model(..., logits_to_keep=k)`` gets).

A model applied with a PEFT adapter has every base weight frozen. Asked for the last positions'
logits of a batch, it slices its hidden states before the head; with a frozen head weight, torch's
matmul then expands and copies the whole ``(batch, hidden, vocab)`` weight on every call. Both ways
score the same translated-MMLU requests (by letter: one scored position per row, the worst case)
on the same model, alternated in one process; the scores must agree (max abs difference printed
beside the ratio).

    .venv/bin/python benchmarks/bench_head.py [--model qwen2.5-coder-0.5b-instruct] [--items 8]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import alternate, median, paired_ratio  # noqa: E402

from lenssteer import evaluate  # noqa: E402


def letter_requests(tokenizer, languages, limit, seed=0):
    """The letter-scoring requests of ``mmlu-translated`` items (four per item)."""
    from lenssteer.task_registry import get_task

    task = get_task("mmlu-translated")
    items = task.items(list(languages), limit, seed)
    return [
        request
        for rows in items.values()
        for item in rows
        for request in task.requests(tokenizer, item, "letter")[0]
    ]


def head_rows(model, tokenizer, languages=("de", "fr"), limit=8, rounds=3, batch_size=8):
    """Seconds per request of both ways (medians), their ratio, and the scores' agreement.
    ``model`` should be frozen (``requires_grad=False``), as a PEFT-wrapped model is."""
    requests = letter_requests(tokenizer, languages, limit)

    def score(contiguous: bool) -> list[float]:
        saved = evaluate.contiguous_head_input
        if not contiguous:
            evaluate.contiguous_head_input = lambda _model: contextlib.nullcontext()
        try:
            return [s for s, _ in evaluate.loglikelihoods(model, tokenizer, requests, batch_size)]
        finally:
            evaluate.contiguous_head_input = saved

    fixed, plain = torch.tensor(score(True)), torch.tensor(score(False))
    times = alternate(
        {"plain": lambda: score(False) and None, "contiguous": lambda: score(True) and None},
        rounds,
    )
    return {
        "requests": len(requests),
        "plain_s_per_request": median(times["plain"]) / len(requests),
        "contiguous_s_per_request": median(times["contiguous"]) / len(requests),
        "speedup": paired_ratio(times["contiguous"], times["plain"]),
        "max_abs_difference": float((fixed - plain).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--items", type=int, default=8, help="items per language (de, fr)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    from lenssteer.models import load_model

    tokenizer, model = load_model(args.model, dtype=args.dtype)
    model.requires_grad_(False)  # as under a PEFT adapter
    print(head_rows(model, tokenizer, limit=args.items, rounds=args.rounds))


if __name__ == "__main__":
    main()
