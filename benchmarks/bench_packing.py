"""Option-text scoring: each option in its own row (plain) against the options packed after one
context in one row (:func:`lenssteer.forward.pack_continuations`, what ``loglikelihoods`` does).

The powered comparison scores all 285 ``mmlu-translated`` items per language with the options'
own text; plain, every item costs four forward passes of its ~100-400-token prompt. Both ways run
on the same model and items, alternated in one process; the scores must agree (max abs
difference and option-ranking agreement are printed beside the ratio).

    .venv/bin/python benchmarks/bench_packing.py [--model smollm2-135m-instruct] [--items 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import alternate, median, paired_ratio  # noqa: E402

from lenssteer.evaluate import loglikelihoods  # noqa: E402
from lenssteer.forward import _PACKING_WORKS, packing_works  # noqa: E402


def option_text_requests(tokenizer, languages, limit, seed=0):
    """``[(requests of one item)]``: the option-text requests of ``mmlu-translated`` items."""
    from lenssteer.task_registry import get_task

    task = get_task("mmlu-translated")
    items = task.items(list(languages), limit, seed)
    return [
        task.requests(tokenizer, item, "option-text")[0] for rows in items.values() for item in rows
    ]


def packing_rows(model, tokenizer, languages=("de", "fr"), limit=8, rounds=3, batch_size=8):
    """Seconds per item of both ways (medians), their ratio, and the scores' agreement."""
    per_item = option_text_requests(tokenizer, languages, limit)
    flat = [request for requests in per_item for request in requests]
    assert packing_works(model), "this model does not honour a 4D mask: nothing to compare"

    def score(packed: bool):
        _PACKING_WORKS[model] = packed
        try:
            return [s for s, _ in loglikelihoods(model, tokenizer, flat, batch_size=batch_size)]
        finally:
            _PACKING_WORKS[model] = True

    packed, plain = torch.tensor(score(True)), torch.tensor(score(False))
    times = alternate(
        {"plain": lambda: score(False) and None, "packed": lambda: score(True) and None}, rounds
    )
    agree, start = 0, 0
    for requests in per_item:
        end = start + len(requests)
        agree += int(packed[start:end].argmax() == plain[start:end].argmax())
        start = end
    return {
        "items": len(per_item),
        "plain_s_per_item": median(times["plain"]) / len(per_item),
        "packed_s_per_item": median(times["packed"]) / len(per_item),
        "speedup": paired_ratio(times["packed"], times["plain"]),
        "max_abs_difference": float((packed - plain).abs().max()),
        "ranking_agreement": agree / len(per_item),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=8, help="items per language (de, fr)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    from lenssteer.models import load_model

    tokenizer, model = load_model(args.model, dtype=args.dtype)
    print(packing_rows(model, tokenizer, limit=args.items, rounds=args.rounds))


if __name__ == "__main__":
    main()
