"""Each Lens loss against values worked out by hand on 2-d states, plus the reference code's faults."""

from __future__ import annotations

import pytest
import torch

from lenssteer.objectives import (
    LensObjective,
    lens_losses,
    pull_loss,
    push_loss,
    retain_loss,
    retain_targets_loss,
    specific_part,
)

# One layer, hidden size 2, a 1-d specific subspace along the x axis.
X_AXIS = torch.tensor([[[1.0, 0.0]]])  # (L=1, r=1, H=2)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_specific_part_projects_on_the_basis():
    basis = torch.tensor([[[0.6, 0.8]]])  # unit vector
    hidden = t([1.0, 2.0]).reshape(1, 1, 2)  # (B, L, H)
    # <h, u> = 0.6 + 1.6 = 2.2 -> 2.2 * (0.6, 0.8)
    torch.testing.assert_close(specific_part(hidden, basis), torch.tensor([[[1.32, 1.76]]]))


def test_pull_by_hand():
    target = t([3.0, 4.0]).reshape(1, 1, 1, 2)  # (B, T, L, H)
    frozen_central = t([1.0, 1.0]).reshape(1, 1, 2)  # (B, L, H)
    # difference (2, 3); its agnostic part (x removed) is (0, 3); mean of squares = 9 / 2
    assert pull_loss(target, frozen_central, X_AXIS).item() == pytest.approx(4.5)


def test_pull_by_hand_rotated_basis_two_items():
    basis = torch.tensor([[[0.6, 0.8]]])
    target = t([[1.0, 2.0]], [[0.0, 0.0]]).reshape(2, 1, 1, 2)
    frozen_central = t([[0.0, 0.0]], [[0.8, -0.6]]).reshape(2, 1, 2)
    # item 1: diff (1, 2), <diff,u> = 2.2, agnostic = (1 - 1.32, 2 - 1.76) = (-0.32, 0.24): sq 0.16
    # item 2: diff (-0.8, 0.6) is orthogonal to u, agnostic = itself: sq 1.0
    # mean over 2 items x 2 units = (0.16 + 1.0) / 4
    assert pull_loss(target, frozen_central, basis).item() == pytest.approx(0.29)


def test_push_by_hand():
    target = t([3.0, 4.0]).reshape(1, 1, 1, 2)
    frozen_target = t([2.0, 0.0]).reshape(1, 1, 1, 2)
    direction = t([1.0, 0.0]).reshape(1, 1, 2)  # (T, L, H)
    # moved specific = (1, 0); minus alpha * d = (1 - 2, 0) = (-1, 0); mean of squares = 1 / 2
    assert push_loss(target, frozen_target, direction, X_AXIS, alpha=2.0).item() == pytest.approx(
        0.5
    )
    # with alpha = 1 the specific component moved exactly by the direction: zero loss
    assert push_loss(target, frozen_target, direction, X_AXIS, alpha=1.0).item() == pytest.approx(
        0.0
    )


def test_push_ignores_the_agnostic_part():
    frozen_target = t([2.0, 0.0]).reshape(1, 1, 1, 2)
    direction = t([1.0, 0.0]).reshape(1, 1, 2)
    a = push_loss(t([3.0, 4.0]).reshape(1, 1, 1, 2), frozen_target, direction, X_AXIS, 1.5)
    b = push_loss(t([3.0, -7.0]).reshape(1, 1, 1, 2), frozen_target, direction, X_AXIS, 1.5)
    assert a.item() == pytest.approx(b.item()) == pytest.approx(0.125)  # (0.5^2) / 2


def test_retain_by_hand():
    central = t([[1.0, 2.0]], [[0.0, 0.0]]).reshape(2, 1, 2)
    frozen = t([[1.0, 1.0]], [[2.0, 0.0]]).reshape(2, 1, 2)
    # squared differences 0, 1, 4, 0 -> mean 5 / 4
    assert retain_loss(central, frozen).item() == pytest.approx(1.25)


def test_retain_targets_by_hand():
    target = t([3.0, 4.0]).reshape(1, 1, 1, 2)  # (B, T, L, H)
    frozen_target = t([2.0, 0.0]).reshape(1, 1, 1, 2)
    # moved (1, 4); outside the x axis (0, 4): squared 16, mean over H = 2 -> 8; unit 4 -> 4
    assert retain_targets_loss(target, frozen_target, X_AXIS).item() == pytest.approx(8.0)
    assert retain_targets_loss(
        target, frozen_target, X_AXIS, scale=torch.tensor([4.0])
    ).item() == pytest.approx(4.0)
    # a move inside the specific subspace (push's job) costs nothing
    pushed = t([7.0, 0.0]).reshape(1, 1, 1, 2)
    assert retain_targets_loss(pushed, frozen_target, X_AXIS).item() == 0.0


def test_retain_targets_in_lens_losses_by_hand():
    states, frozen, directions = _two_language_batch()
    objective = LensObjective(
        pull_weight=0.0, push_weight=3.0, retain_weight=5.0, alpha=2.0, retain_targets_weight=7.0
    )
    out = lens_losses(states, frozen, X_AXIS, directions, 0, objective)
    # target (3, 4) vs frozen (2, 0): outside x (0, 4), 16 / 2 = 8; push 0.5 and retain 0.5 as above
    assert set(out) == {"loss", "push", "retain", "retain_targets"}
    assert out["retain_targets"].item() == pytest.approx(8.0)
    assert out["loss"].item() == pytest.approx(3 * 0.5 + 5 * 0.5 + 7 * 8.0)
    alone = LensObjective(
        pull_weight=0.0, push_weight=0.0, retain_weight=0.0, retain_targets_weight=1.0
    )
    assert set(lens_losses(states, frozen, X_AXIS, directions, 0, alone)) == {
        "loss",
        "retain_targets",
    }
    with pytest.raises(ValueError, match="retain_targets_weight must be >= 0"):
        LensObjective(retain_targets_weight=-1.0)


Y_AXIS = torch.tensor([[0.0, 1.0]])  # (L=1, H=2): the agnostic direction, orthogonal to X_AXIS


def test_pull_along_the_agnostic_direction_by_hand():
    target = t([3.0, 4.0]).reshape(1, 1, 1, 2)
    frozen_central = t([1.0, 1.0]).reshape(1, 1, 2)
    unit = torch.tensor([[0.6, 0.8]])
    # difference (2, 3); coordinate along (0.6, 0.8) = 3.6; |3.6 u|^2 / H = 12.96 / 2
    assert pull_loss(target, frozen_central, X_AXIS, unit).item() == pytest.approx(6.48)
    # along the y axis the coordinate is 3: 9 / 2, the same as the complement of the x axis here
    assert pull_loss(target, frozen_central, X_AXIS, Y_AXIS).item() == pytest.approx(4.5)


def test_pull_along_the_direction_ignores_other_agnostic_dimensions():
    basis = torch.tensor([[[1.0, 0.0, 0.0]]])  # specific: x; agnostic direction: y; z is neither
    direction = torch.tensor([[0.0, 1.0, 0.0]])
    frozen_central = t([0.0, 0.0, 0.0]).reshape(1, 1, 3)
    near = pull_loss(t([5.0, 1.0, 0.0]).reshape(1, 1, 1, 3), frozen_central, basis, direction)
    far = pull_loss(t([5.0, 1.0, 9.0]).reshape(1, 1, 1, 3), frozen_central, basis, direction)
    assert near.item() == pytest.approx(far.item()) == pytest.approx(1.0 / 3)
    complement = pull_loss(t([5.0, 1.0, 9.0]).reshape(1, 1, 1, 3), frozen_central, basis)
    assert complement.item() == pytest.approx(82.0 / 3)


def _two_language_batch():
    # (B=1, K=2, L=1, H=2); language 0 is central
    states = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    frozen = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]])
    directions = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]])  # (K, L, H)
    return states, frozen, directions


def test_lens_losses_weighted_sum_by_hand():
    states, frozen, directions = _two_language_batch()
    objective = LensObjective(pull_weight=2.0, push_weight=3.0, retain_weight=5.0, alpha=2.0)
    out = lens_losses(states, frozen, X_AXIS, directions, 0, objective, Y_AXIS)
    # pull: target (3,4) vs frozen central (1,1): 4.5; push: 0.5 (see above); retain: 0.5
    assert out["pull"].item() == pytest.approx(4.5)
    assert out["push"].item() == pytest.approx(0.5)
    assert out["retain"].item() == pytest.approx(0.5)
    assert out["loss"].item() == pytest.approx(2 * 4.5 + 3 * 0.5 + 5 * 0.5)


def test_weight_multiplies_the_loss_not_the_target():
    """Lens fault: ``pull_weight`` scaled the target direction instead of weighting the loss."""
    states, frozen, directions = _two_language_batch()
    one = lens_losses(
        states, frozen, X_AXIS, directions, 0, LensObjective(1.0, 1.0, 1.0, 2.0), Y_AXIS
    )
    for name in ("pull", "push", "retain"):
        weights = {"pull_weight": 1.0, "push_weight": 1.0, "retain_weight": 1.0}
        weights[f"{name}_weight"] = 7.0
        out = lens_losses(
            states, frozen, X_AXIS, directions, 0, LensObjective(**weights, alpha=2.0), Y_AXIS
        )
        assert out[name].item() == pytest.approx(one[name].item())  # term unchanged
        assert out["loss"].item() == pytest.approx(one["loss"].item() + 6 * one[name].item())


def test_alpha_changes_push_only():
    states, frozen, directions = _two_language_batch()
    a = lens_losses(states, frozen, X_AXIS, directions, 0, LensObjective(alpha=1.0), Y_AXIS)
    b = lens_losses(states, frozen, X_AXIS, directions, 0, LensObjective(alpha=3.0), Y_AXIS)
    assert a["pull"].item() == b["pull"].item() and a["retain"].item() == b["retain"].item()
    assert a["push"].item() == pytest.approx(0.0) and b["push"].item() == pytest.approx(2.0)


def test_push_strength_per_language_by_hand():
    # (B=1, K=3, L=1, H=2): central 0; both targets moved (1, 0) along x from frozen (2, 0)
    states = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]], [[3.0, 4.0]]]])
    frozen = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]], [[2.0, 0.0]]]])
    directions = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]])
    objective = LensObjective(pull_weight=0.0, push_weight=1.0, retain_weight=1.0, alpha=1.0)
    same = lens_losses(states, frozen, X_AXIS, directions, 0, objective)
    assert same["push"].item() == pytest.approx(0.0)  # both moved exactly 1 * d
    # target 1 asked for 1 * d (reached), target 2 for 3 * d: (1 - 3)^2 = 4 over B T L H = 4 -> 1
    alphas = torch.tensor([99.0, 1.0, 3.0])  # the central entry is never read
    out = lens_losses(states, frozen, X_AXIS, directions, 0, objective, alphas=alphas)
    assert out["push"].item() == pytest.approx(1.0)
    assert out["retain"].item() == same["retain"].item()
    # one strength per language is the mean of each language pushed alone at its own strength
    alone = [
        push_loss(states[:, [k]], frozen[:, [k]], directions[[k]], X_AXIS, alphas[k].item())
        for k in (1, 2)
    ]
    assert out["push"].item() == pytest.approx(sum(a.item() for a in alone) / 2)
    with pytest.raises(ValueError, match="alphas"):
        lens_losses(states, frozen, X_AXIS, directions, 0, objective, alphas=alphas[:2])
    with pytest.raises(ValueError, match="one value per target language"):
        push_loss(states[:, 1:], frozen[:, 1:], directions[1:], X_AXIS, torch.tensor([1.0]))


@pytest.mark.parametrize("off", ["pull", "push", "retain"])
def test_any_weight_may_be_zero(off):
    """Lens fault: turning a term off crashed. A zero-weight term is neither computed nor needed."""
    states, frozen, directions = _two_language_batch()
    weights = {"pull_weight": 1.0, "push_weight": 1.0, "retain_weight": 1.0}
    weights[f"{off}_weight"] = 0.0
    states.requires_grad_(True)
    out = lens_losses(states, frozen, X_AXIS, directions, 0, LensObjective(**weights), Y_AXIS)
    assert off not in out
    out["loss"].backward()
    assert torch.isfinite(states.grad).all()


def test_only_one_term_left():
    states, frozen, directions = _two_language_batch()
    out = lens_losses(states, frozen, X_AXIS, directions, 0, LensObjective(0.0, 0.0, 1.0))
    assert set(out) == {"loss", "retain"} and out["loss"].item() == pytest.approx(0.5)


def test_complement_pull_in_lens_losses():
    states, frozen, directions = _two_language_batch()
    objective = LensObjective(pull_space="complement")
    out = lens_losses(states, frozen, X_AXIS, directions, 0, objective)
    assert out["pull"].item() == pytest.approx(4.5)  # (2, 3) minus its x part: 9 / 2
    with pytest.raises(ValueError, match="agnostic direction"):
        lens_losses(states, frozen, X_AXIS, directions, 0, LensObjective())


def test_all_zero_weights_or_bad_values_are_errors():
    with pytest.raises(ValueError, match="nothing to train"):
        LensObjective(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="pull_weight"):
        LensObjective(pull_weight=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        LensObjective(alpha=float("nan"))
    with pytest.raises(ValueError, match="pull_space"):
        LensObjective(pull_space="everything")


def test_frozen_states_get_no_gradient():
    states, frozen, directions = _two_language_batch()
    frozen.requires_grad_(True)
    states.requires_grad_(True)
    lens_losses(states, frozen, X_AXIS, directions, 0, LensObjective(), Y_AXIS)["loss"].backward()
    assert frozen.grad is None
    # pull moves the target, not the central language (the anchor is the frozen state)
    assert states.grad[0, 1].abs().sum() > 0


def test_central_index_other_than_zero():
    states, frozen, directions = _two_language_batch()
    swapped = lens_losses(
        states.flip(1),
        frozen.flip(1),
        X_AXIS,
        directions.flip(0),
        1,
        LensObjective(alpha=2.0),
        Y_AXIS,
    )
    straight = lens_losses(states, frozen, X_AXIS, directions, 0, LensObjective(alpha=2.0), Y_AXIS)
    for key in straight:
        assert swapped[key].item() == pytest.approx(straight[key].item())


# --------------------------------------------------------------------------------------------------
# normalization="scale_free": each squared distance in a unit that means the same on every model


def test_scale_free_terms_by_hand():
    target = t([3.0, 4.0]).reshape(1, 1, 1, 2)
    frozen_central = t([1.0, 1.0]).reshape(1, 1, 2)
    # pull (complement of x): squared gap 9, unit 4 -> 9 / 4 (no division by H)
    assert pull_loss(target, frozen_central, X_AXIS, scale=torch.tensor([4.0])).item() == (
        pytest.approx(2.25)
    )
    # along (0.6, 0.8): coordinate 3.6, squared 12.96, unit 3.24 -> 4
    unit = torch.tensor([[0.6, 0.8]])
    assert pull_loss(
        target, frozen_central, X_AXIS, unit, scale=torch.tensor([3.24])
    ).item() == pytest.approx(4.0)
    # push: moved specific (1, 0) - 2 * d with d = (3, 0): (-5, 0), squared 25, unit |d|^2 = 9
    frozen_target = t([2.0, 0.0]).reshape(1, 1, 1, 2)
    direction = t([3.0, 0.0]).reshape(1, 1, 2)
    assert push_loss(
        target, frozen_target, direction, X_AXIS, 2.0, scale=torch.tensor([[9.0]])
    ).item() == pytest.approx(25 / 9)
    # retain: squared distances 1 and 4 (two items), unit 2 -> mean(0.5, 2)
    central = t([[1.0, 2.0]], [[0.0, 0.0]]).reshape(2, 1, 2)
    frozen = t([[1.0, 1.0]], [[2.0, 0.0]]).reshape(2, 1, 2)
    assert retain_loss(central, frozen, scale=torch.tensor([2.0])).item() == pytest.approx(1.25)


def test_loss_scales_by_hand():
    from lenssteer.objectives import loss_scales

    # (N=2, K=2, L=1, H=2), language 0 central: central states (1, 1) and (3, 1)
    frozen = torch.tensor([[[[1.0, 1.0]], [[2.0, 3.0]]], [[[3.0, 1.0]], [[3.0, 2.0]]]])
    # gaps (1, 2) and (0, 1); along y: 4 and 1 -> 2.5; outside x: the same here
    # central spread: mean (2, 1); deviations (-1, 0), (1, 0) -> 1
    along = loss_scales(frozen, X_AXIS, 0, Y_AXIS)
    torch.testing.assert_close(along["pull"], torch.tensor([2.5]))
    torch.testing.assert_close(along["retain"], torch.tensor([1.0]))
    outside = loss_scales(frozen, torch.tensor([[[0.0, 1.0]]]), 0)  # specific = y: keeps x
    torch.testing.assert_close(outside["pull"], torch.tensor([0.5]))  # (1 + 0) / 2
    with pytest.raises(ValueError, match="unit of the scale-free objective is 0"):
        loss_scales(frozen[:1], X_AXIS, 0, Y_AXIS)  # one item: no spread


def test_scale_free_lens_losses_start_at_one_and_alpha_squared():
    """Before training (states == frozen) pull is 1 on the set the unit came from, push alpha²."""
    from lenssteer.objectives import loss_scales

    generator = torch.Generator().manual_seed(0)
    frozen = torch.randn(6, 3, 2, 5, generator=generator)  # (N, K, L, H)
    basis = torch.linalg.qr(torch.randn(5, 2, generator=generator))[0].T.reshape(1, 2, 5)
    basis = basis.expand(2, 2, 5).contiguous()
    agnostic = torch.nn.functional.normalize(torch.randn(2, 5, generator=generator), dim=-1)
    directions = specific_part(torch.randn(3, 2, 5, generator=generator), basis)
    directions[0] = 0
    scales = loss_scales(frozen, basis, 0, agnostic)
    objective = LensObjective(alpha=0.3, normalization="scale_free")
    out = lens_losses(frozen.clone(), frozen, basis, directions, 0, objective, agnostic, scales)
    assert out["pull"].item() == pytest.approx(1.0, rel=1e-5)
    assert out["push"].item() == pytest.approx(0.09, rel=1e-5)
    assert out["retain"].item() == pytest.approx(0.0)
    # scaling every state (another model's scale) changes no term
    scaled = 37.0 * frozen
    big = lens_losses(
        scaled + 37.0 * 0.1,
        scaled,
        basis,
        37.0 * directions,
        0,
        objective,
        agnostic,
        loss_scales(scaled, basis, 0, agnostic),
    )
    small = lens_losses(frozen + 0.1, frozen, basis, directions, 0, objective, agnostic, scales)
    for key in small:
        assert big[key].item() == pytest.approx(small[key].item(), rel=1e-4)
    # the raw form is not scale-free
    raw = LensObjective(alpha=0.3)
    assert lens_losses(scaled + 3.7, scaled, basis, 37 * directions, 0, raw, agnostic)[
        "retain"
    ].item() == pytest.approx(37**2 * 0.01, rel=1e-4)


def test_scale_free_needs_its_scales_and_a_known_normalization():
    states, frozen, directions = _two_language_batch()
    objective = LensObjective(normalization="scale_free")
    with pytest.raises(ValueError, match="needs the loss scales"):
        lens_losses(states, frozen, X_AXIS, directions, 0, objective, Y_AXIS)
    with pytest.raises(ValueError, match="normalization"):
        LensObjective(normalization="unit")
    # in the raw form the scales are ignored
    scales = {"pull": torch.tensor([100.0]), "retain": torch.tensor([100.0])}
    out = lens_losses(
        states, frozen, X_AXIS, directions, 0, LensObjective(alpha=2.0), Y_AXIS, scales
    )
    assert out["pull"].item() == pytest.approx(4.5) and out["retain"].item() == pytest.approx(0.5)
