"""XTransplant in a comparison: each donor prompt recorded once for every target language, or once
per language (the way before), side by side on real MMLU items.

Every target language borrows from the same English prompts. The comparison's XTransplant scorer
records each distinct donor prompt once, at every source layer its pairs use, and reuses the
vectors for every language; before, each language ran the donor pass again. This script times one
task's XTransplant scoring for all target languages both ways, alternating in one process, and
checks that the scores are identical.

    .venv/bin/python benchmarks/bench_compare_xt.py                     # SmolLM2, 40 items
    .venv/bin/python benchmarks/bench_compare_xt.py --items 20 --rounds 2 --scoring option-text
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_common import alternate, load_average, median  # noqa: E402

from lenssteer.compare import CompareConfig, TransplantScorer  # noqa: E402
from lenssteer.models import dtype_name, load_model, model_dtype  # noqa: E402
from lenssteer.task_registry import get_task  # noqa: E402

# The pairs SmolLM2's powered comparison chose on dev items (docs/compare-smollm2-135m-instruct).
SMOLLM2_PAIRS = {"de": (4, 0), "es": (8, 0), "fr": (4, 0), "it": (4, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--items", type=int, default=40, help="MMLU items per language")
    parser.add_argument("--scoring", default="letter", choices=["letter", "option-text"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer, model = load_model(args.model, args.dtype)
    pairs = SMOLLM2_PAIRS
    task = get_task("mmlu-translated")
    items = task.items(["en", *pairs], args.items, 0)
    english = {item.id: task.requests(tokenizer, item, args.scoring)[1] for item in items["en"]}
    units = []  # (language, contexts, options, donors, add_special_tokens)
    for language in pairs:
        rows = [item for item in items[language] if item.id in english]
        requests = [task.requests(tokenizer, item, args.scoring) for item in rows]
        units.append(
            (
                language,
                [context for _, context in requests],
                [[r.continuation for r in reqs] for reqs, _ in requests],
                [english[item.id] for item in rows],
                requests[0][0][0].add_special_tokens,
            )
        )
    config = CompareConfig(languages=["en", *pairs], batch_size=8)
    results: dict[str, list] = {}

    def score(shared: bool) -> None:
        cache: dict = {}
        scores = []
        for language, contexts, options, donors, special in units:
            if not shared:
                cache = {}  # the way before: every language runs its donor pass again
            scorer = TransplantScorer(pairs, "ffn", cache, model, tokenizer, config, False)
            scores.append(scorer.score_options(contexts, options, donors, special, language, ""))
        results["shared" if shared else "per-language"] = scores

    ways = {"per-language": lambda: score(False), "shared": lambda: score(True)}
    load_before = load_average()
    times = alternate(ways, rounds=args.rounds, warmup=0)
    identical = results["shared"] == results["per-language"]
    before, after = median(times["per-language"]), median(times["shared"])
    n_items = sum(len(unit[1]) for unit in units)
    print(
        f"{args.model} ({dtype_name(model_dtype(model))}), torch threads "
        f"{torch.get_num_threads()}, mmlu-translated {args.scoring}, {len(units)} target "
        f"languages x {n_items // len(units)} items, pairs {pairs}\n"
        f"donor pass per language: {before:.1f} s (median of {len(times['per-language'])})\n"
        f"donor pass once:         {after:.1f} s (median of {len(times['shared'])})\n"
        f"speed-up {before / after:.2f}x; scores identical: {identical}; load average "
        f"{load_before[0]:.2f} -> {load_average()[0]:.2f}"
    )
    if not identical:
        raise SystemExit("the two ways scored differently")


if __name__ == "__main__":
    main()
