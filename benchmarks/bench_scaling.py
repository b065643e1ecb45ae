"""Scaling: time and memory of extraction and of training as items and languages double.

Points ``(items N, languages K)``: ``(n, 2), (2n, 2), (4n, 2)`` (items double) and ``(n, 4)``
(languages double). At each point, on Bible verses in the chat template:

* **extraction**: :func:`lenssteer.extract.extract_corpus` of the top 2 layers, no cache;
* **training**: the frozen precompute (:func:`lenssteer.training_data.prepare_training_data`) and one epoch
  of :func:`lenssteer.train.train_lens` (HF Trainer, fast path, LoRA on the top 2 layers, 2 items
  per step; the time is the Trainer's loop as train_lens records it, without its set-up), on the
  model's shipped subspace (or one probed once on 4 items, outside the timing).

Memory is the bytes of what each keeps (extraction: the pooled states; training: the precomputed
``TrainingData`` tensors), which is what grows with the data; the working memory of a pass depends
on the batch size only. The points run in rounds (the order rotated) and each time is the best
(minimum) over rounds: other processes on a shared machine only ever add time, so the minimum is
the estimate of a point's own cost that load disturbs least. Linear growth means that time and
memory grow like the number of real tokens: we report each doubling's ratio beside the ratio of
real tokens, and call it linear when the two agree within a factor 1.4.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import Row, alternate  # noqa: E402
from bench_train import _corpus  # noqa: E402

from lenssteer.extract import extract_corpus, format_texts  # noqa: E402
from lenssteer.models import num_decoder_layers  # noqa: E402

# Languages with a public-domain Bible (pt and pl have none): at most 6 per point.
LANGUAGES = ["en", "fr", "de", "es", "ru", "it"]
SUBSPACES = Path(__file__).resolve().parent.parent / "subspaces"


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _points(base_items: int) -> list[tuple[int, int]]:
    return [(base_items, 2), (2 * base_items, 2), (4 * base_items, 2), (base_items, 4)]


def _subspace(model, tokenizer, languages: list[str], layers: list[int], chat: bool):
    """The shipped subspace of this model when it covers ``languages``, else one probed on 4 items."""
    from lenssteer.models import model_identity
    from lenssteer.quickstart import probe_from_data
    from lenssteer.subspace import Subspace
    from lenssteer.training_data import prepare_training_data

    fingerprint = model_identity(model)["fingerprint"]
    for folder in sorted(SUBSPACES.glob("*/subspace.json")):
        subspace = Subspace.load(folder.parent)
        if (
            subspace.metadata.get("fingerprint") == fingerprint
            and set(languages) <= set(subspace.languages)
            and set(layers) <= set(subspace.layers)
            and subspace.metadata.get("pooling") == "last"
        ):
            return subspace
    corpus = _corpus(languages, 4)
    data = prepare_training_data(
        model, tokenizer, corpus, layers[0], layers, chat_template=chat, progress=False
    )
    return probe_from_data(model, tokenizer, corpus, data)


def scaling(
    model,
    tokenizer,
    base_items: int = 4,
    rounds: int = 1,
    points: Sequence[tuple[int, int]] | None = None,
    train: bool = True,
) -> tuple[list[Row], list[dict]]:
    """Rows (one per doubling and stage) and the table of points."""
    from lenssteer.train import TrainConfig, train_lens
    from lenssteer.training_data import prepare_training_data

    points = list(points or _points(base_items))
    n_layers = num_decoder_layers(model)
    layers = [n_layers - 2, n_layers - 1]
    chat = bool(getattr(tokenizer, "chat_template", None))
    corpora = {(n, k): _corpus(LANGUAGES[:k], n) for n, k in points}
    table: dict[tuple[int, int], dict] = {
        (n, k): {"items": n, "languages": k, "extract_s": [], "precompute_s": [], "train_s": []}
        for n, k in points
    }
    subspace = _subspace(model, tokenizer, LANGUAGES[: max(k for _, k in points)], layers, chat)
    warm = _corpus(LANGUAGES[:1], 2)  # first calls pay one-off initialisations: not in the table
    extract_corpus(
        model, tokenizer, warm, layers, chat_template=chat, cache_dir=False, progress=False
    )
    scratch = tempfile.TemporaryDirectory(prefix="lenssteer-bench-")

    def point(n: int, k: int):
        def run() -> float:
            entry, corpus = table[(n, k)], corpora[(n, k)]
            started = time.perf_counter()
            states = extract_corpus(
                model,
                tokenizer,
                corpus,
                layers,
                chat_template=chat,
                cache_dir=False,
                progress=False,
            )
            entry["extract_s"].append(time.perf_counter() - started)
            entry["extract_bytes"] = _bytes(list(states.values()))
            entry["texts"] = n * k
            texts = [t for language in corpus.languages for t in corpus.texts[language]]
            prompts = format_texts(tokenizer, texts, chat)
            entry["tokens"] = sum(
                map(len, tokenizer(prompts, add_special_tokens=not chat)["input_ids"])
            )
            if not train:
                return entry["extract_s"][-1]
            started = time.perf_counter()
            data = prepare_training_data(
                model, tokenizer, corpus, layers[0], layers, chat_template=chat, progress=False
            )
            entry["precompute_s"].append(time.perf_counter() - started)
            entry["train_bytes"] = _bytes(
                [data.prefix_states, data.suffix_states, data.token_ids, data.frozen, data.offsets]
            )
            config = TrainConfig(
                kind="lora", n_layers=2, batch_size=2, num_epochs=1.0, logging_steps=10_000
            )
            started = time.perf_counter()
            adapter = train_lens(
                model,
                tokenizer,
                subspace,
                corpus,
                out_dir=None,
                checkpoint_dir=Path(scratch.name) / f"{n}x{k}",
                config=config,
                progress=False,
                data=data,
            )
            entry["train_call_s"] = time.perf_counter() - started
            entry["train_s"].append(adapter.config.metrics["train"]["runtime_s"])
            return None

        return run

    try:
        alternate({f"{n}x{k}": point(n, k) for n, k in points}, rounds, warmup=0)
    finally:
        scratch.cleanup()
    for entry in table.values():
        for key in ("extract_s", "precompute_s", "train_s"):
            entry[key.replace("_s", "_best_s")] = min(entry[key]) if entry[key] else None
    rows = []
    stages = [("extract", "extraction", "extract_bytes")]
    if train:
        stages += [
            ("precompute", "training precompute", "train_bytes"),
            ("train", "training epoch", "train_bytes"),
        ]
    doublings = []  # each point against the one it doubles (items first, then languages), if any
    for n, k in points:
        halves = [(n // 2, k)] if n % 2 == 0 else []
        halves += [(n, k // 2)] if k % 2 == 0 else []
        previous = next((half for half in halves if half in table), None)
        if previous is not None:
            doublings.append((previous, (n, k)))
    for stage, label, bytes_key in stages:
        for before, after in doublings:
            a, b = table[before], table[after]
            time_ratio = b[f"{stage}_best_s"] / a[f"{stage}_best_s"]
            memory_ratio = b[bytes_key] / a[bytes_key]
            token_ratio = b["tokens"] / a["tokens"]
            what = "items" if before[1] == after[1] else "languages"
            rows.append(
                Row(
                    section="6. scaling",
                    name=f"{label}: {what} double ({before[0]}x{before[1]} -> {after[0]}x{after[1]})",
                    baseline=f"{a[f'{stage}_best_s']:.2f} s, {a[bytes_key] / 2**20:.2f} MB",
                    ours=f"{b[f'{stage}_best_s']:.2f} s, {b[bytes_key] / 2**20:.2f} MB",
                    ratio=time_ratio,
                    target="linear (x tokens)",
                    met=0.7 <= time_ratio / token_ratio <= 1.4
                    and 0.7 <= memory_ratio / token_ratio <= 1.4,
                    note=f"time x{time_ratio:.2f}, kept memory x{memory_ratio:.2f}, real tokens "
                    f"x{token_ratio:.2f} (linear: time and memory grow like tokens)",
                )
            )
    return rows, list(table.values())


def _parse_points(text: str) -> list[tuple[int, int]]:
    points = []
    for part in text.split(","):
        items, _, languages = part.strip().partition("x")
        if not (items.isdigit() and languages.isdigit()):
            raise SystemExit(f"bad point {part!r}: write ITEMSxLANGUAGES, e.g. 250x5")
        if not 1 <= int(languages) <= len(LANGUAGES):
            raise SystemExit(
                f"bad point {part!r}: 1 to {len(LANGUAGES)} languages ({', '.join(LANGUAGES)})"
            )
        points.append((int(items), int(languages)))
    return points


def main(argv: Sequence[str] | None = None) -> int:
    """Scaling at chosen sizes, on its own (run.py's section uses small sizes)."""
    import argparse
    import json

    from bench_common import load_average

    from lenssteer.models import DEFAULT_MODEL, load_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--points",
        default="250x5,500x5,1000x5",
        help="ITEMSxLANGUAGES,...: each doubling is compared with the point it doubles",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="also time precompute and an epoch")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args(argv)
    points = _parse_points(args.points)
    tokenizer, model = load_model(args.model, dtype=args.dtype)
    before = load_average()
    rows, table = scaling(model, tokenizer, rounds=args.rounds, points=points, train=args.train)
    after = load_average()
    for row in rows:
        print(f"{row.name}: {row.note} ({'met' if row.met else 'not met'})")
    for entry in table:
        print(
            f"{entry['items']}x{entry['languages']}: {entry['texts']} texts, {entry['tokens']} "
            f"tokens, extraction {entry['extract_best_s']:.2f} s"
            + (f", epoch {entry['train_best_s']:.2f} s" if entry.get("train_best_s") else "")
        )
    print(f"model {args.model} ({args.dtype}); load average {before} -> {after}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"model": args.model, "dtype": args.dtype, "table": table, "load": [before, after]},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
