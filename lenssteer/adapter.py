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
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lenssteer import __version__
from lenssteer.io import atomic_directory, atomic_save_tensors, atomic_write_json
from lenssteer.models import model_identity, num_decoder_layers, weights_fingerprint

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterConfig",
    "AdapterError",
    "AppliedAdapter",
    "SteeringAdapter",
    "base_model_description",
]

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KINDS = ("lora", "layers")


class AdapterError(ValueError):
    """An adapter folder that cannot be read, or an adapter that does not fit the given model."""


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
        if int(data["format_version"]) > FORMAT_VERSION:
            raise AdapterError(
                f"{source}: format_version {data['format_version']} is newer than this lenssteer "
                f"reads ({FORMAT_VERSION}); upgrade lenssteer"
            )
        return cls(**{key: data[key] for key in known if key in data})


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


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

    def remove(self) -> nn.Module:
        """Undo the adapter; returns the base model with its original weights."""
        if self._undo is not None:
            self._undo()
            self._undo = None
            base = self.base
            if getattr(base, "_lenssteer_applied", None) is not None:
                del base._lenssteer_applied
        return self.base

    @property
    def active(self) -> bool:
        return self._undo is not None

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        self.remove()


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
        """Write the folder atomically (an existing adapter at ``path`` is replaced only on success)."""
        with atomic_directory(path) as scratch:
            atomic_save_tensors(
                self.weights,
                scratch / WEIGHTS_NAME,
                metadata={"format": "pt", "lenssteer_kind": self.kind},
            )
            self.config.weights_sha256 = _file_sha256(scratch / WEIGHTS_NAME)
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
            lora_config = data
        if config.weights_sha256 is not None:
            actual = _file_sha256(weights_path)
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
                raise AdapterError(message + "; pass strict=False to apply it anyway")
            warnings.warn(message, stacklevel=3)

    # -- apply / merge ----------------------------------------------------------------------------

    def peft_config(self, inference_mode: bool = True):
        """The PEFT ``LoraConfig`` of a LoRA adapter."""
        from peft import PeftConfig

        if self.lora_config is None:
            raise AdapterError(f"a {self.kind!r} adapter has no PEFT config")
        data = dict(self.lora_config)
        data["inference_mode"] = inference_mode
        return PeftConfig.from_peft_type(**data)

    def apply(self, model: nn.Module, strict: bool = True) -> AppliedAdapter:
        """Steer ``model`` (in place) and return the steered model with a way to undo it.

        LoRA: the model is wrapped in a ``PeftModel`` (``.model``); ``remove()`` unloads the LoRA
        modules. Layers: the trained layers' weights are swapped in and the originals kept;
        ``remove()`` copies them back.
        """
        self.check_base_model(model, strict=strict)
        if self.kind == "lora":
            applied = self._apply_lora(model)
        else:
            applied = self._apply_layers(model)
        model._lenssteer_applied = self.config
        return applied

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
        if self.kind == "lora":
            applied = self._apply_lora(model)
            merged = applied.model.merge_and_unload()
        else:
            self._apply_layers(model)
            merged = model
        identity = dict(model_identity(merged))
        identity["fingerprint"] = weights_fingerprint(merged)
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
) -> dict[str, str]:
    """Greedy answers to ``prompt`` from the base model and, with ``adapter``, the steered one.

    Returns ``{"base": ...}`` and/or ``{"steered": ...}`` (``compare=False`` skips the base answer
    when an adapter is given). ``chat_template=None`` uses the template if the tokenizer has one.
    """
    from lenssteer.evaluate import generate_greedy
    from lenssteer.extract import format_texts
    from lenssteer.models import load_model

    tokenizer, lm = loaded if loaded is not None else load_model(model)
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
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
