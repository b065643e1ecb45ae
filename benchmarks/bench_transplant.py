"""Per-pair cost of the XTransplant grid: the fast path (donor once for all layers, recipient prefix
once, pairs batched on copies of its KV cache) against running each pair from scratch (a donor pass
and a full recipient pass per pair, as the reference code does).

Both are measured in the same run, alternating item by item, and the medians are compared:

    .venv/bin/python benchmarks/bench_transplant.py --model qwen2.5-coder-0.5b-instruct --items 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lenssteer.models import DEFAULT_MODEL, load_model, num_decoder_layers
from lenssteer.tasks import align_items, format_multiple_choice, load_task, sample_items
from lenssteer.transplant import (
    grid_pairs,
    record_donor_activations,
    transplant_grid,
    transplant_loglikelihoods,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="mmlu-translated")
    parser.add_argument("--donor-lang", default="en")
    parser.add_argument("--recipient-lang", default="de")
    parser.add_argument("--items", type=int, default=6, help="items measured (default 6)")
    parser.add_argument(
        "--slow-pairs", type=int, default=3, help="pairs timed from scratch per item (default 3)"
    )
    parser.add_argument("--mode", default="target-first", help="grid of the fast path")
    parser.add_argument("--granularity", default="ffn")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer, model = load_model(args.model)
    n_layers = num_decoder_layers(model)
    pairs = grid_pairs(args.mode, n_layers)
    donors, recipients = align_items(
        load_task(args.task, args.donor_lang), load_task(args.task, args.recipient_lang)
    )
    donors = sample_items(donors, args.items, args.seed)
    recipients = sample_items(recipients, args.items, args.seed)
    donor_prompts = [format_multiple_choice(tokenizer, item).text for item in donors]
    formatted = [format_multiple_choice(tokenizer, item) for item in recipients]
    generator = torch.Generator().manual_seed(args.seed)

    fast, slow, tokens = [], [], []
    for i in range(len(recipients)):
        tokens.append(len(tokenizer(formatted[i].text, add_special_tokens=False)["input_ids"]))
        # From scratch: a few random pairs of the grid, each a donor pass + a recipient pass.
        for k in torch.randperm(len(pairs), generator=generator)[: args.slow_pairs].tolist():
            started = time.perf_counter()
            transplant_loglikelihoods(
                model,
                tokenizer,
                donor_prompts[i : i + 1],
                [formatted[i].text],
                [formatted[i].continuations],
                *pairs[k],
                args.granularity,
            )
            slow.append(time.perf_counter() - started)
        # Fast: this item's donor (all layers) + prefix + every pair of the grid, per pair.
        started = time.perf_counter()
        activations = record_donor_activations(
            model, tokenizer, donor_prompts[i : i + 1], granularities=[args.granularity]
        )
        transplant_grid(
            model,
            tokenizer,
            [formatted[i].text],
            [formatted[i].continuations],
            activations,
            pairs,
            control=False,
        )
        fast.append((time.perf_counter() - started) / len(pairs))
        print(
            f"item {i + 1}/{len(recipients)}: {tokens[-1]} prompt tokens, from scratch "
            f"{statistics.median(slow[-args.slow_pairs :]):.3f} s/pair, fast {fast[-1]:.4f} s/pair",
            flush=True,
        )

    slow_median, fast_median = statistics.median(slow), statistics.median(fast)
    print(
        f"\n{args.model}, {args.donor_lang}->{args.recipient_lang}, {args.granularity}, "
        f"{args.mode} grid ({len(pairs)} pairs), {len(recipients)} items, median prompt "
        f"{statistics.median(tokens)} tokens, torch threads {torch.get_num_threads()}\n"
        f"per pair, from scratch: {slow_median:.3f} s (median of {len(slow)})\n"
        f"per pair, fast grid:    {fast_median:.4f} s (median of {len(fast)}; donor and prefix "
        "amortised over the grid)\n"
        f"speed-up: {slow_median / fast_median:.1f}x"
    )


if __name__ == "__main__":
    main()
