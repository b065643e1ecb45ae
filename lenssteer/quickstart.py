"""The quickstart in one call: probe + train + held-out check on one frozen pass.

:func:`run_quickstart_training` (what ``recipes/quickstart.py`` runs) computes the frozen states of a
training split once, probes the subspace from them (:func:`probe_from_data`), trains a Lens adapter
with a preset (:data:`lenssteer.train.QUICKSTART_CONFIG` or ``SCALE_FREE_CONFIG``) and reports
what training did to a held-out split.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lenssteer.extract import resolve_chat_template
from lenssteer.heldout import format_report, heldout_report
from lenssteer.models import (
    find_decoder_layers,
)
from lenssteer.train import (
    QUICKSTART_CONFIG,
    TrainConfig,
    chat_template_of_signature,
    resolve_training_layers,
    train_lens,
)
from lenssteer.training_data import TrainingData, TrainingError, prepare_training_data


def probe_from_data(model: nn.Module, tokenizer, corpus, data: TrainingData, rank=None, seed=0):
    """The language subspace at ``data.loss_layers`` from the frozen states already computed.

    Same decomposition and metadata as :func:`lenssteer.probe.probe`, without a second pass.
    """
    from lenssteer.probe import probe_metadata
    from lenssteer.subspace import compute_subspace

    states = {language: data.frozen[:, k] for k, language in enumerate(data.languages)}
    metadata = probe_metadata(
        model,
        tokenizer,
        corpus,
        data.pooling,
        data.chat_template,
        data_hash=data.data_hash,
        representation=data.representation,
    )
    return compute_subspace(
        states, data.loss_layers, data.central_language, rank=rank, seed=seed, metadata=metadata
    )


def quickstart_corpora(
    languages: Sequence[str], train_items: int = 200, heldout_items: int = 100, seed: int = 0
):
    """The quickstart's verses: ``train_items + heldout_items`` public-domain Bible verses (seed
    ``seed``) split into disjoint training and held-out corpora. ``languages[0]`` is central."""
    from lenssteer.data import load_bible

    corpus = load_bible(languages, central_language=languages[0])
    sample = corpus.sample(train_items + heldout_items, seed=seed)
    total = len(sample)
    parts = sample.split(
        {"train": train_items / total, "heldout": heldout_items / total}, seed=seed
    )
    return parts["train"], parts["heldout"]


def run_quickstart_training(
    model: nn.Module,
    tokenizer,
    train_corpus,
    heldout_corpus,
    out_dir: str | Path,
    subspace=None,
    config: TrainConfig | None = None,
    subspace_out: str | Path | None = None,
    pooling: str = "last",
    chat_template: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Probe (if no ``subspace`` is given), train a LoRA adapter, and check it on held-out items.

    Without ``subspace``, the subspace is computed from the training items' frozen states at the
    trained layers (the pass that prepares training), so probing costs no extra forward pass; it is
    saved to ``subspace_out`` if given. ``heldout_corpus`` must share no item with the training
    corpus. Returns ``{"adapter", "subspace", "report", "report_markdown", "timings"}``; the adapter
    (with the held-out summary in its config's ``metrics``) is saved to ``out_dir``.
    """
    config = config or QUICKSTART_CONFIG
    shared = set(train_corpus.ids) & set(heldout_corpus.ids)
    if shared:
        raise TrainingError(
            f"{len(shared)} held-out items are also training items (e.g. {sorted(shared)[0]})"
        )
    timings: dict[str, float] = {}
    if subspace is not None:
        pooling = subspace.metadata.get("pooling", pooling)
        use_template = chat_template_of_signature(tokenizer, subspace.metadata.get("template"))
        subspace_layers = subspace.layers
    else:
        use_template = resolve_chat_template(tokenizer, chat_template)
        n_total = len(find_decoder_layers(model))
        subspace_layers = list(range(n_total - config.n_layers, n_total))
        if config.representation == "final_norm":  # read at the last layer only
            subspace_layers = [n_total - 1]
    trained, loss_layers = resolve_training_layers(
        model, config.n_layers, subspace_layers, config.loss_layers
    )
    started = time.perf_counter()
    data = prepare_training_data(
        model,
        tokenizer,
        train_corpus,
        trained[0],
        loss_layers,
        pooling=pooling,
        chat_template=use_template,
        share_prefix=config.share_prefix,
        batch_size=config.precompute_batch_size,
        progress=progress,
        representation=config.representation,
    )
    timings["precompute_train_s"] = time.perf_counter() - started
    if subspace is None:
        started = time.perf_counter()
        subspace = probe_from_data(model, tokenizer, train_corpus, data)
        if subspace_out is not None:
            subspace.save(subspace_out)
        timings["probe_s"] = time.perf_counter() - started
    started = time.perf_counter()
    adapter = train_lens(
        model,
        tokenizer,
        subspace,
        train_corpus,
        out_dir,
        config,
        data=data,
        progress=progress,
        subspace_path=subspace_out,
    )
    timings["train_s"] = time.perf_counter() - started
    started = time.perf_counter()
    report = heldout_report(
        model, tokenizer, adapter, subspace, heldout_corpus, batch_size=16, progress=progress
    )
    timings["heldout_check_s"] = time.perf_counter() - started
    adapter.config.metrics["heldout"] = {
        **report["summary"],
        "n_items": report["n_items"],
        "data_hash": report["data_hash"],
    }
    adapter.save_pretrained(out_dir)
    return {
        "adapter": adapter,
        "subspace": subspace,
        "report": report,
        "report_markdown": format_report(report),
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
