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
:func:`lenssteer.training_data.prepare_training_data` computes them once per item, in one frozen pass (texts that share a
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
``loss_retain``, ``loss_retain_targets``), seeds, checkpoints (trainable weights only, safetensors) and resume. The adapter
is written at the very end into a scratch folder that replaces ``out_dir`` in one rename, so an
interrupted run leaves an earlier adapter there intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lenssteer.adapter import SteeringAdapter, base_model_description
from lenssteer.extract import (
    RepresentationError,
    check_representation,
    has_chat_template,
    representation_map,
    template_signature,
)
from lenssteer.forward import layers_passed_through, pool_real_positions, run_prefix
from lenssteer.hooks import (
    hooked,
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
from lenssteer.objectives import LensObjective, lens_losses, loss_scales, retain_loss
from lenssteer.subspace import SubspaceError
from lenssteer.training_data import TrainingData, TrainingError, prepare_training_data

__all__ = [
    "KINDS",
    "PRESETS",
    "QUICKSTART_CONFIG",
    "SCALE_FREE_CONFIG",
    "LensTrainingModule",
    "TrainConfig",
    "TrainingError",
    "hold_items",
    "resolve_training_layers",
    "top_layer_states",
    "train_adapter",
    "train_lens",
    "training_data",
]

KINDS = ("lora", "layers")


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
    ``language_alpha``: push strength per target language, e.g. ``{"de": 0.1}``, overriding
    ``alpha`` for the languages named (ours; Lens has one strength).
    ``hold_corpus``: a corpus name (e.g. ``"mmlu-letter"``, classification prompts) whose items
    train beside the training corpus' with one term only, *hold*: every language's state stays at
    its frozen value (ours, not Lens'), weighted ``hold_weight``, in retain's units. The adapter
    then learns to steer prompts like the training corpus' and to leave prompts like these alone.
    ``hold_limit``: at most this many of its items (drawn with ``seed``; default all).
    ``max_tokens``: texts longer than this many tokens are cut, with a warning naming the row
    (default: the model's context; see :func:`lenssteer.extract.default_max_tokens`).
    """

    kind: str = "lora"
    n_layers: int = 2
    loss_layers: list[int] | None = None
    pull_weight: float = 1.0
    push_weight: float = 1.0
    retain_weight: float = 1.0
    retain_targets_weight: float = 0.0
    alpha: float = 1.0
    language_alpha: dict[str, float] | None = None
    hold_corpus: str | None = None
    hold_weight: float = 1.0
    hold_limit: int | None = None
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
        if not isinstance(self.hold_weight, (int, float)) or not self.hold_weight >= 0:
            raise TrainingError(f"hold_weight must be a number >= 0, got {self.hold_weight!r}")
        if self.hold_limit is not None and (
            isinstance(self.hold_limit, bool)
            or not isinstance(self.hold_limit, int)
            or self.hold_limit < 1
        ):
            raise TrainingError(f"hold_limit must be a positive integer, got {self.hold_limit!r}")
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
        if self.language_alpha is not None and not isinstance(self.language_alpha, dict):
            raise TrainingError(
                f"language_alpha must map language codes to strengths, got {self.language_alpha!r}"
            )
        for language, value in (self.language_alpha or {}).items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainingError(
                    f"language_alpha[{language!r}] must be a finite number, got {value!r}"
                )
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
                retain_targets_weight=self.retain_targets_weight,
            )
        except ValueError as error:
            raise TrainingError(str(error)) from None

    def push_strengths(self, languages: Sequence[str], central_language: str) -> torch.Tensor | None:
        """``(K,)`` push strength per language in ``languages`` (``None`` without language_alpha)."""
        if not self.language_alpha:
            return None
        for language in self.language_alpha:
            if language == central_language:
                raise TrainingError(
                    f"language_alpha names the central language {language!r}: push moves target "
                    "languages only"
                )
            if language not in languages:
                raise TrainingError(
                    f"language_alpha names {language!r}, which is not a training language "
                    f"({', '.join(languages)})"
                )
        return torch.tensor(
            [float(self.language_alpha.get(language, self.alpha)) for language in languages]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------------
# Checks of the inputs


def chat_template_of_signature(tokenizer, signature: str | None) -> bool:
    """The subspace's template signature -> whether to use the chat template (checked)."""
    if signature is None:
        raise TrainingError(
            "the subspace records no prompt template ('template' in its metadata); make it with "
            "lenssteer.probe.probe or pass metadata={'template': ..., 'pooling': ...}"
        )
    if signature == "raw":
        return False
    has_template = has_chat_template(tokenizer)
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
# The trained layers alone


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
            # The frozen lower layers pass through: their output is the precomputed input.
            with layers_passed_through(decoder_layers[:first_layer]):
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
            positions = torch.arange(prefix_inputs.shape[0], device=prefix_inputs.device)[None]
            prefix = run_prefix(
                decoder_module,
                run,
                skipped_layers=first_layer,
                inputs_embeds=prefix_inputs[None].to(dtype),
                position_ids=positions,
            )
            prefix_length = prefix.length
            prefix_sums = {i: outputs[i][0].float().sum(0) for i in layers}
            run(
                inputs_embeds=layer_inputs.to(dtype),
                **prefix.continuing(
                    decoder_module,
                    attention_mask,
                    position_ids_from_mask(attention_mask),
                    copy_cache=False,
                ),
            )
    pooled = [
        pool_real_positions(outputs[i], attention_mask, pooling, prefix_sums.get(i), prefix_length)
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
        alphas: torch.Tensor | None = None,
        hold_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.hold_weight = hold_weight
        self.register_buffer(  # push strength per language (TrainConfig.language_alpha)
            "alphas", None if alphas is None else alphas.float(), persistent=False
        )
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
        hold: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The Lens terms on the batch's items, and with ``hold (B,)`` the *hold* term on the items
        it marks (their states of every language against the frozen ones, in retain's units; 0 in
        a batch without such items)."""
        if item_index is not None:
            self.items_seen.update(int(i) for i in item_index)
        states = self.pooled_states(
            attention_mask, layer_inputs, input_ids, prefix_inputs, suffix_mask
        )
        states = states.reshape(frozen.shape)
        scales = {name: getattr(self, f"{name}_scale") for name in self.scale_names} or None

        def lens(rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
            return lens_losses(
                states[rows],
                frozen[rows],
                self.basis,
                self.directions,
                self.central_index,
                self.objective,
                self.agnostic_direction,
                scales,
                alphas=self.alphas,
            )

        if hold is None:
            return lens(slice(None))
        hold = hold.bool()
        steer = ~hold
        if bool(steer.any()):
            out = lens(steer)
        else:  # only hold items in this batch: the Lens terms are 0 this step
            out = {name: 0.0 * value for name, value in lens(slice(None)).items()}
        if self.hold_weight:
            held = states.new_zeros(())
            if bool(hold.any()):
                held = retain_loss(states[hold], frozen[hold], (scales or {}).get("retain"))
            out["hold"] = held
            out["loss"] = out["loss"] + self.hold_weight * held
        return out


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
    weights or the optimizer's settings (pass it as ``data=``). With ``config.hold_corpus`` its
    items follow the corpus' and are marked in ``hold``."""
    trained, loss_layers = resolve_training_layers(
        model, config.n_layers, subspace.layers, config.loss_layers, module_names
    )
    held = hold_items(corpus, config)
    if held is not None:  # one pass over both: ids made distinct (a question may be in both)
        from lenssteer.data import ParallelCorpus

        corpus = ParallelCorpus(
            texts={
                language: corpus.texts[language] + held.texts[language]
                for language in corpus.languages
            },
            central_language=corpus.central_language,
            ids=list(corpus.ids) + [f"hold:{item_id}" for item_id in held.ids],
            source=f"{corpus.source} + hold: {held.source}",
            licences={
                language: "; ".join(dict.fromkeys([corpus.licences[language], licence]))
                for language, licence in held.licences.items()
            },
        )
    data = prepare_training_data(
        model,
        tokenizer,
        corpus,
        trained[0],
        loss_layers,
        pooling=subspace.metadata.get("pooling", "last"),
        chat_template=chat_template_of_signature(tokenizer, subspace.metadata.get("template")),
        share_prefix=config.share_prefix,
        batch_size=config.precompute_batch_size,
        progress=progress,
        module_names=module_names,
        representation=config.representation,
        max_tokens=config.max_tokens,
    )
    if held is not None:
        data.hold = torch.arange(len(data)) >= len(data) - len(held)
    return data


def hold_items(corpus, config: TrainConfig):
    """The items of ``config.hold_corpus`` in ``corpus``' languages (``None`` without one)."""
    if config.hold_corpus is None:
        return None
    from lenssteer.data import CorpusError, load_corpus

    try:
        return load_corpus(
            config.hold_corpus,
            list(corpus.languages),
            central_language=corpus.central_language,
            limit=config.hold_limit,
            seed=config.seed,
        )
    except CorpusError as error:
        raise TrainingError(f"hold_corpus {config.hold_corpus!r}: {error}") from None


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
    command: str | None = None,
) -> SteeringAdapter:
    """Train a Lens steering adapter on the top layers of ``model`` and save it to ``out_dir``.

    ``subspace``: a :class:`~lenssteer.subspace.Subspace` probed on this model (its pooling and
    template decide the representation trained on). ``corpus``: the parallel training items; all
    its languages must be in the subspace. ``resume``: continue from the last checkpoint in
    ``checkpoint_dir`` (default ``<out_dir>.checkpoints``). ``data``: precomputed inputs (from
    :func:`~lenssteer.training_data.prepare_training_data`) to skip the frozen pass.
    ``command``: the command line that made it, recorded in the adapter's ``metrics``. The model
    is returned to its original weights afterwards (apply the returned adapter to steer it).
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
    alphas = config.push_strengths(languages, central_language)
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
    chat_template = chat_template_of_signature(tokenizer, subspace.metadata.get("template"))
    trained, loss_layers = resolve_training_layers(
        model, config.n_layers, subspace.layers, config.loss_layers, module_names
    )
    identity = dict(model_identity(model))
    base = base_model_description(model)

    held = hold_items(corpus, config)
    n_hold = 0 if held is None else len(held)
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
    data_holds = 0 if data.hold is None else int(data.hold.sum())
    if (len(data), data_holds) != (len(corpus) + n_hold, n_hold):
        raise TrainingError(
            f"the precomputed data have {len(data)} items, {data_holds} of them to hold; this "
            f"run has {len(corpus)} and {n_hold} (hold_corpus {config.hold_corpus!r}): make them "
            "with training_data for this config"
        )
    steered = slice(None) if data.hold is None else ~data.hold

    positions = [subspace.layer_position(layer) for layer in loss_layers]
    language_positions = [subspace.language_position(language) for language in languages]
    basis = subspace.specific_basis[positions]  # (L, r, H)
    directions = subspace.directions[positions][:, language_positions].transpose(0, 1)  # (K, L, H)
    agnostic = subspace.agnostic[positions]  # (L, H)
    scales = None
    if objective.normalization == "scale_free":
        unit = agnostic.float() / agnostic.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        try:
            scales = loss_scales(  # on the items the Lens terms read
                data.frozen[steered],
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
            alphas=alphas,
            hold_weight=config.hold_weight if held is not None else 0.0,
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
        adapter_config.training_items = [
            str(item_id) for item_id in dict.fromkeys([*corpus.ids, *(held.ids if held is not None else [])])
        ]
        if command:  # the command line that made it, for reproduction
            adapter_config.metrics["command"] = command
        adapter_config.metrics["train"] = {
            "global_step": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_loss": result.training_loss,
            "runtime_s": round(elapsed, 2),
            "items_seen": len(module.items_seen),
            "n_items": len(data),
            "n_hold_items": n_hold,
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
# Presets


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

# Chosen on SmolLM2-135M-Instruct's dev items by recipes/tune_lens.py (docs/lens-study.md): Lens'
# representation (after the final norm) in scale-free units, for the parallel instruction prompts,
# without the pull term (push 3, retain 2): of 8 configurations it alone raised target fidelity on
# dev items without lowering the target text's likelihood; every configuration with pull lowered it.
INSTRUCTIONS_CONFIG = dataclasses.replace(
    SCALE_FREE_CONFIG, representation="final_norm", pull_weight=0.0
)

# The named starting points (CLI --preset): "lens" is TrainConfig's defaults, the paper's settings.
PRESETS: dict[str, TrainConfig] = {
    "lens": TrainConfig(),
    "quickstart": QUICKSTART_CONFIG,
    "scale-free": SCALE_FREE_CONFIG,
    "instructions": INSTRUCTIONS_CONFIG,
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
    command: str | None = None,
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
        command=command,
    )
