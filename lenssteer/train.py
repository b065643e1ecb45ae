"""Lens training: steer the top decoder layers so target languages share the central one's semantics.

**What is trained.** Only the top ``K`` decoder layers (default 2, as in Lens), either in full
(``kind="layers"``) or through LoRA modules on every linear map inside them (``kind="lora"``, PEFT).
Embeddings, lower layers, the final norm and the LM head stay frozen.

**Which representation the losses see.** Exactly what probing measured, so that the subspace and the
training agree: the output of a decoder layer (residual stream, before the final norm), pooled as
the subspace was pooled (``last`` real token by default, or ``mean`` over real tokens), of each text
formatted with the same prompt template (the chat template's user turn plus generation prompt when
the subspace was probed that way). Pooling, template and model identity are read from the subspace's
metadata and checked. The losses (:mod:`lenssteer.objectives`) are taken at the *loss layers*: the
trained layers the subspace covers (by default), averaged over layers.

**The fast path.** Everything below the first trained layer is frozen, so its input (the hidden
states of the whole sequence) and the frozen model's pooled states at the loss layers are fixed:
:func:`prepare_training_data` computes them once per item, in one frozen pass (texts that share a
prompt prefix, such as a chat template's system turn, share one prefix pass through a KV cache).
Each step then runs only the trained layers, by calling the model's own decoder with the lower
layers swapped for pass-throughs: the model builds its causal mask and rotary embeddings itself, so
any architecture whose decoder stack takes ``inputs_embeds`` unchanged works (Llama, Qwen2, Gemma3,
Mistral, Phi3, ...). A start-up check compares the fast path with the frozen states and refuses
models where they differ (GPT-2 adds position embeddings outside the layers; use ``fast=False``).
No second copy of the model and no LM head are involved; the frozen reference is the precomputed
states.

**The loop** is the Hugging Face ``Trainer``: ``accelerate launch`` / ``torchrun`` run the same code
on several processes; progress bar, logging of every loss term (``loss_pull``, ``loss_push``,
``loss_retain``), seeds, checkpoints (trainable weights only, safetensors) and resume. The adapter
is written at the very end into a scratch folder that replaces ``out_dir`` in one rename, so an
interrupted run leaves an earlier adapter there intact.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lenssteer.adapter import SteeringAdapter, base_model_description
from lenssteer.extract import (
    RepresentationError,
    cap_texts,
    check_representation,
    default_max_tokens,
    format_texts,
    representation_map,
    template_signature,
)
from lenssteer.forward import cache_keyword, hidden_states_of_call
from lenssteer.hooks import (
    hooked,
    last_real_positions,
    position_ids_from_mask,
    run_until_stopped,
    stop_after,
)
from lenssteer.models import (
    ModuleNames,
    dtype_name,
    find_decoder_layers,
    model_dtype,
    model_identity,
)
from lenssteer.objectives import LensObjective, lens_losses, loss_scales
from lenssteer.subspace import SubspaceError

__all__ = [
    "KINDS",
    "LensTrainingModule",
    "TrainConfig",
    "TrainingData",
    "TrainingError",
    "heldout_report",
    "format_report",
    "prepare_training_data",
    "representation_report",
    "top_layer_states",
    "train_lens",
]

KINDS = ("lora", "layers")


class TrainingError(ValueError):
    """Bad training input (subspace, languages, layers) or a model the fast path cannot run."""


@dataclass
class TrainConfig:
    """Every hyper-parameter of a Lens run (recorded in the adapter's config).

    ``n_layers``: the top K decoder layers train. ``loss_layers``: absolute layers where the losses
    are taken (default: the trained layers the subspace covers). ``batch_size``: parallel items per
    step and process; each item brings all of its languages. ``save_steps``: checkpoint every N
    steps (0: none). ``fast``: train on precomputed inputs of the first trained layer.
    ``representation``: the point the losses read, ``"residual"`` (layer outputs) or
    ``"final_norm"`` (the last layer after the model's final norm, as Lens; the subspace must have
    been probed there, and the losses are then taken at the last layer only).
    ``normalization``: the units of the loss terms, ``"mse"`` (Lens; the weights depend on the
    model's scale) or ``"scale_free"`` (pull as a share of the frozen gap, push in units of the
    direction's squared length, retain as a share of the central states' spread; see
    :mod:`lenssteer.objectives`).
    ``max_tokens``: texts longer than this many tokens are cut, with a warning naming the row
    (default: the model's context; see :func:`lenssteer.extract.default_max_tokens`).
    """

    kind: str = "lora"
    n_layers: int = 2
    loss_layers: list[int] | None = None
    pull_weight: float = 1.0
    push_weight: float = 1.0
    retain_weight: float = 1.0
    alpha: float = 1.0
    pull_space: str = "direction"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_modules: list[str] | None = None
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = -1
    seed: int = 0
    fast: bool = True
    share_prefix: bool = True
    precompute_batch_size: int = 16
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int = 2
    representation: str = "residual"
    normalization: str = "mse"
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TrainingError(f"kind {self.kind!r} is unknown; choose one of {', '.join(KINDS)}")
        try:
            check_representation(self.representation, [], 1)
        except RepresentationError as error:
            raise TrainingError(str(error)) from None
        if self.n_layers < 1:
            raise TrainingError(f"n_layers must be >= 1, got {self.n_layers}")
        for name in ("learning_rate", "num_epochs", "lora_alpha", "lora_dropout", "warmup_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainingError(f"{name} must be a finite number, got {value!r}")
        if self.max_steps <= 0 and not self.num_epochs > 0:
            raise TrainingError(
                f"num_epochs must be > 0 (CLI: --epochs), got {self.num_epochs}; or set max_steps"
            )
        if not self.learning_rate > 0:
            raise TrainingError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("batch_size", "gradient_accumulation_steps", "precompute_batch_size"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.objective()  # validates the weights

    def objective(self) -> LensObjective:
        try:
            return LensObjective(
                self.pull_weight,
                self.push_weight,
                self.retain_weight,
                self.alpha,
                self.pull_space,
                self.normalization,
            )
        except ValueError as error:
            raise TrainingError(str(error)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------------
# Checks of the inputs


def _chat_template_from_signature(tokenizer, signature: str | None) -> bool:
    """The subspace's template signature -> whether to use the chat template (checked)."""
    if signature is None:
        raise TrainingError(
            "the subspace records no prompt template ('template' in its metadata); make it with "
            "lenssteer.probe.probe or pass metadata={'template': ..., 'pooling': ...}"
        )
    if signature == "raw":
        return False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    actual = template_signature(tokenizer, True) if has_template else "no chat template"
    if actual != signature:
        raise TrainingError(
            f"the subspace was probed with chat template {signature!r}, but this tokenizer has "
            f"{actual!r}: probe again with this tokenizer"
        )
    return True


def check_subspace(model: nn.Module, subspace, languages: Sequence[str], central_language: str):
    """Raise :class:`TrainingError` unless ``subspace`` was made for ``model`` and ``languages``."""
    try:
        subspace.check_fits(model)
    except SubspaceError as error:
        raise TrainingError(str(error)) from error
    missing = [language for language in languages if language not in subspace.languages]
    if missing:
        raise TrainingError(
            f"language(s) {', '.join(missing)} are not in the subspace (it has "
            f"{', '.join(subspace.languages)}): probe with them, or train on fewer languages"
        )
    if subspace.central_language != central_language:
        raise TrainingError(
            f"the subspace's central language is {subspace.central_language!r}, the training "
            f"corpus' is {central_language!r}"
        )


def resolve_training_layers(
    model: nn.Module,
    n_layers: int,
    subspace_layers: Sequence[int],
    loss_layers: Sequence[int] | None = None,
    module_names: ModuleNames | None = None,
) -> tuple[list[int], list[int]]:
    """``(trained_layers, loss_layers)``, absolute and sorted, checked against model and subspace."""
    total = len(find_decoder_layers(model, module_names))
    if n_layers > total:
        raise TrainingError(
            f"cannot train the top {n_layers} layers: the model has {total} decoder layers"
        )
    trained = list(range(total - n_layers, total))
    if loss_layers is None:
        chosen = [layer for layer in trained if layer in subspace_layers]
        if not chosen:
            raise TrainingError(
                f"the subspace covers layers {list(subspace_layers)}, none of the trained layers "
                f"{trained}: probe the top layers (e.g. --layers top:{n_layers})"
            )
    else:
        chosen = sorted({layer % total if layer < 0 else layer for layer in loss_layers})
        absent = [layer for layer in chosen if layer not in subspace_layers]
        if absent:
            raise TrainingError(f"loss layers {absent} are not in the subspace {subspace_layers}")
        outside = [layer for layer in chosen if layer not in trained]
        if outside:
            raise TrainingError(f"loss layers {outside} are not among the trained layers {trained}")
    if chosen[-1] != trained[-1]:
        raise TrainingError(
            f"the top trained layer {trained[-1]} would get no gradient: the highest loss layer "
            f"is {chosen[-1]} (probe layer {trained[-1]} too, or train fewer layers)"
        )
    return trained, chosen


# --------------------------------------------------------------------------------------------------
# Precomputed inputs


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
        atomic_save_tensors(
            {name: getattr(self, name) for name in self._TENSORS},
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
        ``item_index (B,)`` and, as asked, ``input_ids (B*K, S)`` and ``layer_inputs (B*K, S, H)``.
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
        return batch


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving at least one token in every sequence."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    length = 0
    while length < shortest - 1 and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def _pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    extra_sum: torch.Tensor | None = None,
    extra_count: int = 0,
) -> torch.Tensor:
    """Pool ``(N, S, H)`` over real tokens: last real token or mean. Returns ``(N, H)`` float32.

    ``extra_sum``/``extra_count`` add tokens that sit before the sequence (a cached prefix) to the
    mean.
    """
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_real_positions(attention_mask)].float()
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    total = (hidden.float() * mask).sum(1)
    count = mask.sum(1)
    if extra_sum is not None:
        total = total + extra_sum
        count = count + extra_count
    return total / count


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
    from transformers import DynamicCache

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
    prefix_length = _common_prefix_length(encoded) if share_prefix else 0
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
    cache = None
    was_training = model.training
    model.eval()
    try:
        if prefix_length:
            cache = DynamicCache(config=model.config)
            with hooked(**hooks):
                run_until_stopped(
                    model,
                    input_ids=prefix_ids[None].to(device),
                    **{cache_keyword(model): cache},
                    use_cache=True,
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
                kwargs: dict[str, Any] = {"use_cache": False}
                positions = position_ids_from_mask(mask)
                full_mask = mask
                if prefix_length:
                    batch_cache = copy.deepcopy(cache)
                    batch_cache.batch_repeat_interleave(len(chunk))
                    ones = torch.ones(len(chunk), prefix_length, dtype=mask.dtype, device=device)
                    full_mask = torch.cat([ones, mask], dim=1)
                    positions = positions + prefix_length
                    kwargs = {"use_cache": True, cache_keyword(model): batch_cache}
                run_until_stopped(
                    model, input_ids=ids, attention_mask=full_mask, position_ids=positions, **kwargs
                )
                layer_input = captured["input"].float().cpu()
                real = mask.bool().cpu()
                for row, i in enumerate(chunk):
                    suffix_states[offsets[i] : offsets[i + 1]] = layer_input[row][real[row]]
                for position, layer in enumerate(loss_layers):
                    frozen[torch.tensor(chunk), position] = _pool(
                        captured[layer],
                        mask,
                        pooling,
                        extra_sum=prefix_sums.get(layer),
                        extra_count=prefix_length,
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
        pad_token_id=int(tokenizer.pad_token_id or 0),
        metadata={"template": template_signature(tokenizer, chat_template)},
        representation=representation,
    )


# --------------------------------------------------------------------------------------------------
# The trained layers alone


class _PassThrough(nn.Module):
    """Stands in for a frozen lower layer: its input is already the precomputed hidden state."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _dtype_of(model: nn.Module) -> torch.dtype:
    """The model's floating-point dtype (precomputed inputs are stored in float32)."""
    return model_dtype(model)


@contextmanager
def _float32_layers(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Run ``layers`` in float32 inside a lower-precision model (their inputs cast up, outputs back).

    Full-layer training of a bfloat16 model: the trained weights, their gradients and the
    optimizer state are float32 (as LoRA's are under PEFT), the frozen rest stays bfloat16.
    """
    from lenssteer.hooks import _replace_main_output, main_output

    def cast_in(_module, args, kwargs):
        if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
            args = (args[0].float(), *args[1:])
        if torch.is_tensor(kwargs.get("hidden_states")):
            kwargs["hidden_states"] = kwargs["hidden_states"].float()
        return args, kwargs

    handles, dtypes = [], []
    try:
        for layer in layers:
            dtype = model_dtype(layer)
            dtypes.append(dtype)
            layer.float()

            def cast_out(_module, _args, output, dtype=dtype):
                return _replace_main_output(output, main_output(output).to(dtype))

            handles.append(layer.register_forward_pre_hook(cast_in, with_kwargs=True))
            handles.append(layer.register_forward_hook(cast_out))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, dtype in zip(layers, dtypes, strict=False):  # those cast so far
            layer.to(dtype)


def _decoder_of(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The module that owns the decoder layer list (it builds masks and rotary embeddings)."""
    for module in model.modules():
        for child in module.children():
            if child is layers:
                return module
    raise TrainingError("cannot find the module that holds the decoder layers")


@contextmanager
def _lower_layers_skipped(layers: nn.ModuleList, first_layer: int) -> Iterator[None]:
    originals = [layers[i] for i in range(first_layer)]
    try:
        for i in range(first_layer):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _prefix_cache(model: nn.Module, prefix_length: int, first_layer: int, keys, values):
    """Fill the cache slots of the skipped lower layers with zeros of the prefix's length.

    Those layers never read them; the model reads the cache length from its first slot.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in range(first_layer):
        shape = (1, keys[1], prefix_length, keys[3])
        cache.update(
            torch.zeros(shape, dtype=keys[0], device=keys[2]),
            torch.zeros((1, values[1], prefix_length, values[3]), dtype=values[0], device=keys[2]),
            layer,
        )
    return cache


def _run_pooled(
    model: nn.Module,
    layers: Sequence[int],
    attention_mask: torch.Tensor,
    pooling: str,
    module_names: ModuleNames | None,
    layer_inputs: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    first_layer: int | None = None,
    prefix_inputs: torch.Tensor | None = None,
    representation: str = "residual",
) -> torch.Tensor:
    decoder_layers = find_decoder_layers(model, module_names)
    check_representation(representation, layers, len(decoder_layers))
    read = representation_map(model, representation, module_names)
    outputs: dict[int, torch.Tensor] = {}
    top = max(layers)

    def make_hook(layer: int):
        def hook(_module, hidden: torch.Tensor) -> None:
            outputs[layer] = read(hidden)

        return hook

    decoder_module = _decoder_of(model, decoder_layers)

    def run(**kwargs) -> None:
        if layer_inputs is None:
            run_until_stopped(model, **kwargs)
        else:
            with _lower_layers_skipped(decoder_layers, first_layer):
                run_until_stopped(decoder_module, **kwargs)

    dtype = _dtype_of(model)
    prefix_sums: dict[int, torch.Tensor] = {}
    prefix_length = 0
    hooks = [(decoder_layers[i], make_hook(i)) for i in layers]
    with hooked([*hooks, stop_after(decoder_layers[top])]):
        if layer_inputs is None:
            run(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
        elif prefix_inputs is None or len(prefix_inputs) == 0:
            run(
                inputs_embeds=layer_inputs.to(dtype),
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
        else:
            # The shared prefix runs once; the suffixes attend to its keys and values (which carry
            # gradients back to the trained layers through the cache).
            prefix_length = prefix_inputs.shape[0]
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            positions = torch.arange(prefix_length, device=prefix_inputs.device)[None]
            run(
                inputs_embeds=prefix_inputs[None].to(dtype),
                position_ids=positions,
                **{cache_keyword(decoder_module): cache},
                use_cache=True,
            )
            prefix_sums = {i: outputs[i][0].float().sum(0) for i in layers}
            reference = cache.layers[first_layer]
            keys, values = reference.keys, reference.values
            filled = _prefix_cache(
                model,
                prefix_length,
                first_layer,
                (keys.dtype, keys.shape[1], keys.device, keys.shape[3]),
                (values.dtype, values.shape[1], values.device, values.shape[3]),
            )
            for layer in range(first_layer, len(decoder_layers)):
                filled.layers[layer] = cache.layers[layer]
            filled.batch_repeat_interleave(layer_inputs.shape[0])
            ones = torch.ones(
                attention_mask.shape[0],
                prefix_length,
                dtype=attention_mask.dtype,
                device=attention_mask.device,
            )
            run(
                inputs_embeds=layer_inputs.to(dtype),
                attention_mask=torch.cat([ones, attention_mask], dim=1),
                position_ids=position_ids_from_mask(attention_mask) + prefix_length,
                **{cache_keyword(decoder_module): filled},
                use_cache=True,
            )
    pooled = [
        _pool(outputs[i], attention_mask, pooling, prefix_sums.get(i), prefix_length)
        for i in layers
    ]
    return torch.stack(pooled, dim=1)


def top_layer_states(
    model: nn.Module,
    layer_inputs: torch.Tensor,
    attention_mask: torch.Tensor,
    first_layer: int,
    layers: Sequence[int],
    pooling: str = "last",
    module_names: ModuleNames | None = None,
    prefix_inputs: torch.Tensor | None = None,
    representation: str = "residual",
) -> torch.Tensor:
    """Pooled outputs of ``layers`` computed from the inputs of ``first_layer`` alone.

    ``layer_inputs``: ``(N, S, H)`` (right padded), ``attention_mask``: ``(N, S)``. With
    ``prefix_inputs`` ``(P, H)``, every sequence is that shared prefix followed by its row of
    ``layer_inputs`` (the prefix runs once). Returns ``(N, len(layers), H)``. Lower layers are
    skipped; gradients flow into the layers that run.
    """
    return _run_pooled(
        model,
        sorted(layers),
        attention_mask,
        pooling,
        module_names,
        layer_inputs=layer_inputs,
        first_layer=first_layer,
        prefix_inputs=prefix_inputs,
        representation=representation,
    )


def full_forward_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    pooling: str = "last",
    module_names: ModuleNames | None = None,
    representation: str = "residual",
) -> torch.Tensor:
    """The same pooled states from a plain forward of the whole model (with gradients)."""
    return _run_pooled(
        model,
        sorted(layers),
        attention_mask,
        pooling,
        module_names,
        input_ids=input_ids,
        representation=representation,
    )


class LensTrainingModule(nn.Module):
    """The model plus the subspace tensors; ``forward(batch)`` returns the Lens loss and its terms.

    ``basis (L, r, H)`` and ``directions (K, L, H)`` are the subspace's, restricted to the loss
    layers and the training languages (in the data's order); ``agnostic (L, H)`` the subspace's
    agnostic vectors at those layers (normalised here; needed for ``pull_space="direction"``).
    """

    def __init__(
        self,
        model: nn.Module,
        basis: torch.Tensor,
        directions: torch.Tensor,
        central_index: int,
        first_layer: int,
        loss_layers: Sequence[int],
        pooling: str,
        objective: LensObjective,
        fast: bool = True,
        module_names: ModuleNames | None = None,
        agnostic: torch.Tensor | None = None,
        representation: str = "residual",
        scales: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.representation = representation
        self.scale_names = sorted(scales or {})
        for name in self.scale_names:  # the scale-free units (objectives.loss_scales)
            self.register_buffer(f"{name}_scale", scales[name].float(), persistent=False)
        self.register_buffer("basis", basis.float(), persistent=False)
        self.register_buffer("directions", directions.float(), persistent=False)
        unit = None
        if agnostic is not None:
            unit = agnostic.float() / agnostic.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.register_buffer("agnostic_direction", unit, persistent=False)
        self.central_index = central_index
        self.first_layer = first_layer
        self.loss_layers = list(loss_layers)
        self.pooling = pooling
        self.objective = objective
        self.fast = fast
        self.module_names = module_names
        self.items_seen: set[int] = set()

    def pooled_states(
        self,
        attention_mask: torch.Tensor,
        layer_inputs: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        prefix_inputs: torch.Tensor | None = None,
        suffix_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B*K, L, H)`` current states at the loss layers, by the fast or the plain path."""
        if self.fast:
            if layer_inputs is None:
                raise TrainingError("the fast path needs layer_inputs")
            return top_layer_states(
                self.model,
                layer_inputs,
                suffix_mask if prefix_inputs is not None else attention_mask,
                self.first_layer,
                self.loss_layers,
                self.pooling,
                self.module_names,
                prefix_inputs=prefix_inputs,
                representation=self.representation,
            )
        if input_ids is None:
            raise TrainingError("the plain path needs input_ids")
        return full_forward_states(
            self.model,
            input_ids,
            attention_mask,
            self.loss_layers,
            self.pooling,
            self.module_names,
            representation=self.representation,
        )

    def forward(
        self,
        attention_mask: torch.Tensor,
        frozen: torch.Tensor,
        layer_inputs: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        item_index: torch.Tensor | None = None,
        prefix_inputs: torch.Tensor | None = None,
        suffix_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if item_index is not None:
            self.items_seen.update(int(i) for i in item_index)
        states = self.pooled_states(
            attention_mask, layer_inputs, input_ids, prefix_inputs, suffix_mask
        )
        states = states.reshape(frozen.shape)
        return lens_losses(
            states,
            frozen,
            self.basis,
            self.directions,
            self.central_index,
            self.objective,
            self.agnostic_direction,
            {name: getattr(self, f"{name}_scale") for name in self.scale_names} or None,
        )


# --------------------------------------------------------------------------------------------------
# Trainer


def _lens_trainer_class():
    """The Trainer subclass (built lazily so importing this module stays cheap)."""
    from safetensors.torch import load_file
    from transformers import Trainer

    class LensTrainer(Trainer):
        """Logs every loss term; checkpoints hold the trainable weights only (safetensors)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._term_sums: dict[str, torch.Tensor] = {}
            self._term_count = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            for name, value in outputs.items():
                if name != "loss":
                    previous = self._term_sums.get(name, torch.zeros((), device=value.device))
                    self._term_sums[name] = previous + value.detach().float()
            self._term_count += 1
            if not bool(torch.isfinite(outputs["loss"]).all()):
                terms = {k: float(v.detach()) for k, v in outputs.items() if k != "loss"}
                raise TrainingError(
                    f"the loss became NaN or infinite at step {self.state.global_step + 1} (terms "
                    f"{terms}); nothing was saved: lower the learning rate or check the subspace"
                )
            return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self._term_count and "loss" in logs:
                names = sorted(self._term_sums)
                values = torch.stack([self._term_sums[n] for n in names]) / self._term_count
                values = self.accelerator.reduce(values, reduction="mean")
                for name, value in zip(names, values.tolist(), strict=True):
                    logs[f"loss_{name}"] = value
                self._term_sums, self._term_count = {}, 0
            super().log(logs, start_time)

        def _trainable(self) -> dict[str, torch.Tensor]:
            return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            if not self.args.should_save:
                return
            from lenssteer.io import atomic_save_tensors

            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            tensors = {n: p.detach().cpu().contiguous() for n, p in self._trainable().items()}
            path = os.path.join(output_dir, "model.safetensors")
            atomic_save_tensors(tensors, path, {"format": "pt"})

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            path = os.path.join(resume_from_checkpoint, "model.safetensors")
            tensors = load_file(path)
            trainable = self._trainable()
            if set(tensors) != set(trainable):
                raise TrainingError(
                    f"checkpoint {resume_from_checkpoint} holds other weights than this run trains"
                )
            with torch.no_grad():
                for name, parameter in trainable.items():
                    parameter.copy_(tensors[name].to(parameter.device))

    return LensTrainer


# --------------------------------------------------------------------------------------------------
# The run


def _lora_targets(model: nn.Module, trained_layers: Sequence[int], names: list[str] | None):
    """Full names of the linear modules inside the trained layers (optionally by short name)."""
    decoder_layers = find_decoder_layers(model)
    wanted = {id(decoder_layers[i]) for i in trained_layers}
    targets = []
    for prefix, module in model.named_modules():
        if id(module) not in wanted:
            continue
        for name, child in module.named_modules(prefix=prefix):
            if isinstance(child, nn.Linear) and (names is None or name.rsplit(".", 1)[-1] in names):
                targets.append(name)
    if not targets:
        raise TrainingError(f"no linear module named {names} in layers {list(trained_layers)}")
    return sorted(targets)


def _checkpoint_signature(config: TrainConfig, data: TrainingData, identity, subspace) -> dict:
    dtype = {"model_dtype": identity["dtype"]} if identity.get("dtype") else {}
    return {
        **dtype,
        "config": config.to_dict(),
        "data_hash": data.data_hash,
        "languages": data.languages,
        "model_fingerprint": identity["fingerprint"],
        "subspace_data_hash": subspace.metadata.get("data_hash"),
        "subspace_layers": list(subspace.layers),
    }


class _Trainable:
    """The trainable state of a model during a run (see :func:`trainable_top_layers`)."""

    def __init__(self, kind: str, layer_params: dict[str, nn.Parameter], peft_model=None) -> None:
        self.kind = kind
        self.layer_params = layer_params
        self.peft_model = peft_model

    def parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that train, by name."""
        if self.peft_model is not None:
            return {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        return dict(self.layer_params)

    def adapter_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """The adapter's weights (and PEFT config for LoRA) as they are now."""
        if self.peft_model is not None:
            from peft import get_peft_model_state_dict

            weights = get_peft_model_state_dict(self.peft_model)
            lora_dict = self.peft_model.peft_config["default"].to_dict()
            identity = model_identity(self.peft_model.get_base_model())
            lora_dict["inference_mode"] = True
            lora_dict["base_model_name_or_path"] = identity["model"]
            lora_dict["revision"] = identity["revision"]
            return {n: w.detach().clone() for n, w in weights.items()}, lora_dict
        return {n: p.detach().clone() for n, p in self.layer_params.items()}, None


@contextmanager
def trainable_top_layers(
    model: nn.Module,
    trained_layers: Sequence[int],
    config: TrainConfig,
    module_names: ModuleNames | None = None,
) -> Iterator[_Trainable]:
    """Make only ``trained_layers`` trainable (in full, or through LoRA) for the ``with`` block.

    Everything else is frozen. On exit the model gets back its weights (LoRA unloaded, full layers
    restored), ``requires_grad`` flags and train/eval mode, even after an error. In a bfloat16
    model the trainable parameters are float32 all the same: PEFT makes LoRA weights float32, and
    full layers run in float32 for the block (:func:`_float32_layers`), so gradients and the
    optimizer state keep full precision while the frozen layers compute in bfloat16.
    """
    parameters = dict(model.named_parameters())
    requires_grad = {name: p.requires_grad for name, p in parameters.items()}
    was_training = model.training
    decoder_layers = find_decoder_layers(model, module_names)
    in_trained = {id(q) for i in trained_layers for q in decoder_layers[i].parameters()}
    layer_params = {name: p for name, p in parameters.items() if id(p) in in_trained}
    originals = {}
    peft_model = None
    upcast = contextlib.ExitStack()
    try:
        for p in parameters.values():
            p.requires_grad_(False)
        if config.kind == "lora":
            from peft import LoraConfig, get_peft_model

            identity = model_identity(model)
            lora_config = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=_lora_targets(model, trained_layers, config.lora_modules),
                task_type="CAUSAL_LM",
                base_model_name_or_path=identity["model"],
                revision=identity["revision"],
            )
            with warnings.catch_warnings():  # PEFT renames base_model_name_or_path; we set it
                warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
                peft_model = get_peft_model(model, lora_config)
        else:
            originals = {n: p.detach().clone() for n, p in layer_params.items()}
            if model_dtype(model) != torch.float32:
                upcast.enter_context(_float32_layers([decoder_layers[i] for i in trained_layers]))
            for p in layer_params.values():
                p.requires_grad_(True)
        yield _Trainable(config.kind, layer_params, peft_model)
    finally:
        upcast.close()
        if peft_model is not None:
            peft_model.unload()
        with torch.no_grad():
            for name, tensor in originals.items():
                parameters[name].copy_(tensor)
        for name, p in parameters.items():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)


def training_data(
    model: nn.Module,
    tokenizer,
    subspace,
    corpus,
    config: TrainConfig,
    progress: bool = True,
    module_names: ModuleNames | None = None,
) -> TrainingData:
    """The frozen pass :func:`train_lens` makes for ``config`` (its layers, pooling, template and
    representation read from ``subspace``), to share between runs that differ only in the loss's
    weights or the optimizer's settings (pass it as ``data=``)."""
    trained, loss_layers = resolve_training_layers(
        model, config.n_layers, subspace.layers, config.loss_layers, module_names
    )
    return prepare_training_data(
        model,
        tokenizer,
        corpus,
        trained[0],
        loss_layers,
        pooling=subspace.metadata.get("pooling", "last"),
        chat_template=_chat_template_from_signature(tokenizer, subspace.metadata.get("template")),
        share_prefix=config.share_prefix,
        batch_size=config.precompute_batch_size,
        progress=progress,
        module_names=module_names,
        representation=config.representation,
        max_tokens=config.max_tokens,
    )


def train_lens(
    model: nn.Module,
    tokenizer,
    subspace,
    corpus,
    out_dir: str | Path | None,
    config: TrainConfig | None = None,
    resume: bool | str = False,
    checkpoint_dir: str | Path | None = None,
    keep_checkpoints: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    data: TrainingData | None = None,
    subspace_path: str | Path | None = None,
    module_names: ModuleNames | None = None,
) -> SteeringAdapter:
    """Train a Lens steering adapter on the top layers of ``model`` and save it to ``out_dir``.

    ``subspace``: a :class:`~lenssteer.subspace.Subspace` probed on this model (its pooling and
    template decide the representation trained on). ``corpus``: the parallel training items; all
    its languages must be in the subspace. ``resume``: continue from the last checkpoint in
    ``checkpoint_dir`` (default ``<out_dir>.checkpoints``). ``data``: precomputed inputs (from
    :func:`prepare_training_data`) to skip the frozen pass. The model is returned to its original
    weights afterwards (apply the returned adapter to steer it).
    """
    from transformers import TrainingArguments, set_seed

    config = config or TrainConfig()
    objective = config.objective()
    if out_dir is not None:
        from lenssteer.adapter import CONFIG_NAME
        from lenssteer.io import check_output_folder

        check_output_folder(out_dir, CONFIG_NAME, "steering adapter", [subspace_path])
    languages = list(corpus.languages)
    central_language = corpus.central_language
    check_subspace(model, subspace, languages, central_language)
    pooling = subspace.metadata.get("pooling")
    if pooling is None:
        raise TrainingError(
            "the subspace records no provenance (no 'pooling' in its metadata): compute it from the "
            "states extract_corpus returns (they carry it), or use lenssteer probe"
        )
    probed_at = subspace.metadata.get("representation", "residual")
    if probed_at != config.representation:
        raise TrainingError(
            f"the subspace was probed at representation {probed_at!r} but training reads "
            f"{config.representation!r}: train with representation={probed_at!r} "
            f"(CLI: --representation {probed_at}) or probe again at {config.representation!r}"
        )
    chat_template = _chat_template_from_signature(tokenizer, subspace.metadata.get("template"))
    trained, loss_layers = resolve_training_layers(
        model, config.n_layers, subspace.layers, config.loss_layers, module_names
    )
    identity = dict(model_identity(model))
    base = base_model_description(model)

    if data is None:
        data = training_data(model, tokenizer, subspace, corpus, config, progress, module_names)
    else:
        if (data.first_layer, data.languages) != (trained[0], languages):
            raise TrainingError("the precomputed data were made for other layers or languages")
        if data.representation != config.representation:
            raise TrainingError(
                f"the precomputed data read representation {data.representation!r}, training "
                f"reads {config.representation!r}"
            )
        if data.loss_layers != loss_layers:
            data = data.with_loss_layers(loss_layers)

    positions = [subspace.layer_position(layer) for layer in loss_layers]
    language_positions = [subspace.language_position(language) for language in languages]
    basis = subspace.specific_basis[positions]  # (L, r, H)
    directions = subspace.directions[positions][:, language_positions].transpose(0, 1)  # (K, L, H)
    agnostic = subspace.agnostic[positions]  # (L, H)
    scales = None
    if objective.normalization == "scale_free":
        unit = agnostic.float() / agnostic.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        try:
            scales = loss_scales(
                data.frozen,
                basis.float(),
                data.central_index,
                unit if objective.pull_space == "direction" else None,
            )
        except ValueError as error:
            raise TrainingError(str(error)) from None

    set_seed(config.seed)
    with trainable_top_layers(model, trained, config, module_names) as trainable:
        module = LensTrainingModule(
            model,
            basis,
            directions,
            data.central_index,
            trained[0],
            loss_layers,
            pooling,
            objective,
            fast=config.fast,
            module_names=module_names,
            agnostic=agnostic,
            representation=config.representation,
            scales=scales,
        )
        _check_reproduces_frozen(module, data, split_prefix=config.share_prefix)

        out_path = Path(out_dir) if out_dir is not None else None
        if checkpoint_dir is None:
            if out_path is None:
                raise TrainingError("give out_dir or checkpoint_dir")
            checkpoint_dir = out_path.with_name(out_path.name + ".checkpoints")
        checkpoint_dir = Path(checkpoint_dir)
        signature = _checkpoint_signature(config, data, identity, subspace)
        last = _prepare_checkpoint_dir(checkpoint_dir, signature, resume)

        device_is_cpu = next(model.parameters()).device.type == "cpu"
        args = TrainingArguments(
            output_dir=str(checkpoint_dir),
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=config.warmup_ratio,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            num_train_epochs=config.num_epochs,
            max_steps=config.max_steps,
            seed=config.seed,
            data_seed=config.seed,
            logging_steps=config.logging_steps,
            save_strategy="steps" if config.save_steps else "no",
            save_steps=config.save_steps or 500,
            save_total_limit=config.save_total_limit,
            report_to=[],
            disable_tqdm=not progress,
            remove_unused_columns=False,
            dataloader_drop_last=False,
            dataloader_pin_memory=False,
            label_names=[],
            use_cpu=device_is_cpu,
            ddp_backend="gloo" if device_is_cpu and _world_size() > 1 else None,
            ddp_find_unused_parameters=False,
            log_level="warning",
        )
        trainer = _lens_trainer_class()(
            model=module,
            args=args,
            train_dataset=data,
            data_collator=lambda items: data.collate(
                items,
                layer_inputs=config.fast,
                input_ids=not config.fast,
                split_prefix=config.fast and config.share_prefix,
            ),
            callbacks=list(callbacks),
        )
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=last)
        elapsed = time.perf_counter() - started

        weights, lora_dict = trainable.adapter_weights()
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        adapter_config = _adapter_config(
            config, base, trained, loss_layers, data, subspace, subspace_path, chat_template
        )
        # which items trained it: compare keeps them out of every scored task
        adapter_config.training_items = [str(item_id) for item_id in corpus.ids]
        adapter_config.metrics["train"] = {
            "global_step": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_loss": result.training_loss,
            "runtime_s": round(elapsed, 2),
            "items_seen": len(module.items_seen),
            "n_items": len(data),
            "first_log": history[0] if history else None,
            "last_log": history[-1] if history else None,
            "processes": trainer.args.world_size,
            "dtype": dtype_name(_dtype_of(model)),
            "trainable_dtype": dtype_name(next(iter(trainable.parameters().values())).dtype),
        }
        if scales is not None:  # the units the scale-free terms were measured in, per loss layer
            adapter_config.metrics["loss_scales"] = {
                "layers": list(loss_layers),
                **{name: value.tolist() for name, value in scales.items()},
                "push_direction_sq": {  # |d_t|², per target language and loss layer
                    language: directions[k].pow(2).sum(-1).tolist()
                    for k, language in enumerate(data.languages)
                    if k != data.central_index
                },
            }
        adapter = SteeringAdapter(adapter_config, weights, lora_dict)
        adapter.log_history = list(trainer.state.log_history)
        if out_path is not None and trainer.is_world_process_zero():
            adapter.save_pretrained(out_path)
            if not keep_checkpoints:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return adapter


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _adapter_config(config, base, trained, loss_layers, data, subspace, subspace_path, template):
    from lenssteer.adapter import AdapterConfig

    return AdapterConfig(
        kind=config.kind,
        base_model=base,
        trained_layers=list(trained),
        loss_layers=list(loss_layers),
        languages=list(data.languages),
        central_language=data.central_language,
        hyperparameters=config.to_dict(),
        representation={
            "pooling": data.pooling,
            "template": data.metadata.get("template"),
            "chat_template": bool(template),
            "point": data.representation,
            "position": (
                "output of the last layer after the model's final norm (what the LM head reads)"
                if data.representation == "final_norm"
                else "output of each loss layer (residual stream, before the final norm)"
            ),
        },
        subspace={
            "path": str(subspace_path) if subspace_path is not None else None,
            "layers": list(subspace.layers),
            "languages": list(subspace.languages),
            "rank": subspace.rank,
            "model": subspace.metadata.get("model"),
            "fingerprint": subspace.metadata.get("fingerprint"),
            "data_hash": subspace.metadata.get("data_hash"),
            "corpus": subspace.metadata.get("corpus"),
            "representation": subspace.metadata.get("representation", "residual"),
        },
        data_hash=data.data_hash,
    )


def _check_reproduces_frozen(
    module: LensTrainingModule, data: TrainingData, split_prefix: bool = True
) -> None:
    """Refuse to train if the training forward does not reproduce the frozen states at the start."""
    items = list(range(min(4, len(data))))
    batch = data.collate(
        items, layer_inputs=module.fast, input_ids=not module.fast, split_prefix=split_prefix
    )
    device = next(module.model.parameters()).device
    moved = {k: v.to(device) for k, v in batch.items() if k not in ("frozen", "item_index")}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            states = module.pooled_states(
                moved["attention_mask"],
                moved.get("layer_inputs"),
                moved.get("input_ids"),
                moved.get("prefix_inputs"),
                moved.get("suffix_mask"),
            )
    finally:
        module.train(was_training)
    frozen = batch["frozen"].reshape(states.shape).to(states.device)
    error = (states - frozen).abs().max().item()
    scale = frozen.abs().max().item()
    # bfloat16 keeps 8 bits of mantissa: two kernel orders differ by a few of its roundings.
    tolerance = 1e-3 if _dtype_of(module.model) == torch.float32 else 3e-2
    if not error <= tolerance * (1.0 + scale):
        path = "fast path (top layers from precomputed inputs)" if module.fast else "plain path"
        raise TrainingError(
            f"the {path} does not reproduce the frozen model's states (max difference {error:.3g} "
            f"for values up to {scale:.3g}); this architecture ({type(module.model).__name__}) "
            "probably changes hidden states outside its decoder layers: train with fast=False"
        )


def _checkpoint_complete(checkpoint: Path) -> bool:
    """Whether a checkpoint folder was written to the end.

    The Trainer writes ``trainer_state.json`` last (weights, optimizer, scheduler and RNG state
    before it), and our weights file is written atomically, so a checkpoint interrupted by a kill
    lacks one of them or has a truncated state file.
    """
    state = checkpoint / "trainer_state.json"
    if not (checkpoint / "model.safetensors").is_file() or not state.is_file():
        return False
    try:
        return isinstance(json.loads(state.read_text(encoding="utf-8")), dict)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


def _last_complete_checkpoint(folder: Path) -> str | None:
    """The newest complete ``checkpoint-<step>`` in ``folder``; incomplete ones warn and are skipped."""
    steps = []
    for path in folder.iterdir():
        name, _, step = path.name.partition("-")
        if name == "checkpoint" and step.isdigit() and path.is_dir():
            steps.append((int(step), path))
    for _, path in sorted(steps, reverse=True):
        if _checkpoint_complete(path):
            return str(path)
        warnings.warn(
            f"skipping the incomplete checkpoint {path} (interrupted while it was written)",
            stacklevel=3,
        )
    return None


def _prepare_checkpoint_dir(folder: Path, signature: dict, resume: bool | str) -> str | None:
    """Check that checkpoints belong to this run; return the one to resume from (or None).

    A folder that is neither empty nor a lenssteer checkpoint folder is refused, never deleted.
    """
    marker = folder / "lenssteer_run.json"
    if folder.exists() and (
        not folder.is_dir() or (any(folder.iterdir()) and not marker.is_file())
    ):
        raise TrainingError(
            f"checkpoint folder {folder} exists and is not a lenssteer checkpoint folder (no "
            f"{marker.name}); move it away or choose another output"
        )
    if isinstance(resume, str):
        if not _checkpoint_complete(Path(resume)):
            raise TrainingError(f"checkpoint {resume} is incomplete or not a checkpoint folder")
        return resume
    if resume and folder.is_dir():
        if marker.is_file():
            recorded = json.loads(marker.read_text())
            if recorded != json.loads(json.dumps(signature)):
                raise TrainingError(
                    f"the checkpoints in {folder} belong to a different run (other settings, data or "
                    "model): delete the folder or resume=False"
                )
        last = _last_complete_checkpoint(folder)
        if last is not None:
            return last
    elif folder.is_dir() and not resume:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from lenssteer.io import atomic_write_json

    atomic_write_json(marker, signature)
    return None


# --------------------------------------------------------------------------------------------------
# What training did to held-out items


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
) -> dict[str, Any]:
    """Compare pooled states of held-out items before and after steering.

    ``before``, ``after``: ``(N, K, L, H)`` for ``languages`` (central included) at ``layers``.
    Per layer and target language ``t`` (central ``c``; ``â`` = unit agnostic vector, ``B`` = specific
    basis, ``d_t`` = direction), with means over the ``N`` parallel items:

    * ``gap_along_agnostic``: mean ``|(h_t - h_c)·â|``, before and after, and its ``shrink`` =
      1 - after / before (what ``pull_space="direction"`` trains);
    * ``gap_outside_specific``: mean ``|(I - BᵀB)(h_t - h_c)|``, before, after and shrink (what
      ``pull_space="complement"`` trains);
    * ``push_ratio``: mean ``<BᵀB(h_t^after - h_t^before), d_t> / |d_t|²``, to set against ``alpha``;
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
    report = representation_report(data.frozen, after, subspace, data.languages, layers, alpha)
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
            lines.append(
                f"| {layer} | {language} | {r['gap_along_agnostic_before']:.2f} -> "
                f"{r['gap_along_agnostic_after']:.2f} ({100 * r['shrink_along_agnostic']:.0f}%) | "
                f"{r['gap_outside_specific_before']:.1f} -> {r['gap_outside_specific_after']:.1f} "
                f"({100 * r['shrink_outside_specific']:.0f}%) | {r['push_ratio']:.2f} | "
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


# --------------------------------------------------------------------------------------------------
# The quickstart: probe + train + held-out check in one call

# Tuned on the bundled Qwen2.5 model (docs/training.md, "Tuning"): the one-dimensional pull is
# c²/H per item, about 100x smaller than a push of a whole language direction, hence its weight;
# alpha 0.3 moves languages a third of their direction further instead of doubling their distance.
QUICKSTART_CONFIG = TrainConfig(
    kind="lora",
    n_layers=2,
    pull_space="direction",
    pull_weight=100.0,
    push_weight=1.0,
    retain_weight=3.0,
    alpha=0.3,
    lora_rank=8,
    lora_alpha=16.0,
    learning_rate=3e-3,
    batch_size=8,
    num_epochs=4.0,
    warmup_ratio=0.05,
    weight_decay=0.0,
    seed=0,
)

# The quickstart's settings with every term in scale-free units (objectives module docstring): pull
# as a share of the frozen gap, push in units of |d|², retain as a share of the English states'
# spread. The weights are the quickstart's converted to those units with estimates from the shipped
# Qwen2.5 run (docs/training.md, "Scale-free units"): a starting point for every model, not tuned.
SCALE_FREE_CONFIG = dataclasses.replace(
    QUICKSTART_CONFIG,
    normalization="scale_free",
    pull_weight=1.0,
    push_weight=3.0,
    retain_weight=2.0,
)


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
        use_template = _chat_template_from_signature(tokenizer, subspace.metadata.get("template"))
        subspace_layers = subspace.layers
    else:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        use_template = has_template if chat_template is None else chat_template
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


# --------------------------------------------------------------------------------------------------
# From names (what the CLI calls)


def train_adapter(
    model: str,
    subspace: str | Path,
    out: str | Path,
    corpus: str = "bible",
    languages: Sequence[str] | None = None,
    central_language: str = "en",
    limit: int | None = 200,
    seed: int = 0,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    module_names: ModuleNames | None = None,
    loaded=None,
    overwrite: bool = True,
    dtype: str | torch.dtype = "float32",
) -> SteeringAdapter:
    """Load model, subspace folder and corpus by name, train, and save the adapter to ``out``.

    ``languages`` defaults to the subspace's languages. ``loaded`` may pass an already loaded
    ``(tokenizer, model)`` pair. ``out`` is checked before any work: a file, a non-empty folder
    that is not an adapter, a folder equal to, inside or around an input (the subspace, corpus
    file or model folder) or an unwritable place is refused, and so is an existing adapter with
    ``overwrite=False`` (the CLI without ``--force``). ``dtype``: the frozen weights' dtype when the
    model is loaded here; under ``"bfloat16"`` the trained parameters and optimizer state stay
    float32 (see :func:`trainable_top_layers`).
    """
    from lenssteer.adapter import CONFIG_NAME
    from lenssteer.data import load_corpus
    from lenssteer.io import check_output_folder
    from lenssteer.models import load_model
    from lenssteer.subspace import Subspace

    inputs = [subspace, corpus] + ([model] if loaded is None else [])
    check_output_folder(out, CONFIG_NAME, "steering adapter", inputs, overwrite=overwrite)

    lens_subspace = Subspace.load(subspace)
    languages = list(languages) if languages else list(lens_subspace.languages)
    parallel = load_corpus(
        corpus, languages, central_language=central_language, limit=limit, seed=seed
    )
    tokenizer, lm = loaded if loaded is not None else load_model(model, dtype)
    return train_lens(
        lm,
        tokenizer,
        lens_subspace,
        parallel,
        out,
        config,
        resume=resume,
        progress=progress,
        subspace_path=subspace,
        module_names=module_names,
    )
