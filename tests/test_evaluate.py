"""Scoring mechanics (definition, batching, padding), intervals against known values, report files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_model

from lenssteer.evaluate import (
    ScoringRequest,
    detect_language,
    encode_requests,
    generate_greedy,
    loglikelihoods,
)
from lenssteer.report import cost_table, markdown_tables, write_report
from lenssteer.stats import (
    Outcomes,
    bootstrap_mean_interval,
    minimum_detectable_effect,
    paired_bootstrap_difference,
    stratified_bootstrap_mean,
    summarize,
    wilson_interval,
)

REQUESTS = [
    ScoringRequest("The capital of France is", " Paris", True),
    ScoringRequest("The capital of France is", " Lyon", True),
    ScoringRequest("Q: which colour is the sky on a clear day?\nA:", " blue, mostly", True),
    ScoringRequest("One", " two three four five", True),
    ScoringRequest(
        "A much longer context that has quite a few more tokens than the others", " x", True
    ),
]


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny_model("llama", vocab_size=len(tokenizer))


def _by_definition(model, tokenizer, request: ScoringRequest) -> float:
    """Sum of log p(continuation token | everything before), one unpadded sequence, full logits."""
    context = tokenizer(request.context, add_special_tokens=request.add_special_tokens)["input_ids"]
    continuation = tokenizer(request.continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(
        log_probs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation)
    )


def test_loglikelihood_matches_definition(llama, tokenizer):
    scores = loglikelihoods(llama, tokenizer, REQUESTS, batch_size=1)
    for request, (score, n_tokens) in zip(REQUESTS, scores, strict=True):
        assert n_tokens == len(
            tokenizer(request.continuation, add_special_tokens=False)["input_ids"]
        )
        assert score == pytest.approx(_by_definition(llama, tokenizer, request), abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_unbatched(arch, padding_side, tokenizer):
    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    one_by_one = loglikelihoods(model, tokenizer, REQUESTS, batch_size=1)
    batched = loglikelihoods(model, tokenizer, REQUESTS, batch_size=4, padding_side=padding_side)
    for (a, n_a), (b, n_b) in zip(one_by_one, batched, strict=True):
        assert n_a == n_b
        assert a == pytest.approx(b, abs=1e-4)


def test_left_and_right_padding_agree(llama, tokenizer):
    left = loglikelihoods(llama, tokenizer, REQUESTS, batch_size=5, padding_side="left")
    right = loglikelihoods(llama, tokenizer, REQUESTS, batch_size=5, padding_side="right")
    assert [n for _, n in left] == [n for _, n in right]
    assert [s for s, _ in left] == pytest.approx([s for s, _ in right], abs=1e-4)


def test_identical_inputs_run_once(llama, tokenizer):
    """Four one-token options of one question: one forward pass, four different scores."""
    calls = []
    handle = llama.register_forward_hook(lambda *_: calls.append(1))
    try:
        requests = [ScoringRequest("Question? Answer:", f" {letter}", True) for letter in "ABCD"]
        scores = loglikelihoods(llama, tokenizer, requests, batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert len({round(s, 6) for s, _ in scores}) == 4


OPTIONS = [" red and white", " blue", " green, then grey", " a pale shade of yellow"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_options_of_one_context_packed_in_one_row(arch, padding_side, tokenizer):
    """Multi-token options after a shared question: one forward pass, each option scored as if
    it came alone after the question (the definition)."""
    from lenssteer.forward import packing_works

    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    assert packing_works(model)
    requests = [ScoringRequest("Q: the flag's colours?\nA:", o, True) for o in OPTIONS]
    requests += [ScoringRequest("Short one:", o, True) for o in OPTIONS[:2]]
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        scores = loglikelihoods(model, tokenizer, requests, batch_size=8, padding_side=padding_side)
    finally:
        handle.remove()
    if arch != "gemma3":  # its 16-token window unpacks the long row (next test)
        assert len(calls) == 1  # two contexts, six options: one batch of two rows
    for request, (score, _) in zip(requests, scores, strict=True):
        assert score == pytest.approx(_by_definition(model, tokenizer, request), abs=1e-4)


def test_rows_past_a_sliding_window_are_not_packed(tokenizer):
    """gemma3's sliding-window layers take a custom mask as-is: a row longer than the window is
    scored unpacked, with the model's own masks, and still matches the definition."""
    model = make_tiny_model("gemma3", vocab_size=len(tokenizer))
    assert model.config.sliding_window == 16
    context = "A context that is long enough to be well past the sliding window of sixteen tokens:"
    requests = [ScoringRequest(context, o, True) for o in OPTIONS]
    requests.append(ScoringRequest("Short:", OPTIONS[0], True))
    scores = loglikelihoods(model, tokenizer, requests, batch_size=8)
    for request, (score, _) in zip(requests, scores, strict=True):
        assert score == pytest.approx(_by_definition(model, tokenizer, request), abs=1e-4)


def test_a_model_that_ignores_4d_masks_is_scored_unpacked(tokenizer):
    """Where the packing check fails (flash attention ignores custom masks), every option gets its
    own row: same scores, more forward calls."""
    from lenssteer.forward import _PACKING_WORKS

    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    requests = [ScoringRequest("Q: the flag's colours?\nA:", o, True) for o in OPTIONS]
    packed = loglikelihoods(model, tokenizer, requests, batch_size=1)
    _PACKING_WORKS[model] = False
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        unpacked = loglikelihoods(model, tokenizer, requests, batch_size=1)
    finally:
        handle.remove()
    assert len(calls) == len(OPTIONS)
    assert [s for s, _ in unpacked] == pytest.approx([s for s, _ in packed], abs=1e-4)


def test_empty_continuation_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="request 2: the continuation '' has no tokens"):
        encode_requests(tokenizer, [ScoringRequest("a", " b"), ScoringRequest("a", "")])


def test_greedy_generation_batched_equals_one_by_one(llama, tokenizer):
    prompts = ["Hello there", "A longer prompt with several more words in it", "Hi"]
    batched = generate_greedy(llama, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    single = [generate_greedy(llama, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(answer, str) for answer in batched)


def test_detect_language():
    assert detect_language("Das ist ein ganz normaler deutscher Satz über das Wetter.") == "de"
    assert detect_language("Ceci est une phrase tout à fait normale en français.") == "fr"
    assert detect_language("   ") is None


# --------------------------------------------------------------------------------------------------
# Intervals


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        (5, 10, (0.236593, 0.763407)),
        (0, 10, (0.0, 0.277533)),
        (10, 10, (0.722467, 1.0)),
        (81, 263, (0.255289, 0.366210)),
    ],
)
def test_wilson_interval_known_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=1e-5)
    assert high == pytest.approx(expected[1], abs=1e-5)


def test_wilson_interval_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for successes, n in [(3, 7), (40, 100), (1, 50)]:
        reference = scipy_stats.binomtest(successes, n).proportion_ci(method="wilson")
        assert wilson_interval(successes, n) == pytest.approx(
            (reference.low, reference.high), abs=1e-9
        )


def test_wilson_interval_edge_cases():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_bootstrap_intervals():
    assert bootstrap_mean_interval([0.5] * 20) == (0.5, 0.5, 0.5)
    # A large sample: the percentile interval is close to mean +/- 1.96 standard errors.
    values = [1.0] * 300 + [0.0] * 700
    mean, low, high = bootstrap_mean_interval(values, n_resamples=4000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 1000)
    assert mean == pytest.approx(0.3)
    assert low == pytest.approx(0.3 - half, abs=0.005)
    assert high == pytest.approx(0.3 + half, abs=0.005)
    # Stratified: the average of group means, every group weighing the same.
    assert stratified_bootstrap_mean([[1.0] * 10, [0.0] * 90])[0] == pytest.approx(0.5)


def test_paired_bootstrap_difference():
    base = [[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    assert paired_bootstrap_difference(base, base) == (0.0, 0.0, 0.0)
    # Pairing matters: the same gain on every (noisy) item gives a zero-width interval.
    shifted = [[v + 1 for v in group] for group in base]
    assert paired_bootstrap_difference(shifted, base) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_difference([[1.0, 0.0]], [[1.0]])


# --------------------------------------------------------------------------------------------------
# Summary and report


def _outcomes() -> list[Outcomes]:
    ids = [f"q{i}" for i in range(20)]
    made = []
    for language, base_hits in [("en", 12), ("de", 8)]:
        made.append(
            Outcomes(
                "toy", "acc", "base", language, ids, [1.0] * base_hits + [0.0] * (20 - base_hits)
            )
        )
        made.append(
            Outcomes(
                "toy",
                "acc",
                "steered",
                language,
                ids,
                [1.0] * (base_hits + 4) + [0.0] * (16 - base_hits),
            )
        )
    return made


def test_summarize_scores_and_differences():
    summary = summarize(_outcomes())
    cells = summary["toy"]["acc"]
    assert cells["base"]["en"]["score"] == pytest.approx(0.6)
    assert (cells["base"]["en"]["low"], cells["base"]["en"]["high"]) == pytest.approx(
        wilson_interval(12, 20)
    )
    assert cells["steered"]["de"]["diff"] == pytest.approx(0.2)
    assert cells["steered"]["average"]["score"] == pytest.approx(0.7)
    assert cells["steered"]["average"]["diff"] == pytest.approx(0.2)
    # Every steered item is at least as good: the paired interval is strictly positive.
    assert cells["steered"]["average"]["diff_low"] > 0
    assert "diff" not in cells["base"]["en"]


def test_summarize_targets_column():
    summary = summarize(_outcomes(), central_language="en")
    cells = summary["toy"]["acc"]["steered"]
    assert cells["targets"]["languages"] == ["de"]
    assert cells["targets"]["score"] == pytest.approx(0.6)
    assert cells["targets"]["diff"] == pytest.approx(0.2)
    assert cells["average"]["languages"] == ["en", "de"]
    assert "targets" not in summarize(_outcomes())["toy"]["acc"]["steered"]


def test_summarize_refuses_different_items():
    made = _outcomes()
    made[1].item_ids = [f"other{i}" for i in range(20)]
    with pytest.raises(ValueError, match="different items"):
        summarize(made)


def test_write_report_files(tmp_path):
    out = tmp_path / "report"
    document = write_report(
        out,
        _outcomes(),
        metadata={"model": "tiny", "batch_size": 4},
        task_notes={"toy": "A toy task."},
    )
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "toy.png"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == document
    assert on_disk["summary"]["toy"]["acc"]["steered"]["en"]["diff"] == pytest.approx(0.2)
    assert len(on_disk["outcomes"]) == 4
    markdown = (out / "report.md").read_text()
    assert "| steered |" in markdown and "A toy task." in markdown and "![toy](toy.png)" in markdown
    png = (out / "toy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000
    assert "## Cost" not in markdown  # no timings given
    # A rewrite replaces the folder as a whole and leaves no scratch folder behind.
    write_report(out, _outcomes()[:2], metadata={"model": "tiny"})
    assert len(json.loads((out / "report.json").read_text())["outcomes"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_the_cost_table_divides_seconds_by_the_items_each_step_scored(tmp_path):
    timings = {"base / toy": 8.0, "steered / toy": 0.0, "shift / choosing on dev items": 3.5}
    table = cost_table(_outcomes(), timings)
    assert "| base / toy | 8.0 | 40 | 0.200 |" in table  # 20 items x 2 languages
    assert "| steered / toy | 0.0 | 40 | - |" in table
    assert "| shift / choosing on dev items | 3.5 | - | - |" in table
    assert "| **all steps** | 11.5 | | |" in table
    write_report(tmp_path / "r", _outcomes(), metadata={"timings_seconds": timings})
    assert table in (tmp_path / "r" / "report.md").read_text()


# --------------------------------------------------------------------------------------------------
# Replaying the unchanged lower layers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_replay_equals_full_computation(arch, tokenizer):
    """A top-layer edit scored on replayed lower layers gives the numbers of a full forward pass."""
    from lenssteer.evaluate import LowerLayerReplay
    from lenssteer.extract import extract_states
    from lenssteer.hooks import hooked
    from lenssteer.models import find_decoder_layers

    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    top = find_decoder_layers(model)[3]
    edit = [(top, lambda _m, hidden: 1.5 * hidden + 0.1)]
    texts = ["one text", "another, longer text here", "third"]

    def run():
        scores = loglikelihoods(model, tokenizer, REQUESTS, batch_size=2)
        states = extract_states(
            model,
            tokenizer,
            texts,
            [3],
            chat_template=True,
            batch_size=2,
            cache_dir=False,
            progress=False,
            share_prefix=False,
        )
        return scores, states

    with hooked(edit):
        full_scores, full_states = run()
    replay = LowerLayerReplay(model, first_changed_layer=3)
    with replay.record():
        base_scores, _ = run()
    calls = {"n": 0}
    lower = find_decoder_layers(model)[0].mlp
    handle = lower.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        with hooked(edit), replay.replay():
            replayed_scores, replayed_states = run()
    finally:
        handle.remove()
    assert calls["n"] == 0  # the lower layers' blocks did not run
    assert [s for s, _ in replayed_scores] == pytest.approx([s for s, _ in full_scores], abs=1e-4)
    assert torch.allclose(replayed_states, full_states, atol=1e-5)
    assert [s for s, _ in base_scores] != pytest.approx([s for s, _ in full_scores], abs=1e-3)
    # Outside the block the model is whole again.
    assert [
        s for s, _ in loglikelihoods(model, tokenizer, REQUESTS, batch_size=2)
    ] == pytest.approx([s for s, _ in base_scores], abs=1e-5)


def test_replay_out_of_step_is_an_error(llama, tokenizer):
    from lenssteer.evaluate import LowerLayerReplay

    replay = LowerLayerReplay(llama, first_changed_layer=2)
    with pytest.raises(RuntimeError, match="record"):
        with replay.replay():
            pass
    with replay.record():
        loglikelihoods(llama, tokenizer, REQUESTS[:2], batch_size=2)
    with pytest.raises(RuntimeError, match="out of step"):
        with replay.replay():
            loglikelihoods(llama, tokenizer, REQUESTS[2:], batch_size=2)
    with pytest.raises(RuntimeError, match="out of step"):
        with replay.replay():
            pass  # fewer calls than recorded
    from lenssteer.extract import extract_states

    texts = ["one text", "another text"]
    kwargs = dict(chat_template=True, cache_dir=False, progress=False)
    with replay.record():
        extract_states(llama, tokenizer, texts, [3], **kwargs)
    with pytest.raises(RuntimeError, match="KV cache cannot be replayed"):
        with replay.replay():  # extract's shared chat-template prefix runs with a KV cache
            extract_states(llama, tokenizer, texts, [3], **kwargs)
    assert "forward" not in vars(find_layer(llama, 0))


@pytest.mark.parametrize(
    "how", ["positional", "model-keyword", "old-keyword", "any-keyword", "hidden-by-name"]
)
def test_replay_guard_finds_the_cache_however_it_is_passed(llama, tokenizer, how):
    """The guard looks for a ``Cache`` among the arguments, not for a keyword name: transformers 5.24
    renamed ``past_key_values`` -> ``cache`` and a name-keyed guard silently stopped firing."""
    from transformers import DynamicCache

    from lenssteer.evaluate import LowerLayerReplay
    from lenssteer.forward import cache_keyword

    replay = LowerLayerReplay(llama, first_changed_layer=2)
    with replay.record():
        loglikelihoods(llama, tokenizer, REQUESTS[:2], batch_size=2)
    layer = find_layer(llama, 0)
    hidden = torch.zeros(1, 3, llama.config.hidden_size)
    cache = DynamicCache(config=llama.config)
    calls = {
        "positional": lambda: layer(hidden, None, None, cache),
        "model-keyword": lambda: layer(hidden, **{cache_keyword(llama): cache}),
        "old-keyword": lambda: layer(hidden, past_key_values=cache),
        "any-keyword": lambda: layer(hidden, some_future_name=cache),
        "hidden-by-name": lambda: layer(hidden_states=hidden, cache=cache),
    }
    with pytest.raises(RuntimeError, match="KV cache cannot be replayed"):
        with replay.replay():
            calls[how]()
    assert "forward" not in vars(layer)


def find_layer(model, index):
    from lenssteer.models import find_decoder_layers

    return find_decoder_layers(model)[index]


def test_copied_prompt_text_is_not_judged():
    from lenssteer.evaluate import strip_copied

    verse = "Denn so spricht Jehova der Heerscharen: Gleichwie ich euch Böses zu tun gedachte, spricht er"
    assert detect_language(strip_copied("Denn so spricht Jehova der Heerscharen.", verse)) is None
    kept = strip_copied(
        "This verse means that God keeps his word. Denn so spricht Jehova der Heerscharen", verse
    )
    assert kept == "This verse means that God keeps his word."
    assert detect_language(kept) == "en"
    assert strip_copied("Dieser Vers bedeutet etwas.", verse) == "Dieser Vers bedeutet etwas."


def test_minimum_detectable_effect_hand_computed():
    # 10 paired differences, two of them 1: mean 0.2, sample variance (2 * 0.8^2 + 8 * 0.2^2) / 9
    # = 1.6 / 9, standard error sqrt(1.6 / 90) = 2 / 15; z_0.975 + z_0.8 = 1.959964 + 0.841621.
    differences = [1.0, 1.0] + [0.0] * 8
    expected = (1.959964 + 0.841621) * 2 / 15
    assert minimum_detectable_effect([differences]) == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(0.373545, abs=1e-5)
    # Two languages of that kind, averaged: standard error sqrt(2 * (2/15)^2) / 2.
    assert minimum_detectable_effect([differences, differences]) == pytest.approx(
        expected / math.sqrt(2), abs=1e-5
    )
    # Agreement on every item: nothing varies, any effect would be seen; too few items: unknown.
    assert minimum_detectable_effect([[0.0] * 30]) == 0.0
    assert math.isnan(minimum_detectable_effect([[1.0]]))
    # A looser test (alpha 0.2) or less power needs a smaller effect.
    assert minimum_detectable_effect([differences], alpha=0.2) < expected
    assert minimum_detectable_effect([differences], power=0.5) < expected


def test_summary_cells_carry_mde_and_underpowered_mark():
    cells = summarize(_outcomes(), central_language="en")["toy"]["acc"]["steered"]
    # en: 4 of 20 items gain one: variance 3.2 / 19, MDE 2.8016 * sqrt(3.2 / 19 / 20) = 25.7 points.
    assert cells["en"]["mde"] == pytest.approx(2.801585 * math.sqrt(3.2 / 19 / 20), abs=1e-5)
    assert cells["en"]["underpowered"] is True
    assert cells["average"]["mde"] < cells["en"]["mde"]  # two languages: more items
    assert cells["en"]["identical"] is False
    same = [o for o in _outcomes() if o.system == "base"]
    same += [Outcomes(o.task, o.metric, "copy", o.language, o.item_ids, o.values) for o in same]
    copy = summarize(same)["toy"]["acc"]["copy"]["en"]
    assert copy["identical"] is True and copy["mde"] == 0.0
    assert "the same value on every item" in markdown_tables(summarize(same))


def test_report_marks_underpowered_and_at_chance(tmp_path):
    document = write_report(
        tmp_path / "chance",
        _outcomes(),
        metadata={"model": "tiny"},
        central_language="en",
        chance={"toy": 0.5},
    )
    text = (tmp_path / "chance" / "report.md").read_text()
    assert "MDE 25.7 (underpowered)" in text
    assert "**at chance**: `base`" in text  # base en: 12 of 20, Wilson [38.7, 78.1] contains 50
    assert document["at_chance"]["toy"]["acc"] == {
        "chance": 0.5,
        "language": "en",
        "at_chance": True,
    }
    write_report(
        tmp_path / "above",
        _outcomes(),
        metadata={"model": "tiny"},
        central_language="en",
        chance={"toy": 0.25},
    )
    assert "**at chance**: `base`" not in (tmp_path / "above" / "report.md").read_text()
