"""Steering adapters: folder round trip, apply/remove/merge, PEFT compatibility, and bad input."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from test_train import make_subspace, quick_config, tiny_corpus

from lenssteer.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, SteeringAdapter
from lenssteer.train import train_lens

KINDS = ["lora", "layers"]


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """One trained adapter of each kind on a tiny Qwen2 model (top 2 of 4 layers)."""
    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    corpus = tiny_corpus()
    subspace = make_subspace(model, tokenizer, corpus, [2, 3])
    folder = tmp_path_factory.mktemp("adapters")
    adapters = {}
    for kind in KINDS:
        adapters[kind] = train_lens(
            model,
            tokenizer,
            subspace,
            corpus,
            folder / kind,
            quick_config(kind=kind, batch_size=4, num_epochs=2.0, learning_rate=3e-2),
            progress=False,
        )
    return model, adapters, folder


@pytest.fixture
def inputs(tokenizer):
    batch = tokenizer(
        ["le chat dort", "the dog runs fast today"], return_tensors="pt", padding=True
    )
    return dict(batch)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def fresh(model):
    """An independent copy of the base model (same weights, same identity)."""
    return copy.deepcopy(model)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_gives_identical_logits(trained, inputs, kind):
    model, adapters, folder = trained
    assert sorted(p.name for p in (folder / kind).iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = SteeringAdapter.from_pretrained(folder / kind)
    assert set(loaded.weights) == set(adapters[kind].weights)
    for name, tensor in adapters[kind].weights.items():
        assert torch.equal(loaded.weights[name], tensor)
    a, b = fresh(model), fresh(model)
    with adapters[kind].apply(a) as steered_a, loaded.apply(b) as steered_b:
        assert torch.equal(logits(steered_a, inputs), logits(steered_b, inputs))
        assert not torch.allclose(logits(steered_a, inputs), logits(model, inputs))


@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_the_base_model(trained, inputs, kind):
    model, adapters, _ = trained
    base = fresh(model)
    base.lm_head.requires_grad_(False)  # a user's own choice of frozen parameters
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    keys = set(base.state_dict())
    expected = logits(base, inputs)
    applied = adapters[kind].apply(base)
    assert not torch.allclose(logits(base, inputs), expected)  # steered in place
    assert applied.remove() is base
    assert set(base.state_dict()) == keys
    assert torch.equal(logits(base, inputs), expected)
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags  # PEFT froze all
    adapters[kind].apply(base).remove()  # may be applied again after removal


@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_applied(trained, inputs, kind):
    model, adapters, _ = trained
    with adapters[kind].apply(fresh(model)) as steered:
        expected = logits(steered, inputs)
    merged = adapters[kind].merge(fresh(model))
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=1e-4)
    assert merged.lenssteer_identity["fingerprint"] != model_fingerprint(model)
    with pytest.raises(AdapterError, match="fingerprint"):  # merged weights are not the base
        adapters[kind].apply(merged)


def model_fingerprint(model) -> str:
    from lenssteer.models import model_identity

    return model_identity(model)["fingerprint"]


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_trained_layers_differ_from_the_base(trained, kind):
    model, adapters, _ = trained
    merged = adapters[kind].merge(fresh(model))
    base_state, merged_state = model.state_dict(), merged.state_dict()
    assert set(base_state) == set(merged_state)
    changed = [k for k in base_state if not torch.equal(base_state[k], merged_state[k])]
    assert changed
    assert all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in changed), changed


def test_lora_folder_is_a_peft_adapter(trained, inputs):
    from peft import PeftModel

    model, adapters, folder = trained
    with adapters["lora"].apply(fresh(model)) as steered:
        expected = logits(steered, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes the extra 'lenssteer' key
        peft_model = PeftModel.from_pretrained(fresh(model), folder / "lora")
    torch.testing.assert_close(logits(peft_model, inputs), expected, atol=1e-6, rtol=1e-5)


def test_config_is_sorted_json_with_everything_recorded(trained):
    _, adapters, folder = trained
    text = (folder / "layers" / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    ours = data["lenssteer"]
    for key in (
        "format_version",
        "lenssteer_version",
        "kind",
        "base_model",
        "trained_layers",
        "loss_layers",
        "languages",
        "central_language",
        "hyperparameters",
        "representation",
        "subspace",
        "data_hash",
        "weights_sha256",
    ):
        assert key in ours, key
    assert set(ours["base_model"]) >= {
        "model",
        "revision",
        "fingerprint",
        "hidden_size",
        "num_layers",
    }
    assert ours["trained_layers"] == [2, 3] and ours["languages"] == ["en", "fr", "de"]
    assert {"pull_weight", "push_weight", "retain_weight", "alpha", "learning_rate"} <= set(
        ours["hyperparameters"]
    )
    lora = json.loads((folder / "lora" / CONFIG_NAME).read_text())
    assert lora["peft_type"] == "LORA" and lora["base_model_name_or_path"] == "tiny-qwen2"


def test_no_pickle_anywhere():
    """Lens fault: subspaces and directions were pickles. Our artifacts and loaders never are."""
    root = Path(__file__).resolve().parent.parent / "lenssteer"
    for name in ("adapter.py", "train.py", "objectives.py"):
        source = (root / name).read_text()
        assert "torch.load(" not in source and "import pickle" not in source, name


# --------------------------------------------------------------------------------------------------
# Bad input


def test_adapter_for_another_model_hidden_size(trained, tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    _, adapters, _ = trained
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    other = AutoModelForCausalLM.from_config(config)
    with pytest.raises(AdapterError, match="hidden size 32"):
        adapters["lora"].apply(other)


def test_adapter_for_another_model_layer_count(trained, tokenizer):
    _, adapters, _ = trained
    other = make_tiny_model("qwen2", vocab_size=len(tokenizer), n_layers=6)
    with pytest.raises(AdapterError, match="4 decoder layers"):
        adapters["layers"].apply(other)


def test_adapter_for_another_checkpoint(trained, tokenizer, inputs):
    _, adapters, _ = trained
    other = make_tiny_model("qwen2", vocab_size=len(tokenizer), seed=7)
    for kind in KINDS:
        with pytest.raises(AdapterError, match="fingerprint"):
            adapters[kind].apply(other)
    with pytest.warns(UserWarning, match="fingerprint"):
        applied = adapters["layers"].apply(other, strict=False)
    applied.remove()


def test_applying_twice_is_an_error(trained):
    model, adapters, _ = trained
    base = fresh(model)
    with adapters["layers"].apply(base):
        with pytest.raises(AdapterError, match="already has a steering adapter"):
            adapters["lora"].apply(base)


def _copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_weights_file(trained, tmp_path, kind):
    _, _, folder = trained
    copy_ = _copy_folder(folder / kind, tmp_path / "a")
    weights = copy_ / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AdapterError, match="corrupted or truncated"):
        SteeringAdapter.from_pretrained(copy_)
    # without the recorded checksum, safetensors itself notices the truncation
    config = json.loads((copy_ / CONFIG_NAME).read_text())
    config["lenssteer"]["weights_sha256"] = None
    (copy_ / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="corrupted or truncated"):
        SteeringAdapter.from_pretrained(copy_)


def test_corrupted_weights_file(trained, tmp_path):
    _, _, folder = trained
    copy_ = _copy_folder(folder / "layers", tmp_path / "a")
    weights = copy_ / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside a tensor: safetensors alone would not notice
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="corrupted"):
        SteeringAdapter.from_pretrained(copy_)


def test_missing_and_unknown_config_keys(trained, tmp_path):
    _, _, folder = trained
    copy_ = _copy_folder(folder / "layers", tmp_path / "a")
    config = json.loads((copy_ / CONFIG_NAME).read_text())
    config["lenssteer"]["from_the_future"] = 1
    (copy_ / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="from_the_future"):
        SteeringAdapter.from_pretrained(copy_)
    del config["lenssteer"]["trained_layers"], config["lenssteer"]["languages"]
    (copy_ / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="lacks trained_layers, languages"):
        SteeringAdapter.from_pretrained(copy_)


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        SteeringAdapter.from_pretrained(tmp_path / "nowhere")
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA"}')
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(AdapterError, match="not a lenssteer adapter"):
        SteeringAdapter.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        SteeringAdapter.from_pretrained(tmp_path)


def _shipped(folder: str, model_name: str):
    """A shipped adapter with its model, after the checks every shipped adapter must pass: it fits
    the bundled model, names a shipped subspace (final norm) that fits it, and records its training
    items and the dev items it was chosen on, disjoint."""
    from pathlib import Path

    from lenssteer.models import load_model
    from lenssteer.subspace import Subspace

    root = Path(__file__).resolve().parent.parent
    adapter = SteeringAdapter.from_pretrained(root / "checkpoints" / folder)
    tokenizer, model = load_model(model_name)
    adapter.check_base_model(model)
    subspace = Subspace.load(root / adapter.config.subspace["path"])
    subspace.check_fits(model)
    assert subspace.metadata["representation"] == "final_norm"
    assert len(adapter.config.training_items) == 300 and adapter.config.selection_items
    assert not set(adapter.config.training_items) & set(adapter.config.selection_items)
    return adapter, tokenizer, model


@pytest.mark.slow
@pytest.mark.ci
def test_the_shipped_smollm2_adapter_fits_its_model_and_subspace(tmp_path):
    """checkpoints/smollm2-135m-instruct-lens (made by recipes/lens_smollm2.sh): the shipped
    checks, the setting chosen on dev items, top layers only while applied, and save -> load with
    identical outputs."""
    adapter, tokenizer, model = _shipped("smollm2-135m-instruct-lens", "smollm2-135m-instruct")
    assert adapter.config.hyperparameters["pull_weight"] == 0.0  # the setting chosen on dev items
    ids = tokenizer("Erkläre kurz, warum der Himmel blau ist.", return_tensors="pt")
    with torch.no_grad():
        base = model(**ids).logits
        with adapter.apply(model):
            steered = model(**ids).logits
        again = model(**ids).logits
    assert not torch.equal(base, steered) and torch.equal(base, again)
    adapter.save_pretrained(tmp_path / "copy")
    with torch.no_grad(), SteeringAdapter.from_pretrained(tmp_path / "copy").apply(model):
        assert torch.equal(model(**ids).logits, steered)


@pytest.mark.slow
@pytest.mark.ci
def test_the_shipped_default_model_adapter_fits_its_model_and_subspace():
    """checkpoints/qwen2.5-coder-0.5b-instruct-lens (made by recipes/lens_qwen0.5b.sh): the shipped
    checks and the setting shipped (alpha 0.1, LoRA rank 4, no pull, scale-free units)."""
    adapter, _, _ = _shipped("qwen2.5-coder-0.5b-instruct-lens", "qwen2.5-coder-0.5b-instruct")
    hyper = adapter.config.hyperparameters
    assert (hyper["alpha"], hyper["lora_rank"], hyper["pull_weight"], hyper["normalization"]) == (
        0.1,
        4,
        0.0,
        "scale_free",
    )
