"""Extraction: pooling at real positions, batching and padding invariance, and the on-disk cache."""

from __future__ import annotations

import pytest
import torch

from lenssteer.extract import TemplateError, extract_states, format_texts, pooled_states

TEXTS = [
    "In the beginning God created the heavens and the earth.",
    "Au commencement, Dieu créa les cieux et la terre.",
    "Am Anfang schuf Gott die Himmel und die Erde.",
    "Hi",
    "В начале сотворил Бог небо и землю, и земля была безвидна и пуста.",
]
ARCHS_FOR_PADDING = ["llama", "qwen2", "gemma3", "mistral", "phi3", "gpt2"]


def _reference_states(model, tokenizer, text, layers, pooling):
    """One text alone, no padding, all hidden states from transformers itself."""
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
    # hidden_states[i + 1] is the output of decoder layer i, except the last, which is after the norm.
    per_layer = []
    for layer in layers:
        h = out.hidden_states[layer + 1][0]
        per_layer.append(h[-1] if pooling == "last" else h.mean(0))
    return torch.stack(per_layer)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_unbatched_reference(tiny_model, tokenizer, pooling, padding_side):
    tokenizer.padding_side = padding_side
    layers = [0, 2]  # not the last layer: transformers' last hidden state is after the final norm
    batched = extract_states(
        tiny_model,
        tokenizer,
        TEXTS,
        layers,
        pooling=pooling,
        batch_size=4,
        cache_dir=False,
        progress=False,
    )
    assert batched.shape == (len(TEXTS), 2, 32)
    for i, text in enumerate(TEXTS):
        expected = _reference_states(tiny_model, tokenizer, text, layers, pooling)
        torch.testing.assert_close(batched[i], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS_FOR_PADDING)
def test_left_and_right_padding_agree(arch, tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    results = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        results[side] = extract_states(
            model, tokenizer, TEXTS, [1, 3], batch_size=5, cache_dir=False, progress=False
        )
    torch.testing.assert_close(results["left"], results["right"], atol=1e-4, rtol=1e-4)


def test_last_pooling_never_reads_a_pad_position(tokenizer):
    """Regression: ``[:, -1]`` on a right-padded batch reads a pad token."""
    from conftest import make_tiny_model

    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    tokenizer.padding_side = "right"
    batch = tokenizer(
        ["a much longer sentence than the other one", "short"], return_tensors="pt", padding=True
    )
    states = pooled_states(model, batch["input_ids"], batch["attention_mask"], [1])
    alone = pooled_states(model, *tokenizer(["short"], return_tensors="pt").values(), [1])
    torch.testing.assert_close(states[1], alone[0], atol=1e-5, rtol=1e-5)


def test_chat_template_wraps_user_turn(tokenizer):
    (prompt,) = format_texts(tokenizer, ["Bonjour"], chat_template=True)
    assert "Bonjour" in prompt and prompt != "Bonjour"
    assert prompt.rstrip().endswith("assistant")  # the generation prompt is added


def test_missing_chat_template_is_a_clear_error(tokenizer):
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(TemplateError, match="no chat template"):
            format_texts(tokenizer, ["x"], chat_template=True)
    finally:
        tokenizer.chat_template = saved


def test_cache_hits_and_misses(tokenizer, tmp_path):
    from conftest import make_tiny_model

    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    kwargs = dict(layers=[1, 3], cache_dir=tmp_path, progress=False)
    first = extract_states(model, tokenizer, TEXTS, **kwargs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = extract_states(model, tokenizer, TEXTS, **kwargs)
    torch.testing.assert_close(first, again)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # served from the cache

    changed = TEXTS[:-1] + [TEXTS[-1] + "!"]
    extract_states(model, tokenizer, changed, **kwargs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # a changed text misses

    templated = extract_states(model, tokenizer, TEXTS, chat_template=True, **kwargs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # a changed template misses
    assert not torch.allclose(templated, first)

    other_pooling = extract_states(model, tokenizer, TEXTS, pooling="mean", **kwargs)
    assert not torch.allclose(other_pooling, first)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4

    with torch.no_grad():  # changed weights (same id) miss too: the fingerprint is in the key
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    extract_states(model, tokenizer, TEXTS, **kwargs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 5


def test_bad_inputs(tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="pooling"):
        extract_states(model, tokenizer, TEXTS, [0], pooling="max", cache_dir=False)
    with pytest.raises(ValueError, match="0..3"):
        extract_states(model, tokenizer, TEXTS, [4], cache_dir=False)
    with pytest.raises(ValueError, match="text #2 is empty"):
        extract_states(model, tokenizer, ["ok", "  "], [0], cache_dir=False)


def test_common_prefix_length_leaves_each_sequence_a_token():
    from lenssteer.forward import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical: one token each remains
    assert common_prefix_length([[7, 8]]) == 1
    assert common_prefix_length([[1, 2], [3, 4]]) == 0
    assert common_prefix_length([]) == 0


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("arch", ARCHS_FOR_PADDING)
def test_shared_prefix_gives_the_same_states(arch, pooling, tokenizer):
    """The chat template's common prefix runs once; the vectors equal a full pass per batch."""
    from conftest import make_tiny_model

    from lenssteer.forward import common_prefix_length

    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    prompts = format_texts(tokenizer, TEXTS, chat_template=True)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    assert common_prefix_length(encoded) > 16  # longer than gemma3's tiny sliding window
    kwargs = dict(pooling=pooling, chat_template=True, batch_size=2, cache_dir=False)
    shared = extract_states(model, tokenizer, TEXTS, [1, 3], progress=False, **kwargs)
    full = extract_states(
        model, tokenizer, TEXTS, [1, 3], progress=False, share_prefix=False, **kwargs
    )
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    # and a text alone (its prefix is then all but its last token) agrees with the batch
    alone = extract_states(model, tokenizer, TEXTS[3:4], [1, 3], progress=False, **kwargs)
    torch.testing.assert_close(alone[0], full[3], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Representation point: the last layer's output after the final norm


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3", "gpt2"])
def test_final_norm_equals_the_last_hidden_state(
    arch, padding_side, pooling, share_prefix, tokenizer
):
    """``final_norm`` at the last layer is ``output_hidden_states[-1]`` (what Lens reads)."""
    from conftest import make_tiny_model

    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    tokenizer.padding_side = padding_side
    states = extract_states(
        model,
        tokenizer,
        TEXTS,
        [3],
        pooling=pooling,
        chat_template=True,
        batch_size=3,
        cache_dir=False,
        progress=False,
        share_prefix=share_prefix,
        representation="final_norm",
    )
    residual = extract_states(
        model,
        tokenizer,
        TEXTS,
        [3],
        pooling=pooling,
        chat_template=True,
        cache_dir=False,
        progress=False,
    )
    assert not torch.allclose(states, residual, atol=1e-3)  # the norm really changes the vector
    for i, prompt in enumerate(format_texts(tokenizer, TEXTS, chat_template=True)):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            last = model(**ids, output_hidden_states=True).hidden_states[-1][0]
        expected = last[-1] if pooling == "last" else last.mean(0)
        torch.testing.assert_close(states[i, 0], expected, atol=1e-4, rtol=1e-4)


def test_final_norm_only_at_the_last_layer(tokenizer, tmp_path):
    from conftest import make_tiny_model

    from lenssteer.extract import RepresentationError

    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(RepresentationError, match="only at the last decoder layer \\(3\\)"):
        extract_states(
            model, tokenizer, TEXTS, [2, 3], cache_dir=False, representation="final_norm"
        )
    with pytest.raises(RepresentationError, match="unknown representation"):
        extract_states(model, tokenizer, TEXTS, [3], cache_dir=False, representation="logits")
    # the cache keeps the two points apart
    kwargs = dict(cache_dir=tmp_path, progress=False)
    residual = extract_states(model, tokenizer, TEXTS, [3], **kwargs)
    normed = extract_states(model, tokenizer, TEXTS, [3], representation="final_norm", **kwargs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.allclose(residual, normed)
