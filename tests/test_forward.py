"""lenssteer.forward finds a call's cache, hidden states and cache keyword by type and position."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn
from transformers import Cache, DynamicCache

from lenssteer.forward import (
    cache_in_call,
    cache_keyword,
    cache_of_output,
    contiguous_head_input,
    hidden_states_of_call,
    layers_passed_through,
    run_prefix,
)


class _Annotated(nn.Module):
    def forward(self, states: torch.Tensor, kv_store: Cache | None = None) -> torch.Tensor:
        return states


class _Unannotated(nn.Module):
    def forward(self, x, past_key_values=None):
        return x


class _NoCache(nn.Module):
    def forward(self, x):
        return x


def test_cache_keyword_follows_the_annotation_whatever_its_name():
    assert cache_keyword(_Annotated()) == "kv_store"
    assert cache_keyword(_Unannotated()) == "past_key_values"
    with pytest.raises(TypeError, match="takes no KV cache"):
        cache_keyword(_NoCache())


def test_cache_keyword_of_real_and_wrapped_models():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("llama", vocab_size=64)
    keyword = cache_keyword(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_keyword(wrapped) == keyword
    # the keyword really is the one the model takes: a cached step equals the uncached pass
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        prefill = model(input_ids=ids[:, :4], use_cache=True)
        step = model(input_ids=ids[:, 4:], use_cache=True, **{keyword: cache_of_output(prefill)})
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=0)


def test_cache_and_hidden_states_of_a_call():
    cache = DynamicCache()
    hidden = torch.zeros(1, 2, 4)
    layer = _Annotated()
    assert cache_in_call((hidden, None, cache), {}) is cache
    assert cache_in_call((hidden,), {"any_name": cache}) is cache
    assert cache_in_call((hidden,), {"mask": None}) is None
    assert hidden_states_of_call(layer, (hidden,), {}) is hidden
    assert hidden_states_of_call(layer, (), {"states": hidden, "kv_store": cache}) is hidden
    with pytest.raises(TypeError, match="without its first argument 'states'"):
        hidden_states_of_call(layer, (), {"kv_store": cache})
    with pytest.raises(TypeError, match="no KV cache"):
        cache_of_output({"logits": hidden})


def test_pooling_reads_real_positions_only():
    """Last = the last real token under left or right padding; mean counts a shared prefix."""
    from lenssteer.forward import pool_real_positions

    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    last_right = pool_real_positions(hidden, right, "last")
    last_left = pool_real_positions(hidden, left, "last")
    torch.testing.assert_close(last_right, torch.stack([hidden[0, 2], hidden[1, 3]]))
    torch.testing.assert_close(last_left, torch.stack([hidden[0, 3], hidden[1, 3]]))
    prefix = torch.randn(5, 3)  # five prefix tokens before every row
    mean = pool_real_positions(hidden, right, "mean", prefix.sum(0), 5)
    torch.testing.assert_close(mean[0], torch.cat([prefix, hidden[0, :3]]).mean(0))
    torch.testing.assert_close(mean[1], torch.cat([prefix, hidden[1]]).mean(0))
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool_real_positions(hidden, right, "max")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rows_continuing_a_prefix_equal_the_full_pass(arch):
    """A prefix run once, then right-padded rows on copies of its cache: the full pass's logits."""
    model = make_tiny_model(arch, vocab_size=64)
    prefix, tails = [5, 6, 7, 8], [[9, 10, 11], [12]]
    ids = torch.tensor([[9, 10, 11], [12, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    positions = torch.arange(3).expand(2, -1)
    with torch.no_grad():
        cached = run_prefix(model, input_ids=torch.tensor([prefix]))
        assert cached.length == len(prefix)
        for _ in range(2):  # the prefix's own cache is never changed
            logits = model(input_ids=ids, **cached.continuing(model, mask, positions)).logits
            for row, tail in enumerate(tails):
                full = model(input_ids=torch.tensor([prefix + tail])).logits[0, len(prefix) :]
                torch.testing.assert_close(logits[row, : len(tail)], full, atol=1e-5, rtol=1e-4)


def test_layers_passed_through_return_their_input_then_are_whole_again():
    layers = [_Annotated(), _Unannotated(), _Unannotated()]
    layers[1].forward = lambda x, past_key_values=None: 2 * x  # e.g. a wrapper set on the instance
    hidden = torch.ones(1, 2, 3)
    with layers_passed_through(layers, last=lambda h: h + 1):
        assert torch.equal(layers[0](states=hidden), hidden)  # found by its parameter's name
        assert torch.equal(layers[1](hidden), hidden)
        assert torch.equal(layers[2](hidden), hidden + 1)
    assert "forward" not in vars(layers[0]) and "forward" not in vars(layers[2])
    assert torch.equal(layers[1](hidden), 2 * hidden)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_lm_head_gets_a_contiguous_input_and_the_same_logits(arch):
    """Asked for the last k positions of a batch, a model slices its hidden states before the
    head: not contiguous. With frozen weights (PEFT, inference) torch then copies the whole head
    weight per call; contiguous_head_input copies the small input instead, logits unchanged."""
    model = make_tiny_model(arch).requires_grad_(False)
    ids = torch.randint(3, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    seen: list[bool] = []
    record = lambda _m, args: seen.append(args[0].is_contiguous())  # noqa: E731
    head = model.get_output_embeddings()
    with torch.no_grad():
        handle = head.register_forward_pre_hook(record)
        plain = model(input_ids=ids, logits_to_keep=2).logits
        handle.remove()
        with contiguous_head_input(model):
            handle = head.register_forward_pre_hook(record)  # runs after ours
            fixed = model(input_ids=ids, logits_to_keep=2).logits
            handle.remove()
        assert seen == [False, True]
        torch.testing.assert_close(fixed, plain, rtol=0, atol=1e-5)  # another kernel's rounding
        assert not head._forward_pre_hooks  # removed on the way out
        assert torch.equal(model(input_ids=ids, logits_to_keep=2).logits, plain)
