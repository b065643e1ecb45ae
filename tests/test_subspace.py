"""The subspace decomposition's defining properties, its diagnostics, and its folder format."""

from __future__ import annotations

import json

import pytest
import torch

from lenssteer.subspace import Subspace, SubspaceError, compute_subspace, decompose_means

LANGUAGES = ["en", "fr", "de", "ru", "ar"]


def synthetic_states(n_items=60, hidden=24, n_layers=2, seed=0, language_scale=3.0):
    """Shared item content plus a per-language offset: a subspace split that is real."""
    generator = torch.Generator().manual_seed(seed)
    content = torch.randn(n_items, n_layers, hidden, generator=generator)
    states = {}
    for language in LANGUAGES:
        offset = language_scale * torch.randn(n_layers, hidden, generator=generator)
        noise = 0.3 * torch.randn(n_items, n_layers, hidden, generator=generator)
        states[language] = content + offset + noise + 5.0  # a large shared component too
    return states


def test_full_rank_defining_properties():
    states = synthetic_states()
    subspace = compute_subspace(states, [10, 11], "en", diagnostics=False)
    assert subspace.rank == len(LANGUAGES) - 1
    for position, layer in enumerate(subspace.layers):
        basis = subspace.specific_basis[position].double()
        agnostic = subspace.agnostic[position].double()
        means = subspace.means[position].double()
        # orthonormal rows
        torch.testing.assert_close(
            basis @ basis.T, torch.eye(subspace.rank, dtype=torch.float64), atol=1e-5, rtol=0
        )
        # agnostic is orthogonal to the specific basis
        assert (basis @ agnostic).abs().max() < 1e-4 * agnostic.norm()
        # every language mean has the same inner product with agnostic (= |agnostic|^2)
        products = means @ agnostic
        torch.testing.assert_close(
            products, torch.full_like(products, agnostic.norm() ** 2), rtol=1e-4, atol=1e-3
        )
        # directions are mean differences projected on the specific subspace; zero for central
        projector = basis.T @ basis
        expected = (means - means[0]) @ projector
        torch.testing.assert_close(
            subspace.directions[position].double(), expected, atol=1e-4, rtol=1e-4
        )
        assert subspace.direction("en", layer).abs().max() == 0
        # with r = K-1 the specific subspace spans every difference of means exactly
        torch.testing.assert_close(expected, means - means[0], atol=1e-3, rtol=1e-4)


def test_means_are_the_language_means():
    states = synthetic_states()
    subspace = compute_subspace(states, [0, 1], "en", diagnostics=False)
    for k, language in enumerate(LANGUAGES):
        torch.testing.assert_close(
            subspace.means[:, k], states[language].mean(0), atol=1e-5, rtol=1e-5
        )


def test_lower_rank_keeps_top_singular_directions():
    states = synthetic_states()
    full = compute_subspace(states, [0, 1], "en", diagnostics=False)
    low = compute_subspace(states, [0, 1], "en", rank=2, diagnostics=False)
    assert low.specific_basis.shape == (2, 2, 24)
    # the rank-2 basis is the first two rows of the full basis (up to sign)
    overlap = (low.specific_basis[0] @ full.specific_basis[0].T).abs()
    torch.testing.assert_close(overlap[:, :2], torch.eye(2), atol=1e-4, rtol=0)
    assert (low.specific_basis[0] @ low.agnostic[0]).abs().max() < 1e-3


def test_projection_helpers_agree_with_definitions():
    subspace = compute_subspace(synthetic_states(), [3, 7], "en", diagnostics=False)
    hidden = torch.randn(5, 24)
    specific = subspace.specific_component(hidden, 7)
    torch.testing.assert_close(specific + subspace.remove_specific(hidden, 7), hidden)
    torch.testing.assert_close(
        subspace.specific_coordinates(specific, 7),
        subspace.specific_coordinates(hidden, 7),
        atol=1e-5,
        rtol=1e-5,
    )
    assert (subspace.remove_specific(hidden, 7) @ subspace.specific_basis[1].T).abs().max() < 1e-4


def test_decompose_means_in_float64_is_stable_for_large_offsets():
    means = torch.randn(4, 16, dtype=torch.float64) + 1e4
    parts = decompose_means(means, 0, 3)
    assert parts["specific_basis"].dtype == torch.float64
    products = means @ parts["agnostic"]
    assert (products - products[0]).abs().max() / products.abs().max() < 1e-9


def test_diagnostics_see_a_real_split():
    subspace = compute_subspace(synthetic_states(), [0, 1], "en")
    for report in subspace.metadata["diagnostics"]:
        assert report["language_id_accuracy"] > 0.95
        assert set(report["retrieval_before"]) == {"fr", "de", "ru", "ar"}
        assert report["retrieval_after_mean"] >= report["retrieval_before_mean"]
        assert report["n_heldout_items"] == 18
        assert 0.99 <= sum(report["explained_variance"]) <= 1.0 + 1e-9


def test_diagnostics_on_language_free_states_are_at_chance():
    states = synthetic_states(language_scale=0.0)  # only noise separates the languages
    subspace = compute_subspace(states, [0, 1], "en")
    assert subspace.metadata["diagnostics"][0]["language_id_accuracy"] < 0.6


def test_save_load_round_trip(tmp_path):
    subspace = compute_subspace(
        synthetic_states(), [10, 11], "en", metadata={"model": "tiny", "pooling": "last"}
    )
    subspace.save(tmp_path / "sub")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "subspace.json",
        "subspace.safetensors",
    ]
    header = json.loads((tmp_path / "sub" / "subspace.json").read_text())
    assert header["format_version"] == 1 and header["rank"] == 4 and header["layers"] == [10, 11]
    loaded = Subspace.load(tmp_path / "sub")
    for name in ("means", "agnostic", "specific_basis", "directions"):
        torch.testing.assert_close(getattr(loaded, name), getattr(subspace, name))
    assert loaded.languages == LANGUAGES and loaded.central_language == "en"
    assert loaded.metadata["model"] == "tiny"
    assert loaded.metadata["diagnostics"] == subspace.metadata["diagnostics"]


def test_rank_too_large_is_an_error():
    with pytest.raises(SubspaceError, match="rank 5 is invalid for 5 languages"):
        compute_subspace(synthetic_states(), [0, 1], "en", rank=5)


def test_missing_central_language_is_an_error():
    with pytest.raises(SubspaceError, match="central language 'sw'"):
        compute_subspace(synthetic_states(), [0, 1], "sw")


def test_unknown_layer_and_language_are_errors():
    subspace = compute_subspace(synthetic_states(), [0, 1], "en", diagnostics=False)
    with pytest.raises(SubspaceError, match="no layer 5"):
        subspace.direction("fr", 5)
    with pytest.raises(SubspaceError, match="'sw' is not in the subspace"):
        subspace.direction("sw", 0)


def test_truncated_weights_file_is_a_clear_error(tmp_path):
    compute_subspace(synthetic_states(), [0, 1], "en", diagnostics=False).save(tmp_path / "s")
    tensor_file = tmp_path / "s" / "subspace.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:100])
    with pytest.raises(SubspaceError, match="corrupted or truncated"):
        Subspace.load(tmp_path / "s")


def test_interrupted_save_leaves_the_old_folder(tmp_path, monkeypatch):
    first = compute_subspace(synthetic_states(seed=1), [0, 1], "en", diagnostics=False)
    first.save(tmp_path / "s")
    second = compute_subspace(synthetic_states(seed=2), [0, 1], "en", diagnostics=False)

    import lenssteer.subspace as module

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        second.save(tmp_path / "s")
    torch.testing.assert_close(Subspace.load(tmp_path / "s").means, first.means)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no scratch folder left behind
