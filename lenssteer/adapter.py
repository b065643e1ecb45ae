"""Steering adapters: the trained top layers of a Lens run, saved as a small folder users can share.

A folder holds two files:

* ``adapter_config.json``: sorted JSON. The key ``"lenssteer"`` holds our fields (format version,
  lenssteer version, kind, the base model's id, revision, weights fingerprint, hidden size and layer
  count, trained and loss layers, languages, central language, every hyper-parameter, the
  representation trained on, the subspace reference, the training data hash and the sha256 of the
  weights file). For a LoRA adapter the other keys are PEFT's own ``LoraConfig``, so the folder is
  also an ordinary PEFT adapter (``PeftModel.from_pretrained(model, folder)`` loads it; PEFT warns
  once about the extra ``lenssteer`` key and ignores it).
* ``adapter_model.safetensors``: the weights. LoRA: PEFT's keys (``base_model.model.<module>.lora_A
  .weight``). Layers: the base model's own parameter names of the trained layers.

Nothing is pickled, no ``torch.load``, and no code named in a config is ever imported. Loading into
a model with another hidden size, layer count or weights fingerprint is an :class:`AdapterError`.

An adapter folder is untrusted input. Of its PEFT keys, only plain LoRA reaches PEFT
(:data:`LORA_KEYS_PASSED`: rank, alpha, dropout, target modules, bias ``"none"``, fan_in_fan_out,
rsLoRA, the layer restrictions); PEFT's bookkeeping keys are read and dropped
(:data:`LORA_KEYS_RECORDED`); every other PEFT feature is accepted only at the value that leaves it
off (:data:`LORA_KEYS_OFF`: no DoRA, no PiSSA/LoftQ/OLoRA/CorDA/EVA initialisation that rewrites
base weights, no layer replication, no Megatron module import, no ``modules_to_save``, no
``auto_mapping``...). Anything else is an :class:`AdapterError` naming the key. Weights must be
finite; a ``layers`` adapter may only hold parameters of the decoder layers it names. After
``apply()`` (the base weights outside the adapter) and after ``remove()`` (all of them) the base
model's weights fingerprint is computed again; a change is an error.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lenssteer import __version__
from lenssteer.io import atomic_directory, atomic_save_tensors, atomic_write_json, file_sha256
from lenssteer.models import (
    find_decoder_layers,
    loaded_fingerprint,
    model_identity,
    num_decoder_layers,
    tensors_fingerprint,
    weights_fingerprint,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterConfig",
    "AdapterError",
    "AppliedAdapter",
    "SteeringAdapter",
    "base_model_description",
    "check_base_weights",
]

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KINDS = ("lora", "layers")


class AdapterError(ValueError):
    """An adapter folder that cannot be read, or an adapter that does not fit the given model."""


# -- what an adapter's PEFT keys may say ------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


#: Keys handed to PEFT's ``LoraConfig``, each with the values it may take (plain LoRA).
LORA_KEYS_PASSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_int(v) and 0 < v <= 4096, "an integer from 1 to 4096"),
    "lora_alpha": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (lambda v: _str_list(v) and len(v) > 0, "a non-empty list of module names"),
    "exclude_modules": (_optional(_str_list), "null or a list of module names"),
    "bias": (lambda v: v == "none", '"none"'),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "init_lora_weights": (
        lambda v: v is True or v is False or v == "gaussian",
        'true, false or "gaussian" (initialisations that rewrite the base weights are refused)',
    ),
    "layers_to_transform": (
        _optional(lambda v: _is_int(v) or (isinstance(v, list) and all(map(_is_int, v)))),
        "null, a layer index or a list of them",
    ),
    "layers_pattern": (
        _optional(lambda v: isinstance(v, str) or _str_list(v)),
        "null, a name or a list of names",
    ),
    "task_type": (lambda v: v in (None, "CAUSAL_LM"), 'null or "CAUSAL_LM"'),
}

#: PEFT's bookkeeping keys: read, checked, never handed on (``inference_mode`` is ours to set).
LORA_KEYS_RECORDED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peft_type": (lambda v: v == "LORA", '"LORA"'),
    "peft_version": (_optional(lambda v: isinstance(v, str)), "a version string"),
    "base_model_name_or_path": (_optional(lambda v: isinstance(v, str)), "null or a string"),
    "revision": (_optional(lambda v: isinstance(v, str)), "null or a string"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "qalora_group_size": (_is_int, "an integer (unused without QA-LoRA)"),
}


def _off(*allowed: Any) -> tuple[Callable[[Any], bool], str]:
    def check(value: Any) -> bool:
        return any(value == a and type(value) is type(a) for a in allowed)

    return check, " or ".join(json.dumps(a) for a in allowed) + " (the feature is not supported)"


#: Every other PEFT LoRA feature: accepted only at the value that leaves it off, never handed on.
#: Among them the ones an attacker wants: ``megatron_config`` (imports the module named by
#: ``megatron_core``), ``init_lora_weights``-style configs that rewrite base weights (``loftq``,
#: ``eva``, ``corda``, ``lora_ga``), ``layer_replication`` (adds decoder layers), ``auto_mapping``
#: (names classes to import), ``modules_to_save`` and ``trainable_token_indices`` (replace base
#: modules), ``use_dora`` (not supported: not tested with lenssteer's apply/remove).
LORA_KEYS_OFF: dict[str, tuple[Callable[[Any], bool], str]] = {
    "auto_mapping": _off(None),
    "modules_to_save": _off(None, []),
    "rank_pattern": _off({}, None),
    "alpha_pattern": _off({}, None),
    "megatron_config": _off(None),
    "megatron_core": _off("megatron.core", None),
    "trainable_token_indices": _off(None),
    "loftq_config": _off({}, None),
    "eva_config": _off(None),
    "corda_config": _off(None),
    "lora_ga_config": _off(None),
    "velora_config": _off(None),
    "monteclora_config": _off(None),
    "kasa_config": _off(None),
    "arrow_config": _off(None),
    "alora_invocation_tokens": _off(None),
    "use_dora": _off(False),
    "use_qalora": _off(False),
    "use_bdlora": _off(None, False),
    "layer_replication": _off(None),
    "lora_bias": _off(False),
    "target_parameters": _off(None, []),
    "ensure_weight_tying": _off(False),
    "runtime_config": _off({}, {"ephemeral_gpu_offload": False}),
}


def check_lora_config(data: dict[str, Any], source: str = "adapter config") -> dict[str, Any]:
    """Validate an adapter's PEFT keys against the allow-list; return the keys PEFT may see.

    Raises :class:`AdapterError` naming the first key that is unknown or has a value outside what
    lenssteer accepts (see the module docstring). Nothing in ``data`` is imported or called.
    """
    passed: dict[str, Any] = {}
    for key in sorted(data):
        value = data[key]
        for table in (LORA_KEYS_PASSED, LORA_KEYS_RECORDED, LORA_KEYS_OFF):
            if key in table:
                check, expected = table[key]
                try:
                    ok = bool(check(value))
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise AdapterError(
                        f"{source}: PEFT key {key!r} = {json.dumps(value, default=str)[:80]} is "
                        f"refused; lenssteer accepts {expected}"
                    )
                if table is LORA_KEYS_PASSED:
                    passed[key] = value
                break
        else:
            raise AdapterError(
                f"{source}: PEFT key {key!r} is not one lenssteer accepts (plain LoRA only); "
                "refusing to load the adapter"
            )
    for key in ("peft_type", "r", "target_modules"):
        if key not in data:
            raise AdapterError(f"{source}: a LoRA adapter needs PEFT's key {key!r}")
    return passed


def check_base_weights(model: nn.Module, expected: str | None = None, when: str = "") -> str:
    """Recompute ``model``'s weights fingerprint; raise :class:`AdapterError` if it is not ``expected``.

    ``expected`` defaults to the fingerprint recorded when the model was loaded
    (``model.lenssteer_identity``). Returns the fingerprint. Used after an adapter is applied or
    removed and by ``compare`` before each system: weights that changed under a run stop it.
    """
    if expected is None:
        expected = loaded_fingerprint(model)  # the checkpoint's, or its cast under --dtype
    actual = weights_fingerprint(model)
    if actual != expected:
        raise AdapterError(
            f"the base model's weights changed{' ' + when if when else ''} (fingerprint {actual}, "
            f"expected {expected}); stopping so that nothing is scored on a changed model"
        )
    return actual


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        if hasattr(text_config, name):
            return int(getattr(text_config, name))
    raise AdapterError(f"cannot find the hidden size of {type(model).__name__}")


def base_model_description(model: nn.Module) -> dict[str, Any]:
    """What an adapter records about the model it was trained on (identity and shape)."""
    identity = model_identity(model)
    return {
        "model": identity["model"],
        "revision": identity["revision"],
        "fingerprint": identity["fingerprint"],
        "hidden_size": _hidden_size(model),
        "num_layers": num_decoder_layers(model),
        "architecture": type(model).__name__,
    }


@dataclass
class AdapterConfig:
    """The ``"lenssteer"`` section of ``adapter_config.json``."""

    kind: str
    base_model: dict[str, Any]
    trained_layers: list[int]
    languages: list[str]
    central_language: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    loss_layers: list[int] = field(default_factory=list)
    representation: dict[str, Any] = field(default_factory=dict)
    subspace: dict[str, Any] = field(default_factory=dict)
    data_hash: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training_items: list[str] = field(default_factory=list)  # corpus ids: never to be scored
    selection_items: list[str] = field(default_factory=list)  # dev ids settings were chosen on
    weights_sha256: str | None = None
    format_version: int = FORMAT_VERSION
    lenssteer_version: str = __version__

    REQUIRED = (
        "format_version",
        "lenssteer_version",
        "kind",
        "base_model",
        "trained_layers",
        "languages",
        "central_language",
        "hyperparameters",
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AdapterError(f"adapter kind {self.kind!r} is unknown; expected one of {KINDS}")

    def validate(self, source: str = "adapter config") -> None:
        """Check the types and values of every field (raises :class:`AdapterError` naming it)."""
        checks: list[tuple[str, bool, str]] = [
            ("format_version", _is_int(self.format_version), "an integer"),
            ("lenssteer_version", isinstance(self.lenssteer_version, str), "a string"),
            ("base_model", isinstance(self.base_model, dict), "an object"),
            (
                "trained_layers",
                isinstance(self.trained_layers, list)
                and bool(self.trained_layers)
                and all(_is_int(i) and i >= 0 for i in self.trained_layers),
                "a non-empty list of layer indices",
            ),
            (
                "loss_layers",
                isinstance(self.loss_layers, list) and all(map(_is_int, self.loss_layers)),
                "a list of layer indices",
            ),
            (
                "languages",
                _str_list(self.languages) and bool(self.languages),
                "a non-empty list of language codes",
            ),
            ("central_language", isinstance(self.central_language, str), "a language code"),
            ("hyperparameters", isinstance(self.hyperparameters, dict), "an object"),
            ("representation", isinstance(self.representation, dict), "an object"),
            ("subspace", isinstance(self.subspace, dict), "an object"),
            ("training_items", _str_list(self.training_items), "a list of item ids"),
            ("selection_items", _str_list(self.selection_items), "a list of item ids"),
            ("metrics", isinstance(self.metrics, dict), "an object"),
            ("data_hash", self.data_hash is None or isinstance(self.data_hash, str), "a string"),
            (
                "weights_sha256",
                self.weights_sha256 is None
                or (
                    isinstance(self.weights_sha256, str)
                    and len(self.weights_sha256) == 64
                    and all(c in "0123456789abcdef" for c in self.weights_sha256)
                ),
                "a sha256 hex digest",
            ),
        ]
        for key, ok, expected in checks:
            if not ok:
                value = json.dumps(getattr(self, key), default=str)[:60]
                raise AdapterError(f"{source}: 'lenssteer.{key}' = {value} is not {expected}")
        for key, ok in (
            ("model", isinstance(self.base_model.get("model", ""), str)),
            ("fingerprint", isinstance(self.base_model.get("fingerprint", ""), (str, type(None)))),
            ("hidden_size", _is_int(self.base_model.get("hidden_size", 0))),
            ("num_layers", _is_int(self.base_model.get("num_layers", 0))),
        ):
            if not ok:
                value = json.dumps(self.base_model.get(key), default=str)[:60]
                raise AdapterError(f"{source}: 'lenssteer.base_model.{key}' = {value} is invalid")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        """Build from JSON: missing required keys are named, unknown keys are ignored with a warning."""
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise AdapterError(f"{source}: the 'lenssteer' section lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{source}: ignoring unknown keys {unknown} (written by a newer lenssteer?)",
                stacklevel=3,
            )
        if not _is_int(data["format_version"]):
            raise AdapterError(
                f"{source}: 'lenssteer.format_version' = "
                f"{json.dumps(data['format_version'], default=str)[:60]} is not an integer"
            )
        if data["format_version"] > FORMAT_VERSION:
            raise AdapterError(
                f"{source}: format_version {data['format_version']} is newer than this lenssteer "
                f"reads ({FORMAT_VERSION}); upgrade lenssteer"
            )
        if not isinstance(data["kind"], str) or data["kind"] not in KINDS:
            raise AdapterError(
                f"{source}: 'lenssteer.kind' = {json.dumps(data['kind'], default=str)[:60]} is "
                f"unknown; expected one of {', '.join(KINDS)}"
            )
        config = cls(**{key: data[key] for key in known if key in data})
        config.validate(source)
        return config


def _check_finite(weights: dict[str, torch.Tensor], source: str) -> None:
    for name in sorted(weights):
        tensor = weights[name]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{source}: weight {name} holds NaN or infinite values")


def _json_ready(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "value") and isinstance(value, str):  # str enums such as PeftType
        return str(value.value)
    return value


class AppliedAdapter:
    """A steered model and the way back: ``.model`` is steered, ``.remove()`` restores the base.

    Also a context manager: ``with adapter.apply(model) as steered: ...``. The base model object is
    modified in place while the adapter is applied (so calling it steers too).
    """

    def __init__(self, model: nn.Module, base: nn.Module, undo) -> None:
        self.model = model
        self.base = base
        self._undo = undo
        self._check_removed: Callable[[], None] | None = None

    def remove(self, check: bool = True) -> nn.Module:
        """Undo the adapter; returns the base model with its original weights.

        The base weights' fingerprint is then compared with the one before ``apply()``: a
        difference is an :class:`AdapterError` (``check=False`` skips it).
        """
        if self._undo is not None:
            self._undo()
            self._undo = None
            base = self.base
            if getattr(base, "_lenssteer_applied", None) is not None:
                del base._lenssteer_applied
            if check and self._check_removed is not None:
                self._check_removed()
        return self.base

    @property
    def active(self) -> bool:
        return self._undo is not None

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, exc_type, *exc) -> None:
        self.remove(check=exc_type is None)


class SteeringAdapter:
    """A trained Lens adapter: configuration plus weights (see the module docstring)."""

    def __init__(
        self,
        config: AdapterConfig,
        weights: dict[str, torch.Tensor],
        lora_config: dict[str, Any] | None = None,
    ) -> None:
        if config.kind == "lora" and lora_config is None:
            raise AdapterError("a LoRA adapter needs its PEFT LoraConfig")
        self.config = config
        self.weights = {
            name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()
        }
        self.lora_config = _json_ready(lora_config) if lora_config is not None else None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SteeringAdapter(kind={c.kind!r}, base={c.base_model.get('model')!r}, "
            f"layers={c.trained_layers}, languages={c.languages}, {len(self.weights)} tensors)"
        )

    @property
    def kind(self) -> str:
        return self.config.kind

    # -- folder format ----------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the folder atomically (an existing adapter at ``path`` is replaced only on success).

        A file or a non-empty folder that is not an adapter at ``path`` is refused
        (:class:`~lenssteer.io.OutputFolderError`), as are NaN/infinite weights.
        """
        _check_finite(self.weights, "adapter")
        if self.lora_config is not None:
            check_lora_config(self.lora_config)
        with atomic_directory(path, marker=CONFIG_NAME, what="steering adapter") as scratch:
            atomic_save_tensors(
                self.weights,
                scratch / WEIGHTS_NAME,
                metadata={"format": "pt", "lenssteer_kind": self.kind},
            )
            self.config.weights_sha256 = file_sha256(scratch / WEIGHTS_NAME)
            data: dict[str, Any] = dict(self.lora_config or {})
            data["lenssteer"] = _json_ready(self.config.to_dict())
            atomic_write_json(scratch / CONFIG_NAME, data)
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SteeringAdapter:
        """Read a folder written by :meth:`save_pretrained`, checking every part of it."""
        folder = Path(path)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not folder.is_dir():
            raise AdapterError(f"adapter folder {folder} does not exist")
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise AdapterError(f"{folder} is not an adapter folder: {needed.name} is missing")
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AdapterError(f"{config_path} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or not isinstance(data.get("lenssteer"), dict):
            raise AdapterError(
                f"{config_path} has no 'lenssteer' section: not a lenssteer adapter (a plain PEFT "
                "adapter loads with peft.PeftModel.from_pretrained)"
            )
        config = AdapterConfig.from_dict(data.pop("lenssteer"), source=str(config_path))
        lora_config = None
        if config.kind == "lora":
            if data.get("peft_type") != "LORA":
                raise AdapterError(f"{config_path}: a LoRA adapter needs PEFT's LoraConfig keys")
            check_lora_config(data, source=str(config_path))
            lora_config = data
        elif data:
            raise AdapterError(
                f"{config_path}: a {config.kind!r} adapter has no PEFT keys, but the file has "
                f"{', '.join(sorted(data)[:4])}"
            )
        if config.weights_sha256 is not None:
            actual = file_sha256(weights_path)
            if actual != config.weights_sha256:
                raise AdapterError(
                    f"{weights_path} is corrupted or truncated: sha256 {actual[:16]}..., the config "
                    f"records {config.weights_sha256[:16]}..."
                )
        try:
            weights = load_file(weights_path)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise AdapterError(f"{weights_path} is corrupted or truncated: {error}") from error
        if not weights:
            raise AdapterError(f"{weights_path} holds no tensors")
        _check_finite(weights, str(weights_path))
        return cls(config, weights, lora_config)

    # -- model checks -----------------------------------------------------------------------------

    def check_base_model(self, model: nn.Module, strict: bool = True) -> None:
        """Raise :class:`AdapterError` unless ``model`` is the base model the adapter was made for.

        Hidden size and layer count must always match; with ``strict=False`` a different weights
        fingerprint (another checkpoint of the same architecture) only warns.
        """
        expected = self.config.base_model
        name = expected.get("model", "?")
        if getattr(model, "_lenssteer_applied", None) is not None:
            raise AdapterError(
                "this model already has a steering adapter applied; remove() it or load a fresh model"
            )
        hidden = _hidden_size(model)
        if "hidden_size" in expected and hidden != expected["hidden_size"]:
            raise AdapterError(
                f"adapter made for {name} (hidden size {expected['hidden_size']}) does not fit this "
                f"model (hidden size {hidden})"
            )
        layers = num_decoder_layers(model)
        if "num_layers" in expected and layers != expected["num_layers"]:
            raise AdapterError(
                f"adapter made for {name} ({expected['num_layers']} decoder layers) does not fit this "
                f"model ({layers} decoder layers)"
            )
        fingerprint = model_identity(model)["fingerprint"]
        if expected.get("fingerprint") and fingerprint != expected["fingerprint"]:
            message = (
                f"adapter made for {name} (weights fingerprint {expected['fingerprint']}) but this "
                f"model's weights differ (fingerprint {fingerprint}): another checkpoint, or weights "
                "already changed"
            )
            if strict:
                raise AdapterError(
                    message + "; use the base model the adapter was trained on (from Python, "
                    "apply(model, strict=False) applies it anyway)"
                )
            warnings.warn(message, stacklevel=3)

    # -- apply / merge ----------------------------------------------------------------------------

    def peft_config(self, inference_mode: bool = True):
        """The PEFT ``LoraConfig`` of a LoRA adapter."""
        from peft import PeftConfig

        if self.lora_config is None:
            raise AdapterError(f"a {self.kind!r} adapter has no PEFT config")
        data = check_lora_config(self.lora_config)  # only plain-LoRA keys reach PEFT
        data["inference_mode"] = inference_mode
        return PeftConfig.from_peft_type(peft_type="LORA", **data)

    def apply(self, model: nn.Module, strict: bool = True) -> AppliedAdapter:
        """Steer ``model`` (in place) and return the steered model with a way to undo it.

        LoRA: the model is wrapped in a ``PeftModel`` (``.model``); ``remove()`` unloads the LoRA
        modules. Layers: the trained layers' weights are swapped in and the originals kept;
        ``remove()`` copies them back.
        """
        self.check_base_model(model, strict=strict)
        self._check_layer_names(model)
        # The tensors themselves (not copies): what they hold after applying is what is checked.
        tracked = dict(model.state_dict(keep_vars=True))
        untouched = [(n, t) for n, t in tracked.items() if n not in self.weights]
        before_all = tensors_fingerprint(tracked.items())
        before_untouched = tensors_fingerprint(untouched)
        n_layers = num_decoder_layers(model)
        # PEFT freezes every base parameter; removing the adapter gives the flags back as they were.
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        if self.kind == "lora":
            applied = self._apply_lora(model)
        else:
            applied = self._apply_layers(model)
        undo = applied._undo

        def undo_and_restore_flags() -> None:
            undo()
            for name, parameter in model.named_parameters():
                if name in trainable:
                    parameter.requires_grad_(trainable[name])

        applied._undo = undo_and_restore_flags
        if tensors_fingerprint(untouched) != before_untouched or (
            num_decoder_layers(model) != n_layers
        ):
            applied.remove(check=False)
            raise AdapterError(
                "applying the adapter changed base weights outside its own (or the layer count); "
                "refusing it"
            )

        def check_removed() -> None:
            after = tensors_fingerprint(model.state_dict(keep_vars=True).items())
            if after != before_all:
                raise AdapterError(
                    f"the base model's weights differ after removing the adapter (fingerprint "
                    f"{after}, before applying {before_all}); reload the model"
                )

        applied._check_removed = check_removed
        model._lenssteer_applied = self.config
        return applied

    def _check_layer_names(self, model: nn.Module) -> None:
        """The adapter's weights may only belong to the decoder layers it says it trained."""
        layers = find_decoder_layers(model)
        bad = [i for i in self.config.trained_layers if not 0 <= i < len(layers)]
        if bad:
            raise AdapterError(
                f"the adapter names decoder layers {bad}; this model has {len(layers)}"
            )
        names = {id(module): name for name, module in model.named_modules()}
        prefixes = tuple(names[id(layers[i])] + "." for i in self.config.trained_layers)
        for weight in sorted(self.weights):
            module = weight.removeprefix("base_model.model.") if self.kind == "lora" else weight
            if not module.startswith(prefixes):
                raise AdapterError(
                    f"the adapter's weight {weight} lies outside its trained decoder layers "
                    f"{self.config.trained_layers}; refusing it"
                )
        for target in (self.lora_config or {}).get("target_modules") or []:
            if "." in target and not target.startswith(prefixes):
                raise AdapterError(
                    f"the adapter's LoRA target module {target} lies outside its trained decoder "
                    f"layers {self.config.trained_layers}; refusing it"
                )

    def _apply_lora(self, model: nn.Module) -> AppliedAdapter:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        with warnings.catch_warnings():  # PEFT renames base_model_name_or_path; harmless here
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
            peft_model = get_peft_model(model, self.peft_config(inference_mode=True))
        try:
            expected = set(get_peft_model_state_dict(peft_model))
            if expected != set(self.weights):
                missing = sorted(expected - set(self.weights))[:4]
                extra = sorted(set(self.weights) - expected)[:4]
                raise AdapterError(
                    f"LoRA weights do not match the modules of this model (missing {missing}, "
                    f"unexpected {extra})"
                )
            for name, tensor in get_peft_model_state_dict(peft_model).items():
                if tuple(tensor.shape) != tuple(self.weights[name].shape):
                    raise AdapterError(
                        f"LoRA weight {name} has shape {tuple(self.weights[name].shape)}, the model "
                        f"needs {tuple(tensor.shape)}"
                    )
            device = next(model.parameters()).device
            set_peft_model_state_dict(
                peft_model, {k: v.to(device) for k, v in self.weights.items()}
            )
        except BaseException:
            peft_model.unload()
            raise
        return AppliedAdapter(peft_model, model, lambda: peft_model.unload())

    def _apply_layers(self, model: nn.Module) -> AppliedAdapter:
        parameters = dict(model.named_parameters())
        missing = [name for name in self.weights if name not in parameters]
        if missing:
            raise AdapterError(
                f"the adapter's weights name parameters this model does not have: {missing[:4]}"
            )
        for name, tensor in self.weights.items():
            if tuple(parameters[name].shape) != tuple(tensor.shape):
                raise AdapterError(
                    f"weight {name} has shape {tuple(tensor.shape)}, the model's is "
                    f"{tuple(parameters[name].shape)}"
                )
        originals = {name: parameters[name].detach().clone() for name in self.weights}
        with torch.no_grad():
            for name, tensor in self.weights.items():
                parameters[name].copy_(tensor.to(parameters[name].device, parameters[name].dtype))

        def undo() -> None:
            with torch.no_grad():
                for name, tensor in originals.items():
                    parameters[name].copy_(tensor)

        return AppliedAdapter(model, model, undo)

    def merge(self, model: nn.Module, strict: bool = True) -> nn.Module:
        """Steer ``model`` permanently (LoRA merged into the weights); returns the same model.

        Its ``lenssteer_identity`` gets the new weights fingerprint, so caches keyed on it and later
        adapter checks see the changed weights.
        """
        self.check_base_model(model, strict=strict)
        self._check_layer_names(model)
        if self.kind == "lora":
            applied = self._apply_lora(model)
            merged = applied.model.merge_and_unload()
        else:
            self._apply_layers(model)
            merged = model
        identity = dict(model_identity(merged))
        identity["fingerprint"] = weights_fingerprint(merged)
        identity.pop("loaded_fingerprint", None)  # the merged weights are their own checkpoint
        identity["merged_adapter"] = f"{self.kind}:{self.config.weights_sha256 or 'unsaved'}"
        merged.lenssteer_identity = identity
        return merged


def generate(
    model: str,
    prompt: str,
    adapter: str | Path | None = None,
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    compare: bool = True,
    loaded=None,
    dtype: str | torch.dtype = "float32",
) -> dict[str, str]:
    """Greedy answers to ``prompt`` from the base model and, with ``adapter``, the steered one.

    Returns ``{"base": ...}`` and/or ``{"steered": ...}`` (``compare=False`` skips the base answer
    when an adapter is given). ``chat_template=None`` uses the template if the tokenizer has one.
    ``dtype``: the weights' dtype when the model is loaded here (``"auto"``: bfloat16 where the
    device computes it natively, which decodes faster).
    """
    from lenssteer.evaluate import generate_greedy
    from lenssteer.extract import format_texts, resolve_chat_template
    from lenssteer.models import load_model

    tokenizer, lm = loaded if loaded is not None else load_model(model, dtype)
    chat_template = resolve_chat_template(tokenizer, chat_template)
    text = format_texts(tokenizer, [prompt], chat_template)[0]
    special = not chat_template
    answers: dict[str, str] = {}
    if adapter is None or compare:
        answers["base"] = generate_greedy(
            lm, tokenizer, [text], max_new_tokens, add_special_tokens=special
        )[0]
    if adapter is not None:
        steering = SteeringAdapter.from_pretrained(adapter)
        with steering.apply(lm) as steered:
            answers["steered"] = generate_greedy(
                steered, tokenizer, [text], max_new_tokens, add_special_tokens=special
            )[0]
    return answers
