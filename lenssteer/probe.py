"""The probe stage end to end: parallel text -> pooled states -> language subspaces on disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lenssteer.extract import (
    Pooling,
    Representation,
    check_representation,
    extract_corpus,
    provenance_of,
    resolve_chat_template,
)
from lenssteer.models import (
    ModuleNames,
    load_model,
    num_decoder_layers,
    resolve_layers,
)
from lenssteer.subspace import Subspace, compute_subspace


def probe_metadata(
    model,
    tokenizer,
    corpus,
    pooling: Pooling,
    chat_template: bool,
    module_names: ModuleNames | None = None,
    data_hash: str | None = None,
    representation: Representation = "residual",
) -> dict:
    """What a subspace records about where its states came from (model, representation, text):
    :func:`~lenssteer.extract.provenance_of` as subspace.json fields."""
    provenance = provenance_of(
        model,
        tokenizer,
        corpus,
        [],
        pooling,
        chat_template,
        module_names,
        data_hash,
        representation,
    )
    return provenance.as_metadata()


def probe(
    model: str,
    corpus: str = "bible",
    languages: Sequence[str] = ("en", "fr", "de", "es", "ru"),
    central_language: str = "en",
    layers: str | Sequence[int] = "top:2",  # a layer spec: models.resolve_layers
    limit: int | None = 300,
    out: str | Path | None = None,
    rank: int | None = None,
    pooling: Pooling = "last",
    chat_template: bool | None = None,
    batch_size: int = 16,
    seed: int = 0,
    module_names: ModuleNames | None = None,
    progress: bool = True,
    loaded=None,
    representation: Representation = "residual",
    overwrite: bool = True,
    max_tokens: int | None = None,
    dtype: str = "float32",
    command: str | None = None,
) -> Subspace:
    """Compute (and, with ``out``, save) the language subspaces of ``model`` on a parallel corpus.

    ``loaded`` may pass an already loaded ``(tokenizer, model)`` pair to skip loading. ``out`` is
    checked before any work: a file, a non-empty folder that is not a subspace, a folder equal to
    or inside an input (corpus file, model folder) or an unwritable place is refused, and so is an
    existing subspace with ``overwrite=False`` (the CLI without ``--force``). ``max_tokens``: the
    token cap per text (default: the model's context; longer texts are cut with a warning).
    ``representation="final_norm"`` reads the last layer after the model's final norm (as Lens
    does; ``layers`` must then be the last layer only, e.g. ``"-1"``). ``dtype``: the weights'
    dtype when the model is loaded here (``"bfloat16"``: faster only on a device that computes
    it natively, ``"auto"`` picks it there, see :func:`lenssteer.models.native_bfloat16`; the pooled
    states and the subspace stay float32). ``command``: the command line
    that ran this (the CLI's), recorded as the subspace's ``command`` metadata.
    """
    from lenssteer.data import load_corpus
    from lenssteer.io import check_output_folder

    if out is not None:
        inputs = [corpus, model] if loaded is None else [corpus]
        check_output_folder(out, "subspace.json", "subspace", inputs, overwrite=overwrite)
    parallel = load_corpus(
        corpus, languages, central_language=central_language, limit=limit, seed=seed
    )
    tokenizer, lm = loaded if loaded is not None else load_model(model, dtype)
    n_layers = num_decoder_layers(lm, module_names)
    absolute = resolve_layers(layers, n_layers)
    check_representation(representation, absolute, n_layers)
    use_template = resolve_chat_template(tokenizer, chat_template)
    states = extract_corpus(
        lm,
        tokenizer,
        parallel,
        absolute,
        pooling=pooling,
        chat_template=use_template,
        batch_size=batch_size,
        progress=progress,
        module_names=module_names,
        representation=representation,
        max_tokens=max_tokens,
    )
    metadata = probe_metadata(
        lm, tokenizer, parallel, pooling, use_template, module_names, representation=representation
    )
    if command is not None:
        metadata["command"] = command
    subspace = compute_subspace(
        states, absolute, central_language, rank=rank, seed=seed, metadata=metadata
    )
    if out is not None:
        subspace.save(out)
    return subspace


def format_diagnostics(subspace: Subspace) -> str:
    """A Markdown table of the subspace diagnostics, one row per layer."""
    reports = subspace.metadata.get("diagnostics", [])
    targets = [lang for lang in subspace.languages if lang != subspace.central_language]
    header = (
        "| layer | lang-ID acc | retrieval before | retrieval after | "
        + " | ".join(f"{subspace.central_language}->{t} before/after" for t in targets)
        + " | explained var (top r) |"
    )
    lines = [header, "|" + "---|" * (5 + len(targets))]
    for report in reports:
        cells = [
            str(report["layer"]),
            f"{report['language_id_accuracy']:.3f}",
            f"{report['retrieval_before_mean']:.3f}",
            f"{report['retrieval_after_mean']:.3f}",
            *(
                f"{report['retrieval_before'][t]:.2f}/{report['retrieval_after'][t]:.2f}"
                for t in targets
            ),
            f"{sum(report['explained_variance']):.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if reports:
        r = reports[0]
        lines.append(
            f"\n{r['n_train_items']} items fit the diagnostic subspace, {r['n_heldout_items']} held-out "
            f"items per language are scored (retrieval: top-1 among {r['n_heldout_items']})."
        )
    return "\n".join(lines)
