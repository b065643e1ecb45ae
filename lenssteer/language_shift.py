"""The training-free language vector: add the difference of language means at one layer.

For a target language ``x`` and the central language ``c`` (English), the *language shift* at
decoder layer ``l`` is

    d_x = mean_l(texts in x) - mean_l(texts in c)          (mean over tokens and texts)

and steering adds ``strength * d_x`` to the output of layer ``l`` at every position while the model
reads an input in ``x``. It is the simplest language-steering baseline, and among the strongest
simple ones in language-forcing comparisons: it needs parallel text only for the means, no
subspace and no training. Unlike :mod:`lenssteer.baselines`' ``language-shift`` (the direction
*inside* a fitted specific subspace), this is the whole mean difference.

Layer and strength are chosen on *dev* items, never on scored ones: the means come from one set of
public-domain verses, the choice from another (disjoint from each other and from every verse a
comparison scores, :func:`lenssteer.sampling.check_disjoint`). Two criteria, averaged over the
target languages:

* ``"likelihood"``: the per-byte log-likelihood of target-language verses (after the verse before
  them) under the shift: the setting that makes the model's predictions most like language ``x``
  without breaking them;
* ``"fidelity"``: the share of greedy answers in the prompt's language to dev prompts (a request to
  explain a dev verse), among the settings whose dev likelihood is at most ``max_likelihood_drop``
  nats per byte below the unshifted model's: what the vector is for (answers in the right
  language) without a visible cost to the language's text.

Strength 0 (the model as it is) is always a candidate, so a shift that only hurts is not chosen.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lenssteer.baselines import language_shift
from lenssteer.hooks import hooked
from lenssteer.models import find_decoder_layers

CRITERIA = ("likelihood", "fidelity")

__all__ = [
    "CRITERIA",
    "LanguageShift",
    "answer_fidelity",
    "choose_layer_and_strength",
    "default_candidate_layers",
    "language_means",
]


@dataclass
class LanguageShift:
    """A chosen layer, strength and per-language directions ``{language: (hidden,)}``."""

    layer: int
    strength: float
    directions: dict[str, torch.Tensor]
    central_language: str = "en"
    selection: dict[str, Any] = field(default_factory=dict)

    def languages(self) -> list[str]:
        return [self.central_language, *self.directions]

    @contextmanager
    def steer(self, model: nn.Module, language: str) -> Iterator[nn.Module]:
        """Add ``strength * d_language`` at the layer's output inside a ``with`` block."""
        if language == self.central_language or self.strength == 0:
            yield model
            return
        if language not in self.directions:
            raise ValueError(
                f"language-shift has no direction for {language!r}; it has "
                f"{', '.join(self.directions)}"
            )
        direction, strength = self.directions[language], self.strength
        layer_module = find_decoder_layers(model)[self.layer]
        with hooked([(layer_module, lambda _m, h: language_shift(h, direction, strength))]):
            yield model

    def describe(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "strength": self.strength,
            "direction_norms": {k: round(float(v.norm()), 4) for k, v in self.directions.items()},
            "selection": self.selection,
        }


def default_candidate_layers(n_layers: int) -> list[int]:
    """A quarter, half and three quarters of the way up (distinct, in range)."""
    return sorted({max(0, min(n_layers - 1, round(n_layers * f))) for f in (0.25, 0.5, 0.75)})


def language_means(
    model: nn.Module,
    tokenizer,
    texts: Mapping[str, Sequence[str]],
    layers: Sequence[int],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``{language: (len(layers), hidden)}``: token-mean layer outputs averaged over the texts."""
    from lenssteer.extract import extract_states

    means = {}
    for language, rows in texts.items():
        states = extract_states(
            model,
            tokenizer,
            list(rows),
            list(layers),
            pooling="mean",
            chat_template=False,
            batch_size=batch_size,
            cache_dir=False,
            progress=progress,
            description=f"language-shift means {language}",
            share_prefix=False,
        )
        means[language] = states.double().mean(dim=0).float()
    return means


def choose_layer_and_strength(
    model: nn.Module,
    tokenizer,
    means: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    strengths: Sequence[float],
    dev_items: Mapping[str, Sequence[Any]],
    central_language: str,
    batch_size: int = 8,
    padding_side: str = "left",
    progress: bool = False,
    criterion: str = "likelihood",
    dev_prompts: Mapping[str, Sequence[str]] | None = None,
    max_new_tokens: int = 24,
    max_likelihood_drop: float = 0.05,
    generation_batch_size: int | None = None,
) -> LanguageShift:
    """The (layer, strength) by ``criterion`` (module docstring) on the dev items; strength 0 is
    always tried.

    ``dev_items``: ``{language: MultipleChoiceItem with question = previous verse, choices =
    [verse]}`` (the likelihood of every candidate). ``dev_prompts``: ``{language: [user message]}``
    for ``criterion="fidelity"`` (answered greedily, ``max_new_tokens`` each, with the chat template
    when the tokenizer has one), ``generation_batch_size`` at a time (default ``batch_size``: the
    decoding steps cost nearly the same for 24 rows as for 8 on a CPU). Ties: the higher
    likelihood, the smaller strength, the lower layer.
    """
    from lenssteer.evaluate import ScoringRequest, loglikelihoods

    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    targets = [lang for lang in dev_items if lang != central_language]
    if not targets:
        raise ValueError(
            "language-shift needs at least one target language besides the central one"
        )
    if criterion == "fidelity" and not (dev_prompts and all(dev_prompts.get(t) for t in targets)):
        raise ValueError("criterion 'fidelity' needs dev prompts in every target language")
    directions_at = {
        layer: {lang: means[lang][k] - means[central_language][k] for lang in targets}
        for k, layer in enumerate(layers)
    }

    def score(layer: int, strength: float) -> float:
        shift = LanguageShift(layer, strength, directions_at[layer], central_language)
        per_language = []
        for language in targets:
            requests = [
                ScoringRequest(item.question, f" {item.choices[0]}", True)
                for item in dev_items[language]
            ]
            with shift.steer(model, language):
                scored = loglikelihoods(
                    model,
                    tokenizer,
                    requests,
                    batch_size,
                    padding_side,
                    False,  # type: ignore[arg-type]
                )
            per_byte = [
                s / max(1, len(r.continuation.strip().encode("utf-8")))
                for (s, _), r in zip(scored, requests, strict=True)
            ]
            per_language.append(sum(per_byte) / len(per_byte))
        return sum(per_language) / len(per_language)

    def fidelity(layer: int, strength: float) -> float:
        shift = LanguageShift(layer, strength, directions_at[layer], central_language)
        return sum(
            answer_fidelity(
                model,
                tokenizer,
                shift,
                lang,
                dev_prompts[lang],
                max_new_tokens,
                generation_batch_size or batch_size,
            )
            for lang in targets
        ) / len(targets)

    candidates = [(layers[0], 0.0)] + [
        (layer, float(strength)) for layer in layers for strength in strengths if strength != 0
    ]
    from tqdm.auto import tqdm

    table = []
    for layer, strength in tqdm(
        candidates, desc="language-shift: choosing on dev", unit="setting", disable=not progress
    ):
        row = {"layer": layer, "strength": strength, "dev_loglik_per_byte": score(layer, strength)}
        if criterion == "fidelity":
            row["dev_fidelity"] = fidelity(layer, strength)
        table.append(row)
    if criterion == "likelihood":
        best = max(table, key=lambda r: (r["dev_loglik_per_byte"], -r["strength"], -r["layer"]))
        described = "mean dev log-likelihood per byte, target languages"
    else:
        floor = table[0]["dev_loglik_per_byte"] - max_likelihood_drop
        allowed = [r for r in table if r["dev_loglik_per_byte"] >= floor]  # strength 0 always is
        best = max(
            allowed,
            key=lambda r: (
                r["dev_fidelity"],
                r["dev_loglik_per_byte"],
                -r["strength"],
                -r["layer"],
            ),
        )
        described = (
            "mean dev fidelity (greedy answers in the prompt's language), target languages, among "
            f"settings within {max_likelihood_drop} nats/byte of the unshifted dev log-likelihood"
        )
    return LanguageShift(
        best["layer"],
        best["strength"],
        directions_at[best["layer"]],
        central_language,
        selection={"criterion": described, "grid": table},
    )


def answer_fidelity(
    model: nn.Module,
    tokenizer,
    shift: LanguageShift,
    language: str,
    messages: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 8,
) -> float:
    """Share of greedy answers to ``messages`` (user turns in ``language``) that are in ``language``
    under ``shift``, judged as the comparison's fidelity tasks judge them (passages copied from the
    prompt removed, then language ID)."""
    from lenssteer.evaluate import detect_language, generate_greedy, strip_copied
    from lenssteer.extract import format_texts, has_chat_template

    template = has_chat_template(tokenizer)
    texts = format_texts(tokenizer, list(messages), template)
    with shift.steer(model, language):
        answers = generate_greedy(
            model, tokenizer, texts, max_new_tokens, batch_size, add_special_tokens=not template
        )
    found = [
        detect_language(strip_copied(answer, message)) == language
        for answer, message in zip(answers, messages, strict=True)
    ]
    return sum(found) / len(found)
