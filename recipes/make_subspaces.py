"""Recompute the subspaces shipped in ``subspaces/`` (re-run it to reproduce them exactly).

For each bundled instruct model: public-domain Bible verses in en, fr, de, es, ru (a
deterministic sample), every decoder layer, last-token pooling inside the chat template (what
Lens trains on), rank K-1. Run: ``.venv/bin/python recipes/make_subspaces.py [--models NAME ...]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lenssteer.threads import prefer_passive_waiting

prefer_passive_waiting()  # OMP_WAIT_POLICY=PASSIVE unless set, before torch loads

from lenssteer.io import atomic_write_text  # noqa: E402
from lenssteer.probe import format_diagnostics, probe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = ["en", "fr", "de", "es", "ru"]
MODELS = ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--limit", type=int, default=200, help="verses per language (default 200)")
    args = parser.parse_args()
    for model in args.models:
        out = ROOT / "subspaces" / f"{model}-bible-{len(LANGUAGES)}lang"
        subspace = probe(
            model,
            corpus="bible",
            languages=LANGUAGES,
            central_language="en",
            layers="all",
            limit=args.limit,
            out=out,
            seed=0,
        )
        atomic_write_text(
            out / "DIAGNOSTICS.md",
            f"# {model}: language subspaces (all layers)\n\nMade by `python recipes/make_subspaces.py "
            f"--models {model} --limit {args.limit}`. Text: {subspace.metadata['corpus']} "
            "(public domain).\n\n" + format_diagnostics(subspace) + "\n",
        )
        print(f"{model}: written to {out}")


if __name__ == "__main__":
    main()
