"""Quickstart: probe -> train a Lens LoRA adapter -> check it on held-out items -> compare systems.

By default on the English-centric bundled model (smollm2-135m-instruct, which answers a share of
target-language prompts in another language: what Lens is for), with parallel instruction prompts
in English and four target languages and the preset chosen on dev items in docs/lens-study.md
(``--preset``; ``--model qwen2.5-coder-0.5b-instruct --corpus bible --preset quickstart`` is the
earlier quickstart on the default model):

1. one frozen pass over the training items gives the inputs of the top 2 layers and their frozen
   last-token states; the language subspace is computed from the same states (the probe, no second
   pass) and its diagnostics printed;
2. a LoRA adapter is trained on the top 2 layers (pull / push / retain, the fast path);
3. on held-out items (never seen by the probe or the training): the agnostic gap to English, the
   movement along each language's direction, the drift of English states, English -> target
   retrieval, before and after (a diagnostic);
4. the same prompts answered by the base model and with the adapter;
5. (unless --skip-compare) `lenssteer compare` with the model's quickstart config
   (recipes/compare_quickstart_smollm2.toml, or recipes/compare_quickstart.toml on the default
   model), using this run's adapter: what a user sees, on scored items it was not trained on.

Everything lands in --out (default runs/quickstart). --ship also copies the adapter to checkpoints/
and the subspace it was trained with to subspaces/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lenssteer.threads import prefer_passive_waiting

prefer_passive_waiting()  # OMP_WAIT_POLICY=PASSIVE unless set, before torch loads

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LANGUAGES = "en,de,es,fr,it"  # the MMLU translations of compare have de, es, fr, it
COMPARE_CONFIGS = {  # the comparison the quickstart runs, per model
    "smollm2-135m-instruct": ROOT / "recipes" / "compare_quickstart_smollm2.toml",
    "qwen2.5-coder-0.5b-instruct": ROOT / "recipes" / "compare_quickstart.toml",
}


def shipped_paths(model: str, corpus: str) -> tuple[Path, Path]:
    """Where --ship puts the adapter and its subspace."""
    return (
        ROOT / "checkpoints" / f"{model}-lens-quickstart",
        ROOT / "subspaces" / f"{model}-{corpus}-quickstart",
    )


TRY_PROMPTS = [
    "Qual è la capitale del Giappone? Rispondi in una frase.",
    "Quelle est la capitale de l'Australie ? Réponds en une phrase.",
    "Erkläre in zwei Sätzen, warum der Himmel blau ist.",
    "¿Cuántos días tiene un año bisiesto? Responde brevemente.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help=f"bundled model (default: smollm2-135m-instruct); the comparison step knows "
        f"{', '.join(COMPARE_CONFIGS)}",
    )
    parser.add_argument(
        "--preset",
        choices=["instructions", "scale-free", "quickstart"],  # lenssteer.train.PRESETS
        default="instructions",
        help="training settings (lenssteer.train.PRESETS): 'instructions' = chosen on SmolLM2's "
        "dev items (docs/lens-study.md; final norm, scale-free units); 'quickstart' = the earlier "
        "preset tuned on the geometric report on the default model (default: instructions)",
    )
    parser.add_argument("--languages", default=DEFAULT_LANGUAGES, help="central first")
    parser.add_argument("--train-items", type=int, default=200, help="parallel verses to train on")
    parser.add_argument("--heldout-items", type=int, default=100, help="held-out verses to check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="the frozen model's weights while training, checking and answering (default: auto, "
        "bfloat16 on a CPU with bfloat16 instructions (AMX, AVX512-BF16; about 3.5x faster than "
        "float32, benchmarks/RESULTS.md s. 8), float32 on one without (emulated bfloat16 is 3-5x "
        "slower); the LoRA weights train in float32 either way); the comparison uses its "
        "config's dtype (auto too)",
    )
    parser.add_argument("--skip-compare", action="store_true", help="stop after the adapter check")
    parser.add_argument("--compare-limit", type=int, help="items per task and language in compare")
    parser.add_argument(
        "--corpus",
        choices=["bible", "instructions", "mmlu-open", "verse-instructions"],
        default="instructions",
        help="training prompts: parallel instructions ('instructions', default: MMLU "
        "training-split questions asked openly and instructions about verses; or one of the two), "
        "or public-domain verses ('bible'); --train-items/--heldout-items split them the same way",
    )
    parser.add_argument(
        "--ship",
        action="store_true",
        help="copy the adapter to checkpoints/<model>-lens-quickstart and its subspace to "
        "subspaces/<model>-<corpus>-quickstart",
    )
    return parser.parse_args(argv)


def ship(out: Path, subspace, model: str, corpus: str) -> None:
    """Copy the adapter and its subspace to checkpoints/ and subspaces/, with repo-relative links."""
    from lenssteer.adapter import SteeringAdapter

    shipped_adapter, shipped_subspace = shipped_paths(model, corpus)
    subspace.save(shipped_subspace)
    adapter = SteeringAdapter.from_pretrained(out / "adapter")
    adapter.config.subspace["path"] = str(shipped_subspace.relative_to(ROOT))
    adapter.save_pretrained(shipped_adapter)
    print(
        f"[quickstart] shipped {shipped_adapter.relative_to(ROOT)} and its subspace "
        f"{shipped_subspace.relative_to(ROOT)}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lenssteer.adapter import generate
    from lenssteer.io import atomic_write_text
    from lenssteer.models import dtype_name, load_model, resolve_dtype
    from lenssteer.probe import format_diagnostics
    from lenssteer.quickstart import quickstart_corpora, run_quickstart_training
    from lenssteer.train import PRESETS

    started = time.perf_counter()
    out = Path(args.out)
    languages = [code.strip() for code in args.languages.split(",") if code.strip()]
    if args.corpus == "bible":
        train, heldout = quickstart_corpora(
            languages, args.train_items, args.heldout_items, seed=args.seed
        )
    else:
        from lenssteer.instructions import instruction_training_corpora

        train, heldout = instruction_training_corpora(
            args.corpus, languages, args.train_items, args.heldout_items, seed=args.seed
        )
    dtype = dtype_name(resolve_dtype(args.dtype))  # auto -> what this machine computes fastest
    print(
        f"[quickstart] {args.model} ({dtype}); {train.source}; {len(train)} training and "
        f"{len(heldout)} held-out items per language\n"
    )

    tokenizer, model = load_model(args.model, dtype)
    result = run_quickstart_training(
        model,
        tokenizer,
        train,
        heldout,
        out / "adapter",
        config=PRESETS[args.preset],
        subspace_out=out / "subspace",
    )
    print("\n## Probe: language subspaces of the trained layers (from the training verses)\n")
    print(format_diagnostics(result["subspace"]))
    print("\n## Held-out check of the adapter\n")
    print(result["report_markdown"])

    print("\n## The same prompts, base model vs adapter (greedy)\n")
    lines = []
    for prompt in TRY_PROMPTS:
        answers = generate(
            args.model,
            prompt,
            adapter=out / "adapter",
            max_new_tokens=args.max_new_tokens,
            loaded=(tokenizer, model),
        )
        lines += [
            f"- prompt: {prompt}",
            f"  - base:    {answers['base']!r}",
            f"  - steered: {answers['steered']!r}",
        ]
    print("\n".join(lines))
    timings = {**result["timings"], "total_s": round(time.perf_counter() - started, 1)}
    print(f"\n[quickstart] timings (s): {timings}")
    atomic_write_text(
        out / "QUICKSTART.md",
        "# Quickstart run\n\n"
        f"Command: `bash recipes/quickstart.sh {' '.join(sys.argv[1:])}`\n\n"
        f"Model: {args.model}, frozen weights in {dtype}\n\n"
        "## Probe\n\n"
        + format_diagnostics(result["subspace"])
        + "\n\n## Held-out check\n\n"
        + result["report_markdown"]
        + "\n\n## Generations\n\n"
        + "\n".join(lines)
        + f"\n\nTimings (s): {timings}\n",
    )
    if args.ship:
        ship(out, result["subspace"], args.model, args.corpus)

    if not args.skip_compare and args.model not in COMPARE_CONFIGS:
        print(f"[quickstart] no comparison config for {args.model}; skipping the comparison")
    elif not args.skip_compare:
        from lenssteer.cli import main as lenssteer_main

        compare_args = [
            "compare",
            "--config",
            str(COMPARE_CONFIGS[args.model]),
            "--adapter",
            str(out / "adapter"),
            "--out",
            str(out / "compare"),
        ]
        if args.compare_limit:
            compare_args += ["--limit", str(args.compare_limit)]
        print(f"\n[quickstart] lenssteer {' '.join(compare_args)}")
        return lenssteer_main(compare_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
