"""Lens training: the fast path equals a full forward, the loop's mechanics, and bad input.

Tiny random models test mechanics; the real SmolLM2 checks behaviour (``slow``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from lenssteer.data import ParallelCorpus
from lenssteer.extract import extract_corpus, extract_states, template_signature
from lenssteer.heldout import format_report, representation_report
from lenssteer.models import model_identity, num_decoder_layers
from lenssteer.subspace import compute_subspace
from lenssteer.train import (
    LensTrainingModule,
    TrainConfig,
    TrainingError,
    full_forward_states,
    hold_items,
    resolve_training_layers,
    top_layer_states,
    train_lens,
    training_data,
    trainable_top_layers,
)
from lenssteer.training_data import prepare_training_data

EN = [
    "the cat sleeps",
    "the dog runs fast",
    "I like green tea",
    "it rains today",
    "we read a book",
    "the sun is hot",
    "my house is small",
    "she sings well",
]
FR = [
    "le chat dort",
    "le chien court vite",
    "j'aime le thé vert",
    "il pleut aujourd'hui",
    "nous lisons un livre",
    "le soleil est chaud",
    "ma maison est petite",
    "elle chante bien",
]
DE = [
    "die Katze schläft",
    "der Hund läuft schnell",
    "ich mag grünen Tee",
    "es regnet heute",
    "wir lesen ein Buch",
    "die Sonne ist heiß",
    "mein Haus ist klein",
    "sie singt gut",
]


def tiny_corpus(n_items: int = 8, languages=("en", "fr", "de")) -> ParallelCorpus:
    texts = {"en": EN, "fr": FR, "de": DE}
    return ParallelCorpus({lang: texts[lang][:n_items] for lang in languages}, "en")


def make_subspace(model, tokenizer, corpus, layers, chat_template=True, pooling="last"):
    """A subspace made the way ``lenssteer.probe.probe`` makes one (extraction + decomposition)."""
    states = extract_corpus(
        model,
        tokenizer,
        corpus,
        layers,
        pooling=pooling,
        chat_template=chat_template,
        progress=False,
        cache_dir=False,
    )
    identity = model_identity(model)
    return compute_subspace(
        states,
        layers,
        corpus.central_language,
        diagnostics=False,
        metadata={
            **identity,
            "num_layers": num_decoder_layers(model),
            "pooling": pooling,
            "template": template_signature(tokenizer, chat_template),
            "data_hash": corpus.data_hash(),
        },
    )


def quick_config(**overrides) -> TrainConfig:
    settings = dict(batch_size=4, num_epochs=1.0, learning_rate=1e-2, logging_steps=1, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def qwen(tokenizer):
    return make_tiny_model("qwen2", vocab_size=len(tokenizer))


@pytest.fixture
def setup(qwen, tokenizer):
    corpus = tiny_corpus()
    return qwen, corpus, make_subspace(qwen, tokenizer, corpus, [2, 3])


# --------------------------------------------------------------------------------------------------
# The representation and the fast path


def assert_fast_equals_plain(module, batch, params) -> None:
    """The fast path's losses and gradients equal the plain full forward's."""
    results = {}
    for fast in (True, False):
        module.fast = fast
        module.zero_grad()
        for p in params.values():
            p.grad = None
        out = module(**batch)
        out["loss"].backward()
        results[fast] = (
            {k: v.detach() for k, v in out.items()},
            {n: p.grad.clone() for n, p in params.items()},
        )
    (fast_losses, fast_grads), (plain_losses, plain_grads) = results[True], results[False]
    expected = {"loss", "pull", "push", "retain"}
    if module.objective.retain_targets_weight:
        expected.add("retain_targets")
    assert set(fast_losses) == expected
    for key in fast_losses:
        torch.testing.assert_close(fast_losses[key], plain_losses[key], rtol=1e-4, atol=1e-9)
    assert set(fast_grads) == set(plain_grads) and fast_grads
    for name in fast_grads:
        assert fast_grads[name].abs().sum() > 0, name
        scale = plain_grads[name].abs().max().item()
        torch.testing.assert_close(
            fast_grads[name], plain_grads[name], rtol=1e-3, atol=1e-4 * scale
        )


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_frozen_states_equal_what_probing_extracts(qwen, tokenizer, share_prefix, pooling):
    """Lens fault: probing and training read different positions/templates. Here they are one."""
    corpus = tiny_corpus(5)
    data = prepare_training_data(
        qwen,
        tokenizer,
        corpus,
        2,
        [2, 3],
        pooling,
        True,
        share_prefix,
        batch_size=3,
        progress=False,
    )
    if share_prefix:
        assert len(data.prefix_ids) > 5  # the chat template's system turn is shared
    for k, language in enumerate(corpus.languages):
        expected = extract_states(
            qwen,
            tokenizer,
            corpus.texts[language],
            [2, 3],
            pooling=pooling,
            chat_template=True,
            cache_dir=False,
            progress=False,
        )
        torch.testing.assert_close(data.frozen[:, k], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_fast_path_equals_full_forward(arch, pooling, tokenizer):
    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    data = prepare_training_data(
        model, tokenizer, tiny_corpus(4), 2, [2, 3], pooling, True, batch_size=5, progress=False
    )
    batch = data.collate([0, 1, 2, 3], layer_inputs=True, input_ids=True)
    split = data.collate([0, 1, 2, 3], layer_inputs=True, split_prefix=True)
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    assert split["prefix_inputs"].shape[0] == len(data.prefix_ids) > 5
    with torch.no_grad():
        plain = full_forward_states(
            model, batch["input_ids"], batch["attention_mask"], [2, 3], pooling
        )
        fast = top_layer_states(
            model, batch["layer_inputs"], batch["attention_mask"], 2, [2, 3], pooling
        )
        shared = top_layer_states(  # the shared prefix runs once, through a KV cache
            model,
            split["layer_inputs"],
            split["suffix_mask"],
            2,
            [2, 3],
            pooling,
            prefix_inputs=split["prefix_inputs"],
        )
    for states in (fast, shared):
        torch.testing.assert_close(states, plain, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            states.reshape(data.frozen.shape), data.frozen, atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("kind", ["lora", "layers"])
def test_fast_and_plain_losses_and_gradients_match(arch, kind, tokenizer):
    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    corpus = tiny_corpus(6)
    subspace = make_subspace(model, tokenizer, corpus, [2, 3])
    data = prepare_training_data(
        model, tokenizer, corpus, 2, [2, 3], "last", True, batch_size=4, progress=False
    )
    batch = data.collate([0, 2, 3, 5], layer_inputs=True, input_ids=True, split_prefix=True)
    assert "prefix_inputs" in batch  # the fast path runs the shared prefix once
    config = quick_config(kind=kind)
    directions = subspace.directions.transpose(0, 1)
    with trainable_top_layers(model, [2, 3], config) as trainable:
        params = trainable.parameters()
        torch.manual_seed(1)
        with torch.no_grad():  # move away from the LoRA init (B = 0) so every gradient is non-zero
            for p in params.values():
                p.add_(0.05 * torch.randn_like(p))
        module = LensTrainingModule(
            model,
            subspace.specific_basis,
            directions,
            0,
            2,
            [2, 3],
            "last",
            config.objective(),
            agnostic=subspace.agnostic,
        )
        assert_fast_equals_plain(module, batch, params)


def test_only_the_top_layers_get_gradients(setup, tokenizer):
    model, corpus, subspace = setup
    for kind in ("lora", "layers"):
        with trainable_top_layers(model, [2, 3], quick_config(kind=kind)) as trainable:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            assert names
            assert {id(p) for p in trainable.parameters().values()} == {
                id(p) for p in model.parameters() if p.requires_grad
            }
            assert all(".layers.2." in n or ".layers.3." in n for n in names)
        assert not any("lora" in n for n, _ in model.named_parameters())


def test_architecture_the_fast_path_cannot_run_is_refused(tokenizer, tmp_path):
    """GPT-2 adds position embeddings outside its blocks: the start-up check catches it."""
    model = make_tiny_model("gpt2", vocab_size=len(tokenizer))
    corpus = tiny_corpus(4)
    subspace = make_subspace(model, tokenizer, corpus, [2, 3])
    with pytest.raises(TrainingError, match="fast=False"):
        train_lens(
            model,
            tokenizer,
            subspace,
            corpus,
            tmp_path / "a",
            quick_config(kind="layers"),
            progress=False,
        )


def test_plain_path_trains_where_the_fast_path_cannot(tokenizer, tmp_path):
    model = make_tiny_model("gpt2", vocab_size=len(tokenizer))
    corpus = tiny_corpus(4)
    subspace = make_subspace(model, tokenizer, corpus, [2, 3])
    adapter = train_lens(
        model,
        tokenizer,
        subspace,
        corpus,
        tmp_path / "a",
        quick_config(kind="layers", fast=False),
        progress=False,
    )
    assert adapter.config.metrics["train"]["global_step"] == 1


# --------------------------------------------------------------------------------------------------
# The loop


def test_training_lowers_the_loss_and_restores_the_model(setup, tokenizer, tmp_path):
    model, corpus, subspace = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kind in ("lora", "layers"):
        adapter = train_lens(
            model,
            tokenizer,
            subspace,
            corpus,
            tmp_path / kind,
            quick_config(
                kind=kind,
                batch_size=8,
                num_epochs=12.0,
                learning_rate=1e-3,
                alpha=3.0,
                retain_targets_weight=0.1,
            ),
            progress=False,
        )
        history = [e for e in adapter.log_history if "loss" in e]
        assert {"loss_pull", "loss_push", "loss_retain", "loss_retain_targets"} <= set(history[0])
        assert history[-1]["loss"] < 0.9 * history[0]["loss"], (kind, history)
        after = model.state_dict()
        assert set(after) == set(before)
        for key, value in before.items():
            assert torch.equal(after[key], value), key
        assert not model.training


def test_last_partial_batch_is_not_dropped(setup, tokenizer, tmp_path):
    """Lens fault: the last partial batch was dropped. 5 items in batches of 2 -> 3 steps."""
    model, _, _ = setup
    corpus = tiny_corpus(5)
    subspace = make_subspace(model, tokenizer, corpus, [2, 3])
    adapter = train_lens(
        model,
        tokenizer,
        subspace,
        corpus,
        tmp_path / "a",
        quick_config(batch_size=2),
        progress=False,
    )
    train = adapter.config.metrics["train"]
    assert train["global_step"] == 3
    assert train["items_seen"] == train["n_items"] == 5
    # the items it was trained on are recorded, so that compare never scores them
    from lenssteer.adapter import SteeringAdapter

    assert SteeringAdapter.from_pretrained(tmp_path / "a").config.training_items == corpus.ids


@pytest.mark.parametrize("off", ["pull", "push", "retain"])
def test_any_loss_weight_may_be_zero(setup, tokenizer, tmp_path, off):
    model, corpus, subspace = setup
    adapter = train_lens(
        model,
        tokenizer,
        subspace,
        corpus,
        tmp_path / "a",
        quick_config(**{f"{off}_weight": 0.0}),
        progress=False,
    )
    logged = [e for e in adapter.log_history if "loss" in e]
    assert logged and all(f"loss_{off}" not in e for e in logged)
    assert all(torch.isfinite(w).all() for w in adapter.weights.values())


def test_same_seed_same_adapter(setup, tokenizer, tmp_path):
    model, corpus, subspace = setup
    runs = [
        train_lens(
            model, tokenizer, subspace, corpus, tmp_path / f"r{i}", quick_config(), progress=False
        )
        for i in range(2)
    ]
    other = train_lens(
        model, tokenizer, subspace, corpus, tmp_path / "s", quick_config(seed=1), progress=False
    )
    for name, tensor in runs[0].weights.items():
        assert torch.equal(tensor, runs[1].weights[name])
    assert any(not torch.equal(t, other.weights[n]) for n, t in runs[0].weights.items())


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int):
    from transformers import TrainerCallback

    class Interrupter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Interrupt(f"stopped at step {step}")

    return Interrupter()


def test_interrupted_training_keeps_the_earlier_adapter_and_resumes(setup, tokenizer, tmp_path):
    model, corpus, subspace = setup
    out = tmp_path / "adapter"
    config = quick_config(batch_size=2, num_epochs=2.0, save_steps=2)
    train_lens(model, tokenizer, subspace, corpus, out, quick_config(seed=5), progress=False)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(_Interrupt):
        train_lens(
            model,
            tokenizer,
            subspace,
            corpus,
            out,
            config,
            progress=False,
            callbacks=[_interrupt_at(5)],
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]  # no debris
    checkpoints = sorted((tmp_path / "adapter.checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert not list((tmp_path / "adapter.checkpoints").rglob("*.bin"))  # no pickled weights

    resumed = train_lens(
        model, tokenizer, subspace, corpus, out, config, resume=True, progress=False
    )
    assert resumed.config.metrics["train"]["global_step"] == 8
    straight = train_lens(
        model, tokenizer, subspace, corpus, tmp_path / "straight", config, progress=False
    )
    for name, tensor in straight.weights.items():
        torch.testing.assert_close(resumed.weights[name], tensor, atol=1e-6, rtol=1e-5)
    assert not (tmp_path / "adapter.checkpoints").exists()  # cleaned up after success


def test_resume_refuses_checkpoints_of_another_run(setup, tokenizer, tmp_path):
    model, corpus, subspace = setup
    out = tmp_path / "adapter"
    with pytest.raises(_Interrupt):
        train_lens(
            model,
            tokenizer,
            subspace,
            corpus,
            out,
            quick_config(batch_size=2, save_steps=1),
            progress=False,
            callbacks=[_interrupt_at(2)],
        )
    with pytest.raises(TrainingError, match="different run"):
        train_lens(
            model,
            tokenizer,
            subspace,
            corpus,
            out,
            quick_config(batch_size=2, save_steps=1, learning_rate=1e-3),
            resume=True,
            progress=False,
        )


# --------------------------------------------------------------------------------------------------
# Bad input


def test_subspace_made_for_another_model(setup, tokenizer, tmp_path):
    model, corpus, subspace = setup
    other = make_tiny_model("qwen2", vocab_size=len(tokenizer), seed=1)
    with pytest.raises(TrainingError, match="made for model"):
        train_lens(
            other, tokenizer, subspace, corpus, tmp_path / "a", quick_config(), progress=False
        )
    wider_subspace = copy.copy(subspace)
    wider_subspace.means = torch.zeros(2, 3, 48)
    with pytest.raises(TrainingError, match="hidden size"):
        train_lens(
            model, tokenizer, wider_subspace, corpus, tmp_path / "a", quick_config(), progress=False
        )


def test_languages_missing_from_the_subspace(setup, tokenizer, tmp_path):
    model, corpus, _ = setup
    subspace = make_subspace(model, tokenizer, tiny_corpus(8, ("en", "fr")), [2, 3])
    with pytest.raises(TrainingError, match="de are not in the subspace"):
        train_lens(
            model, tokenizer, subspace, corpus, tmp_path / "a", quick_config(), progress=False
        )


def test_more_trained_layers_than_the_model_has(setup, tokenizer, tmp_path):
    model, corpus, subspace = setup
    with pytest.raises(TrainingError, match="the model has 4 decoder layers"):
        train_lens(
            model,
            tokenizer,
            subspace,
            corpus,
            tmp_path / "a",
            quick_config(n_layers=5),
            progress=False,
        )


def test_subspace_must_cover_the_top_trained_layer(setup, tokenizer):
    model, corpus, _ = setup
    low = make_subspace(model, tokenizer, corpus, [1, 2])
    with pytest.raises(TrainingError, match="none of the trained layers"):
        resolve_training_layers(model, 1, low.layers)
    with pytest.raises(TrainingError, match="no gradient"):
        resolve_training_layers(model, 2, low.layers)


def test_subspace_probed_with_another_template(setup, tokenizer, tmp_path):
    model, corpus, subspace = setup
    other = copy.copy(subspace)
    other.metadata = {**subspace.metadata, "template": "chat:000000000000"}
    with pytest.raises(TrainingError, match="chat template"):
        train_lens(model, tokenizer, other, corpus, tmp_path / "a", quick_config(), progress=False)


def test_push_strength_per_language(setup, tokenizer, tmp_path):
    """language_alpha sets each target's push target: in scale-free units push starts at alpha²."""
    from lenssteer.adapter import SteeringAdapter

    model, corpus, subspace = setup  # en (central), fr, de
    first_push = {}
    for name, language_alpha in (("one", None), ("per-language", {"de": 0.0})):
        config = quick_config(
            alpha=3.0, language_alpha=language_alpha, normalization="scale_free", max_steps=1
        )
        adapter = train_lens(
            model, tokenizer, subspace, corpus, tmp_path / name, config, progress=False
        )
        history = [e for e in adapter.log_history if "loss" in e]
        first_push[name] = history[0]["loss_push"]
    # before the first update every state is the frozen one: push = mean over targets of alpha_t²
    assert first_push["one"] == pytest.approx(9.0, rel=1e-4)
    assert first_push["per-language"] == pytest.approx((9.0 + 0.0) / 2, rel=1e-4)
    loaded = SteeringAdapter.from_pretrained(tmp_path / "per-language")
    assert loaded.config.hyperparameters["language_alpha"] == {"de": 0.0}
    for bad, message in (
        ({"en": 0.1}, "central language 'en'"),
        ({"it": 0.1}, "'it', which is not a training language"),
    ):
        with pytest.raises(TrainingError, match=message):
            train_lens(
                model,
                tokenizer,
                subspace,
                corpus,
                tmp_path / "bad",
                quick_config(language_alpha=bad),
                progress=False,
            )
    with pytest.raises(TrainingError, match="language_alpha\\['de'\\] must be a finite number"):
        TrainConfig(language_alpha={"de": "a lot"})
    with pytest.raises(TrainingError, match="must map language codes"):
        TrainConfig(language_alpha=0.1)


def test_hold_corpus_leaves_its_prompts_in_place(setup, tokenizer, tmp_path):
    """Held prompts (lettered MMLU questions) stay put; the training prompts are still pushed."""
    from lenssteer.data import load_corpus
    from lenssteer.heldout import heldout_report

    model, corpus, subspace = setup  # en (central), fr, de
    held = load_corpus("mmlu-letter", list(corpus.languages))
    push = {}
    for weight in (0.0, 20.0):
        config = quick_config(
            hold_corpus="mmlu-letter",
            hold_weight=weight,
            alpha=3.0,
            num_epochs=6.0,
            normalization="scale_free",
        )
        adapter = train_lens(
            model, tokenizer, subspace, corpus, tmp_path / str(weight), config, progress=False
        )
        assert adapter.config.metrics["train"]["n_hold_items"] == len(held) == 57
        assert set(held.ids) <= set(adapter.config.training_items)  # never scored by compare
        push[weight] = {
            name: heldout_report(model, tokenizer, adapter, subspace, part, progress=False)[
                "summary"
            ]
            for name, part in (("held", held), ("trained", corpus))
        }
    # weight 0: the held prompts move with the rest (one adapter for every prompt)
    assert push[0.0]["held"]["push_ratio"] > 0.5
    assert abs(push[20.0]["held"]["push_ratio"]) < 0.1 * push[0.0]["held"]["push_ratio"]
    assert push[20.0]["held"]["retain_mse_rel"] < 0.1 * push[0.0]["held"]["retain_mse_rel"]
    assert push[20.0]["trained"]["push_ratio"] > 0.5  # the training prompts are still pushed


def test_hold_term_by_its_definition(setup, tokenizer, tmp_path):
    """The Lens terms read the training items only; hold = retain's distance over every language of
    the held items; precomputed data without the held items are refused."""
    from lenssteer.objectives import lens_losses, retain_loss

    model, corpus, subspace = setup
    config = quick_config(hold_corpus="mmlu-letter", hold_weight=3.0)
    data = training_data(model, tokenizer, subspace, corpus, config, progress=False)
    assert len(data) == len(corpus) + 57 and data.hold.sum() == 57 and not data.hold[:8].any()
    batch = data.collate([1, 5, 20, 40], layer_inputs=True, split_prefix=True)
    assert batch["hold"].tolist() == [False, False, True, True]
    with trainable_top_layers(model, [2, 3], config) as trainable:
        torch.manual_seed(2)
        with torch.no_grad():
            for p in trainable.parameters().values():
                p.add_(0.05 * torch.randn_like(p))
        module = LensTrainingModule(
            model,
            subspace.specific_basis,
            subspace.directions.transpose(0, 1),
            0,
            2,
            [2, 3],
            "last",
            config.objective(),
            agnostic=subspace.agnostic,
            hold_weight=3.0,
        )
        out = module(**batch)
        inputs = {k: v for k, v in batch.items() if k not in ("frozen", "item_index", "hold")}
        states = module.pooled_states(
            inputs["attention_mask"],
            inputs["layer_inputs"],
            None,
            inputs.get("prefix_inputs"),
            inputs.get("suffix_mask"),
        ).reshape(batch["frozen"].shape)
    frozen = batch["frozen"]
    lens = lens_losses(
        states[:2],
        frozen[:2],
        module.basis,
        module.directions,
        0,
        config.objective(),
        module.agnostic_direction,
    )
    hold = retain_loss(states[2:], frozen[2:])
    for name in ("pull", "push", "retain"):
        torch.testing.assert_close(out[name], lens[name])
    torch.testing.assert_close(out["hold"], hold)
    torch.testing.assert_close(out["loss"], lens["loss"] + 3.0 * hold)
    assert hold > 0
    few = quick_config(hold_corpus="mmlu-letter", hold_limit=5)
    assert training_data(model, tokenizer, subspace, corpus, few, progress=False).hold.sum() == 5
    with pytest.raises(TrainingError, match="hold_limit must be a positive integer"):
        quick_config(hold_limit=0)
    with pytest.raises(TrainingError, match="hold_corpus 'no-such-corpus'"):
        hold_items(corpus, quick_config(hold_corpus="no-such-corpus"))
    without = training_data(model, tokenizer, subspace, corpus, quick_config(), progress=False)
    with pytest.raises(TrainingError, match="57"):
        train_lens(
            model, tokenizer, subspace, corpus, tmp_path / "a", config, data=without, progress=False
        )


def test_bad_settings_are_errors():
    with pytest.raises(TrainingError, match="kind"):
        TrainConfig(kind="full")
    with pytest.raises(TrainingError, match="nothing to train"):
        TrainConfig(pull_weight=0, push_weight=0, retain_weight=0)


# --------------------------------------------------------------------------------------------------
# The held-out report


def test_representation_report_by_hand():
    """One layer, 2-d states, specific subspace = x axis; central en, target fr; alpha 2."""
    from lenssteer.subspace import Subspace

    subspace = Subspace(
        means=torch.tensor([[[0.0, 1.0], [2.0, 1.0]]]),
        agnostic=torch.tensor([[0.0, 1.0]]),
        specific_basis=torch.tensor([[[1.0, 0.0]]]),
        directions=torch.tensor([[[0.0, 0.0], [2.0, 0.0]]]),
        layers=[7],
        languages=["en", "fr"],
        central_language="en",
    )
    # items x languages x layers x hidden; centre of retrieval = mean of means = (1, 1)
    before = torch.tensor([[[[1.0, 3.0]], [[3.0, 5.0]]], [[[1.0, -1.0]], [[3.0, 1.0]]]])
    after = before.clone()
    after[:, 1, 0, 1] -= 1.0  # the agnostic gap halves: 2 -> 1 on both items
    after[:, 1, 0, 0] += 2.0  # specific moves by exactly one direction: ratio 1
    after[:, 0, 0, 1] += 0.5  # central moves a little
    report = representation_report(before, after, subspace, ["en", "fr"], [7], alpha=2.0)
    fr = report["layers"][7]["languages"]["fr"]
    # in 2-d the agnostic direction (y) is the whole complement of the specific subspace (x)
    for gap in ("along_agnostic", "outside_specific"):
        assert fr[f"gap_{gap}_before"] == pytest.approx(2.0)
        assert fr[f"gap_{gap}_after"] == pytest.approx(0.5)  # 2 - 1 - 0.5 (central moved up)
        assert fr[f"shrink_{gap}"] == pytest.approx(0.75)
    assert fr["push_ratio"] == pytest.approx(1.0)
    # central states (1,3),(1,-1): variance 4 per item; displacement 0.25 -> 0.0625
    assert report["summary"]["retain_mse_rel"] == pytest.approx(0.0625)
    assert report["summary"]["shrink_along_agnostic"] == pytest.approx(0.75)
    assert fr["retrieval_before"] == pytest.approx(1.0)
    assert fr["alpha"] == 2.0 and "(alpha 2)" in format_report(report)
    # a push strength of its own: the ratio is set against it, in the table too
    own = representation_report(before, after, subspace, ["en", "fr"], [7], 2.0, {"fr": 0.5})
    assert own["layers"][7]["languages"]["fr"]["alpha"] == 0.5
    assert "| 1.00 (alpha 0.5) |" in format_report(own)


# --------------------------------------------------------------------------------------------------
# Several processes (gloo) and the real model


TWO_PROCESS_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from transformers import AutoTokenizer
from conftest import make_tiny_model
from test_train import tiny_corpus, make_subspace, quick_config
from lenssteer.models import bundled_model_folder
from lenssteer.train import train_lens
tok = AutoTokenizer.from_pretrained(bundled_model_folder("smollm2-135m-instruct"))
model = make_tiny_model("qwen2", vocab_size=len(tok))
corpus = tiny_corpus(8)
subspace = make_subspace(model, tok, corpus, [2, 3])
batch = int(sys.argv[1])
adapter = train_lens(model, tok, subspace, corpus, sys.argv[2],
                     quick_config(batch_size=batch, num_epochs=2.0, learning_rate=1e-2),
                     progress=False)
if int(os.environ.get("RANK", "0")) == 0:
    losses = [e["loss"] for e in adapter.log_history if "loss" in e]
    with open(sys.argv[3], "w") as f:
        json.dump({{"losses": losses, "processes": adapter.config.metrics["train"]["processes"]}}, f)
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU) with batch 2 each = one process with batch 4."""
    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    one = subprocess.run(
        [sys.executable, str(script), "4", str(tmp_path / "a1"), str(tmp_path / "one.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
            "2",
            str(tmp_path / "a2"),
            str(tmp_path / "two.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single = json.loads((tmp_path / "one.json").read_text())
    double = json.loads((tmp_path / "two.json").read_text())
    assert single["processes"] == 1 and double["processes"] == 2
    assert len(single["losses"]) == len(double["losses"]) == 4
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-9)


def _quickstart_run(tmp_path, languages, n_train, n_heldout):
    from lenssteer.models import load_model
    from lenssteer.quickstart import quickstart_corpora, run_quickstart_training

    try:
        train, heldout = quickstart_corpora(languages, n_train, n_heldout, seed=0)
    except Exception as error:  # the corpus package is optional
        pytest.skip(f"Bible corpus unavailable: {error}")
    tokenizer, model = load_model("qwen2.5-coder-0.5b-instruct")
    result = run_quickstart_training(
        model, tokenizer, train, heldout, tmp_path / "adapter", progress=False
    )
    return result["report"]["summary"], result["report_markdown"]


@pytest.mark.slow
@pytest.mark.ci
def test_real_model_training_moves_heldout_states_small(tmp_path):
    """CI scale (60 training verses, 32 steps): held-out states move the right way and English
    and retrieval hold. At this scale the gap shrinks only about 7% (push barely moves); the
    issue's targets are checked at the quickstart's scale by the test below."""
    summary, table = _quickstart_run(tmp_path, ["en", "de", "fr"], 60, 30)
    assert summary["shrink_along_agnostic"] > 0.03, table
    assert summary["retain_mse_rel"] < 0.1, table
    assert summary["retrieval_after"] >= summary["retrieval_before"] - 0.1, table


@pytest.mark.slow
def test_quickstart_meets_the_heldout_targets(tmp_path):
    """The quickstart itself (200 + 100 verses, en + 4 languages; about 8 minutes): the issue's
    held-out targets at the top layer."""
    from lenssteer.train import QUICKSTART_CONFIG

    summary, table = _quickstart_run(tmp_path, ["en", "de", "es", "fr", "it"], 200, 100)
    assert summary["shrink_along_agnostic"] >= 0.3, table
    assert 0.5 * QUICKSTART_CONFIG.alpha < summary["push_ratio"] < 1.5 * QUICKSTART_CONFIG.alpha, (
        table
    )
    assert summary["retain_mse_rel"] < 0.05, table
    assert summary["retrieval_after"] >= summary["retrieval_before"], table


def test_training_data_save_load_round_trip(qwen, tokenizer, tmp_path):
    from lenssteer.training_data import TrainingData

    data = prepare_training_data(
        qwen, tokenizer, tiny_corpus(3), 2, [2, 3], "last", True, batch_size=4, progress=False
    )
    loaded = TrainingData.load(data.save(tmp_path / "data.safetensors"))
    for name in ("prefix_ids", "prefix_states", "token_ids", "suffix_states", "offsets", "frozen"):
        assert torch.equal(getattr(loaded, name), getattr(data, name)), name
    assert (loaded.languages, loaded.loss_layers, loaded.data_hash) == (
        data.languages,
        data.loss_layers,
        data.data_hash,
    )
    batch, again = data.collate([0, 2]), loaded.collate([0, 2])
    assert all(torch.equal(batch[k], again[k]) for k in batch)


# --------------------------------------------------------------------------------------------------
# Representation point "final_norm": the last layer after the model's final norm (as Lens reads it)


def make_final_norm_subspace(model, tokenizer, corpus):
    """A subspace probed at the last layer after the final norm (as ``probe`` makes one)."""
    from lenssteer.probe import probe_metadata

    last = num_decoder_layers(model) - 1
    states = extract_corpus(
        model,
        tokenizer,
        corpus,
        [last],
        chat_template=True,
        progress=False,
        cache_dir=False,
        representation="final_norm",
    )
    metadata = probe_metadata(model, tokenizer, corpus, "last", True, representation="final_norm")
    return compute_subspace(
        states, [last], corpus.central_language, diagnostics=False, metadata=metadata
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral", "phi3"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_final_norm_fast_path_equals_full_forward_and_last_hidden_state(arch, pooling, tokenizer):
    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    corpus = tiny_corpus(4)
    data = prepare_training_data(
        model,
        tokenizer,
        corpus,
        2,
        [3],
        pooling,
        True,
        batch_size=5,
        progress=False,
        representation="final_norm",
    )
    assert data.representation == "final_norm"
    batch = data.collate([0, 1, 2, 3], layer_inputs=True, input_ids=True)
    split = data.collate([0, 1, 2, 3], layer_inputs=True, split_prefix=True)
    with torch.no_grad():
        kwargs = dict(pooling=pooling, representation="final_norm")
        plain = full_forward_states(
            model, batch["input_ids"], batch["attention_mask"], [3], **kwargs
        )
        fast = top_layer_states(
            model, batch["layer_inputs"], batch["attention_mask"], 2, [3], **kwargs
        )
        shared = top_layer_states(
            model,
            split["layer_inputs"],
            split["suffix_mask"],
            2,
            [3],
            prefix_inputs=split["prefix_inputs"],
            **kwargs,
        )
        # transformers' own last hidden state (after the final norm), one text at a time
        reference = []
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            out = model(batch["input_ids"][row : row + 1, :length], output_hidden_states=True)
            last = out.hidden_states[-1][0]
            reference.append(last[-1] if pooling == "last" else last.mean(0))
    reference = torch.stack(reference)[:, None]
    for states in (fast, shared, plain):
        torch.testing.assert_close(states, reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            states.reshape(data.frozen.shape), data.frozen, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("kind", ["lora", "layers"])
def test_final_norm_fast_and_plain_losses_and_gradients_match(arch, kind, tokenizer):
    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    corpus = tiny_corpus(6)
    subspace = make_final_norm_subspace(model, tokenizer, corpus)
    data = prepare_training_data(
        model,
        tokenizer,
        corpus,
        2,
        [3],
        "last",
        True,
        batch_size=4,
        progress=False,
        representation="final_norm",
    )
    batch = data.collate([0, 2, 3, 5], layer_inputs=True, input_ids=True, split_prefix=True)
    # retain_targets on (ours, not Lens'): its term and gradient must match on both paths too
    config = quick_config(kind=kind, representation="final_norm", retain_targets_weight=0.5)
    with trainable_top_layers(model, [2, 3], config) as trainable:
        params = trainable.parameters()
        torch.manual_seed(1)
        with torch.no_grad():
            for p in params.values():
                p.add_(0.05 * torch.randn_like(p))
        module = LensTrainingModule(
            model,
            subspace.specific_basis,
            subspace.directions.transpose(0, 1),
            0,
            2,
            [3],
            "last",
            config.objective(),
            agnostic=subspace.agnostic,
            representation="final_norm",
        )
        assert_fast_equals_plain(module, batch, params)


def test_final_norm_training_records_its_representation(qwen, tokenizer, tmp_path):
    from lenssteer.adapter import SteeringAdapter
    from lenssteer.heldout import heldout_report

    corpus = tiny_corpus(8)
    subspace = make_final_norm_subspace(qwen, tokenizer, corpus)
    subspace.save(tmp_path / "subspace")
    saved = json.loads((tmp_path / "subspace" / "subspace.json").read_text())
    assert saved["representation"] == "final_norm"
    config = quick_config(representation="final_norm")
    adapter = train_lens(qwen, tokenizer, subspace, corpus, tmp_path / "a", config, progress=False)
    loaded = SteeringAdapter.from_pretrained(tmp_path / "a")
    assert loaded.config.representation["point"] == "final_norm"
    assert loaded.config.subspace["representation"] == "final_norm"
    assert loaded.config.hyperparameters["representation"] == "final_norm"
    assert loaded.config.loss_layers == [3] and loaded.config.trained_layers == [2, 3]
    report = heldout_report(qwen, tokenizer, adapter, subspace, tiny_corpus(8), progress=False)
    assert set(report["layers"]) == {3}


def test_representation_mismatch_is_an_error(setup, qwen, tokenizer, tmp_path):
    _, corpus, residual_subspace = setup
    with pytest.raises(TrainingError, match="probed at representation 'residual'"):
        train_lens(
            qwen,
            tokenizer,
            residual_subspace,
            corpus,
            tmp_path / "a",
            quick_config(representation="final_norm"),
            progress=False,
        )
    normed = make_final_norm_subspace(qwen, tokenizer, corpus)
    with pytest.raises(TrainingError, match="--representation final_norm"):
        train_lens(qwen, tokenizer, normed, corpus, tmp_path / "a", quick_config(), progress=False)
    with pytest.raises(TrainingError, match="only at the last decoder layer"):
        prepare_training_data(
            qwen, tokenizer, corpus, 2, [2, 3], progress=False, representation="final_norm"
        )
    with pytest.raises(TrainingError, match="unknown representation"):
        TrainConfig(representation="logits")


# --------------------------------------------------------------------------------------------------
# Scale-free loss units


def test_scale_free_training_starts_at_unit_pull_and_records_its_units(setup, tokenizer, tmp_path):
    from lenssteer.objectives import loss_scales

    model, corpus, subspace = setup
    config = quick_config(normalization="scale_free", alpha=0.5, learning_rate=1e-3, batch_size=8)
    adapter = train_lens(model, tokenizer, subspace, corpus, tmp_path / "a", config, progress=False)
    first = adapter.config.metrics["train"]["first_log"]
    # one batch holds every item: before the first step pull is 1 and push alpha² (by definition)
    assert first["loss_pull"] == pytest.approx(1.0, rel=1e-3)
    assert first["loss_push"] == pytest.approx(0.25, rel=1e-3)
    recorded = adapter.config.metrics["loss_scales"]
    assert recorded["layers"] == [2, 3] and set(recorded["push_direction_sq"]) == {"fr", "de"}
    data = prepare_training_data(model, tokenizer, corpus, 2, [2, 3], "last", True, progress=False)
    unit = torch.nn.functional.normalize(subspace.agnostic, dim=-1)
    expected = loss_scales(data.frozen, subspace.specific_basis, 0, unit)
    for name in ("pull", "retain"):
        torch.testing.assert_close(torch.tensor(recorded[name]), expected[name], rtol=1e-4, atol=0)
    assert adapter.config.hyperparameters["normalization"] == "scale_free"


def test_an_adapter_config_without_normalization_means_mse():
    """Adapters made before the option (the shipped quickstart one) keep their meaning: raw MSE
    units."""
    from lenssteer.adapter import SteeringAdapter

    folder = Path(__file__).resolve().parents[1] / "checkpoints"
    adapter = SteeringAdapter.from_pretrained(
        folder / "qwen2.5-coder-0.5b-instruct-lens-quickstart"
    )
    assert "normalization" not in adapter.config.hyperparameters
    config = TrainConfig.from_dict(adapter.config.hyperparameters)
    assert config.normalization == "mse" and config.representation == "residual"
    assert config.objective().normalization == "mse"
