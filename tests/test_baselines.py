"""Training-free subspace baselines: the hook math against the definition, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from lenssteer.baselines import SubspaceBaseline, remove_specific, subspace_steering
from lenssteer.hooks import hooked
from lenssteer.models import find_decoder_layers, model_identity
from lenssteer.subspace import SubspaceError, compute_subspace

VOCAB = 300
LANGUAGES = ["en", "de", "fr"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def subspace(model):
    generator = torch.Generator().manual_seed(0)
    # Clearly separated language means so that the specific subspace is well defined.
    states = {
        lang: torch.randn(12, 2, 32, generator=generator)
        + 3 * torch.randn(1, 2, 32, generator=generator)
        for lang in LANGUAGES
    }
    return compute_subspace(
        states,
        [2, 3],
        "en",
        diagnostics=False,
        metadata={"fingerprint": model_identity(model)["fingerprint"], "model": "tiny-llama"},
    )


IDS = torch.tensor([[5, 17, 42, 7, 99, 3], [8, 8, 120, 64, 2, 11]])


def _last_layer_output_and_logits(model, **steering):
    captured = {}
    last = find_decoder_layers(model)[-1]

    def keep(_module, hidden):
        captured["h"] = hidden.detach().clone()

    with torch.no_grad(), hooked([(last, keep)]):
        logits = model(input_ids=IDS).logits
    return captured["h"], logits


def test_remove_specific_at_last_layer_equals_projection_by_hand(model, subspace):
    hidden, base_logits = _last_layer_output_and_logits(model)
    basis = subspace.specific_basis[subspace.layer_position(3)].double()
    # By hand: h - B^T B h, then the model's own final norm and head.
    projected = hidden.double() - hidden.double() @ basis.T @ basis
    assert (projected.double() @ basis.T).abs().max() < 1e-9  # nothing left in the subspace
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(projected.float()))
        with subspace_steering(model, subspace, "remove-specific", layers="-1"):
            steered = model(input_ids=IDS).logits
    assert torch.allclose(steered, expected, atol=1e-4)
    assert not torch.allclose(steered, base_logits, atol=1e-3)
    # The hooks are gone after the block.
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, base_logits)


def test_remove_specific_agrees_with_subspace_method(subspace):
    hidden = torch.randn(2, 5, 32)
    basis = subspace.specific_basis[subspace.layer_position(2)]
    assert torch.allclose(
        remove_specific(hidden, basis), subspace.remove_specific(hidden, 2), atol=1e-6
    )
    half = remove_specific(hidden, basis, strength=0.5)
    assert torch.allclose(half, hidden - 0.5 * subspace.specific_component(hidden, 2), atol=1e-6)


def test_language_shift_adds_the_direction(model, subspace):
    hidden, _ = _last_layer_output_and_logits(model)
    direction = subspace.direction("de", 3)
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(hidden + 2.0 * direction))
        with subspace_steering(
            model, subspace, "language-shift", layers=[3], strength=2.0, language="de"
        ):
            steered = model(input_ids=IDS).logits
        with subspace_steering(model, subspace, "language-shift", layers=[3], language="en"):
            central = model(input_ids=IDS).logits  # the central direction is zero
        base = model(input_ids=IDS).logits
    assert torch.allclose(steered, expected, atol=1e-4)
    assert torch.allclose(central, base, atol=1e-5)


def test_subspace_of_another_model_is_refused(subspace):
    wider = make_tiny_model("llama", vocab_size=VOCAB)
    wider_config = wider.config
    wider_config.hidden_size = 64
    other = type(wider)(wider_config).eval()
    with pytest.raises(SubspaceError, match="hidden size 32.*has 64"):
        with subspace_steering(other, subspace):
            pass
    retrained = make_tiny_model("llama", vocab_size=VOCAB, seed=1)
    with pytest.raises(SubspaceError, match="fingerprint"):
        SubspaceBaseline(subspace).check(retrained)
    SubspaceBaseline(subspace).check(retrained, strict=False)  # explicitly allowed


def test_bad_layer_mode_or_language(model, subspace):
    with pytest.raises(SubspaceError, match="no layer 1"):
        with subspace_steering(model, subspace, layers=[1]):
            pass
    with pytest.raises(SubspaceError, match="'it' is not in the subspace"):
        with subspace_steering(model, subspace, "language-shift", language="it"):
            pass
    with pytest.raises(ValueError, match="needs the input's language"):
        with subspace_steering(model, subspace, "language-shift"):
            pass
    with pytest.raises(ValueError, match="unknown baseline mode"):
        SubspaceBaseline(subspace, mode="add-noise")


def test_from_folder_round_trip(model, subspace, tmp_path):
    subspace.save(tmp_path / "sub")
    baseline = SubspaceBaseline.from_folder(tmp_path / "sub", layers="top:1")
    baseline.check(model)
    assert baseline.describe()["layers"] == "top:1"
    with torch.no_grad(), baseline.steer(model) as steered:
        assert steered is model
        out = model(input_ids=IDS).logits
    assert torch.isfinite(out).all()


def test_final_norm_subspace_edits_what_the_head_reads(model, subspace):
    """A subspace probed after the final norm is applied to the final norm's output."""
    import copy

    from lenssteer.extract import RepresentationError

    normed = copy.copy(subspace)
    normed.metadata = {**subspace.metadata, "representation": "final_norm"}
    with torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
        final = out.hidden_states[-1].double()  # after the final norm
        basis = subspace.specific_basis[subspace.layer_position(3)].double()
        expected = model.lm_head((final - final @ basis.T @ basis).float())
        with subspace_steering(model, normed, "remove-specific", layers="-1"):
            steered = model(input_ids=IDS).logits
    torch.testing.assert_close(steered, expected, atol=1e-4, rtol=1e-4)
    assert SubspaceBaseline(normed, layers="-1").describe()["representation"] == "final_norm"
    with pytest.raises(RepresentationError, match="only at the last decoder layer"):
        with subspace_steering(model, normed, "remove-specific", layers=[2, 3]):
            pass
    with pytest.raises(RepresentationError, match="only at the last decoder layer"):
        SubspaceBaseline(normed, layers=[2, 3]).check(model)
