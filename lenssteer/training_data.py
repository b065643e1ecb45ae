"""The frozen pass of Lens training: what the trained layers read and what the losses compare to.

Everything below the first trained layer is frozen, so its output (the hidden states of the whole
sequence) and the frozen model's pooled states at the loss layers are fixed. :func:`prepare_training_data`
computes them once per item (texts that share a prompt prefix, such as a chat template's system turn,
share one prefix pass through a KV cache) into a :class:`TrainingData`, which training
(:mod:`lenssteer.train`) then reads step by step and which can be saved and reloaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lenssteer.adapter import base_model_description
from lenssteer.extract import (
    RepresentationError,
    cap_texts,
    check_representation,
    default_max_tokens,
    format_texts,
    representation_map,
    template_signature,
)
from lenssteer.forward import (
    common_prefix_length,
    hidden_states_of_call,
    pool_real_positions,
    run_prefix,
)
from lenssteer.hooks import (
    hooked,
    position_ids_from_mask,
    run_until_stopped,
    stop_after,
)
from lenssteer.models import (
    ModuleNames,
    find_decoder_layers,
    pad_token_id,
)


class TrainingError(ValueError):
    """Bad training input (subspace, languages, layers) or a model the fast path cannot run."""


@dataclass
class TrainingData(torch.utils.data.Dataset):
    """What training needs from the frozen model, for ``N`` parallel items in ``K`` languages.

    Sequences are item-major (item ``i``, language ``k`` is sequence ``i * K + k``). Each sequence
    is ``prefix_ids`` (shared by all, may be empty) followed by its own suffix tokens.

    * ``prefix_ids (P,)``, ``prefix_states (P, H)``: the shared prefix and its input to the first
      trained layer.
    * ``token_ids (T,)``, ``suffix_states (T, H)``, ``offsets (N*K + 1,)``: suffix tokens of every
      sequence, concatenated, and their inputs to the first trained layer.
    * ``frozen (N, K, L, H)``: the frozen model's pooled states at the loss layers.
    * ``hold (N,)``, optional: items whose states the adapter must leave in place (training's
      ``hold_corpus``); the Lens terms read the other items only.
    """

    languages: list[str]
    central_language: str
    first_layer: int
    loss_layers: list[int]
    pooling: str
    chat_template: bool
    prefix_ids: torch.Tensor
    prefix_states: torch.Tensor
    token_ids: torch.Tensor
    suffix_states: torch.Tensor
    offsets: torch.Tensor
    frozen: torch.Tensor
    data_hash: str | None = None
    pad_token_id: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    representation: str = "residual"
    hold: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.frozen.shape[0]

    def __getitem__(self, index: int) -> int:
        return index

    @property
    def n_languages(self) -> int:
        return len(self.languages)

    @property
    def central_index(self) -> int:
        return self.languages.index(self.central_language)

    _TENSORS = ("prefix_ids", "prefix_states", "token_ids", "suffix_states", "offsets", "frozen")

    def save(self, path: str | Path) -> Path:
        """Write the tensors (safetensors) and the rest (JSON header) to one file, atomically.

        Reusing it skips the frozen pass, e.g. to sweep hyper-parameters.
        """
        from lenssteer.io import atomic_save_tensors

        header = {
            "languages": self.languages,
            "central_language": self.central_language,
            "first_layer": self.first_layer,
            "loss_layers": self.loss_layers,
            "pooling": self.pooling,
            "chat_template": self.chat_template,
            "data_hash": self.data_hash,
            "pad_token_id": self.pad_token_id,
            "metadata": self.metadata,
            "representation": self.representation,
        }
        tensors = {name: getattr(self, name) for name in self._TENSORS}
        if self.hold is not None:
            tensors["hold"] = self.hold
        atomic_save_tensors(
            tensors,
            path,
            metadata={"format": "lenssteer-training-data", "header": json.dumps(header)},
        )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TrainingData:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != "lenssteer-training-data":
                raise TrainingError(f"{path} is not a lenssteer training-data file")
            tensors = {name: handle.get_tensor(name) for name in cls._TENSORS}
            if "hold" in handle.keys():
                tensors["hold"] = handle.get_tensor("hold")
        return cls(**json.loads(meta["header"]), **tensors)

    def with_loss_layers(self, layers: Sequence[int]) -> TrainingData:
        """The same data keeping the frozen states of ``layers`` only (a subset of ours)."""
        missing = [layer for layer in layers if layer not in self.loss_layers]
        if missing:
            raise TrainingError(f"the precomputed data have no frozen states at layers {missing}")
        keep = [self.loss_layers.index(layer) for layer in sorted(layers)]
        return dataclasses.replace(self, loss_layers=sorted(layers), frozen=self.frozen[:, :, keep])

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(S,)`` and first-trained-layer inputs ``(S, H)`` of sequence ``index``."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = torch.cat([self.prefix_ids, self.token_ids[start:end]])
        states = torch.cat([self.prefix_states, self.suffix_states[start:end]])
        return ids, states

    def collate(
        self,
        items: Sequence[int],
        layer_inputs: bool = True,
        input_ids: bool = False,
        split_prefix: bool = False,
    ) -> dict[str, torch.Tensor]:
        """A right-padded batch of ``B`` items (``B*K`` sequences, item-major).

        Returns ``attention_mask (B*K, S)`` (whole sequences), ``frozen (B, K, L, H)``,
        ``item_index (B,)``, ``hold (B,)`` (with :attr:`hold`) and, as asked, ``input_ids (B*K, S)`` and ``layer_inputs (B*K, S, H)``.
        With ``split_prefix`` (and a shared prefix), ``layer_inputs`` holds the suffixes only,
        ``(B*K, S - P, H)``, with ``suffix_mask (B*K, S - P)``, and ``prefix_inputs (P, H)`` the
        shared prefix once.
        """
        items = [int(i) for i in items]
        indices = [i * self.n_languages + k for i in items for k in range(self.n_languages)]
        prefix = len(self.prefix_ids)
        split = split_prefix and prefix > 0
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in indices]
        suffix_width = max(lengths)
        mask = torch.zeros(len(indices), prefix + suffix_width, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, : prefix + length] = 1
        batch: dict[str, torch.Tensor] = {"attention_mask": mask}
        if input_ids:
            ids = torch.full(mask.shape, self.pad_token_id, dtype=torch.long)
            ids[:, :prefix] = self.prefix_ids
            for row, i in enumerate(indices):
                ids[row, prefix : prefix + lengths[row]] = self.token_ids[
                    self.offsets[i] : self.offsets[i + 1]
                ]
            batch["input_ids"] = ids
        if layer_inputs:
            hidden = self.suffix_states.shape[-1]
            start = prefix if split else 0
            states = torch.zeros(
                len(indices), prefix + suffix_width - start, hidden, dtype=self.suffix_states.dtype
            )
            if not split:
                states[:, :prefix] = self.prefix_states
            for row, i in enumerate(indices):
                states[row, prefix - start : prefix - start + lengths[row]] = self.suffix_states[
                    self.offsets[i] : self.offsets[i + 1]
                ]
            batch["layer_inputs"] = states
            if split:
                batch["prefix_inputs"] = self.prefix_states
                batch["suffix_mask"] = mask[:, prefix:].contiguous()
        batch["frozen"] = self.frozen[torch.tensor(items)]
        batch["item_index"] = torch.tensor(items)
        if self.hold is not None:
            batch["hold"] = self.hold[torch.tensor(items)]
        return batch


@torch.no_grad()
def prepare_training_data(
    model: nn.Module,
    tokenizer,
    corpus,
    first_layer: int,
    loss_layers: Sequence[int],
    pooling: str = "last",
    chat_template: bool = False,
    share_prefix: bool = True,
    batch_size: int = 16,
    progress: bool = True,
    module_names: ModuleNames | None = None,
    representation: str = "residual",
    max_tokens: int | None = None,
) -> TrainingData:
    """One frozen pass over every text of ``corpus``: inputs of ``first_layer`` and pooled states.

    ``corpus`` is a :class:`~lenssteer.data.ParallelCorpus` (languages in its order, central first).
    Texts are formatted and tokenized exactly as :func:`lenssteer.extract.extract_states` does, so
    ``frozen`` equals what extraction returns for the same layers, pooling, template and
    representation point.
    """
    from tqdm.auto import tqdm

    languages = list(corpus.languages)
    n_items, n_languages = len(corpus), len(languages)
    loss_layers = sorted(int(i) for i in loss_layers)
    if pooling not in ("last", "mean"):
        raise TrainingError(f"unknown pooling {pooling!r}")
    if loss_layers[0] < first_layer:
        raise TrainingError(f"loss layers {loss_layers} start below the first trained layer")
    decoder_layers = find_decoder_layers(model, module_names)
    try:
        check_representation(representation, loss_layers, len(decoder_layers))
    except RepresentationError as error:
        raise TrainingError(str(error)) from None
    read = representation_map(model, representation, module_names)
    if max_tokens is None:
        max_tokens = default_max_tokens(model, tokenizer, chat_template)
    capped = {
        language: cap_texts(tokenizer, corpus.texts[language], max_tokens, f"precompute {language}")
        for language in languages
    }
    texts = [capped[language][i] for i in range(n_items) for language in languages]
    prompts = format_texts(tokenizer, texts, chat_template)
    encoded = tokenizer(prompts, add_special_tokens=not chat_template)["input_ids"]
    prefix_length = common_prefix_length(encoded) if share_prefix else 0
    device = next(model.parameters()).device
    top = loss_layers[-1]
    captured: dict[str, Any] = {}

    def capture_input(_module, args, kwargs) -> None:
        captured["input"] = hidden_states_of_call(_module, args, kwargs)

    def make_output_hook(layer: int):
        def hook(_module, hidden: torch.Tensor) -> None:
            captured[layer] = read(hidden)

        return hook

    hooks = dict(
        output_hooks=[(decoder_layers[i], make_output_hook(i)) for i in loss_layers]
        + [stop_after(decoder_layers[top])],
        input_hooks=[(decoder_layers[first_layer], capture_input)],
    )

    prefix_ids = torch.tensor(encoded[0][:prefix_length], dtype=torch.long)
    hidden_size = base_model_description(model)["hidden_size"]
    prefix_states = torch.zeros(0, hidden_size)
    prefix_sums: dict[int, torch.Tensor] = {}
    prefix = None
    was_training = model.training
    model.eval()
    try:
        if prefix_length:
            with hooked(**hooks):
                prefix = run_prefix(
                    model, partial(run_until_stopped, model), input_ids=prefix_ids[None].to(device)
                )
            prefix_states = captured["input"][0].float().cpu()
            prefix_sums = {i: captured[i][0].float().sum(0) for i in loss_layers}

        suffixes = [ids[prefix_length:] for ids in encoded]
        offsets = torch.zeros(len(suffixes) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor([len(s) for s in suffixes]).cumsum(0)
        token_ids = torch.tensor([t for s in suffixes for t in s], dtype=torch.long)
        suffix_states = torch.empty(int(offsets[-1]), hidden_size)
        frozen = torch.empty(len(suffixes), len(loss_layers), hidden_size)
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        with (
            tqdm(total=len(order), desc="precompute", unit="text", disable=not progress) as bar,
            hooked(**hooks),
        ):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(suffixes[i]) for i in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, : len(suffixes[i])] = torch.tensor(suffixes[i])
                    mask[row, : len(suffixes[i])] = 1
                ids, mask = ids.to(device), mask.to(device)
                kwargs: dict[str, Any] = {
                    "attention_mask": mask,
                    "position_ids": position_ids_from_mask(mask),
                    "use_cache": False,
                }
                if prefix is not None:
                    kwargs = prefix.continuing(model, mask, kwargs["position_ids"])
                run_until_stopped(model, input_ids=ids, **kwargs)
                layer_input = captured["input"].float().cpu()
                real = mask.bool().cpu()
                for row, i in enumerate(chunk):
                    suffix_states[offsets[i] : offsets[i + 1]] = layer_input[row][real[row]]
                for position, layer in enumerate(loss_layers):
                    frozen[torch.tensor(chunk), position] = pool_real_positions(
                        captured[layer],
                        mask,
                        pooling,
                        prefix_sums.get(layer),
                        prefix_length,
                    ).cpu()
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return TrainingData(
        languages=languages,
        central_language=corpus.central_language,
        first_layer=first_layer,
        loss_layers=loss_layers,
        pooling=pooling,
        chat_template=chat_template,
        prefix_ids=prefix_ids,
        prefix_states=prefix_states,
        token_ids=token_ids,
        suffix_states=suffix_states,
        offsets=offsets,
        frozen=frozen.reshape(n_items, n_languages, len(loss_layers), hidden_size),
        data_hash=corpus.data_hash() if hasattr(corpus, "data_hash") else None,
        pad_token_id=pad_token_id(tokenizer),
        metadata={"template": template_signature(tokenizer, chat_template)},
        representation=representation,
    )
