"""Training-free baselines from a language subspace, applied at inference with forward hooks.

Both edit the residual stream (the output of a decoder layer, the same vectors the subspace was
computed from) at every position, in the chosen top layers, with nothing trained:

* ``remove-specific`` (LSAR-style, Xie et al. 2022, the inference-time counterpart of Lens' *pull*):
  ``h <- h - strength * BᵀB h``, the language-specific component projected out (``strength=1``
  removes all of it). If the split is real, what is left is the shared, language-agnostic part, so
  non-English inputs look more like English ones to the layers above and the head; it may also cost
  the model the knowledge of which language to answer in (language-fidelity measures that).
* ``language-shift`` (the counterpart of Lens' *push*): ``h <- h + strength * d_x``, the input's
  language direction (mean of language ``x`` minus mean of the central language, inside the specific
  subspace) added, so the model leans towards answering in ``x``. Needs to know ``x``; a no-op for
  the central language, whose direction is zero.

``B`` (``(r, hidden)``, orthonormal rows) and ``d_x`` come from a :class:`~lenssteer.subspace.Subspace`
of the same model (checked by weights fingerprint when the subspace records one, and by hidden size).
A subspace probed at representation ``"final_norm"`` (the last layer after the model's final norm)
is applied where it was measured: to the final norm's output, i.e. to what the LM head reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lenssteer.extract import check_representation
from lenssteer.hooks import hooked
from lenssteer.models import (
    ModuleNames,
    find_decoder_layers,
    find_final_norm,
    resolve_layers,
)
from lenssteer.subspace import Subspace

__all__ = [
    "BASELINE_MODES",
    "SubspaceBaseline",
    "language_shift",
    "remove_specific",
    "subspace_steering",
]

Mode = Literal["remove-specific", "language-shift"]
BASELINE_MODES: tuple[str, ...] = ("remove-specific", "language-shift")


def remove_specific(
    hidden: torch.Tensor, basis: torch.Tensor, strength: float = 1.0
) -> torch.Tensor:
    """``hidden - strength * (hidden Bᵀ) B``. ``hidden``: ``(..., H)``; ``basis``: ``(r, H)``.

    The projection is computed in float32 whatever the model's dtype (a bfloat16 product would
    leave a residue of the removed part of order 2⁻⁸ |hidden|), then cast back.
    """
    basis = basis.to(hidden.device, torch.float32)
    wide = hidden.float()
    return (wide - strength * (wide @ basis.T) @ basis).to(hidden.dtype)


def language_shift(
    hidden: torch.Tensor, direction: torch.Tensor, strength: float = 1.0
) -> torch.Tensor:
    """``hidden + strength * direction``. ``hidden``: ``(..., H)``; ``direction``: ``(H,)``."""
    return hidden + strength * direction.to(hidden.device, hidden.dtype)


@contextmanager
def subspace_steering(
    model: nn.Module,
    subspace: Subspace,
    mode: Mode = "remove-specific",
    layers: str | Sequence[int] | None = None,
    strength: float = 1.0,
    language: str | None = None,
    module_names: ModuleNames | None = None,
    strict: bool = True,
) -> Iterator[nn.Module]:
    """Steer ``model`` inside a ``with`` block (hooks removed on exit, even on error).

    ``layers``: a layer spec (``"top:2"``, ``"-1"``, indices) resolved against the model; default
    every layer of the subspace. Each must be a subspace layer. ``language`` is needed for
    ``language-shift``.
    """
    if mode not in BASELINE_MODES:
        raise ValueError(
            f"unknown baseline mode {mode!r}; choose one of {', '.join(BASELINE_MODES)}"
        )
    subspace.check_fits(model, strict)
    decoder_layers = find_decoder_layers(model, module_names)
    chosen = (
        list(subspace.layers) if layers is None else resolve_layers(layers, len(decoder_layers))
    )
    for layer in chosen:
        subspace.layer_position(layer)  # raises if the subspace lacks the layer
    representation = subspace.metadata.get("representation", "residual")
    check_representation(representation, chosen, len(decoder_layers))
    hook_points = {layer: decoder_layers[layer] for layer in chosen}
    if representation == "final_norm":  # edit what the LM head reads, where the states were read
        hook_points = {layer: find_final_norm(model, module_names) for layer in chosen}
    if mode == "language-shift":
        if language is None:
            raise ValueError("the language-shift baseline needs the input's language")
        subspace.language_position(language)  # raises if the subspace lacks the language

    def make_hook(layer: int):
        if mode == "remove-specific":
            basis = subspace.specific_basis[subspace.layer_position(layer)]
            return lambda _module, hidden: remove_specific(hidden, basis, strength)
        direction = subspace.direction(language, layer)  # type: ignore[arg-type]
        return lambda _module, hidden: language_shift(hidden, direction, strength)

    with hooked([(hook_points[layer], make_hook(layer)) for layer in chosen]):
        yield model


@dataclass
class SubspaceBaseline:
    """A named, configured baseline: which subspace, mode, layers and strength.

    ``SubspaceBaseline.from_folder(path, ...)`` loads the subspace; :meth:`steer` is the context
    manager that applies it for inputs in one language.
    """

    subspace: Subspace
    mode: Mode = "remove-specific"
    layers: str | list[int] | None = None
    strength: float = 1.0
    source: str = "(in memory)"
    module_names: ModuleNames | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in BASELINE_MODES:
            raise ValueError(
                f"unknown baseline mode {self.mode!r}; choose one of {', '.join(BASELINE_MODES)}"
            )

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        mode: Mode = "remove-specific",
        layers: str | list[int] | None = None,
        strength: float = 1.0,
    ) -> SubspaceBaseline:
        subspace = Subspace.load(path)
        subspace.metadata.setdefault("path", str(path))
        return cls(subspace, mode, layers, strength, source=str(path))

    def languages(self) -> list[str] | None:
        """Languages the baseline can steer (None: any, for ``remove-specific``)."""
        return list(self.subspace.languages) if self.mode == "language-shift" else None

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "subspace": self.source,
            "subspace_layers": list(self.subspace.layers),
            "layers": self.layers if self.layers is not None else list(self.subspace.layers),
            "strength": self.strength,
            "subspace_languages": list(self.subspace.languages),
            "rank": self.subspace.rank,
            "representation": self.subspace.metadata.get("representation", "residual"),
        }

    def check(self, model: nn.Module, strict: bool = True) -> None:
        """Raise unless the subspace fits ``model`` and names every requested layer."""
        self.subspace.check_fits(model, strict, self.source)
        n_layers = len(find_decoder_layers(model, self.module_names))
        chosen = (
            self.subspace.layers if self.layers is None else resolve_layers(self.layers, n_layers)
        )
        for layer in chosen:
            self.subspace.layer_position(layer)
        check_representation(
            self.subspace.metadata.get("representation", "residual"), chosen, n_layers
        )

    def steer(
        self, model: nn.Module, language: str | None = None, strict: bool = True
    ) -> AbstractContextManager[nn.Module]:
        """Apply the baseline to ``model`` for inputs in ``language`` inside a ``with`` block."""
        return subspace_steering(
            model,
            self.subspace,
            self.mode,
            self.layers,
            self.strength,
            language,
            self.module_names,
            strict,
        )
