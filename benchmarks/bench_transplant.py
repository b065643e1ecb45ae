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
from collections.abc import Callable
from typing import Any

import torch

from lenssteer.mmlu import align_items, format_multiple_choice, load_task, sample_items
from lenssteer.models import DEFAULT_MODEL, load_model, num_decoder_layers
from lenssteer.transplant import record_donor_activations, transplant_loglikelihoods
from lenssteer.transplant_pairs import grid_pairs, transplant_grid


def measure_pairs(
    model,
    tokenizer,
    task: str = "mmlu-translated",
    donor_lang: str = "en",
    recipient_lang: str = "de",
    items: int = 6,
    slow_pairs: int = 3,
    mode: str = "target-first",
    granularity: str = "ffn",
    seed: int = 0,
    log: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Per-pair seconds of both ways, alternating item by item; medians and the speed-up.

    Per item: ``slow_pairs`` random pairs from scratch (donor pass + full recipient pass each),
    then the item's whole grid by the fast path (its time divided by the number of pairs), then a
    one-pair grid, whose difference gives the marginal cost of a pair.
    """
    n_layers = num_decoder_layers(model)
    pairs = grid_pairs(mode, n_layers)
    donors, recipients = align_items(load_task(task, donor_lang), load_task(task, recipient_lang))
    donors = sample_items(donors, items, seed)
    recipients = sample_items(recipients, items, seed)
    donor_prompts = [format_multiple_choice(tokenizer, item).text for item in donors]
    formatted = [format_multiple_choice(tokenizer, item) for item in recipients]
    generator = torch.Generator().manual_seed(seed)

    def run_grid(i: int, activations, grid: list[tuple[int, int]]) -> None:
        transplant_grid(
            model,
            tokenizer,
            [formatted[i].text],
            [formatted[i].continuations],
            activations,
            grid,
            control=False,
        )

    fast, slow, marginal, tokens = [], [], [], []
    for i in range(len(recipients)):
        tokens.append(len(tokenizer(formatted[i].text, add_special_tokens=False)["input_ids"]))
        # From scratch: a few random pairs of the grid, each a donor pass + a recipient pass.
        for k in torch.randperm(len(pairs), generator=generator)[:slow_pairs].tolist():
            started = time.perf_counter()
            transplant_loglikelihoods(
                model,
                tokenizer,
                donor_prompts[i : i + 1],
                [formatted[i].text],
                [formatted[i].continuations],
                *pairs[k],
                granularity,
            )
            slow.append(time.perf_counter() - started)
        # Fast: this item's donor (all layers) + prefix + every pair of the grid, per pair.
        started = time.perf_counter()
        activations = record_donor_activations(
            model, tokenizer, donor_prompts[i : i + 1], granularities=[granularity]
        )
        grid_started = time.perf_counter()
        run_grid(i, activations, pairs)
        finished = time.perf_counter()
        fast.append((finished - started) / len(pairs))
        # Marginal: what one more pair adds once the donor and the prefix are paid for.
        started = time.perf_counter()
        run_grid(i, activations, pairs[:1])
        one_pair = time.perf_counter() - started
        marginal.append(max(0.0, (finished - grid_started - one_pair) / max(1, len(pairs) - 1)))
        if log is not None:
            log(
                f"item {i + 1}/{len(recipients)}: {tokens[-1]} prompt tokens, from scratch "
                f"{statistics.median(slow[-slow_pairs:]):.3f} s/pair, fast {fast[-1]:.4f} s/pair"
            )
    slow_median, fast_median = statistics.median(slow), statistics.median(fast)
    return {
        "n_pairs": len(pairs),
        "items": len(recipients),
        "median_prompt_tokens": statistics.median(tokens),
        "slow_s": slow,
        "fast_s": fast,
        "slow_median_s": slow_median,
        "fast_median_s": fast_median,
        "speedup": slow_median / fast_median,
        "marginal_s": marginal,
        "marginal_median_s": statistics.median(marginal),
        "marginal_speedup": slow_median / max(statistics.median(marginal), 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="mmlu-translated")
    # the CLI's spelling (lenssteer transplant); --donor-lang/--recipient-lang: the old one
    parser.add_argument(
        "--central", "--donor-lang", dest="donor_lang", default="en", metavar="LANG"
    )
    parser.add_argument(
        "--languages", "--recipient-lang", dest="recipient_lang", default="de", metavar="LANG"
    )
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
    result = measure_pairs(
        model,
        tokenizer,
        task=args.task,
        donor_lang=args.donor_lang,
        recipient_lang=args.recipient_lang,
        items=args.items,
        slow_pairs=args.slow_pairs,
        mode=args.mode,
        granularity=args.granularity,
        seed=args.seed,
        log=lambda message: print(message, flush=True),
    )
    print(
        f"\n{args.model}, {args.donor_lang}->{args.recipient_lang}, {args.granularity}, "
        f"{args.mode} grid ({result['n_pairs']} pairs), {result['items']} items, median prompt "
        f"{result['median_prompt_tokens']} tokens, torch threads {torch.get_num_threads()}\n"
        f"per pair, from scratch: {result['slow_median_s']:.3f} s (median of "
        f"{len(result['slow_s'])})\n"
        f"per pair, fast grid:    {result['fast_median_s']:.4f} s (median of "
        f"{len(result['fast_s'])}; donor and prefix amortised over the grid)\n"
        f"per pair, fast grid, marginal (beyond the shared donor and prefix passes): "
        f"{result['marginal_median_s']:.4f} s\n"
        f"speed-up: {result['speedup']:.1f}x amortised, {result['marginal_speedup']:.0f}x marginal"
    )


if __name__ == "__main__":
    main()
