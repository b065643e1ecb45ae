"""XTransplant mechanics on tiny random decoders (four architectures) and on a real bundled model.

What must hold: batched (left-padded) == one by one; KV cache on == off; a prompt transplanted into
itself at s = t changes nothing; the patch lands at the last real prompt token and only where the
prompt is computed (never on decoding steps); ``attn`` moves the attention output, not the residual
stream; the fast grid gives the numbers of running each pair from scratch; bad input fails clearly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

from lenssteer.forward import cache_keyword, cache_of_output, hidden_states_of_call
from lenssteer.hooks import hooked, last_real_positions, position_ids_from_mask
from lenssteer.models import ModuleDiscoveryError, ModuleNames, find_layer_modules
from lenssteer.stats import wilson_interval
from lenssteer.transplant import (
    encode_prompts,
    generate_transplanted,
    record_donor_activations,
    record_module_outputs,
    transplant_generate,
    transplant_loglikelihoods,
    transplanted,
)
from lenssteer.transplant_pairs import (
    GridScores,
    accuracy,
    dev_heldout_split,
    grid_pairs,
    load_selected_pairs,
    plot_accuracy_heatmap,
    save_selected_pairs,
    select_pair,
    summarize_grid,
    transplant_grid,
)

ARCHS = ["llama", "qwen2", "gemma3", "mistral"]
N_LAYERS = 4

# Donor (English) and recipient (German) prompts, aligned; lengths differ so batches are padded,
# and one recipient is longer than Gemma3's tiny sliding window (16) to exercise its cache.
DONORS = [
    "The capital of France is",
    "One, two, three, four, five, six, seven",
    "Hello",
]
RECIPIENTS = [
    "Die Hauptstadt von Frankreich ist die Stadt, in der der Eiffelturm steht, und sie heißt",
    "Eins, zwei",
    "Guten Tag, wie geht es Ihnen heute?",
]
CONTINUATIONS = [
    [" Paris", " Berlin", " A"],
    [" drei", " vier und fünf", " B"],
    [" gut", " nein", " C"],
]
LETTERS = [[" A", " B", " C", " D"]] * 3

ATOL = 2e-5


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tokenizer):
    torch.manual_seed(0)
    return make_tiny_model(request.param, vocab_size=len(tokenizer), n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny_model("llama", vocab_size=len(tokenizer), n_layers=N_LAYERS)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# Equivalences


def test_batched_left_padding_equals_one_by_one(model, tokenizer):
    input_ids, mask = encode_prompts(tokenizer, DONORS)
    assert mask[:, -1].all() and not mask.all()  # left padded
    batched = record_module_outputs(model, input_ids, mask)
    for i, prompt in enumerate(DONORS):
        single = record_module_outputs(model, *encode_prompts(tokenizer, [prompt]))
        for granularity in ("ffn", "attn"):
            torch.testing.assert_close(
                batched[granularity][i], single[granularity][0], atol=ATOL, rtol=0
            )

    scores = transplant_loglikelihoods(
        model, tokenizer, DONORS, RECIPIENTS, CONTINUATIONS, 1, 2, "ffn", batch_size=3
    )
    for i in range(len(DONORS)):
        single = transplant_loglikelihoods(
            model,
            tokenizer,
            DONORS[i : i + 1],
            RECIPIENTS[i : i + 1],
            CONTINUATIONS[i : i + 1],
            1,
            2,
        )
        torch.testing.assert_close(scores[i], single[0], atol=ATOL, rtol=0)

    batched_text = transplant_generate(
        model, tokenizer, DONORS, RECIPIENTS, 2, 1, "attn", max_new_tokens=5, batch_size=3
    )
    one_by_one = [
        transplant_generate(model, tokenizer, [d], [r], 2, 1, "attn", max_new_tokens=5)[0]
        for d, r in zip(DONORS, RECIPIENTS, strict=True)
    ]
    assert batched_text == one_by_one


def test_packed_options_equal_one_row_per_option(model, tokenizer):
    """Multi-token options packed after their recipient prompt score as when each option has its
    own row, patched and unpatched."""
    from lenssteer.forward import _PACKING_WORKS, packing_works

    assert packing_works(model)
    recipients = [r[:60] for r in RECIPIENTS]  # within gemma3's 16-token window once packed
    for pair in ((1, 2), (None, None)):
        packed = transplant_loglikelihoods(
            model, tokenizer, DONORS, recipients, CONTINUATIONS, *pair, batch_size=3
        )
        _PACKING_WORKS[model] = False
        try:
            plain = transplant_loglikelihoods(
                model, tokenizer, DONORS, recipients, CONTINUATIONS, *pair, batch_size=3
            )
        finally:
            _PACKING_WORKS[model] = True
        torch.testing.assert_close(packed, plain, atol=ATOL, rtol=0)


def test_kv_cache_on_equals_off(model, tokenizer):
    donors = record_donor_activations(model, tokenizer, DONORS)["ffn"][:, 1]  # source layer 1
    input_ids, mask = encode_prompts(tokenizer, RECIPIENTS)
    positions = last_real_positions(mask)
    step = torch.tensor([[11], [12], [13]])

    def forward(ids, attention_mask, **kwargs):
        return model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask)[:, -ids.shape[1] :],
            **kwargs,
        )

    full_ids, full_mask = (
        torch.cat([input_ids, step], 1),
        torch.cat([mask, torch.ones_like(step)], 1),
    )
    with torch.no_grad(), transplanted(model, donors, positions, 2, "ffn"):
        prefill = forward(input_ids, mask, use_cache=True)
        cache = {cache_keyword(model): cache_of_output(prefill)}
        cached_step = forward(step, full_mask, **cache).logits
        uncached = forward(full_ids, full_mask, use_cache=False).logits
    torch.testing.assert_close(prefill.logits, uncached[:, :-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_step[:, -1], uncached[:, -1], atol=ATOL, rtol=0)
    with torch.no_grad():
        unpatched = forward(full_ids, full_mask, use_cache=False).logits
    assert (unpatched[:, -1] - uncached[:, -1]).abs().max() > 1e-4  # the patch mattered

    on = generate_transplanted(model, input_ids, mask, donors, 2, "ffn", 6, use_cache=True)
    off = generate_transplanted(model, input_ids, mask, donors, 2, "ffn", 6, use_cache=False)
    assert torch.equal(on, off)


def test_self_transplant_at_same_layer_changes_nothing(model, tokenizer):
    base = transplant_loglikelihoods(
        model, tokenizer, RECIPIENTS, RECIPIENTS, CONTINUATIONS, None, None
    )
    for granularity in ("ffn", "attn"):
        for layer in (0, N_LAYERS - 1):
            same = transplant_loglikelihoods(
                model, tokenizer, RECIPIENTS, RECIPIENTS, CONTINUATIONS, layer, layer, granularity
            )
            torch.testing.assert_close(same, base, atol=ATOL, rtol=0)
    base_text = transplant_generate(
        model, tokenizer, RECIPIENTS, RECIPIENTS, None, None, max_new_tokens=4
    )
    same_text = transplant_generate(
        model, tokenizer, RECIPIENTS, RECIPIENTS, 2, 2, max_new_tokens=4
    )
    assert same_text == base_text
    other = transplant_loglikelihoods(model, tokenizer, DONORS, RECIPIENTS, CONTINUATIONS, 2, 2)
    assert (other - base).abs().max() > 1e-4  # a real donor does change the answer scores


def test_fast_grid_equals_each_pair_from_scratch(model, tokenizer):
    donors = record_donor_activations(model, tokenizer, DONORS, batch_size=2)
    pairs = [(0, 0), (3, 0), (1, 2), (2, 3), (-1, -1)]
    for continuations in (CONTINUATIONS, LETTERS):  # multi-token options, and one-token letters
        grid = transplant_grid(
            model, tokenizer, RECIPIENTS, continuations, donors, pairs, chunk_size=2, seed=3
        )
        base = transplant_loglikelihoods(
            model, tokenizer, DONORS, RECIPIENTS, continuations, None, None
        )
        for granularity in ("ffn", "attn"):
            scores = grid[granularity]
            assert scores.pairs[-1] == (N_LAYERS - 1, N_LAYERS - 1)
            torch.testing.assert_close(scores.base, base, atol=ATOL, rtol=0)
            for k, (s, t) in enumerate(scores.pairs):
                slow = transplant_loglikelihoods(
                    model,
                    tokenizer,
                    DONORS,
                    RECIPIENTS,
                    continuations,
                    s,
                    t,
                    granularity,
                    batch_size=2,
                )
                torch.testing.assert_close(scores.transplant[:, k], slow, atol=ATOL, rtol=0)
            # Control rows use a random *other* item as donor.
            k = 2
            others = scores.control_donors[:, k]
            assert (others != torch.arange(3)).all()
            slow = transplant_loglikelihoods(
                model,
                tokenizer,
                [DONORS[j] for j in others],
                RECIPIENTS,
                continuations,
                *scores.pairs[k],
                granularity,
            )
            torch.testing.assert_close(scores.control[:, k], slow, atol=ATOL, rtol=0)
    assert _hook_count(model) == 0


# --------------------------------------------------------------------------------------------------
# Where the patch lands


SENTINEL = 1234.5


def _sentinel_spy(module, seen: list[set[tuple[int, int]]]):
    def spy(_module, hidden):
        hits = (hidden == SENTINEL).all(dim=-1).nonzero().tolist()
        seen.append({(r, c) for r, c in hits})

    return (module, spy)


@pytest.mark.parametrize("use_cache", [True, False])
def test_patch_at_last_real_prompt_token_and_only_on_prefill(llama, tokenizer, use_cache):
    input_ids, mask = encode_prompts(tokenizer, RECIPIENTS[:2])
    width = input_ids.shape[1]
    hidden = llama.config.hidden_size
    activations = torch.full((2, hidden), SENTINEL)
    module = find_layer_modules(llama, 1, None)["mlp"]
    seen: list[set[tuple[int, int]]] = []
    with transplanted(llama, activations, last_real_positions(mask), 1, "ffn"):
        with hooked([_sentinel_spy(module, seen)]):  # registered after the patch: sees its output
            new = generate_transplanted(
                llama, input_ids, mask, None, None, max_new_tokens=3, use_cache=use_cache
            )
    assert new.shape[1] == 3 and len(seen) == 3
    # Left padding: every row's last real prompt token is the last prompt column.
    assert seen[0] == {(0, width - 1), (1, width - 1)}
    if use_cache:  # decoding steps compute only new columns: never patched
        assert seen[1:] == [set(), set()]
    else:  # each call recomputes the prompt: the same column is patched again, never a new one
        assert seen[1:] == [seen[0], seen[0]]

    # Right padding: the last real token is found from the mask, not taken as the last column.
    n_pad = int((mask[1] == 0).sum())
    right_ids = torch.stack([input_ids[0], torch.roll(input_ids[1], -n_pad)])
    right_mask = torch.stack([mask[0], torch.roll(mask[1], -n_pad)])
    positions = last_real_positions(right_mask)
    assert positions.tolist() == [width - 1, int(mask[1].sum()) - 1]
    seen.clear()
    with (
        transplanted(llama, activations, positions, 1, "ffn"),
        hooked([_sentinel_spy(module, seen)]),
    ):
        llama(input_ids=right_ids, attention_mask=right_mask)
    assert seen == [{(0, width - 1), (1, int(mask[1].sum()) - 1)}]
    assert _hook_count(llama) == 0


def _last_output(store: dict, key: str):
    """An output hook that keeps a copy of the last column of the module's main output."""

    def hook(_module, hidden):
        store[key] = hidden[0, -1].clone()

    return hook


def _last_input(store: dict, key: str):
    """A pre-hook that keeps a copy of the last column of the module's hidden-state input."""

    def hook(module, args, kwargs):
        hidden = hidden_states_of_call(module, args, kwargs)
        store[key] = hidden[0, -1].clone()

    return hook


def test_attn_transplants_the_attention_output_not_the_residual_stream(llama, tokenizer):
    """Regression for the reference code, which kept the attention output by reference; the block's
    in-place residual add then turned it into the whole residual stream."""
    donor_ids, donor_mask = encode_prompts(tokenizer, DONORS[:1])
    layer = find_layer_modules(llama, 2, None)
    post_attention = layer["layer"].post_attention_layernorm  # its input: residual + attention

    # 1. What we record is the attention block's output (o_proj), not residual + attention.
    seen: dict[str, torch.Tensor] = {}
    with hooked(
        [(layer["attn"].o_proj, _last_output(seen, "attn"))],
        [(post_attention, _last_input(seen, "residual"))],
    ):
        recorded = record_module_outputs(llama, donor_ids, donor_mask, [2], ["attn"])["attn"][0, 0]
    torch.testing.assert_close(recorded, seen["attn"])
    assert (recorded - seen["residual"]).abs().max() > 1e-3

    # 2. The record is a copy: mutating the module's output in place afterwards (as an in-place
    #    residual add does) leaves it untouched.
    stash: dict[str, torch.Tensor] = {}

    def keep_reference(_module, hidden):
        stash["out"] = hidden

    def add_in_place(_module, args, kwargs):
        stash["out"].add_(1000.0)

    with hooked([(layer["attn"], keep_reference)], [(post_attention, add_in_place)]):
        mutated = record_module_outputs(llama, donor_ids, donor_mask, [2], ["attn"])["attn"][0, 0]
    torch.testing.assert_close(mutated, recorded)

    # 3. In the patched recipient, the residual after attention is the recipient's own residual
    #    plus the donor's attention output.
    ids, mask = encode_prompts(tokenizer, RECIPIENTS[1:2])
    captured: dict[str, torch.Tensor] = {}
    pre = [
        (layer["layer"], _last_input(captured, "x")),
        (post_attention, _last_input(captured, "h")),
    ]
    with transplanted(llama, recorded.unsqueeze(0), last_real_positions(mask), 2, "attn"):
        with hooked([], pre):
            llama(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(captured["h"], captured["x"] + recorded, atol=1e-5, rtol=1e-5)


def test_hooks_removed_even_on_error(llama):
    with pytest.raises(RuntimeError, match="boom"):
        with transplanted(
            llama, torch.zeros(1, llama.config.hidden_size), torch.tensor([0]), 1, "attn"
        ):
            assert _hook_count(llama) == 2  # the patch and the call tracker
            raise RuntimeError("boom")
    assert _hook_count(llama) == 0


# --------------------------------------------------------------------------------------------------
# Bad input


def test_donor_and_recipient_lists_of_different_length(llama, tokenizer):
    with pytest.raises(ValueError, match="aligned item by item: got 2 donor and 3 recipient"):
        transplant_loglikelihoods(llama, tokenizer, DONORS[:2], RECIPIENTS, CONTINUATIONS, 0, 0)
    with pytest.raises(ValueError, match="aligned item by item"):
        transplant_generate(llama, tokenizer, DONORS, RECIPIENTS[:1], 0, 0)


def test_layer_out_of_range(llama, tokenizer):
    with pytest.raises(ValueError, match="out of range: the model has 4 decoder layers"):
        transplant_loglikelihoods(llama, tokenizer, DONORS, RECIPIENTS, CONTINUATIONS, 9, 0)
    with pytest.raises(ValueError, match="out of range"):
        grid_pairs("explicit", 4, sources=[0], targets=[4])


def test_unknown_granularity(llama, tokenizer):
    with pytest.raises(ValueError, match="unknown granularity 'mlp'; choose one of ffn, attn"):
        transplant_loglikelihoods(llama, tokenizer, DONORS, RECIPIENTS, CONTINUATIONS, 0, 0, "mlp")


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mixer = torch.nn.Linear(width, width)
        self.channel = torch.nn.Linear(width, width)

    def forward(self, hidden):
        hidden = hidden + self.mixer(hidden)
        return hidden + self.channel(hidden)


class _ToyDecoder(torch.nn.Module):
    """An architecture the name patterns do not know: blocks with ``mixer`` and ``channel`` parts."""

    def __init__(self, vocab: int = 50, width: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList([_Block(width) for _ in range(3)])

    def forward(self, input_ids, attention_mask=None, **_):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def test_module_discovery_failure_says_how_to_override():
    toy = _ToyDecoder()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ModuleDiscoveryError, match=r"ModuleNames\(layers=.*mlp=.*attn="):
        record_module_outputs(toy, ids, torch.ones_like(ids))
    names = ModuleNames(layers="blocks", mlp="channel", attn="mixer")
    recorded = record_module_outputs(toy, ids, torch.ones_like(ids), names=names)
    assert recorded["ffn"].shape == (1, 3, 8)
    with transplanted(toy, torch.zeros(1, 8), torch.tensor([2]), 1, "ffn", names=names):
        patched = toy(ids)
    assert not torch.allclose(patched, toy(ids))


# --------------------------------------------------------------------------------------------------
# Reading a grid


def test_grid_pairs_modes():
    assert grid_pairs("target-first", 3) == [(0, 0), (1, 0), (2, 0)]
    assert grid_pairs("overall", 2) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert grid_pairs("explicit", 24, sources=[-1, 3], targets=[0]) == [(3, 0), (23, 0)]
    assert grid_pairs("target-first", 24, sources=[5, 6]) == [(5, 0), (6, 0)]
    with pytest.raises(ValueError, match="unknown grid mode"):
        grid_pairs("diagonal", 3)
    with pytest.raises(ValueError, match="fixes the target layer at 0"):
        grid_pairs("target-first", 3, targets=[1])


def test_select_pair_breaks_ties_by_lowest_target_then_deepest_source():
    pairs = [(0, 1), (2, 1), (1, 0), (3, 0), (5, 2)]
    correct = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert pairs[select_pair(correct, pairs)] == (3, 0)
    correct[1, 0] = True  # now (0, 1) alone is best
    assert pairs[select_pair(correct, pairs)] == (0, 1)


def test_summarize_grid_hand_computed():
    # 4 items, answer 0 everywhere; option scores chosen so correctness is explicit.
    right, wrong = torch.tensor([0.0, -1.0]), torch.tensor([-1.0, 0.0])

    def table(rows):
        return torch.stack([torch.stack([right if c else wrong for c in row]) for row in rows])

    scores = GridScores(
        granularity="ffn",
        pairs=[(0, 0), (1, 0), (2, 0)],
        base=torch.stack([right, wrong, wrong, wrong]),
        transplant=table([[1, 0, 1], [0, 1, 1], [0, 0, 0], [0, 0, 1]]),
        control=table([[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]),
    )
    summary = summarize_grid(scores, torch.zeros(4, dtype=torch.long), dev_fraction=0.5, seed=0)
    assert summary["base_accuracy"] == 0.25
    assert summary["pair_accuracy"] == [0.25, 0.25, 0.75]
    assert summary["best_pair"] == [2, 0] and summary["best_pair_accuracy"] == 0.75
    assert summary["upper_bound"] == 0.75
    assert summary["control_upper_bound"] == 0.25
    assert summary["pair_correct"] == ["101", "011", "000", "001"]
    p_right = 1 / (1 + math.exp(-1))  # softmax([0, -1])[0]
    assert summary["base_answer_probability"] == pytest.approx((p_right + 3 * (1 - p_right)) / 4)
    assert summary["pair_answer_probability"][2] == pytest.approx((2 * p_right + 1) / 4, abs=1e-4)
    selection = summary["selection"]
    assert selection["dev_items"] + selection["heldout_items"] == 4
    lo, hi = summary["base_accuracy_ci"]
    assert lo < 0.25 < hi


def test_accuracy_and_split_and_wilson():
    scores = torch.tensor(
        [[[0.0, 1.0], [2.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]]
    )  # (2 items, 2 pairs, 2)
    assert accuracy(scores, torch.tensor([1, 0])).tolist() == [[True, False], [False, False]]
    dev, held = dev_heldout_split(10, 0.5, seed=1)
    assert len(dev) == 5 and set(dev.tolist()).isdisjoint(held.tolist())
    assert torch.equal(dev, dev_heldout_split(10, 0.5, seed=1)[0])
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)


def test_heatmap_and_selected_pairs_files(tmp_path):
    pairs = grid_pairs("overall", 3)
    plot_accuracy_heatmap([i / 9 for i in range(9)], pairs, tmp_path / "h.png", "test", 0.3)
    data = (tmp_path / "h.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    save_selected_pairs(
        tmp_path / "pairs.json", {"de": {"ffn": {"source_layer": 3, "target_layer": 0}}}
    )
    loaded = load_selected_pairs(tmp_path / "pairs.json")
    assert loaded["de"]["ffn"] == {"source_layer": 3, "target_layer": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "h.png",
        "pairs.json",
    ]  # no temp files left
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="not a lenssteer transplant pair file"):
        load_selected_pairs(tmp_path / "other.json")


# --------------------------------------------------------------------------------------------------
# A real bundled model


@pytest.fixture(scope="module")
def smollm2():
    from lenssteer.models import load_model

    return load_model("smollm2-135m-instruct")


def _mmlu_prompts(tokenizer, n: int = 3):
    from lenssteer.mmlu import (
        align_items,
        format_multiple_choice,
        load_mmlu_translated,
        sample_items,
    )

    en, de = align_items(load_mmlu_translated("en"), load_mmlu_translated("de"))
    en, de = sample_items(en, n, seed=1), sample_items(de, n, seed=1)
    donors = [format_multiple_choice(tokenizer, item) for item in en]
    recipients = [format_multiple_choice(tokenizer, item) for item in de]
    return (
        [d.text for d in donors],
        [r.text for r in recipients],
        [r.continuations for r in recipients],
    )


@pytest.mark.slow
@pytest.mark.ci
def test_real_model_fast_grid_equals_from_scratch(smollm2):
    tokenizer, model = smollm2
    donors, recipients, continuations = _mmlu_prompts(tokenizer)
    activations = record_donor_activations(model, tokenizer, donors)
    pairs = [(5, 0), (20, 0), (12, 12)]
    grid = transplant_grid(model, tokenizer, recipients, continuations, activations, pairs)
    for granularity in ("ffn", "attn"):
        for k, (s, t) in enumerate(pairs):
            slow = transplant_loglikelihoods(
                model, tokenizer, donors, recipients, continuations, s, t, granularity
            )
            torch.testing.assert_close(grid[granularity].transplant[:, k], slow, atol=2e-4, rtol=0)
    self_pair = transplant_loglikelihoods(
        model, tokenizer, recipients, recipients, continuations, 12, 12, "attn"
    )
    torch.testing.assert_close(self_pair, grid["ffn"].base, atol=2e-4, rtol=0)
    assert (grid["ffn"].transplant[:, 0] - grid["ffn"].base).abs().max() > 1e-3


@pytest.mark.slow
def test_real_model_batched_and_cache_equivalences(smollm2):
    tokenizer, model = smollm2
    donors, recipients, _ = _mmlu_prompts(tokenizer)
    batched = transplant_generate(
        model, tokenizer, donors, recipients, 8, 0, max_new_tokens=6, batch_size=3
    )
    single = [
        transplant_generate(model, tokenizer, [d], [r], 8, 0, max_new_tokens=6)[0]
        for d, r in zip(donors, recipients, strict=True)
    ]
    no_cache = transplant_generate(
        model, tokenizer, donors, recipients, 8, 0, max_new_tokens=6, use_cache=False
    )
    assert batched == single == no_cache


# --------------------------------------------------------------------------------------------------
# Command line, end to end on a tiny model saved as a local folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", vocab_size=len(tokenizer), n_layers=N_LAYERS).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_cli_transplant_grid_writes_json_heatmaps_and_summary(tiny_folder, tmp_path, capsys):
    from lenssteer.cli import main

    out = tmp_path / "grid"
    argv = ["transplant-grid", "--model", tiny_folder, "--recipient-lang", "de,fr"]
    argv += ["--mode", "explicit", "--sources", "0,3", "--targets", "0,1", "--limit", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "grid.json",
        "heatmap_de_ffn.png",
        "heatmap_fr_ffn.png",
        "scores_de_ffn.safetensors",
        "scores_fr_ffn.safetensors",
        "selected_pairs.json",
        "summary.md",
    ]
    result = json.loads((out / "grid.json").read_text())
    assert result["n_items"] == 4 and result["recipient_languages"] == ["de", "fr"]
    grid = result["languages"]["de"]["ffn"]
    assert grid["pairs"] == [[0, 0], [3, 0], [0, 1], [3, 1]]
    assert 0 <= grid["base_accuracy"] <= 1 and grid["best_pair_accuracy"] <= grid["upper_bound"]
    assert {"control_upper_bound", "best_pair", "selection"} <= set(grid)
    assert result["command"].startswith("lenssteer transplant-grid --model")
    summary = (out / "summary.md").read_text()
    assert "| de | ffn |" in summary and "random-donor bound" in summary
    assert load_selected_pairs(out / "selected_pairs.json")["fr"]["ffn"]["target_layer"] in (0, 1)
    # The items the pairs were chosen on are recorded, so a comparison can refuse to score them.
    chosen_on = load_selected_pairs(out / "selected_pairs.json")["dev_item_ids"]
    assert len(chosen_on) == 2 and set(chosen_on) <= set(result["item_ids"])
    raw = load_file(out / "scores_de_ffn.safetensors")
    assert raw["transplant"].shape == (4, 4, 4) and raw["control_donors"].shape == (4, 4)
    assert accuracy(raw["base"], raw["answers"]).float().mean() == grid["base_accuracy"]
    assert "upper bound" in capsys.readouterr().out


def test_cli_transplant_one_pair_with_generation(tiny_folder, tmp_path, capsys):
    from lenssteer.cli import main

    out = tmp_path / "one.json"
    argv = ["transplant", "--model", tiny_folder, "--granularity", "attn", "--source", "-1"]
    argv += ["--target", "0", "--limit", "3", "--generate", "2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["source_layer"] == N_LAYERS - 1 and result["n_items"] == 3
    assert len(result["generations"]) == 3
    assert "transplant accuracy" in capsys.readouterr().out
    assert main(["transplant", "--model", tiny_folder, "--source", "9", "--target", "0"]) == 2
    assert "out of range" in capsys.readouterr().err
