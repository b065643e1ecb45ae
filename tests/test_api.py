"""``import lenssteer as ls``: the public verbs, imported lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_public_names_resolve_to_the_stage_functions():
    import lenssteer as ls
    from lenssteer.adapter import SteeringAdapter
    from lenssteer.subspace import compute_subspace
    from lenssteer.train import train_lens

    assert ls.compute_subspace is compute_subspace
    assert ls.train_lens is train_lens
    assert ls.SteeringAdapter is SteeringAdapter
    for name in ls.__all__:
        assert getattr(ls, name) is not None
    assert set(ls.__all__) <= set(dir(ls))
    with pytest.raises(AttributeError, match="no attribute 'not_a_verb'"):
        ls.not_a_verb  # noqa: B018


def test_importing_the_package_does_not_load_torch():
    code = "import sys, lenssteer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.ci
def test_readme_python_route_probe_subspace_train_apply(tmp_path):
    """The README's Python route, end to end on the small bundled model: the subspace that
    compute_subspace makes from extract_corpus's states is one that training accepts."""
    import torch

    import lenssteer as ls
    from lenssteer.models import num_decoder_layers, resolve_layers

    tokenizer, model = ls.load_model("smollm2-135m-instruct")
    corpus = ls.load_corpus("bible", ["en", "de", "fr"]).sample(12, seed=0)
    layers = resolve_layers("top:2", num_decoder_layers(model))
    states = ls.extract_corpus(
        model, tokenizer, corpus, layers, chat_template=True, cache_dir=False, progress=False
    )
    subspace = ls.compute_subspace(states, layers, central_language="en")
    assert subspace.metadata["pooling"] == "last" and subspace.metadata["template"]
    subspace.save(tmp_path / "subspace")
    subspace = ls.Subspace.load(tmp_path / "subspace")
    config = ls.TrainConfig(kind="lora", max_steps=2, batch_size=4)
    adapter = ls.train_lens(
        model, tokenizer, subspace, corpus, tmp_path / "adapter", config=config, progress=False
    )
    ids = tokenizer("Guten Morgen", return_tensors="pt")
    with torch.no_grad():
        base = model(**ids).logits
        with adapter.apply(model):
            steered = model(**ids).logits
        after = model(**ids).logits
    assert not torch.allclose(base, steered)
    torch.testing.assert_close(after, base)
    loaded = ls.SteeringAdapter.from_pretrained(tmp_path / "adapter")
    with torch.no_grad(), loaded.apply(model):
        torch.testing.assert_close(model(**ids).logits, steered)
