"""Sweep Lens hyper-parameters on the quickstart's split, one frozen pass for all of them.

Precomputes the training and held-out data of the quickstart (same verses, same seed) once, probes
the subspace from the training states (as the quickstart does), then for every configuration
trains an adapter on the fast path and prints one JSON line with the held-out report (and the same
report on the training items, to tell under-fitting from over-fitting). For example:

    .venv/bin/python recipes/tune_lens.py --configs '[{}, {"alpha": 0.3, "num_epochs": 2}]'

Each configuration overrides fields of the *current* ``QUICKSTART_CONFIG``
(lenssteer.train.TrainConfig), so ``{}`` is the shipped setting; the rows of the table in
docs/training.md ("Tuning") give their settings in full.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from lenssteer.threads import prefer_passive_waiting

prefer_passive_waiting()  # OMP_WAIT_POLICY=PASSIVE unless set, before torch loads

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", required=True, help="JSON list of TrainConfig overrides")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--languages", default="en,de,es,fr,it", help="central first")
    parser.add_argument("--train-items", type=int, default=200)
    parser.add_argument("--heldout-items", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "tune"), help="data cache + results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lenssteer.models import load_model, num_decoder_layers
    from lenssteer.train import (
        QUICKSTART_CONFIG,
        TrainingData,
        TrainingError,
        heldout_report,
        prepare_training_data,
        probe_from_data,
        quickstart_corpora,
        train_lens,
    )

    try:
        overrides_list = json.loads(args.configs)
        configs = [dataclasses.replace(QUICKSTART_CONFIG, **o) for o in overrides_list]
    except (json.JSONDecodeError, TypeError, TrainingError) as error:
        print(f"error: --configs: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    languages = [code.strip() for code in args.languages.split(",") if code.strip()]
    train, heldout = quickstart_corpora(
        languages, args.train_items, args.heldout_items, seed=args.seed
    )
    parts = {"train": train, "heldout": heldout}
    tokenizer, model = load_model(args.model)
    total = num_decoder_layers(model)
    layers = list(range(total - QUICKSTART_CONFIG.n_layers, total))  # trained = loss layers
    data = {}
    for name in ("train", "heldout"):
        path = out / f"{name}-{parts[name].data_hash()[:12]}.safetensors"
        if path.exists():
            data[name] = TrainingData.load(path)
        else:
            data[name] = prepare_training_data(
                model, tokenizer, parts[name], layers[0], layers, pooling="last", chat_template=True
            )
            data[name].save(path)
    subspace = probe_from_data(model, tokenizer, parts["train"], data["train"])
    for overrides, config in zip(overrides_list, configs, strict=True):
        loss_layers = config.loss_layers or layers
        subset = {name: data[name].with_loss_layers(loss_layers) for name in parts}
        started = time.perf_counter()
        adapter = train_lens(
            model,
            tokenizer,
            subspace,
            parts["train"],
            out / "adapter",
            config,
            data=subset["train"],
        )
        seconds = time.perf_counter() - started
        reports = {
            name: heldout_report(
                model, tokenizer, adapter, subspace, parts[name], data=subset[name]
            )["summary"]
            for name in ("heldout", "train")
        }
        line = {"config": overrides, "train_s": round(seconds), **reports}
        print(json.dumps(line), flush=True)
        with open(out / "results.jsonl", "a", encoding="utf-8") as results:
            results.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
