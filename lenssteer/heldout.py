"""What training did to held-out items: the geometric report of a Lens adapter (a diagnostic).

Agnostic gap, push ratio, retain error and central->target retrieval before and after training, on
items training never saw (:func:`heldout_report`), and the same measures for any pair of state sets
(:func:`representation_report`). What users want is measured downstream (:mod:`lenssteer.compare`);
these numbers say whether the objectives moved the representation as designed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lenssteer.adapter import SteeringAdapter
from lenssteer.models import (
    ModuleNames,
)
from lenssteer.train import top_layer_states
from lenssteer.training_data import TrainingData, prepare_training_data


def _top1(queries: torch.Tensor, keys: torch.Tensor) -> float:
    queries = torch.nn.functional.normalize(queries, dim=-1)
    keys = torch.nn.functional.normalize(keys, dim=-1)
    return (queries @ keys.T).argmax(1).eq(torch.arange(len(queries))).double().mean().item()


def representation_report(
    before: torch.Tensor,
    after: torch.Tensor,
    subspace,
    languages: Sequence[str],
    layers: Sequence[int],
    alpha: float,
    language_alpha: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Compare pooled states of held-out items before and after steering.

    ``before``, ``after``: ``(N, K, L, H)`` for ``languages`` (central included) at ``layers``.
    Per layer and target language ``t`` (central ``c``; ``â`` = unit agnostic vector, ``B`` = specific
    basis, ``d_t`` = direction), with means over the ``N`` parallel items:

    * ``gap_along_agnostic``: mean ``|(h_t - h_c)·â|``, before and after, and its ``shrink`` =
      1 - after / before (what ``pull_space="direction"`` trains);
    * ``gap_outside_specific``: mean ``|(I - BᵀB)(h_t - h_c)|``, before, after and shrink (what
      ``pull_space="complement"`` trains);
    * ``push_ratio``: mean ``<BᵀB(h_t^after - h_t^before), d_t> / |d_t|²``, to set against ``alpha``
      (the language's own, ``alpha`` per language, where ``language_alpha`` names it);
    * ``retrieval``: central -> target top-1 among the N items (cosine, centred on the subspace's
      mean of language means), before and after; ``agnostic_retrieval``: the same on the states
      with their specific component projected out (what the subspace diagnostics call "after").

    For the central language: ``retain_mse_rel`` = mean ``|h_c^after - h_c^before|²`` divided by the
    variance of ``h_c^before`` across items (summed over hidden units). Layer means of the gaps are
    taken before the ratio: ``shrink = 1 - mean(after) / mean(before)``.
    """
    central = subspace.central_language
    c = list(languages).index(central)
    report: dict[str, Any] = {"alpha": alpha, "n_items": before.shape[0], "layers": {}}
    if language_alpha:
        report["language_alpha"] = dict(language_alpha)

    def shrink(gap_before: float, gap_after: float) -> float:
        return 1.0 - gap_after / gap_before if gap_before > 0 else 0.0

    for position, layer in enumerate(layers):
        b, a = before[:, :, position].double(), after[:, :, position].double()
        row = subspace.layer_position(layer)
        basis = subspace.specific_basis[row].double()
        agnostic = subspace.agnostic[row].double()
        unit = agnostic / agnostic.norm().clamp_min(1e-12)
        centre = subspace.means[row].double().mean(0)

        def outside(x: torch.Tensor, basis=basis) -> torch.Tensor:
            return x - (x @ basis.T) @ basis

        per_language = {}
        for k, language in enumerate(languages):
            if k == c:
                continue
            along = (
                ((b[:, k] - b[:, c]) @ unit).abs().mean().item(),
                ((a[:, k] - a[:, c]) @ unit).abs().mean().item(),
            )
            rest = (
                outside(b[:, k] - b[:, c]).norm(dim=-1).mean().item(),
                outside(a[:, k] - a[:, c]).norm(dim=-1).mean().item(),
            )
            direction = subspace.direction(language, layer).double()
            moved = ((a[:, k] - b[:, k]) @ basis.T) @ basis
            ratio = (moved @ direction).mean().item() / max(direction.dot(direction).item(), 1e-12)
            per_language[language] = {
                "gap_along_agnostic_before": along[0],
                "gap_along_agnostic_after": along[1],
                "shrink_along_agnostic": shrink(*along),
                "gap_outside_specific_before": rest[0],
                "gap_outside_specific_after": rest[1],
                "shrink_outside_specific": shrink(*rest),
                "push_ratio": ratio,
                "alpha": (language_alpha or {}).get(language, alpha),
                "retrieval_before": _top1(b[:, c] - centre, b[:, k] - centre),
                "retrieval_after": _top1(a[:, c] - centre, a[:, k] - centre),
                "agnostic_retrieval_before": _top1(outside(b[:, c]), outside(b[:, k])),
                "agnostic_retrieval_after": _top1(outside(a[:, c]), outside(a[:, k])),
            }
        variance = (b[:, c] - b[:, c].mean(0)).pow(2).sum(-1).mean().item()
        displacement = (a[:, c] - b[:, c]).pow(2).sum(-1).mean().item()
        targets = list(per_language.values())

        def mean(key: str, targets=targets) -> float:
            return sum(t[key] for t in targets) / len(targets)

        report["layers"][int(layer)] = {
            "languages": per_language,
            "shrink_along_agnostic": shrink(
                mean("gap_along_agnostic_before"), mean("gap_along_agnostic_after")
            ),
            "shrink_outside_specific": shrink(
                mean("gap_outside_specific_before"), mean("gap_outside_specific_after")
            ),
            "push_ratio": mean("push_ratio"),
            "retrieval_before": mean("retrieval_before"),
            "retrieval_after": mean("retrieval_after"),
            "agnostic_retrieval_before": mean("agnostic_retrieval_before"),
            "agnostic_retrieval_after": mean("agnostic_retrieval_after"),
            "retain_mse_rel": displacement / variance if variance > 0 else float("nan"),
        }
    top = int(max(layers))
    report["summary"] = {
        "layer": top,
        **{k: v for k, v in report["layers"][top].items() if k != "languages"},
    }
    return report


def heldout_report(
    model: nn.Module,
    tokenizer,
    adapter: SteeringAdapter,
    subspace,
    corpus,
    data: TrainingData | None = None,
    batch_size: int = 16,
    progress: bool = True,
    module_names: ModuleNames | None = None,
) -> dict[str, Any]:
    """Before/after report (:func:`representation_report`) of ``adapter`` on held-out ``corpus``.

    One frozen pass gives the states before and the trained layers' inputs; the states after run the
    trained layers alone with the adapter applied (equal to a full forward of the steered model, as
    the tests check).
    """
    config = adapter.config
    layers = list(config.loss_layers)
    if data is None:
        data = prepare_training_data(
            model,
            tokenizer,
            corpus,
            config.trained_layers[0],
            layers,
            pooling=config.representation.get("pooling", "last"),
            chat_template=bool(config.representation.get("chat_template")),
            batch_size=batch_size,
            progress=progress,
            module_names=module_names,
            representation=config.representation.get("point", "residual"),
        )
    device = next(model.parameters()).device
    after = torch.empty_like(data.frozen)
    with adapter.apply(model), torch.no_grad():
        for start in range(0, len(data), batch_size):
            items = list(range(start, min(start + batch_size, len(data))))
            batch = data.collate(items, split_prefix=True)
            prefix = batch.get("prefix_inputs")
            states = top_layer_states(
                model,
                batch["layer_inputs"].to(device),
                batch["suffix_mask" if prefix is not None else "attention_mask"].to(device),
                data.first_layer,
                layers,
                data.pooling,
                module_names,
                prefix_inputs=prefix.to(device) if prefix is not None else None,
                representation=data.representation,
            )
            after[items] = states.reshape(len(items), *data.frozen.shape[1:]).cpu()
    alpha = float(config.hyperparameters.get("alpha", 1.0))
    language_alpha = config.hyperparameters.get("language_alpha")
    report = representation_report(
        data.frozen, after, subspace, data.languages, layers, alpha, language_alpha
    )
    report["data_hash"] = data.data_hash
    return report


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table of :func:`heldout_report`: one row per target language and layer."""
    lines = [
        "| layer | language | gap along agnostic dir. before -> after (shrink) | gap outside "
        f"specific subspace (shrink) | push ratio (alpha {report['alpha']:g}) | "
        "retrieval before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for layer, entry in report["layers"].items():
        for language, r in entry["languages"].items():
            own = f" (alpha {r['alpha']:g})" if "language_alpha" in report else ""
            lines.append(
                f"| {layer} | {language} | {r['gap_along_agnostic_before']:.2f} -> "
                f"{r['gap_along_agnostic_after']:.2f} ({100 * r['shrink_along_agnostic']:.0f}%) | "
                f"{r['gap_outside_specific_before']:.1f} -> {r['gap_outside_specific_after']:.1f} "
                f"({100 * r['shrink_outside_specific']:.0f}%) | {r['push_ratio']:.2f}{own} | "
                f"{r['retrieval_before']:.2f} -> {r['retrieval_after']:.2f} |"
            )
        lines.append(
            f"| {layer} | **all** | **{100 * entry['shrink_along_agnostic']:.0f}%** | "
            f"{100 * entry['shrink_outside_specific']:.0f}% | {entry['push_ratio']:.2f} | "
            f"{entry['retrieval_before']:.2f} -> {entry['retrieval_after']:.2f} |"
        )
    s = report["summary"]
    lines.append(
        f"\nLayer {s['layer']}, {report['n_items']} held-out items: the gap along the agnostic "
        f"direction shrinks {100 * s['shrink_along_agnostic']:.1f}% (outside the specific subspace: "
        f"{100 * s['shrink_outside_specific']:.1f}%), push ratio {s['push_ratio']:.2f} (alpha "
        f"{report['alpha']:g}), central-language retain MSE {s['retain_mse_rel']:.4f} of its "
        f"variance, retrieval {s['retrieval_before']:.3f} -> {s['retrieval_after']:.3f} (on the "
        f"part outside the specific subspace: {s['agnostic_retrieval_before']:.3f} -> "
        f"{s['agnostic_retrieval_after']:.3f})."
    )
    return "\n".join(lines)
