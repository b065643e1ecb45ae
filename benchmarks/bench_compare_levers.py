"""Two costs of the powered comparison, each measured the way before and the way now, side by side
in one process on the real model, with a check that both ways give the same results.

* ``xt``: XTransplant's donor pass. Every target language borrows from the same English prompts;
  the comparison's scorer now records each distinct donor prompt once, at every source layer its
  pairs use, and reuses the vectors for every language (before: each language ran the donor pass
  again). Times one MMLU scoring's XTransplant units for four target languages both ways.
* ``ls``: the language vector's dev answers (24 prompts per language, 24 new tokens), generated
  8 at a time (before: the comparison's batch size) or 24 at a time (now: the fidelity task's).

    .venv/bin/python benchmarks/bench_compare_levers.py                  # both, SmolLM2
    .venv/bin/python benchmarks/bench_compare_levers.py --part xt --items 20 --scoring option-text
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


def xtransplant_donors(model, tokenizer, items_per_language: int, scoring: str, rounds: int) -> str:
    pairs = SMOLLM2_PAIRS
    task = get_task("mmlu-translated")
    items = task.items(["en", *pairs], items_per_language, 0)
    english = {item.id: task.requests(tokenizer, item, scoring)[1] for item in items["en"]}
    units = []  # (language, contexts, options, donors, add_special_tokens)
    for language in pairs:
        rows = [item for item in items[language] if item.id in english]
        requests = [task.requests(tokenizer, item, scoring) for item in rows]
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

    times = alternate(
        {"per-language": lambda: score(False), "shared": lambda: score(True)}, rounds, warmup=0
    )
    identical = results["shared"] == results["per-language"]
    before, after = median(times["per-language"]), median(times["shared"])
    n_items = sum(len(unit[1]) for unit in units)
    if not identical:
        raise SystemExit("xt: the two ways scored differently")
    return (
        f"xt: mmlu-translated {scoring}, {len(units)} target languages x "
        f"{n_items // len(units)} items, pairs {pairs}\n"
        f"    donor pass per language {before:.1f} s, once {after:.1f} s (medians of {rounds}): "
        f"{before / after:.2f}x; scores identical"
    )


def language_vector_dev_answers(model, tokenizer, rounds: int) -> str:
    from lenssteer.language_shift import LanguageShift, answer_fidelity
    from lenssteer.models import find_decoder_layers
    from lenssteer.sampling import split_ids
    from lenssteer.task_registry import FIDELITY_INSTRUCTIONS, bible_followers, bible_verse_pairs

    languages = ["en", "de", "es", "fr", "it"]
    dev_ids = split_ids(bible_followers(languages), [24, None], 0, "language-shift-dev")[0]
    items = bible_verse_pairs(languages, set(dev_ids))
    prompts = {
        lang: [f"{FIDELITY_INSTRUCTIONS[lang]}\n\n{item.choices[0]}" for item in rows]
        for lang, rows in items.items()
        if lang != "en"
    }
    layer = len(find_decoder_layers(model)) // 2
    hidden = model.config.hidden_size
    shift = LanguageShift(layer, 0.5, {lang: torch.ones(hidden) for lang in prompts}, "en")
    results: dict[int, list[float]] = {}

    def answer(batch_size: int) -> None:
        results[batch_size] = [
            answer_fidelity(model, tokenizer, shift, lang, texts, 24, batch_size)
            for lang, texts in prompts.items()
        ]

    times = alternate({"8": lambda: answer(8), "24": lambda: answer(24)}, rounds, warmup=0)
    before, after = median(times["8"]), median(times["24"])
    return (
        f"ls: {len(prompts)} target languages x 24 dev prompts, 24 new tokens, one setting\n"
        f"    8 at a time {before:.1f} s, 24 at a time {after:.1f} s (medians of {rounds}): "
        f"{before / after:.2f}x; dev fidelity per language {results[8]} vs {results[24]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--part", default="both", choices=["xt", "ls", "both"])
    parser.add_argument("--items", type=int, default=40, help="xt: MMLU items per language")
    parser.add_argument("--scoring", default="letter", choices=["letter", "option-text"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer, model = load_model(args.model, args.dtype)
    load_before = load_average()
    print(
        f"{args.model} ({dtype_name(model_dtype(model))}), torch threads {torch.get_num_threads()}"
    )
    if args.part in ("xt", "both"):
        print(
            xtransplant_donors(model, tokenizer, args.items, args.scoring, args.rounds), flush=True
        )
    if args.part in ("ls", "both"):
        print(language_vector_dev_answers(model, tokenizer, args.rounds), flush=True)
    print(f"load average {load_before[0]:.2f} -> {load_average()[0]:.2f}")


if __name__ == "__main__":
    main()
