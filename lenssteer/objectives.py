"""The Lens training objectives, as pure functions on pooled hidden states.

Names follow the paper (arXiv 2410.04407); the official code swaps *pull* and *push*.

* **pull** (language-agnostic component): each target language's state is pulled toward the
  *frozen* central-language state of the same parallel item, along the agnostic component. Two
  readings of "along the agnostic component" are offered (``pull_space``):

  - ``"direction"`` (default; Lens and DESIGN.md): along the subspace's agnostic vector ``a`` (the
    shared direction every language mean projects onto equally): the difference's projection
    ``((h_t - h_c)·â) â`` with ``â = a / |a|``;
  - ``"complement"``: everything outside the specific subspace: ``(I - BᵀB)(h_t - h_c)``, a much
    stronger constraint (it asks translations to coincide in every non-language dimension).

  The anchor is the frozen model's central state (a fixed target); keeping the central language
  itself in place is *retain*'s job.
* **push** (language-specific subspace): the specific component of each target language's state is
  moved to its frozen value plus ``alpha`` times the language's direction (``BᵀB h_frozen + alpha
  d_k``), so the language keeps expressing itself, a little more strongly.
* **retain**: the central language's state stays where the frozen model had it.

Every term is a mean squared error over hidden units of an ``H``-dimensional difference vector
(``torch.nn.MSELoss`` on ``(..., H)``, as Lens): the squared distance divided by ``H``. The terms'
sizes therefore differ by orders of magnitude (a one-dimensional pull is tiny next to a push of a
whole language direction), so the weights are tuned per model: see ``QUICKSTART_CONFIG`` in
:mod:`lenssteer.train` and ``docs/training.md``. ``alpha`` is a separate parameter, never a loss
weight. A term whose weight is 0 is not computed (and may need no frozen input).

Shapes: ``B`` items, ``K`` languages (central included), ``T = K - 1`` target languages, ``L`` loss
layers, ``H`` hidden size, ``r`` rank of the specific subspace.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

PULL_SPACES = ("direction", "complement")

__all__ = [
    "PULL_SPACES",
    "LensObjective",
    "lens_losses",
    "pull_loss",
    "push_loss",
    "retain_loss",
    "specific_part",
]


@dataclass(frozen=True)
class LensObjective:
    """Weights of the three terms and the push strength ``alpha``.

    ``pull_weight``, ``push_weight`` and ``retain_weight`` multiply their (mean squared error) terms;
    any of them may be 0, but not all. ``alpha`` scales the language direction added to the frozen
    specific component in *push*. ``pull_space``: ``"direction"`` or ``"complement"`` (module
    docstring).
    """

    pull_weight: float = 1.0
    push_weight: float = 1.0
    retain_weight: float = 1.0
    alpha: float = 1.0
    pull_space: str = "direction"

    def __post_init__(self) -> None:
        if self.pull_space not in PULL_SPACES:
            raise ValueError(
                f"pull_space {self.pull_space!r} is unknown; choose one of {', '.join(PULL_SPACES)}"
            )
        for name in ("pull_weight", "push_weight", "retain_weight", "alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("pull_weight", "push_weight", "retain_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pull_weight == self.push_weight == self.retain_weight == 0:
            raise ValueError("all loss weights are 0: there is nothing to train")

    def to_dict(self) -> dict[str, float | str]:
        return {k: v if isinstance(v, str) else float(v) for k, v in asdict(self).items()}


def specific_part(hidden: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Component of ``hidden`` inside the specific subspace, per layer.

    ``hidden``: ``(..., L, H)``; ``basis``: ``(L, r, H)`` with orthonormal rows. Returns ``(..., L, H)``.
    """
    coordinates = torch.einsum("...lh,lrh->...lr", hidden, basis)
    return torch.einsum("...lr,lrh->...lh", coordinates, basis)


def pull_loss(
    target: torch.Tensor,
    frozen_central: torch.Tensor,
    basis: torch.Tensor,
    agnostic_direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared gap between target and frozen central states along the agnostic component.

    ``target``: ``(B, T, L, H)`` current target-language states; ``frozen_central``: ``(B, L, H)``
    the frozen model's central-language states of the same items; ``basis``: ``(L, r, H)``.
    With ``agnostic_direction`` ``(L, H)`` (unit vectors) the gap is its projection on that
    direction (``pull_space="direction"``); without, the gap outside the specific subspace
    (``"complement"``). Either way the mean is over ``B, T, L`` and the ``H`` hidden units.
    """
    difference = target - frozen_central.detach().unsqueeze(1)
    if agnostic_direction is not None:
        coordinate = torch.einsum("btlh,lh->btl", difference, agnostic_direction)
        return coordinate.pow(2).mean() / difference.shape[-1]  # |c â|² / H
    agnostic_difference = difference - specific_part(difference, basis)
    return agnostic_difference.pow(2).mean()


def push_loss(
    target: torch.Tensor,
    frozen_target: torch.Tensor,
    directions: torch.Tensor,
    basis: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Mean squared distance of the specific component from ``frozen + alpha * direction``.

    ``target``, ``frozen_target``: ``(B, T, L, H)``; ``directions``: ``(T, L, H)`` the target
    languages' directions (already inside the specific subspace); ``basis``: ``(L, r, H)``.
    """
    moved = specific_part(target - frozen_target.detach(), basis)
    return (moved - alpha * directions).pow(2).mean()


def retain_loss(central: torch.Tensor, frozen_central: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the central language's states from the frozen ones. ``(B, L, H)``."""
    return (central - frozen_central.detach()).pow(2).mean()


def lens_losses(
    states: torch.Tensor,
    frozen: torch.Tensor,
    basis: torch.Tensor,
    directions: torch.Tensor,
    central_index: int,
    objective: LensObjective,
    agnostic_direction: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted Lens loss and its unweighted terms.

    ``states``, ``frozen``: ``(B, K, L, H)`` current and frozen states of every language;
    ``basis``: ``(L, r, H)``; ``directions``: ``(K, L, H)`` (the central row is ignored);
    ``agnostic_direction``: ``(L, H)`` unit vectors, required for ``pull_space="direction"``.
    Returns ``{"loss", "pull", "push", "retain"}``, leaving out terms whose weight is 0.
    """
    n_languages = states.shape[1]
    if frozen.shape != states.shape:
        raise ValueError(f"frozen {tuple(frozen.shape)} and states {tuple(states.shape)} differ")
    if directions.shape[0] != n_languages:
        raise ValueError(f"{directions.shape[0]} directions for {n_languages} languages")
    if not 0 <= central_index < n_languages:
        raise ValueError(f"central_index {central_index} out of range for {n_languages} languages")
    targets = [k for k in range(n_languages) if k != central_index]
    terms: dict[str, torch.Tensor] = {}
    total = states.new_zeros(())
    if objective.pull_weight and targets:
        if objective.pull_space == "direction" and agnostic_direction is None:
            raise ValueError('pull_space="direction" needs the agnostic direction')
        terms["pull"] = pull_loss(
            states[:, targets],
            frozen[:, central_index],
            basis,
            agnostic_direction if objective.pull_space == "direction" else None,
        )
        total = total + objective.pull_weight * terms["pull"]
    if objective.push_weight and targets:
        terms["push"] = push_loss(
            states[:, targets], frozen[:, targets], directions[targets], basis, objective.alpha
        )
        total = total + objective.push_weight * terms["push"]
    if objective.retain_weight:
        terms["retain"] = retain_loss(states[:, central_index], frozen[:, central_index])
        total = total + objective.retain_weight * terms["retain"]
    return {"loss": total, **terms}
