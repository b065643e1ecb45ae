"""Split a layer's representation space into a language-agnostic and a language-specific part.

For each layer, from the K language means ``m_1..m_K`` (the LSAR / Lens low-rank decomposition):

* centre the means on their average ``m̄`` and take the top-``r`` right singular vectors of the
  centred ``(K, hidden)`` matrix: the rows of ``specific_basis`` ``B`` (``r`` orthonormal directions,
  ``r <= K - 1``; with ``r = K - 1`` they span every difference of means);
* ``agnostic = (I - BᵀB) m̄``: the minimum-norm point of the affine hull ``m̄ + span(B)``, a direction
  every language shares (with ``r = K - 1`` each mean has the same inner product with it);
* ``directions[k] = BᵀB (m_k - m_central)``: where language ``k`` sits relative to the central one,
  inside the specific subspace (a zero row for the central language).

The SVD runs in float64; tensors are stored in float32. Diagnostics tell whether the split is real:
language identification from the specific coordinates alone (held-out items), and central -> target
nearest-neighbour retrieval before and after projecting the specific subspace out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lenssteer.io import atomic_directory, atomic_save_tensors, atomic_write_json, file_sha256

FORMAT_VERSION = 1
TENSORS = ("means", "agnostic", "specific_basis", "directions")


class SubspaceError(ValueError):
    """Bad input to the decomposition, or a subspace folder that cannot be used."""


@dataclass
class Subspace:
    """Per-layer language subspaces of one model (see the module docstring for the definitions).

    Tensors: ``means (L, K, H)``, ``agnostic (L, H)``, ``specific_basis (L, r, H)``,
    ``directions (L, K, H)``; ``L = len(layers)`` (absolute layer indices), ``K = len(languages)``.
    """

    means: torch.Tensor
    agnostic: torch.Tensor
    specific_basis: torch.Tensor
    directions: torch.Tensor
    layers: list[int]
    languages: list[str]
    central_language: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.specific_basis.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.means.shape[-1]

    def check_fits(
        self, model: torch.nn.Module, strict: bool = True, source: str | None = None
    ) -> None:
        """Raise :class:`SubspaceError` unless this subspace can steer ``model``: finite values, the
        model's hidden size and layer count, and (``strict``) the weights it was probed on.

        The one check that training, the baselines and compare share.
        """
        from lenssteer.models import find_decoder_layers, model_identity

        source = source or str(self.metadata.get("path", "(in memory)"))
        for name in ("means", "agnostic", "specific_basis", "directions"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise SubspaceError(f"subspace {source}: its {name} hold NaN or infinite values")
        identity = model_identity(model)
        config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        hidden = int(config.hidden_size)
        made_for = self.metadata.get("model", "unknown")
        if self.hidden_size != hidden:
            raise SubspaceError(
                f"subspace {source} has hidden size {self.hidden_size}, the model "
                f"{identity['model']} has {hidden}: it was made for another model ({made_for})"
            )
        n_layers = len(find_decoder_layers(model))
        expected_layers = self.metadata.get("num_layers")
        if expected_layers and expected_layers != n_layers:
            raise SubspaceError(
                f"subspace {source} was made for a model with {expected_layers} layers; this one "
                f"has {n_layers}"
            )
        expected = self.metadata.get("fingerprint")
        if strict and expected and expected != identity["fingerprint"]:
            raise SubspaceError(
                f"subspace {source} was made for model {made_for!r} (weights fingerprint "
                f"{expected}), not for this one ({identity['model']!r}, fingerprint "
                f"{identity['fingerprint']}): probe this model first (Python: strict=False uses "
                "it anyway)"
            )

    def layer_position(self, layer: int) -> int:
        """Row of absolute decoder layer ``layer`` in the tensors."""
        if layer not in self.layers:
            raise SubspaceError(f"the subspace has no layer {layer}; it has layers {self.layers}")
        return self.layers.index(layer)

    def language_position(self, language: str) -> int:
        if language not in self.languages:
            raise SubspaceError(
                f"language {language!r} is not in the subspace; it has {', '.join(self.languages)}"
            )
        return self.languages.index(language)

    def _basis(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        return self.specific_basis[self.layer_position(layer)].to(like.device, like.dtype)

    def specific_coordinates(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Coordinates in the specific subspace: ``(..., H) -> (..., r)``."""
        return hidden @ self._basis(layer, hidden).T

    def specific_component(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """The part of ``hidden`` inside the specific subspace: ``(..., H) -> (..., H)``."""
        basis = self._basis(layer, hidden)
        return (hidden @ basis.T) @ basis

    def remove_specific(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """``hidden`` with its specific component projected out: the language-agnostic part."""
        return hidden - self.specific_component(hidden, layer)

    def direction(self, language: str, layer: int) -> torch.Tensor:
        """Language direction ``(H,)`` of ``language`` at ``layer`` (zero for the central one)."""
        return self.directions[self.layer_position(layer), self.language_position(language)]

    def to(self, *args, **kwargs) -> Subspace:
        """A copy with tensors moved/cast like ``torch.Tensor.to``."""
        return Subspace(
            **{name: getattr(self, name).to(*args, **kwargs) for name in TENSORS},
            layers=list(self.layers),
            languages=list(self.languages),
            central_language=self.central_language,
            metadata=dict(self.metadata),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``subspace.safetensors`` + ``subspace.json`` into folder ``path`` (atomically).

        The JSON records the sha256 of the tensor file (checked on load). NaN/infinite tensors, and
        a file or non-empty folder at ``path`` that is not a subspace, are refused.
        """
        for name in TENSORS:
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise SubspaceError(f"subspace tensor {name} holds NaN or infinite values")
        header = {
            "format_version": FORMAT_VERSION,
            "layers": self.layers,
            "languages": self.languages,
            "central_language": self.central_language,
            "rank": self.rank,
            "hidden_size": self.hidden_size,
            **self.metadata,
        }
        with atomic_directory(path, marker="subspace.json", what="subspace") as scratch:
            atomic_save_tensors(
                {name: getattr(self, name).float() for name in TENSORS},
                scratch / "subspace.safetensors",
                metadata={"format": "lenssteer-subspace", "format_version": str(FORMAT_VERSION)},
            )
            header["tensors_sha256"] = file_sha256(scratch / "subspace.safetensors")
            atomic_write_json(scratch / "subspace.json", header)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        """Read a folder written by :meth:`save`, checking that its parts agree."""
        folder = Path(path)
        json_path, tensor_path = folder / "subspace.json", folder / "subspace.safetensors"
        for needed in (json_path, tensor_path):
            if not needed.is_file():
                raise SubspaceError(f"{folder} is not a subspace folder: {needed.name} is missing")
        try:
            header = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SubspaceError(f"{json_path} is not valid JSON: {error}") from error
        if not isinstance(header, dict):
            raise SubspaceError(f"{json_path} does not hold a JSON object")
        missing = [
            k
            for k in ("format_version", "layers", "languages", "central_language")
            if k not in header
        ]
        if missing:
            raise SubspaceError(f"{json_path} lacks {', '.join(missing)}")
        _check_header_types(header, json_path)
        if header["format_version"] > FORMAT_VERSION:
            raise SubspaceError(
                f"{json_path} has format_version {header['format_version']}; this lenssteer reads "
                f"up to {FORMAT_VERSION}: upgrade lenssteer"
            )
        recorded = header.get("tensors_sha256")
        if recorded is not None:  # subspaces saved before the checksum existed have none
            actual = file_sha256(tensor_path)
            if actual != recorded:
                raise SubspaceError(
                    f"{tensor_path} is corrupted or truncated (or was changed): sha256 {actual[:16]}..., "
                    f"{json_path.name} records {str(recorded)[:16]}..."
                )
        try:
            tensors = load_file(tensor_path)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise SubspaceError(f"{tensor_path} is corrupted or truncated: {error}") from error
        absent = [name for name in TENSORS if name not in tensors]
        if absent:
            raise SubspaceError(f"{tensor_path} lacks tensors {', '.join(absent)}")
        for name in TENSORS:
            tensor = tensors[name]
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise SubspaceError(f"{tensor_path}: tensor {name} holds NaN or infinite values")
        n_layers, n_languages = len(header["layers"]), len(header["languages"])
        if tensors["means"].shape[:2] != (n_layers, n_languages):
            raise SubspaceError(
                f"{folder}: tensors have shape {tuple(tensors['means'].shape)} but the JSON names "
                f"{n_layers} layers and {n_languages} languages"
            )
        metadata = {
            k: v
            for k, v in header.items()
            if k
            not in (
                "format_version",
                "layers",
                "languages",
                "central_language",
                "rank",
                "hidden_size",
                "tensors_sha256",
            )
        }
        return cls(
            **{name: tensors[name] for name in TENSORS},
            layers=[int(i) for i in header["layers"]],
            languages=list(header["languages"]),
            central_language=header["central_language"],
            metadata=metadata,
        )


def _check_header_types(header: dict[str, Any], json_path: Path) -> None:
    """Values, not only keys: each field of ``subspace.json`` has the type it must have."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checks = [
        ("format_version", is_int(header["format_version"]), "an integer"),
        (
            "layers",
            isinstance(header["layers"], list) and all(map(is_int, header["layers"])),
            "a list of layer indices",
        ),
        (
            "languages",
            isinstance(header["languages"], list)
            and len(header["languages"]) >= 2
            and all(isinstance(code, str) for code in header["languages"]),
            "a list of at least 2 language codes",
        ),
        (
            "central_language",
            isinstance(header["central_language"], str)
            and header["central_language"] in (header["languages"] or []),
            "one of the languages",
        ),
        (
            "tensors_sha256",
            header.get("tensors_sha256") is None or isinstance(header["tensors_sha256"], str),
            "a sha256 hex digest",
        ),
    ]
    for key, ok, expected in checks:
        if not ok:
            value = json.dumps(header.get(key), default=str)[:60]
            raise SubspaceError(f"{json_path}: {key} = {value} is not {expected}")


def decompose_means(means: torch.Tensor, central_index: int, rank: int) -> dict[str, torch.Tensor]:
    """The decomposition of one layer's language means ``(K, H)`` (float64 inside).

    Returns ``agnostic (H,)``, ``specific_basis (r, H)``, ``directions (K, H)`` and
    ``singular_values (K,)``.
    """
    means64 = means.to(torch.float64)
    average = means64.mean(dim=0)
    centred = means64 - average
    _, singular_values, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[:rank]
    projector = basis.T @ basis
    agnostic = average - projector @ average
    directions = (means64 - means64[central_index]) @ projector
    directions[central_index] = 0.0
    return {
        "agnostic": agnostic,
        "specific_basis": basis,
        "directions": directions,
        "singular_values": singular_values,
    }


def _check_states(
    states: Mapping[str, torch.Tensor], central_language: str, rank: int | None
) -> int:
    languages = list(states)
    if len(languages) < 2:
        raise SubspaceError(f"need at least 2 languages for a subspace, got {languages}")
    if central_language not in states:
        raise SubspaceError(
            f"central language {central_language!r} is not among the languages {', '.join(languages)}"
        )
    shapes = {language: tuple(s.shape) for language, s in states.items()}
    if len({shape for shape in shapes.values()}) != 1 or len(next(iter(shapes.values()))) != 3:
        raise SubspaceError(
            f"states must all be (items, layers, hidden) of one shape; got {shapes}"
        )
    rank = len(languages) - 1 if rank is None else rank
    if not 1 <= rank <= len(languages) - 1:
        raise SubspaceError(
            f"rank {rank} is invalid for {len(languages)} languages: it must be between 1 and "
            f"{len(languages) - 1} (the number of languages minus one)"
        )
    return rank


def compute_subspace(
    states: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    central_language: str,
    rank: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    diagnostics: bool = True,
    heldout_fraction: float = 0.3,
    seed: int = 0,
) -> Subspace:
    """Decompose pooled states ``{language: (items, len(layers), hidden)}`` into language subspaces.

    The subspace uses all items. Diagnostics, if asked, refit the decomposition on a training part
    of the items and measure language identification and retrieval on the held-out rest. States
    from :func:`~lenssteer.extract.extract_corpus` carry their provenance (model, pooling, template,
    representation, data), which the subspace records so that training can check it; ``metadata``
    adds to it. Plain tensors (synthetic states) give a subspace that records none, which training
    refuses.
    """
    provenance = getattr(states, "provenance", None)
    if provenance is not None:
        if list(provenance.layers) != [int(i) for i in layers]:
            raise SubspaceError(
                f"the states were extracted at layers {list(provenance.layers)}, not {list(layers)}"
            )
        metadata = {**provenance.as_metadata(), **dict(metadata or {})}
    rank = _check_states(states, central_language, rank)
    languages = list(states)
    for language in languages:
        if not bool(torch.isfinite(states[language]).all()):
            raise SubspaceError(f"the {language} states hold NaN or infinite values")
    central_index = languages.index(central_language)
    stacked = torch.stack([states[language].to(torch.float64) for language in languages], dim=1)
    means = stacked.mean(dim=0).transpose(0, 1)  # (L, K, H)
    parts = [decompose_means(means[i], central_index, rank) for i in range(len(layers))]
    subspace = Subspace(
        means=means.float(),
        agnostic=torch.stack([p["agnostic"] for p in parts]).float(),
        specific_basis=torch.stack([p["specific_basis"] for p in parts]).float(),
        directions=torch.stack([p["directions"] for p in parts]).float(),
        layers=[int(i) for i in layers],
        languages=languages,
        central_language=central_language,
        metadata={"n_items": int(stacked.shape[0]), **dict(metadata or {})},
    )
    if diagnostics:
        subspace.metadata["diagnostics"] = subspace_diagnostics(
            stacked, layers, languages, central_language, rank, heldout_fraction, seed
        )
    return subspace


def _top1_retrieval(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """Share of queries whose nearest key (cosine) is the aligned one. ``(n, H), (n, H)``."""
    queries = torch.nn.functional.normalize(queries, dim=-1)
    keys = torch.nn.functional.normalize(keys, dim=-1)
    nearest = (queries @ keys.T).argmax(dim=1)
    return (nearest == torch.arange(len(queries))).double().mean().item()


def subspace_diagnostics(
    stacked: torch.Tensor,
    layers: Sequence[int],
    languages: Sequence[str],
    central_language: str,
    rank: int,
    heldout_fraction: float = 0.3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-layer diagnostics on held-out items. ``stacked``: ``(items, K, L, H)`` float64.

    The decomposition is refit on the training items only, so nothing measured here has seen the
    held-out items. Retrieval vectors are centred on the training items' overall mean.
    """
    central_index = list(languages).index(central_language)
    from sklearn.linear_model import LogisticRegression

    n_items, n_languages = stacked.shape[:2]
    n_heldout = max(2, round(n_items * heldout_fraction))
    if n_items - n_heldout < 2:
        raise SubspaceError(f"need at least 4 items per language for diagnostics, got {n_items}")
    from lenssteer.sampling import split_ids

    heldout_part, train_part = split_ids(
        [str(i) for i in range(n_items)], [n_heldout, None], seed, "subspace-heldout"
    )
    train = torch.tensor(sorted(int(i) for i in train_part), dtype=torch.long)
    heldout = torch.tensor(sorted(int(i) for i in heldout_part), dtype=torch.long)
    labels = torch.arange(n_languages)
    report = []
    for position, layer in enumerate(layers):
        x = stacked[:, :, position]  # (items, K, H)
        fold = decompose_means(x[train].mean(dim=0), central_index, rank)
        basis = fold["specific_basis"]
        coords_train = (x[train] @ basis.T).reshape(-1, rank).numpy()
        coords_test = (x[heldout] @ basis.T).reshape(-1, rank).numpy()
        classifier = LogisticRegression(max_iter=2000)
        classifier.fit(coords_train, labels.repeat(len(train)).numpy())
        language_id = float(
            (classifier.predict(coords_test) == labels.repeat(len(heldout)).numpy()).mean()
        )
        centred = x[heldout] - x[train].mean(dim=(0, 1))
        removed = centred - (centred @ basis.T) @ basis
        before, after = {}, {}
        for k in range(n_languages):
            if k == central_index:
                continue
            name = languages[k]
            before[name] = _top1_retrieval(centred[:, central_index], centred[:, k])
            after[name] = _top1_retrieval(removed[:, central_index], removed[:, k])
        singular = decompose_means(x.mean(dim=0), central_index, rank)["singular_values"]
        explained = (singular[:rank] ** 2 / (singular**2).sum().clamp_min(1e-30)).tolist()
        report.append(
            {
                "layer": int(layer),
                "language_id_accuracy": language_id,
                "retrieval_before": before,
                "retrieval_after": after,
                "retrieval_before_mean": sum(before.values()) / len(before),
                "retrieval_after_mean": sum(after.values()) / len(after),
                "explained_variance": explained,
                "n_train_items": len(train),
                "n_heldout_items": len(heldout),
            }
        )
    return report
