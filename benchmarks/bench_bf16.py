"""bfloat16 against float32, end to end: speed of every stage, and agreement of every result.

Speed (:func:`bf16_rows`): the same loaded model in float32 and a bfloat16 copy made by
:func:`lenssteer.models.cast_model` (what ``--dtype bfloat16`` loads), each way alternated with the
other in one process (:func:`bench_common.alternate`), medians and their ratio:

* **extraction**: :func:`lenssteer.extract.extract_states` (cache off) of Bible verses at the top two
  layers, texts per second;
* **training step**: one Lens step on the fast path (forward of the trained top layers, backward,
  AdamW), LoRA on the top two layers. Three ways: float32; bfloat16 weights with float32 LoRA
  parameters and optimizer state (what ``train --dtype bfloat16`` does); and float32 weights under
  ``torch.autocast("cpu", bfloat16)`` (the alternative, measured to choose between them);
* **option scoring**: :func:`lenssteer.evaluate.loglikelihoods` of the lettered options of
  ``mmlu-translated`` items (what ``compare`` scores), items per second;
* **generation**: :func:`lenssteer.evaluate.generate_greedy` of one prompt at batch 1, tokens per
  second;
* **memory**: the parameters' bytes; with a model name, each dtype in a fresh process
  (:func:`memory_dtype`): resident size after loading, the loading peak, and the peak growth of one
  extraction batch.

Agreement (the functions named ``*_agreement``; tests/test_dtype.py asserts them on SmolLM2):
subspace diagnostics, option rankings, the language of greedy answers, and training losses.

Run alone: ``.venv/bin/python benchmarks/bench_bf16.py [--model NAME] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import Row, alternate, isolated, median, memory_window  # noqa: E402
from bench_train import _corpus  # noqa: E402

from lenssteer.models import cast_model, find_decoder_layers  # noqa: E402

SECTION = "8. bfloat16 vs float32"  # 7: threads (README; bench_threads.py)
PROMPT = "Explain in two sentences why the sky is blue."


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 copy of a float32 model, with the identity ``load_model(dtype=...)`` gives it."""
    return cast_model(copy.deepcopy(model), torch.bfloat16)


def _parameter_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


# --------------------------------------------------------------------------------------------------
# Workloads


def mmlu_requests(tokenizer, languages: Sequence[str], limit: int, seed: int = 0):
    """Lettered-option requests of ``mmlu-translated`` items: ``[(item key, requests, answer)]``."""
    from lenssteer.task_registry import get_task

    task = get_task("mmlu-translated")
    items = task.items(list(languages), limit, seed)
    out = []
    for language, rows in items.items():
        for item in rows:
            requests, _ = task.requests(tokenizer, item, "letter")
            out.append((f"{language}:{item.id}", requests, item.answer))
    return out


def fidelity_prompts(tokenizer, languages: Sequence[str], limit: int, seed: int = 0):
    """``[(language, formatted prompt)]`` of the language-fidelity task (chat template applied)."""
    from lenssteer.extract import format_texts
    from lenssteer.task_registry import get_task

    task = get_task("language-fidelity")
    chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for language, rows in task.prompts(list(languages), limit, seed).items():
        texts = format_texts(tokenizer, [message for _, message in rows], chat)
        out += [(language, text) for text in texts]
    return out, chat


def option_scores(model, tokenizer, items, batch_size: int = 8) -> list[list[float]]:
    """Per item, the log-likelihood of each option."""
    from lenssteer.evaluate import loglikelihoods

    flat = [request for _, requests, _ in items for request in requests]
    scores = [s for s, _ in loglikelihoods(model, tokenizer, flat, batch_size=batch_size)]
    out, start = [], 0
    for _, requests, _ in items:
        out.append(scores[start : start + len(requests)])
        start += len(requests)
    return out


class TrainStep:
    """One Lens fast-path step (LoRA on the top two layers) on a fixed batch of one model."""

    def __init__(
        self, model, tokenizer, corpus, autocast: bool = False, lr: float = 1e-4, items: int = 2
    ) -> None:
        from lenssteer.objectives import LensObjective
        from lenssteer.quickstart import probe_from_data
        from lenssteer.train import LensTrainingModule, TrainConfig, trainable_top_layers
        from lenssteer.training_data import prepare_training_data

        n_layers = len(find_decoder_layers(model))
        trained = [n_layers - 2, n_layers - 1]
        self.autocast = autocast
        with self._cast():
            data = prepare_training_data(
                model,
                tokenizer,
                corpus,
                trained[0],
                trained,
                chat_template=bool(tokenizer.chat_template),
                progress=False,
            )
        subspace = probe_from_data(model, tokenizer, corpus, data)
        batch_items = list(range(min(items, len(corpus))))
        self.batch = data.collate(batch_items, layer_inputs=True, split_prefix=True)
        self.tokens = int(self.batch["attention_mask"].sum())
        self._context = trainable_top_layers(model, trained, TrainConfig(kind="lora", n_layers=2))
        trainable = self._context.__enter__()
        self.trainable_dtype = str(next(iter(trainable.parameters().values())).dtype)
        self.module = LensTrainingModule(
            model,
            subspace.specific_basis,
            subspace.directions.transpose(0, 1),
            0,
            trained[0],
            trained,
            "last",
            LensObjective(),
            agnostic=subspace.agnostic,
        )
        self.module.train()
        self.optimizer = torch.optim.AdamW(trainable.parameters().values(), lr=lr)

    def _cast(self):
        if self.autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self) -> float:
        with self._cast():
            out = self.module(**self.batch)
        out["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out["loss"].detach())

    def close(self) -> None:
        self._context.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------------
# Speed


def bf16_rows(
    model,
    tokenizer,
    n_texts: int = 16,
    batch_size: int = 8,
    train_items: int = 2,
    train_languages: str = "en,fr,de,es,ru",
    score_items: int = 8,
    generate_tokens: int = 16,
    rounds: int = 3,
    model_name: str | None = None,
) -> list[Row]:
    """Rows: bf16 / fp32 speed of extraction, a training step, option scoring and generation,
    and memory. ``model`` is a float32 model; its bfloat16 copy is made here. With ``model_name``,
    memory is also measured per dtype in fresh processes (:func:`memory_dtype`)."""
    from lenssteer.evaluate import generate_greedy
    from lenssteer.extract import extract_states, format_texts

    models = {"fp32": model, "bf16": bf16_copy(model)}
    chat = bool(getattr(tokenizer, "chat_template", None))
    n_layers = len(find_decoder_layers(model))
    top = [n_layers - 2, n_layers - 1]
    rows: list[Row] = []

    # Extraction.
    languages = ["en", "de", "fr", "es"]
    per_language = max(1, n_texts // len(languages))
    corpus = _corpus(languages, per_language)
    texts = [t for language in corpus.languages for t in corpus.texts[language]]

    def extract(name: str):
        return lambda: extract_states(
            models[name],
            tokenizer,
            texts,
            top,
            chat_template=chat,
            batch_size=batch_size,
            progress=False,
            cache_dir=False,
        )

    times = alternate({name: _whole(extract(name)) for name in models}, rounds)
    fp32_s, bf16_s = median(times["fp32"]), median(times["bf16"])
    ratio = fp32_s / bf16_s
    rows.append(
        Row(
            section=SECTION,
            name="extraction throughput (texts/s): bf16 / fp32",
            baseline=f"{len(texts) / fp32_s:.1f} texts/s",
            ours=f"{len(texts) / bf16_s:.1f} texts/s",
            ratio=ratio,
            target=">= 2x",
            met=ratio >= 2,
            note=f"extract_states of {len(texts)} Bible verses (en, de, fr, es), layers {top}, "
            f"batch {batch_size}, chat template, cache off; {rounds} alternating rounds after a "
            f"warm-up",
            details={"fp32_s": times["fp32"], "bf16_s": times["bf16"]},
        )
    )

    # Training step: fp32, bf16 weights + fp32 LoRA, fp32 weights under autocast.
    train_corpus = _corpus(train_languages.split(","), max(train_items, 4))  # 4: probe_from_data
    steps = {
        name: TrainStep(models[name], tokenizer, train_corpus, items=train_items)
        for name in ("fp32", "bf16")
    }
    # Autocast runs the float32 model's own step (same LoRA) under torch.autocast.
    step_times = alternate(
        {
            "fp32": _whole(steps["fp32"]),
            "bf16": _whole(steps["bf16"]),
            "autocast": _whole(lambda: _autocast_step(steps["fp32"])),
        },
        rounds,
    )
    for step in steps.values():
        step.close()
    fp32_s, bf16_s = median(step_times["fp32"]), median(step_times["bf16"])
    auto_s = median(step_times["autocast"])
    ratio = fp32_s / bf16_s
    autocast_ratio = fp32_s / auto_s
    rows.append(
        Row(
            section=SECTION,
            name="training step (fast path, LoRA): fp32 / bf16 time",
            baseline=f"{fp32_s:.3f} s",
            ours=f"{bf16_s:.3f} s",
            ratio=ratio,
            target="report",
            met=None,
            note=f"one Lens step (forward of the top 2 layers, backward, AdamW) on "
            f"{train_items} items x {train_languages} ({steps['bf16'].tokens} real tokens); bf16 "
            f"weights with {steps['bf16'].trainable_dtype} LoRA parameters and optimizer state "
            f"(what train --dtype bfloat16 does). The alternative, float32 weights under "
            f"torch.autocast(bfloat16), in the same rounds: {auto_s:.3f} s (x{autocast_ratio:.2f} "
            f"of float32)",
            details={
                "fp32_s": step_times["fp32"],
                "bf16_s": step_times["bf16"],
                "autocast_s": step_times["autocast"],
                "autocast_speedup": autocast_ratio,
            },
        )
    )

    # Option scoring.
    items = mmlu_requests(tokenizer, ["en", "de"], max(1, score_items // 2))
    n_requests = sum(len(r) for _, r, _ in items)
    times = alternate(
        {
            name: _whole(lambda m=m: option_scores(m, tokenizer, items))
            for name, m in models.items()
        },
        rounds,
    )
    fp32_s, bf16_s = median(times["fp32"]), median(times["bf16"])
    ratio = fp32_s / bf16_s
    rows.append(
        Row(
            section=SECTION,
            name="option scoring (items/s): bf16 / fp32",
            baseline=f"{len(items) / fp32_s:.2f} items/s",
            ours=f"{len(items) / bf16_s:.2f} items/s",
            ratio=ratio,
            target=">= 2x",
            met=ratio >= 2,
            note=f"loglikelihoods of the lettered options of {len(items)} mmlu-translated items "
            f"(en, de; {n_requests} requests, one forward per item since the options share the "
            "prompt), batch 8",
            details={"fp32_s": times["fp32"], "bf16_s": times["bf16"]},
        )
    )

    # Generation at batch 1.
    text = format_texts(tokenizer, [PROMPT], chat)[0]

    def generate(name: str):
        def run() -> None:
            generate_greedy(
                models[name], tokenizer, [text], generate_tokens, add_special_tokens=not chat
            )

        return run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = alternate({name: generate(name) for name in models}, rounds)
    fp32_s, bf16_s = median(times["fp32"]), median(times["bf16"])
    ratio = fp32_s / bf16_s
    rows.append(
        Row(
            section=SECTION,
            name="generation tokens/s (batch 1, greedy): bf16 / fp32",
            baseline=f"{generate_tokens / fp32_s:.1f} tok/s",
            ours=f"{generate_tokens / bf16_s:.1f} tok/s",
            ratio=ratio,
            target="report",
            met=None,
            note=f"generate_greedy of one chat prompt, {generate_tokens} new tokens (prefill "
            "included), KV cache",
            details={"fp32_s": times["fp32"], "bf16_s": times["bf16"]},
        )
    )

    fp32_mb, bf16_mb = _parameter_mb(models["fp32"]), _parameter_mb(models["bf16"])
    note = "bytes of the model's parameters"
    if model_name is not None:
        memory = {
            dtype: isolated("bench_bf16:memory_dtype", model_name=model_name, dtype=dtype)
            for dtype in ("float32", "bfloat16")
        }
        a, b = memory["float32"], memory["bfloat16"]
        note += (
            f". Each dtype in a fresh process (load_model(..., dtype), then one extraction batch "
            f"of {a['shape'][0]}x{a['shape'][1]} tokens twice): resident after loading "
            f"{a['loaded_mb']:.0f} MB fp32 vs {b['loaded_mb']:.0f} MB bf16; peak while loading "
            f"{a['load_peak_mb']:.0f} vs {b['load_peak_mb']:.0f} MB (load_model reads float32 "
            f"to fingerprint the checkpoint, then casts); peak growth of the measured extraction "
            f"pass +{a['extract_growth_mb']:.0f} vs +{b['extract_growth_mb']:.0f} MB"
        )
    else:
        memory = None
    rows.append(
        Row(
            section=SECTION,
            name="parameter memory: bf16 / fp32",
            baseline=f"{fp32_mb:.0f} MB",
            ours=f"{bf16_mb:.0f} MB",
            ratio=bf16_mb / fp32_mb,
            target="report",
            met=None,
            note=note,
            details={"memory": memory} if memory else {},
        )
    )
    return rows


def memory_dtype(model_name: str, dtype: str, batch_size: int = 8) -> dict:
    """Run in a fresh process: resident size after loading in ``dtype``, the loading peak, and the
    peak growth of one extraction batch (the second of two runs)."""
    import gc

    from bench_common import _peak_rss_mb, _rss_mb
    from bench_extract import make_batches, texts_for

    from lenssteer.extract import pooled_states
    from lenssteer.models import load_model

    tokenizer, model = load_model(model_name, dtype)
    gc.collect()
    load_peak, loaded = _peak_rss_mb(), _rss_mb()
    chat = bool(getattr(tokenizer, "chat_template", None))
    batch = make_batches(tokenizer, texts_for(["en"], batch_size), batch_size, chat)[0]
    top = [len(find_decoder_layers(model)) - 1]
    with torch.no_grad():
        pooled_states(model, batch["input_ids"], batch["attention_mask"], top)
        gc.collect()
        with memory_window() as window:
            pooled_states(model, batch["input_ids"], batch["attention_mask"], top)
    return {
        "dtype": dtype,
        "loaded_mb": round(loaded, 1),
        "load_peak_mb": round(load_peak, 1),
        "extract_growth_mb": round(window.growth_mb, 1),
        "peak_reset": window.reset,
        "shape": list(batch["input_ids"].shape),
    }


def _whole(fn):
    """``fn`` for :func:`bench_common.alternate`, which reads a returned number as the seconds."""

    def run() -> None:
        fn()

    return run


def _autocast_step(step: TrainStep) -> float:
    step.autocast = True
    try:
        return step()
    finally:
        step.autocast = False


# --------------------------------------------------------------------------------------------------
# Agreement


def subspace_agreement(fp32, bf16, tokenizer, languages, limit: int, seed: int = 0) -> dict:
    """Probe both models on the same Bible items; the largest |bf16 - fp32| of each diagnostic."""
    from lenssteer.probe import probe

    common = dict(
        corpus="bible", languages=languages, limit=limit, seed=seed, progress=False, layers="top:2"
    )
    spaces = {
        name: probe("", loaded=(tokenizer, m), **common)
        for name, m in (("fp32", fp32), ("bf16", bf16))
    }
    keys = ("language_id_accuracy", "retrieval_before_mean", "retrieval_after_mean")
    diffs: dict[str, float] = {}
    per_layer = []
    for a, b in zip(
        spaces["fp32"].metadata["diagnostics"], spaces["bf16"].metadata["diagnostics"], strict=True
    ):
        row = {key: (a[key], b[key]) for key in keys}
        row["explained_variance"] = (sum(a["explained_variance"]), sum(b["explained_variance"]))
        per_layer.append({"layer": a["layer"], **row})
        for key, (x, y) in row.items():
            diffs[key] = max(diffs.get(key, 0.0), abs(x - y))
    a_dirs, b_dirs = spaces["fp32"].directions.float(), spaces["bf16"].directions.float()
    nonzero = a_dirs.norm(dim=-1) > 0  # the central language's direction is zero
    cosines = torch.nn.functional.cosine_similarity(a_dirs, b_dirs, dim=-1)[nonzero]
    return {
        "max_abs_diff": diffs,
        "per_layer": per_layer,
        "direction_cosine_min": float(cosines.min()),
        "n_heldout": spaces["fp32"].metadata["diagnostics"][0]["n_heldout_items"],
    }


def option_ranking_agreement(
    fp32, bf16, tokenizer, languages, limit: int | None, decisive: float = 0.1
) -> dict:
    """Share of mmlu-translated items whose top-scored option is the same in both dtypes (also
    among the items float32 decides by at least ``decisive`` nats, and the margins of the flips)."""
    items = mmlu_requests(tokenizer, languages, limit)
    a, b = option_scores(fp32, tokenizer, items), option_scores(bf16, tokenizer, items)
    same = [
        max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
        for x, y in zip(a, b, strict=True)
    ]
    correct = {
        name: sum(
            max(range(len(s)), key=s.__getitem__) == answer
            for s, (_, _, answer) in zip(scores, items, strict=True)
        )
        / len(items)
        for name, scores in (("fp32", a), ("bf16", b))
    }
    gaps = [abs(x_ - y_) for x, y in zip(a, b, strict=True) for x_, y_ in zip(x, y, strict=True)]
    # Near ties: float32's best option leads the next by less than `decisive` nats.
    margins = [sorted(x, reverse=True)[0] - sorted(x, reverse=True)[1] for x in a]
    decisive_same = [ok for ok, m in zip(same, margins, strict=True) if m >= decisive]
    return {
        "n_items": len(items),
        "agreement": sum(same) / len(same),
        "decisive_margin": decisive,
        "n_decisive": len(decisive_same),
        "agreement_decisive": sum(decisive_same) / max(1, len(decisive_same)),
        "flip_margins": sorted(m for ok, m in zip(same, margins, strict=True) if not ok),
        "accuracy": correct,
        "max_abs_loglik_diff": max(gaps),
        "median_abs_loglik_diff": median(gaps),
    }


def generation_language_agreement(
    fp32, bf16, tokenizer, languages, limit: int, max_new_tokens: int = 32
) -> dict:
    """Share of language-fidelity prompts whose greedy answers are judged the same language."""
    from lenssteer.evaluate import detect_language, generate_greedy

    prompts, chat = fidelity_prompts(tokenizer, languages, limit)
    texts = [text for _, text in prompts]
    answers = {
        name: generate_greedy(m, tokenizer, texts, max_new_tokens, add_special_tokens=not chat)
        for name, m in (("fp32", fp32), ("bf16", bf16))
    }
    judged = {name: [detect_language(a) for a in out] for name, out in answers.items()}
    same = [x == y for x, y in zip(judged["fp32"], judged["bf16"], strict=True)]
    identical = [x == y for x, y in zip(answers["fp32"], answers["bf16"], strict=True)]
    return {
        "n_prompts": len(texts),
        "language_agreement": sum(same) / len(same),
        "identical_answers": sum(identical) / len(identical),
    }


def training_loss_agreement(fp32, bf16, tokenizer, languages, n_items: int, steps: int) -> dict:
    """Lens losses of the same LoRA fast-path steps (same batch, same init seed) in both dtypes."""
    corpus = _corpus(list(languages), max(n_items, 4))
    losses = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        torch.manual_seed(0)
        step = TrainStep(model, tokenizer, corpus, lr=1e-3, items=n_items)
        try:
            losses[name] = [step() for _ in range(steps)]
        finally:
            step.close()
    relative = [abs(b - a) / abs(a) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)]
    return {"losses": losses, "max_relative_diff": max(relative)}


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from lenssteer.models import load_model

    tokenizer, model = load_model(args.model)
    for row in bf16_rows(model, tokenizer, rounds=args.rounds):
        print(f"{row.name}: {row.baseline} -> {row.ours} (x{row.ratio:.2f}); {row.note}")


if __name__ == "__main__":
    _main()
