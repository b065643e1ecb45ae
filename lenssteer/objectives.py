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
  d_k``), so the language keeps expressing itself, a little more strongly. ``alpha`` may differ
  per target language (``lens_losses(..., alphas=...)``; ours, Lens has one).
* **retain**: the central language's state stays where the frozen model had it.
* **retain_targets** (ours, not in Lens; weight 0 by default): each target language's state stays
  where the frozen model had it *outside* the specific subspace, ``|(I - BᵀB)(h_t - h⁰_t)|²``.
  With push (which moves only the specific component) it asks the adapter to move a target
  language along its language direction and nowhere else, so what the text says is left alone.
  It constrains what pull moves (pull acts outside the specific subspace too): use one or the other.

Two normalisations (``LensObjective.normalization``) say in which units a term is measured:

* ``"mse"`` (default; Lens, and every adapter made before the option existed): each term is a mean
  squared error over hidden units of an ``H``-dimensional difference vector (``torch.nn.MSELoss``
  on ``(..., H)``): the squared distance divided by ``H``. The terms' sizes then differ by orders of
  magnitude (a one-dimensional pull is tiny next to a push of a whole language direction) and with
  the model's scale (|d| is about 56 on Qwen2.5's residual stream), so the weights are tuned per
  model: see ``QUICKSTART_CONFIG`` in :mod:`lenssteer.train` and ``docs/training.md``.
* ``"scale_free"``: each squared distance is divided by a unit that means the same on every model,
  so one set of weights can serve all of them:

  - pull: by the *frozen gap* in the pull space, ``s_pull[l]`` = the mean over training items and
    target languages of ``|P(h⁰_t - h⁰_c)|²`` (:func:`loss_scales`). Pull is 1 before training (on
    average over the training set) and 0 when every target coincides with the central language
    along the pulled component; 0.49 means the gap shrank by 30%.
  - push: by the squared length of the language's direction, ``|d_t|²``: push is ``alpha²`` before
    training and 0 when each specific component moved exactly ``alpha d_t``.
  - retain: by the spread of the frozen central states, ``s_retain[l]`` = the mean over training
    items of ``|h⁰_c - mean(h⁰_c)|²``; retain is then the held-out report's ``retain_mse_rel``
    (the central language's drift as a share of its variance).
  - retain_targets: by the same unit ``s_retain[l]`` (the targets' drift outside the specific
    subspace as a share of the central states' spread).

  Means are then taken over items, target languages and layers as before (no division by ``H``).

``alpha`` is a separate parameter, never a loss weight. A term whose weight is 0 is not computed
(and may need no frozen input).

Shapes: ``B`` items, ``K`` languages (central included), ``T = K - 1`` target languages, ``L`` loss
layers, ``H`` hidden size, ``r`` rank of the specific subspace.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

PULL_SPACES = ("direction", "complement")
NORMALIZATIONS = ("mse", "scale_free")

__all__ = [
    "NORMALIZATIONS",
    "PULL_SPACES",
    "LensObjective",
    "lens_losses",
    "loss_scales",
    "pull_loss",
    "push_loss",
    "retain_loss",
    "retain_targets_loss",
    "specific_part",
]


@dataclass(frozen=True)
class LensObjective:
    """Weights of the three terms and the push strength ``alpha``.

    ``pull_weight``, ``push_weight``, ``retain_weight`` and ``retain_targets_weight`` multiply their
    (mean squared error) terms; any of them may be 0, but not all. ``alpha`` scales the language direction added to the frozen
    specific component in *push*. ``pull_space``: ``"direction"`` or ``"complement"``;
    ``normalization``: ``"mse"`` or ``"scale_free"`` (module docstring).
    """

    pull_weight: float = 1.0
    push_weight: float = 1.0
    retain_weight: float = 1.0
    alpha: float = 1.0
    pull_space: str = "direction"
    normalization: str = "mse"
    retain_targets_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.pull_space not in PULL_SPACES:
            raise ValueError(
                f"pull_space {self.pull_space!r} is unknown; choose one of {', '.join(PULL_SPACES)}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization {self.normalization!r} is unknown; choose one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        weights = ("pull_weight", "push_weight", "retain_weight", "retain_targets_weight")
        for name in (*weights, "alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not any(getattr(self, name) for name in weights):
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
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared gap between target and frozen central states along the agnostic component.

    ``target``: ``(B, T, L, H)`` current target-language states; ``frozen_central``: ``(B, L, H)``
    the frozen model's central-language states of the same items; ``basis``: ``(L, r, H)``.
    With ``agnostic_direction`` ``(L, H)`` (unit vectors) the gap is its projection on that
    direction (``pull_space="direction"``); without, the gap outside the specific subspace
    (``"complement"``). Either way the mean is over ``B, T, L`` and the ``H`` hidden units; with
    ``scale`` ``(L,)`` the squared gap is divided by ``scale[l]`` instead of ``H``.
    """
    difference = target - frozen_central.detach().unsqueeze(1)
    if agnostic_direction is not None:
        coordinate = torch.einsum("btlh,lh->btl", difference, agnostic_direction)
        squared = coordinate.pow(2)  # |c â|², (B, T, L)
    else:
        agnostic_difference = difference - specific_part(difference, basis)
        squared = agnostic_difference.pow(2).sum(-1)
    if scale is not None:
        return (squared / scale.detach()).mean()
    return squared.mean() / difference.shape[-1]


def push_loss(
    target: torch.Tensor,
    frozen_target: torch.Tensor,
    directions: torch.Tensor,
    basis: torch.Tensor,
    alpha: float | torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared distance of the specific component from ``frozen + alpha * direction``.

    ``target``, ``frozen_target``: ``(B, T, L, H)``; ``directions``: ``(T, L, H)`` the target
    languages' directions (already inside the specific subspace); ``basis``: ``(L, r, H)``;
    ``alpha``: one strength, or ``(T,)``, one per target language. The mean is over ``B, T, L``
    and ``H``; with ``scale`` ``(T, L)`` (``|d_t|²`` for ``"scale_free"``) each squared distance is
    divided by ``scale[t, l]`` instead of ``H``.
    """
    moved = specific_part(target - frozen_target.detach(), basis)
    if isinstance(alpha, torch.Tensor):
        if alpha.shape != directions.shape[:1]:
            raise ValueError(
                f"alpha {tuple(alpha.shape)} needs one value per target language "
                f"({directions.shape[0]})"
            )
        alpha = alpha.to(directions).reshape(-1, 1, 1)
    squared = (moved - alpha * directions).pow(2)
    if scale is not None:
        return (squared.sum(-1) / scale.detach()).mean()
    return squared.mean()


def retain_loss(
    central: torch.Tensor, frozen_central: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared distance of the central language's states from the frozen ones. ``(B, L, H)``
    (any leading dimensions: training's *hold* term passes ``(B, K, L, H)``, every language).

    With ``scale`` ``(L,)`` each squared distance is divided by ``scale[l]`` instead of ``H``.
    """
    squared = (central - frozen_central.detach()).pow(2)
    if scale is not None:
        return (squared.sum(-1) / scale.detach()).mean()
    return squared.mean()


def retain_targets_loss(
    target: torch.Tensor,
    frozen_target: torch.Tensor,
    basis: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared distance of the target languages' states from the frozen ones, outside the
    specific subspace: ``|(I - BᵀB)(h_t - h⁰_t)|²``.

    ``target``, ``frozen_target``: ``(B, T, L, H)``; ``basis``: ``(L, r, H)``. The mean is over
    ``B, T, L`` and ``H``; with ``scale`` ``(L,)`` each squared distance is divided by ``scale[l]``
    instead of ``H``.
    """
    moved = target - frozen_target.detach()
    squared = (moved - specific_part(moved, basis)).pow(2).sum(-1)
    if scale is not None:
        return (squared / scale.detach()).mean()
    return squared.mean() / moved.shape[-1]


def loss_scales(
    frozen: torch.Tensor,
    basis: torch.Tensor,
    central_index: int,
    agnostic_direction: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The ``"scale_free"`` units of pull and retain, from the frozen states of the training set.

    ``frozen``: ``(N, K, L, H)``; ``basis``: ``(L, r, H)``; ``agnostic_direction``: ``(L, H)`` unit
    vectors for ``pull_space="direction"`` (``None``: the complement of the specific subspace).
    Returns ``{"pull": (L,), "retain": (L,)}``: the frozen gap ``mean |P(h⁰_t - h⁰_c)|²`` over items
    and target languages, and the central states' spread ``mean |h⁰_c - mean(h⁰_c)|²`` over items.
    Raises ``ValueError`` where a unit is 0 (identical texts, or a single item).
    """
    frozen = frozen.detach().double()
    n_languages = frozen.shape[1]
    targets = [k for k in range(n_languages) if k != central_index]
    central = frozen[:, central_index]
    scales: dict[str, torch.Tensor] = {}
    if targets:
        difference = frozen[:, targets] - central.unsqueeze(1)
        if agnostic_direction is not None:
            gap = torch.einsum("btlh,lh->btl", difference, agnostic_direction.double()).pow(2)
        else:
            outside = difference - specific_part(difference, basis.double())
            gap = outside.pow(2).sum(-1)
        scales["pull"] = gap.mean(dim=(0, 1))
    scales["retain"] = (central - central.mean(0)).pow(2).sum(-1).mean(0)
    for name, value in scales.items():
        if not bool((value > 0).all()):
            raise ValueError(
                f"the {name} unit of the scale-free objective is 0 at some layer ({value.tolist()}): "
                "the training items need at least 2 distinct texts per language that differ across "
                "languages"
            )
    return {name: value.float() for name, value in scales.items()}


def lens_losses(
    states: torch.Tensor,
    frozen: torch.Tensor,
    basis: torch.Tensor,
    directions: torch.Tensor,
    central_index: int,
    objective: LensObjective,
    agnostic_direction: torch.Tensor | None = None,
    scales: dict[str, torch.Tensor] | None = None,
    alphas: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted Lens loss and its unweighted terms.

    ``states``, ``frozen``: ``(B, K, L, H)`` current and frozen states of every language;
    ``basis``: ``(L, r, H)``; ``directions``: ``(K, L, H)`` (the central row is ignored);
    ``agnostic_direction``: ``(L, H)`` unit vectors, required for ``pull_space="direction"``;
    ``scales``: the units of :func:`loss_scales` (``{"pull": (L,), "retain": (L,)}``, computed on
    the whole training set), required for ``normalization="scale_free"``; ``alphas``: ``(K,)`` push
    strength per language (the central entry is ignored) instead of ``objective.alpha`` for all.
    Returns ``{"loss", "pull", "push", "retain", "retain_targets"}``, leaving out terms whose weight
    is 0.
    """
    n_languages = states.shape[1]
    if frozen.shape != states.shape:
        raise ValueError(f"frozen {tuple(frozen.shape)} and states {tuple(states.shape)} differ")
    if directions.shape[0] != n_languages:
        raise ValueError(f"{directions.shape[0]} directions for {n_languages} languages")
    if not 0 <= central_index < n_languages:
        raise ValueError(f"central_index {central_index} out of range for {n_languages} languages")
    if alphas is not None and alphas.shape != (n_languages,):
        raise ValueError(f"alphas {tuple(alphas.shape)} for {n_languages} languages")
    targets = [k for k in range(n_languages) if k != central_index]
    scale_free = objective.normalization == "scale_free"
    if scale_free and scales is None:
        raise ValueError('normalization="scale_free" needs the loss scales (see loss_scales)')
    scales = scales if scale_free else {}
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
            scale=scales.get("pull"),
        )
        total = total + objective.pull_weight * terms["pull"]
    if objective.push_weight and targets:
        push_scale = None
        if scale_free:  # |d_t|², (T, L)
            push_scale = directions[targets].detach().pow(2).sum(-1).clamp_min(1e-12)
        terms["push"] = push_loss(
            states[:, targets],
            frozen[:, targets],
            directions[targets],
            basis,
            objective.alpha if alphas is None else alphas[targets],
            scale=push_scale,
        )
        total = total + objective.push_weight * terms["push"]
    if objective.retain_weight:
        terms["retain"] = retain_loss(
            states[:, central_index], frozen[:, central_index], scale=scales.get("retain")
        )
        total = total + objective.retain_weight * terms["retain"]
    if objective.retain_targets_weight and targets:
        terms["retain_targets"] = retain_targets_loss(
            states[:, targets], frozen[:, targets], basis, scale=scales.get("retain")
        )
        total = total + objective.retain_targets_weight * terms["retain_targets"]
    return {"loss": total, **terms}
