"""The peers a user would pick instead, on the same model and inputs, alternated in one process.

* **pooled top-layer activations**: :func:`lenssteer.extract.extract_states` (last real token of the
  top decoder layer, chat template, the template's shared prefix run once, the pass stopped after
  the top layer) against steering-vectors' ``record_activations`` and nnsight's ``.save()`` of
  the same layer's output, each written the way its documentation shows: a full ``model(**batch)``
  pass on the same tokenized (right-padded) batches, pooled at the last real token afterwards.
  Parity: the largest difference between the pooled vectors, relative to their largest value.
* **a language-shift vector at one layer**: our hook (:class:`lenssteer.language_shift.
  LanguageShift`, what ``compare``'s language-shift system applies) against steering-vectors'
  ``SteeringVector.apply`` with the same vector and multiplier. Parity: the largest difference of
  the steered logits; speed: greedy generation at batch 1.

* **one XTransplant pair**: the FFN output at the donor's last token in layer s, written into the
  recipient's last token in layer t, with nnsight (a saved activation assigned in a second trace)
  against our pair from scratch and our per-pair cost in the fast grid. Parity: the largest
  difference of the options' log-likelihoods.

Install the peers with ``pip install -e '.[bench]'`` (see pyproject.toml: steering-vectors declares
``transformers<5`` and is installed with ``--no-deps``). Run alone:
``.venv/bin/python benchmarks/bench_peers.py [--model NAME] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import Row, alternate, median  # noqa: E402
from bench_extract import make_batches, texts_for  # noqa: E402

from lenssteer.hooks import last_real_positions  # noqa: E402
from lenssteer.models import find_decoder_layers  # noqa: E402

SECTION = "9. peers"


def _whole(fn):
    def run() -> None:
        fn()

    return run


def _pool_last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0])
    return hidden[rows, last_real_positions(mask)].float()


def pooled_activation_rows(
    model, tokenizer, n_texts: int = 16, batch_size: int = 8, rounds: int = 3
) -> list[Row]:
    """Rows: extract_states against steering-vectors' record_activations and nnsight's .save()."""
    from nnsight import LanguageModel
    from steering_vectors import record_activations

    from lenssteer.extract import extract_states

    chat = bool(getattr(tokenizer, "chat_template", None))
    texts = texts_for(["en"], n_texts)
    batches = make_batches(tokenizer, texts, batch_size, chat)  # shortest first, as ours
    top = len(find_decoder_layers(model)) - 1
    with warnings.catch_warnings():  # nnsight 0.8 names a successor; its documentation uses this
        warnings.simplefilter("ignore")
        traced = LanguageModel(model, tokenizer=tokenizer)

    def ours() -> torch.Tensor:
        return extract_states(
            model,
            tokenizer,
            texts,
            [top],
            chat_template=chat,
            batch_size=batch_size,
            progress=False,
            cache_dir=False,
        )[:, 0]

    def steering_vectors_way() -> torch.Tensor:
        out = []
        with torch.no_grad():
            for batch in batches:
                with record_activations(model, layer_type="decoder_block", layer_nums=[top]) as rec:
                    model(**batch)
                out.append(_pool_last(rec[top][0], batch["attention_mask"]))
        return torch.cat(out)

    def nnsight_way() -> torch.Tensor:
        out = []
        for batch in batches:
            with torch.no_grad(), traced.trace(dict(batch)):
                hidden = traced.model.layers[top].output.save()
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            out.append(_pool_last(hidden, batch["attention_mask"]))
        return torch.cat(out)

    # Parity first: the same vectors (ours come back in text order, the peers' in batch order).
    reference = ours()
    order = _batch_order(tokenizer, texts, chat)
    parity = {}
    for name, way in (("steering-vectors", steering_vectors_way), ("nnsight", nnsight_way)):
        theirs = torch.empty_like(reference)
        theirs[order] = way()
        parity[name] = float((theirs - reference).abs().max() / reference.abs().max())
    ways = {
        "lenssteer": _whole(ours),
        "steering-vectors": _whole(steering_vectors_way),
        "nnsight": _whole(nnsight_way),
    }
    times = alternate(ways, rounds)
    ours_s = median(times["lenssteer"])
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    rows = []
    for name in ("steering-vectors", "nnsight"):
        theirs_s = median(times[name])
        rows.append(
            Row(
                section=SECTION,
                name=f"pooled top-layer activations: lenssteer extract_states vs {name} (speed-up)",
                baseline=f"{len(texts) / theirs_s:.2f} texts/s",
                ours=f"{len(texts) / ours_s:.2f} texts/s",
                ratio=theirs_s / ours_s,
                target="report",
                met=None,
                note=f"{len(texts)} templated Bible verses ({tokens} real tokens), batch "
                f"{batch_size}, layer {top}, last real token; {rounds} alternating rounds after a "
                f"warm-up. Parity: largest |difference| / largest |value| = {parity[name]:.1e}",
                details={"times": times[name], "ours": times["lenssteer"], "parity": parity[name]},
            )
        )
    return rows


def _batch_order(tokenizer, texts, chat) -> torch.Tensor:
    """Index of each text in the peers' concatenated output (batches sorted shortest first)."""
    from lenssteer.extract import format_texts, tokenize

    prompts = format_texts(tokenizer, texts, chat)
    lengths = [len(ids) for ids in tokenize(tokenizer, prompts, chat)["input_ids"]]
    return torch.tensor(sorted(range(len(prompts)), key=lambda i: lengths[i]))


def language_shift_rows(
    model, tokenizer, generate_tokens: int = 16, rounds: int = 3, strength: float = 4.0
) -> list[Row]:
    """Rows: the same language vector applied by our hook and by SteeringVector.apply."""
    from steering_vectors import SteeringVector

    from lenssteer.evaluate import generate_greedy
    from lenssteer.extract import format_texts
    from lenssteer.language_shift import LanguageShift, language_means

    layer = len(find_decoder_layers(model)) // 2
    texts = {lang: texts_for([lang], 8) for lang in ("en", "de")}
    means = language_means(model, tokenizer, texts, [layer])
    direction = (means["de"] - means["en"])[0]
    shift = LanguageShift(layer, strength, {"de": direction})
    vector = SteeringVector({layer: direction}, "decoder_block")
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompt = format_texts(tokenizer, ["Erkläre in zwei Sätzen, warum der Himmel blau ist."], chat)[
        0
    ]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)

    with torch.no_grad():
        with shift.steer(model, "de"):
            ours_logits = model(**ids).logits
        with vector.apply(model, multiplier=strength):
            their_logits = model(**ids).logits
        base = model(**ids).logits
    parity = float((ours_logits - their_logits).abs().max())
    moved = float((ours_logits - base).abs().max())

    def generate(context):
        def run() -> None:
            with context():
                generate_greedy(model, tokenizer, [prompt], generate_tokens)

        return run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = alternate(
            {
                "lenssteer": generate(lambda: shift.steer(model, "de")),
                "steering-vectors": generate(lambda: vector.apply(model, multiplier=strength)),
            },
            rounds,
        )
    ours_s, theirs_s = median(times["lenssteer"]), median(times["steering-vectors"])
    return [
        Row(
            section=SECTION,
            name="language-shift vector at one layer: lenssteer hook vs steering-vectors "
            "SteeringVector.apply (generation tokens/s, ours / theirs)",
            baseline=f"{generate_tokens / theirs_s:.2f} tok/s",
            ours=f"{generate_tokens / ours_s:.2f} tok/s",
            ratio=theirs_s / ours_s,
            target="report",
            met=None,
            note=f"de - en mean difference at layer {layer} (8 verses each), strength {strength}, "
            f"greedy generation of {generate_tokens} tokens at batch 1; {rounds} alternating rounds. "
            f"Parity: steered logits differ by at most {parity:.1e} (the vector moves them by up "
            f"to {moved:.1f})",
            details={"times": times, "parity": parity, "moved": moved},
        )
    ]


def xtransplant_rows(model, tokenizer, items: int = 3, pairs_per_item: int = 2) -> list[Row]:
    """Rows: one XTransplant pair (ffn, MMLU en -> de) written with nnsight, against our pair from
    scratch (:func:`lenssteer.transplant.transplant_loglikelihoods`) and our per-pair cost in the
    fast grid (donor once, prefix once, the target-first grid's pairs batched)."""
    from nnsight import LanguageModel

    from lenssteer.mmlu import align_items, format_multiple_choice, load_task, sample_items
    from lenssteer.transplant import record_donor_activations, transplant_loglikelihoods
    from lenssteer.transplant_pairs import grid_pairs, transplant_grid

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = LanguageModel(model, tokenizer=tokenizer)
    n_layers = len(find_decoder_layers(model))
    pairs = grid_pairs("target-first", n_layers)
    donors, recipients = align_items(
        load_task("mmlu-translated", "en"), load_task("mmlu-translated", "de")
    )
    donors, recipients = sample_items(donors, items, 0), sample_items(recipients, items, 0)
    generator = torch.Generator().manual_seed(0)

    def nnsight_pair(donor: str, recipient: str, letters: list[int], s: int, t: int):
        """The pair as nnsight's documentation writes a patch: save, then assign."""
        donor_ids = tokenizer(donor, return_tensors="pt", add_special_tokens=False)
        recipient_ids = tokenizer(recipient, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            with traced.trace(dict(donor_ids)):
                activation = traced.model.layers[s].mlp.output[0, -1].save()
            with traced.trace(dict(recipient_ids)):
                traced.model.layers[t].mlp.output[0, -1] = activation
                logits = traced.lm_head.output[0, -1].save()
        return torch.log_softmax(logits.float(), dim=-1)[letters]

    times: dict[str, list[float]] = {"nnsight": [], "scratch": [], "grid": []}
    parity = 0.0
    warm = format_multiple_choice(tokenizer, recipients[0])  # one untimed pair each way first
    warm_letters = [
        tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in warm.continuations
    ]
    nnsight_pair(
        format_multiple_choice(tokenizer, donors[0]).text, warm.text, warm_letters, *pairs[0]
    )
    transplant_loglikelihoods(
        model, tokenizer, [warm.text], [warm.text], [warm.continuations], *pairs[0]
    )
    for i in range(len(recipients)):
        donor = format_multiple_choice(tokenizer, donors[i]).text
        formatted = format_multiple_choice(tokenizer, recipients[i])
        letters = [
            tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in formatted.continuations
        ]
        chosen = torch.randperm(len(pairs), generator=generator)[:pairs_per_item].tolist()
        for k in chosen:
            s, t = pairs[k]
            started = time.perf_counter()
            theirs = nnsight_pair(donor, formatted.text, letters, s, t)
            times["nnsight"].append(time.perf_counter() - started)
            started = time.perf_counter()
            ours = transplant_loglikelihoods(
                model, tokenizer, [donor], [formatted.text], [formatted.continuations], s, t
            )[0, : len(letters)]
            times["scratch"].append(time.perf_counter() - started)
            parity = max(parity, float((ours - theirs).abs().max()))
        started = time.perf_counter()
        activations = record_donor_activations(model, tokenizer, [donor], granularities=["ffn"])
        transplant_grid(
            model,
            tokenizer,
            [formatted.text],
            [formatted.continuations],
            activations,
            pairs,
            control=False,
        )
        times["grid"].append((time.perf_counter() - started) / len(pairs))
    nnsight_s = median(times["nnsight"])
    rows = []
    for name, label in (("scratch", "from scratch"), ("grid", "in the fast grid")):
        ours_s = median(times[name])
        rows.append(
            Row(
                section=SECTION,
                name=f"XTransplant pair (ffn): lenssteer {label} vs nnsight (speed-up)",
                baseline=f"{nnsight_s:.3f} s/pair",
                ours=f"{ours_s:.4f} s/pair",
                ratio=nnsight_s / ours_s,
                target="report",
                met=None,
                note=f"mmlu-translated en -> de, {len(recipients)} items x {pairs_per_item} random "
                f"pairs of the target-first grid ({len(pairs)} pairs; the grid figure amortises "
                "the donor and prefix passes over it), nnsight and ours alternating pair by pair. "
                f"Parity: option log-likelihoods differ by at most {parity:.1e}",
                details={"times": times, "parity": parity},
            )
        )
    return rows


def peer_rows(model, tokenizer, rounds: int = 3) -> list[Row]:
    return (
        pooled_activation_rows(model, tokenizer, rounds=rounds)
        + language_shift_rows(model, tokenizer, rounds=rounds)
        + xtransplant_rows(model, tokenizer, items=rounds)
    )


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from lenssteer.models import load_model

    tokenizer, model = load_model(args.model)
    for row in peer_rows(model, tokenizer, args.rounds):
        print(f"| 9 | {row.name} | {row.baseline} | {row.ours} | {row.ratio:.2f} | report | - |")
        print(f"- **{row.section}, {row.name}**: {row.note}")


if __name__ == "__main__":
    _main()
