"""Shared fixtures: tiny randomly initialised decoders of several architectures, and a real tokenizer.

Tiny models test mechanics (padding, batching, hooks, caching) in milliseconds; the real bundled
models test behaviour in tests marked ``slow``.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_ARCHS = ["llama", "qwen2", "gemma3", "mistral", "phi3", "gpt2"]


def make_tiny_model(arch: str, vocab_size: int = 49152, n_layers: int = 4, seed: int = 0):
    """A randomly initialised causal LM of the given architecture, small enough for unit tests."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=None)
    elif arch == "phi3":
        config = Phi3Config(**common, pad_token_id=0)
    elif arch == "gemma3":
        config = Gemma3TextConfig(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=n_layers, n_head=4, n_positions=256
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.name_or_path = f"tiny-{arch}"
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (has a chat template); its model folder is converted on first use."""
    from transformers import AutoTokenizer

    from lenssteer.models import bundled_model_folder

    tok = AutoTokenizer.from_pretrained(bundled_model_folder("smollm2-135m-instruct"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request, tokenizer):
    return make_tiny_model(request.param, vocab_size=len(tokenizer))
