"""Choose Lens settings on downstream dev items, never on the items the final comparison scores.

For every configuration (overrides of a training preset, e.g. ``{"push_weight": 1}``), train an
adapter on the corpus (the frozen pass is computed once per set of layers and shared), then score
the base model and every adapter in one comparison run on *dev* items of the comparison's tasks:
the dev config's items (another seed) minus every item the final comparison (``--scored-config``)
scores and, per adapter, its training items. The geometric report of training is a diagnostic;
the choice is made on what a user sees:

* **gain**: the target languages' average fidelity difference to the base model (answers in the
  prompt's language), averaged over the dev config's fidelity tasks (``--criterion
  loglik_per_byte``: the target text likelihood's instead, for a model that already answers in the
  prompt's language; target fidelity is then a constraint too);
* **constraints**: the target languages' held-out text log-likelihood per byte may not fall by
  more than ``--max-likelihood-drop`` nats per byte, and English fidelity may not fall by more than
  ``--max-english-drop`` points nor English likelihood by more than ``--max-likelihood-drop``; and
  no accuracy (a multiple-choice or retrieval task in the dev config, e.g. multiemo) may fall, in
  the targets or in English, with a paired 95% interval wholly below zero.

The best configuration meeting the constraints is chosen; ``--ship DIR`` copies its adapter to DIR
with the dev item ids recorded as ``selection_items`` (``lenssteer compare`` never scores them).
Everything lands in ``--out``: ``configs/<k>/adapter``, ``dev/report.{json,md}`` and ``tune.json``
(one row per configuration and the choice). Interrupted runs continue: adapters already trained
with the same settings are reused. For example (the recipe in recipes/lens_smollm2.sh)::

    .venv/bin/python recipes/tune_lens.py --model smollm2-135m-instruct \\
        --subspace runs/lens-smollm2/subspace --corpus instructions --limit 300 \\
        --dev-config recipes/tune_lens_smollm2.toml --scored-config recipes/compare_lens_smollm2.toml \\
        --configs '[{}, {"push_weight": 1}, {"n_layers": 4}]' --out runs/tune-smollm2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from lenssteer.threads import prefer_passive_waiting

prefer_passive_waiting()  # OMP_WAIT_POLICY=PASSIVE unless set, before torch loads

ROOT = Path(__file__).resolve().parent.parent
FIDELITY = "fidelity"
LIKELIHOOD = "loglik_per_byte"
SUBSPACE_KEY = "subspace"  # a configuration may name its own subspace folder (another probe)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        required=True,
        help="JSON list of training overrides (TrainConfig fields; 'subspace' names another "
        "subspace folder); {} is the preset itself",
    )
    parser.add_argument(
        "--preset", choices=["scale-free", "quickstart", "instructions"], default="scale-free"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--subspace", required=True, help="subspace folder (lenssteer probe)")
    parser.add_argument("--corpus", default="instructions", help="training corpus (as in train)")
    parser.add_argument("--languages", default=None, help="default: the subspace's languages")
    parser.add_argument("--central", default="en")
    parser.add_argument("--limit", type=int, default=300, help="training items (as in train)")
    parser.add_argument("--seed", type=int, default=0, help="training corpus sampling seed")
    parser.add_argument("--dev-config", required=True, help="compare TOML of the dev tasks")
    parser.add_argument(
        "--scored-config", required=True, help="compare TOML of the final comparison (kept apart)"
    )
    parser.add_argument(
        "--train-dtype",
        choices=["float32", "bfloat16", "auto"],
        default="float32",
        help="frozen weights while training (default float32); the dev comparison runs in its "
        "config's dtype",
    )
    parser.add_argument(
        "--criterion",
        choices=[FIDELITY, LIKELIHOOD],
        default=FIDELITY,
        help="what to gain: target fidelity (default) or target text likelihood (for a model "
        "that already answers in the prompt's language)",
    )
    parser.add_argument("--max-likelihood-drop", type=float, default=0.005, help="nats per byte")
    parser.add_argument("--max-english-drop", type=float, default=2.0, help="fidelity points")
    parser.add_argument("--out", default=str(ROOT / "runs" / "tune"))
    parser.add_argument("--ship", default=None, help="copy the chosen adapter here")
    parser.add_argument(
        "--ship-config",
        type=int,
        default=None,
        help="with --ship: ship configuration K (its position in --configs) when the rule chooses "
        "none; tune.json records it as chosen by hand, beside the rule's empty choice",
    )
    parser.add_argument(
        "--ship-subspace",
        default=None,
        help="with --ship: copy the chosen adapter's subspace here and point the adapter at it",
    )
    parser.add_argument(
        "--earlier-selection",
        action="append",
        default=[],
        metavar="ADAPTER",
        help="an adapter whose dev items chose the settings this sweep starts from (e.g. an earlier "
        "sweep's shipped adapter); with --ship its selection_items are recorded too, so the "
        "scored comparison never scores an item that chose anything (repeatable)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="train only these configurations (comma-separated positions in --configs) and stop "
        "before the comparison: to train on several processes, then run once without --only",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def dev_rows(document: dict[str, Any], systems: list[str], central: str) -> list[dict[str, Any]]:
    """One row per system: the target average difference to base of every task's primary metric
    (fidelity x100, likelihood in nats per byte), and the central language's."""
    rows = []
    for name in systems:
        row: dict[str, Any] = {"system": name, "targets": {}, "central": {}}
        for task, metrics in document["summary"].items():
            metric = document["primary_metrics"][task]
            cells = metrics[metric][name]
            scale = 1.0 if metric == LIKELIHOOD else 100.0  # shares in points, nats as they are
            for where, key in (("targets", "targets"), ("central", central)):
                cell = cells[key]
                row[where][task] = {
                    "metric": metric,
                    "diff": scale * cell["diff"],
                    "low": scale * cell["diff_low"],
                    "high": scale * cell["diff_high"],
                    "n": cell["n"],
                }
        rows.append(row)
    return rows


def judge(
    row: dict[str, Any],
    max_likelihood_drop: float,
    max_english_drop: float,
    criterion: str = FIDELITY,
) -> None:
    """Add the gain and the constraints a row breaks. ``criterion``: ``fidelity`` (gain = mean
    target fidelity difference, points) or ``loglik_per_byte`` (gain = mean target text
    likelihood difference, nats per byte; then target fidelity may not fall by more than
    ``max_english_drop`` points either): for a model that already answers in the prompt's
    language, where there is no fidelity to gain. Any other metric (an accuracy) breaks a
    constraint when its paired 95% interval lies wholly below zero."""
    gains = [c["diff"] for c in row["targets"].values() if c["metric"] == criterion]
    row["gain"] = sum(gains) / len(gains) if gains else float("nan")
    broken = []
    for where, cells in (("targets", row["targets"]), ("central", row["central"])):
        for task, cell in cells.items():
            if cell["metric"] == LIKELIHOOD and cell["diff"] < -max_likelihood_drop:
                broken.append(f"{where} {task} {cell['diff']:+.4f} nats/byte")
            guarded = where == "central" or criterion != FIDELITY
            if guarded and cell["metric"] == FIDELITY and cell["diff"] < -max_english_drop:
                broken.append(f"{where} {task} {cell['diff']:+.1f} points")
            if cell["metric"] not in (FIDELITY, LIKELIHOOD) and cell["high"] < 0:
                broken.append(
                    f"{where} {task} {cell['diff']:+.1f} points "
                    f"[{cell['low']:+.1f}, {cell['high']:+.1f}]"
                )
    row["broken"] = broken


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the largest positive gain among those that break no constraint."""
    allowed = [r for r in rows if not r["broken"] and r["gain"] > 0]
    return max(allowed, key=lambda r: r["gain"]) if allowed else None


def selection_ids(dev_ids: list[str], earlier: list[str]) -> list[str]:
    """The item ids a shipped adapter records as chosen on: this sweep's dev items and those of
    every ``earlier`` adapter (an error names a folder that is not an adapter)."""
    from lenssteer.adapter import SteeringAdapter

    ids = set(dev_ids)
    for folder in earlier:
        ids.update(SteeringAdapter.from_pretrained(folder).config.selection_items)
    return sorted(ids)


def format_table(rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> str:
    tasks = list(rows[0]["targets"]) if rows else []
    lines = ["system | gain | " + " | ".join(f"{t} (targets; en)" for t in tasks) + " | broken"]
    for row in rows:
        cells = []
        for task in tasks:
            t, c = row["targets"][task], row["central"][task]
            digits = 4 if t["metric"] == LIKELIHOOD else 1
            cells.append(
                f"{t['diff']:+.{digits}f} [{t['low']:+.{digits}f}, {t['high']:+.{digits}f}]; "
                f"{c['diff']:+.{digits}f}"
            )
        mark = " <- chosen" if row is chosen else ""
        lines.append(
            f"{row['system']} | {row['gain']:+.1f} | "
            + " | ".join(cells)
            + f" | {'; '.join(row['broken']) or '-'}{mark}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lenssteer.adapter import AdapterError, SteeringAdapter
    from lenssteer.compare import (
        SystemConfig,
        load_config,
        run_comparison,
        scored_item_ids,
    )
    from lenssteer.data import load_corpus
    from lenssteer.mmlu import TaskDataError
    from lenssteer.models import cast_model, load_model, model_dtype, resolve_dtype
    from lenssteer.subspace import Subspace
    from lenssteer.task_registry import TaskError
    from lenssteer.train import (
        PRESETS,
        TrainingError,
        resolve_training_layers,
        train_lens,
        training_data,
    )
    from lenssteer.training_data import TrainingData

    preset = PRESETS[args.preset]
    try:
        overrides_list = json.loads(args.configs)
        subspaces = [o.pop(SUBSPACE_KEY, args.subspace) for o in overrides_list]
        configs = [dataclasses.replace(preset, **o) for o in overrides_list]
    except (json.JSONDecodeError, TypeError, AttributeError, TrainingError) as error:
        print(f"error: --configs: {error}", file=sys.stderr)
        return 2
    if args.ship_config is not None and not 0 <= args.ship_config < len(configs):
        print(
            f"error: --ship-config {args.ship_config}: --configs has {len(configs)} entries",
            file=sys.stderr,
        )
        return 2
    try:  # read before hours of training: every earlier adapter must load
        earlier_ids = selection_ids([], args.earlier_selection)
    except AdapterError as error:
        print(f"error: --earlier-selection: {error}", file=sys.stderr)
        return 2
    dev = load_config(args.dev_config)
    final = load_config(args.scored_config)
    if (dev.model, dev.languages) != (final.model, final.languages) or dev.model != args.model:
        print(
            "error: --model, the dev and the scored configs must name one model and languages",
            file=sys.stderr,
        )
        return 2
    try:  # every task's items must be readable before hours of training (multiemo's archive)
        scored = scored_item_ids(final)
        scored_item_ids(dev)
    except (TaskError, TaskDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    out = Path(args.out)
    tokenizer, model = load_model(args.model, args.train_dtype)
    loaded_subspaces = {path: Subspace.load(path) for path in dict.fromkeys(subspaces)}
    languages = args.languages.split(",") if args.languages else None

    only = None if args.only is None else {int(k) for k in args.only.split(",")}
    systems = [SystemConfig("base")]
    frozen: dict[tuple, Any] = {}
    for k, (overrides, config, path) in enumerate(
        zip(overrides_list, configs, subspaces, strict=True)
    ):
        if only is not None and k not in only:
            continue
        subspace = loaded_subspaces[path]
        if config.representation != subspace.metadata.get("representation", "residual"):
            config = dataclasses.replace(config, representation=subspace.metadata["representation"])
        folder = out / "configs" / str(k)
        settings = {
            "overrides": overrides,
            "subspace": str(path),
            "corpus": [args.corpus, args.languages, args.central, args.limit, args.seed],
            "config": dataclasses.asdict(config),
        }
        done = folder / "settings.json"
        if not (done.exists() and json.loads(done.read_text()) == settings):
            corpus = load_corpus(
                args.corpus,
                languages or list(subspace.languages),
                central_language=args.central,
                limit=args.limit,
                seed=args.seed,
            )
            trained, loss_layers = resolve_training_layers(
                model, config.n_layers, subspace.layers, config.loss_layers
            )
            key = (
                str(path),
                trained[0],
                tuple(loss_layers),
                corpus.data_hash(),
                config.max_tokens,
                config.hold_corpus,
                config.hold_limit,
            )
            cached = out / "frozen" / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}.st"
            if key not in frozen and cached.exists():
                frozen[key] = TrainingData.load(cached)
            if key not in frozen:
                frozen[key] = training_data(model, tokenizer, subspace, corpus, config, progress)
                cached.parent.mkdir(parents=True, exist_ok=True)
                frozen[key].save(cached)
            print(f"[{k}] training {json.dumps(overrides)} on {path}", flush=True)
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            train_lens(
                model,
                tokenizer,
                subspace,
                corpus,
                folder / "adapter",
                config,
                progress=progress,
                data=frozen[key],
                subspace_path=path,
            )
            done.write_text(json.dumps(settings, indent=1))
        systems.append(SystemConfig(f"lens-{k}", kind="lens", adapter=str(folder / "adapter")))

    if only is not None:
        print(f"trained {sorted(only)}; run again without --only for the comparison")
        return 0
    if resolve_dtype(dev.dtype) != model_dtype(model):  # score in the dev config's dtype
        cast_model(model, dev.dtype)
    dev.exclude_items = sorted({i for ids in scored.values() for i in ids})
    dev.systems = systems
    dev.out = str(out / "dev")
    document = run_comparison(
        dev, progress=progress, loaded=(tokenizer, model), command=" ".join(sys.argv)
    )
    names = [s.name for s in systems[1:]]
    rows = dev_rows(document, names, dev.central_language)
    for row, overrides, path in zip(rows, overrides_list, subspaces, strict=True):
        row["overrides"] = overrides
        row["subspace"] = str(path)
        judge(row, args.max_likelihood_drop, args.max_english_drop, args.criterion)
    chosen = choose(rows)
    by_hand = None
    if chosen is None and args.ship_config is not None:
        by_hand = rows[args.ship_config]
    dev_ids = sorted({i for o in document["outcomes"] for i in o["item_ids"]})
    result = {
        "dev_config": args.dev_config,
        "scored_config": args.scored_config,
        "dev_items": len(dev_ids),
        "criterion": {
            "gain": f"mean target {args.criterion} difference to base, over its tasks",
            "max_likelihood_drop": args.max_likelihood_drop,
            "max_english_drop": args.max_english_drop,
        },
        "rows": rows,
        "chosen": chosen["system"] if chosen else None,
        "chosen_by_hand": by_hand["system"] if by_hand else None,
    }
    (out / "tune.json").write_text(json.dumps(result, indent=1))
    print(format_table(rows, chosen))
    if chosen is None and by_hand is None:
        print(f"no configuration gained {args.criterion} within the constraints; nothing chosen")
        return 1 if args.ship else 0
    if chosen is None:
        print(f"the rule chose nothing; shipping {by_hand['system']} as asked (--ship-config)")
        chosen = by_hand
    else:
        print(f"chosen: {chosen['system']} {json.dumps(chosen['overrides'])}")
    if args.ship:
        adapter = SteeringAdapter.from_pretrained(
            out / "configs" / chosen["system"].removeprefix("lens-") / "adapter"
        )
        adapter.config.selection_items = sorted({*dev_ids, *earlier_ids})
        if args.ship_subspace:
            loaded_subspaces[chosen["subspace"]].save(args.ship_subspace)
            adapter.config.subspace["path"] = str(args.ship_subspace)
        adapter.save_pretrained(args.ship)
        recorded = len(adapter.config.selection_items)
        print(f"shipped to {args.ship} ({recorded} dev item ids recorded as selection_items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
