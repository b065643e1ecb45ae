"""Extract one pooled hidden-state vector per text, for the requested decoder layers only.

Layer ``i``'s state is the *output* of decoder layer ``i`` (the residual stream after that block,
before the final norm). Pooling is over real tokens only, found from the attention mask: ``last``
takes the last real token (what Lens probes and trains), ``mean`` averages all real tokens. Forward
hooks pool inside the pass and the pass stops after the highest requested layer, so memory grows with
``texts x kept layers x hidden``, never with all layers x tokens. Positions are computed from the
attention mask, so left and right padding, batched and one-by-one runs give the same vectors.

The *representation point* says which vector of a layer is read: ``"residual"`` (the default, the
layer's output as above) or ``"final_norm"``: the last layer's output after the model's final norm,
what the LM head sees and what Lens' code reads (``output_hidden_states[-1]``). It exists for the
last decoder layer only; asking for it elsewhere is a :class:`RepresentationError`.

Tokens that every prompt starts with (the chat template's system turn: 24 of the ~70 tokens of a
templated Bible verse for the default model) run once: their KV cache is copied for each batch,
which then computes only its own tokens (:class:`SharedPrefix`, on
:func:`lenssteer.forward.run_prefix`). The vectors are the same up to float rounding.

Results are cached on disk as safetensors, keyed by everything that could change them: model id,
revision, weights fingerprint, layers, pooling, the exact prompt template, and a hash of the texts.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from lenssteer.forward import PrefixCache, common_prefix_length, pool_real_positions, run_prefix
from lenssteer.hooks import (
    hooked,
    position_ids_from_mask,
    run_until_stopped,
    stop_after,
)
from lenssteer.io import atomic_save_tensors
from lenssteer.models import (
    ModuleNames,
    cache_root,
    dtype_name,
    find_decoder_layers,
    find_final_norm,
    model_dtype,
    model_identity,
    pad_token_id,
)

Pooling = Literal["last", "mean"]
POOLINGS = ("last", "mean")
Representation = Literal["residual", "final_norm"]
REPRESENTATIONS = ("residual", "final_norm")


class RepresentationError(ValueError):
    """A representation point that is unknown or meaningless at the requested layers."""


@dataclass(frozen=True)
class Provenance:
    """Where a set of pooled states came from: what a subspace records and training checks.

    ``template`` is :func:`template_signature`'s fingerprint of the prompt format (None: raw text).
    """

    model: str
    revision: str | None
    fingerprint: str
    num_layers: int
    layers: tuple[int, ...]
    pooling: Pooling
    representation: Representation
    template: str | None
    corpus: str
    data_hash: str
    licences: dict = field(default_factory=dict)

    def as_metadata(self) -> dict:
        """The subspace.json fields (the layers are a field of the subspace itself)."""
        fields_ = asdict(self)
        del fields_["layers"]
        return fields_


def provenance_of(
    model: nn.Module,
    tokenizer,
    corpus,
    layers: Sequence[int],
    pooling: Pooling,
    chat_template: bool,
    module_names: ModuleNames | None = None,
    data_hash: str | None = None,
    representation: Representation = "residual",
) -> Provenance:
    """The :class:`Provenance` of states extracted from ``corpus`` with these settings.

    ``data_hash`` defaults to the corpus's own hash.
    """
    identity = model_identity(model)
    return Provenance(
        model=identity["model"],
        revision=identity["revision"],
        fingerprint=identity["fingerprint"],
        num_layers=len(find_decoder_layers(model, module_names)),
        layers=tuple(int(i) for i in layers),
        pooling=pooling,
        representation=representation,
        template=template_signature(tokenizer, chat_template),
        corpus=getattr(corpus, "source", "in-memory"),
        data_hash=data_hash or corpus.data_hash(),
        licences=dict(getattr(corpus, "licences", {})),
    )


class CorpusStates(dict):
    """``{language: (n_items, len(layers), hidden)}`` plus the :class:`Provenance` of the states, which
    :func:`~lenssteer.subspace.compute_subspace` records in the subspace."""

    def __init__(self, states: dict[str, torch.Tensor], provenance: Provenance) -> None:
        super().__init__(states)
        self.provenance = provenance


def check_representation(representation: str, layers: Sequence[int], n_layers: int) -> None:
    """Raise :class:`RepresentationError` unless ``representation`` can be read at ``layers``.

    ``"final_norm"`` is the top layer's output after the model's final norm, so it exists for the
    last decoder layer (``n_layers - 1``) only.
    """
    if representation not in REPRESENTATIONS:
        raise RepresentationError(
            f"unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}"
        )
    if representation == "final_norm":
        other = [int(i) for i in layers if int(i) != n_layers - 1]
        if other:
            raise RepresentationError(
                f"representation 'final_norm' (after the model's final norm) exists only at the last "
                f"decoder layer ({n_layers - 1}); layers {other} were asked for: use --layers=-1 "
                "(or representation 'residual')"
            )


def representation_map(
    model: nn.Module, representation: str, module_names: ModuleNames | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map a decoder layer's output ``(..., H)`` to the representation read there.

    ``"residual"``: unchanged; ``"final_norm"``: the model's own final norm applied to it (what the
    LM head sees and ``output_hidden_states[-1]`` returns; gradients flow through it).
    """
    if representation == "residual":
        return lambda hidden: hidden
    if representation != "final_norm":
        raise RepresentationError(
            f"unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}"
        )
    return find_final_norm(model, module_names)


class TemplateError(ValueError):
    """A chat template was asked for but the tokenizer has none."""


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (instruct models do)."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_template(tokenizer, chat_template: bool | None = None) -> bool:
    """``None`` means: use the chat template when the tokenizer has one (instruct models)."""
    return has_chat_template(tokenizer) if chat_template is None else chat_template


def format_texts(tokenizer, texts: Sequence[str], chat_template: bool) -> list[str]:
    """Wrap each text as a user turn plus the generation prompt (as Lens does), or leave it raw."""
    if not chat_template:
        return list(texts)
    if not has_chat_template(tokenizer):
        raise TemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "use chat_template=False (CLI: --no-chat-template) for base models"
        )
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        for text in texts
    ]


def template_signature(tokenizer, chat_template: bool) -> str:
    """A short id of the prompt format, stored with subspaces and adapters and used in cache keys."""
    if not chat_template:
        return "raw"
    digest = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:12]
    return f"chat:{digest}"


def model_context_length(model: nn.Module) -> int | None:
    """The number of positions the model was built for (``max_position_embeddings``), if known."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def default_max_tokens(model: nn.Module, tokenizer, chat_template: bool) -> int | None:
    """The token cap per text: the model's context less what the prompt format adds around a text."""
    context = model_context_length(model)
    if context is None:
        return None
    wrapped = format_texts(tokenizer, ["x"], chat_template)[0]
    overhead = len(tokenizer(wrapped, add_special_tokens=not chat_template)["input_ids"]) - 1
    return max(1, context - overhead)


def cap_texts(
    tokenizer, texts: Sequence[str], max_tokens: int | None, what: str = "text"
) -> list[str]:
    """``texts`` with each one cut to its first ``max_tokens`` tokens (``None``: no cap).

    One long row would otherwise pad its batch and grow memory and time with its length squared;
    a cut text is named in one warning (its 1-based row and token count).
    """
    if max_tokens is None:
        return list(texts)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    capped = list(texts)
    cut: list[str] = []
    encoded = tokenizer(capped, add_special_tokens=False)["input_ids"]
    for row, ids in enumerate(encoded):
        if len(ids) > max_tokens:
            capped[row] = tokenizer.decode(ids[:max_tokens])
            cut.append(f"row {row + 1} ({len(ids)} tokens)")
    if cut:
        more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
        warnings.warn(
            f"{what}: {', '.join(cut[:5])}{more} cut to the first {max_tokens} tokens "
            "(max_tokens; CLI: --max-tokens)",
            stacklevel=3,
        )
    return capped


def tokenize(tokenizer, prompts: Sequence[str], chat_template: bool) -> dict[str, torch.Tensor]:
    """Tokenize formatted prompts with padding; templated text already carries its special tokens."""
    return tokenizer(
        list(prompts),
        return_tensors="pt",
        padding=True,
        add_special_tokens=not chat_template,
    )


def _cache_key(
    model: nn.Module, tokenizer, texts, layers, pooling, chat_template, representation="residual"
) -> str:
    identity = model_identity(model)
    point = {} if representation == "residual" else {"representation": representation}
    dtype = model_dtype(model)
    if dtype != torch.float32:  # float32 keys stay as they were before dtypes were keyed
        point["dtype"] = dtype_name(dtype)
    text_hash = hashlib.sha256()
    for text in texts:
        text_hash.update(text.encode())
        text_hash.update(b"\x00")
    key = json.dumps(
        {
            **identity,
            "layers": list(layers),
            "pooling": pooling,
            "template": template_signature(tokenizer, chat_template),
            "bos": getattr(tokenizer, "bos_token", None),
            "texts": text_hash.hexdigest(),
            "n": len(texts),
            "version": 1,
            **point,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class SharedPrefix:
    """Tokens every prompt of a batch starts with, run once.

    ``cache``: their KV cache up to the top requested layer (copied for each batch, never changed);
    ``sums``: for mean pooling, the sum of their outputs per layer (``(hidden,)`` float32).
    """

    ids: list[int]
    cache: PrefixCache
    sums: dict[int, torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)


@torch.no_grad()
def run_shared_prefix(
    model: nn.Module,
    prefix_ids: Sequence[int],
    layers: Sequence[int],
    module_names: ModuleNames | None = None,
    representation: Representation = "residual",
) -> SharedPrefix:
    """Run ``prefix_ids`` once through the layers up to ``max(layers)``, keeping its KV cache."""
    decoder_layers = find_decoder_layers(model, module_names)
    check_representation(representation, layers, len(decoder_layers))
    read = representation_map(model, representation, module_names)
    sums: dict[int, torch.Tensor] = {}
    top = max(layers)

    def make_hook(index: int):
        def hook(_module: nn.Module, hidden: torch.Tensor) -> None:
            sums[index] = read(hidden)[0].float().sum(0)

        return hook

    device = next(model.parameters()).device
    hooks = [(decoder_layers[i], make_hook(i)) for i in layers]
    with hooked([*hooks, stop_after(decoder_layers[top])]):
        cache = run_prefix(
            model,
            partial(run_until_stopped, model),
            input_ids=torch.tensor([list(prefix_ids)], device=device),
        )
    return SharedPrefix(list(prefix_ids), cache, sums)


@torch.no_grad()
def pooled_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    pooling: Pooling = "last",
    module_names: ModuleNames | None = None,
    prefix: SharedPrefix | None = None,
    representation: Representation = "residual",
) -> torch.Tensor:
    """Pooled outputs of the given (absolute, sorted) decoder layers for one batch.

    ``input_ids``, ``attention_mask``: ``(batch, seq)``. Returns ``(batch, len(layers), hidden)``.
    With ``prefix``, every row continues that shared prefix: ``input_ids`` hold only the tokens
    after it (right padded), and mean pooling counts the prefix tokens too. ``representation``:
    the layer's output (``"residual"``) or, at the last layer only, that output after the model's
    final norm (``"final_norm"``).
    """
    decoder_layers = find_decoder_layers(model, module_names)
    check_representation(representation, layers, len(decoder_layers))
    read = representation_map(model, representation, module_names)
    pooled: dict[int, torch.Tensor] = {}
    top = max(layers)
    prefix_length = len(prefix) if prefix is not None else 0

    def make_hook(index: int):
        def hook(_module: nn.Module, hidden: torch.Tensor) -> None:
            prefix_sum = prefix.sums[index] if prefix is not None and pooling == "mean" else None
            pooled[index] = pool_real_positions(
                read(hidden), attention_mask, pooling, prefix_sum, prefix_length
            )

        return hook

    kwargs: dict = {
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
    if prefix is not None:
        kwargs = prefix.cache.continuing(model, attention_mask, kwargs["position_ids"])
    hooks = [(decoder_layers[i], make_hook(i)) for i in layers]
    with hooked([*hooks, stop_after(decoder_layers[top])]):
        run_until_stopped(model, input_ids=input_ids, **kwargs)
    return torch.stack([pooled[i] for i in layers], dim=1)


def _right_padded(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def extract_states(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    pooling: Pooling = "last",
    chat_template: bool = False,
    batch_size: int = 16,
    cache_dir: str | Path | None | Literal[False] = None,
    progress: bool = True,
    module_names: ModuleNames | None = None,
    description: str = "extract",
    share_prefix: bool = True,
    representation: Representation = "residual",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Pooled hidden states of ``texts`` at ``layers``: ``(n_texts, len(layers), hidden)``, float32.

    ``layers`` are absolute indices (see :func:`lenssteer.models.resolve_layers`). ``cache_dir=None``
    uses ``$LENSSTEER_CACHE/states``; ``False`` disables the cache. ``share_prefix``: run the
    tokens every prompt starts with once (see the module docstring). ``representation``:
    ``"residual"`` (layer outputs) or ``"final_norm"`` (last layer only, after the final norm).
    ``max_tokens``: longer texts are cut with a warning naming the row (default: the model's
    context, see :func:`default_max_tokens`). Batches are built shortest text first.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_layers = len(find_decoder_layers(model, module_names))
    layers = sorted(set(int(i) for i in layers))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers {layers} must be absolute indices in 0..{n_layers - 1}")
    check_representation(representation, layers, n_layers)
    for position, text in enumerate(texts):
        if not text or not text.strip():
            raise ValueError(f"text #{position + 1} is empty")
    if max_tokens is None:
        max_tokens = default_max_tokens(model, tokenizer, chat_template)
    texts = cap_texts(tokenizer, texts, max_tokens, description)

    cache_path = None
    if cache_dir is not False:
        folder = Path(cache_dir) if cache_dir is not None else cache_root() / "states"
        key = _cache_key(model, tokenizer, texts, layers, pooling, chat_template, representation)
        cache_path = folder / f"{key}.safetensors"
        if cache_path.is_file():
            return load_file(cache_path)["states"]

    prompts = format_texts(tokenizer, texts, chat_template)
    encoded = tokenizer(prompts, add_special_tokens=not chat_template)["input_ids"]
    prefix_length = common_prefix_length(encoded) if share_prefix else 0
    lengths = [len(ids) for ids in encoded]
    # Shortest first keeps padding small; results are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    device = next(model.parameters()).device
    prefix = None
    if prefix_length:
        prefix = run_shared_prefix(
            model, encoded[0][:prefix_length], layers, module_names, representation
        )
    pad_id = pad_token_id(tokenizer)
    out: torch.Tensor | None = None
    with tqdm(total=len(prompts), desc=description, unit="text", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if prefix is not None:
                ids, mask = _right_padded([encoded[i][prefix_length:] for i in chunk], pad_id)
            else:
                batch = tokenize(tokenizer, [prompts[i] for i in chunk], chat_template)
                ids, mask = batch["input_ids"], batch["attention_mask"]
            states = pooled_states(
                model,
                ids.to(device),
                mask.to(device),
                layers,
                pooling,
                module_names,
                prefix=prefix,
                representation=representation,
            ).cpu()
            if out is None:
                out = torch.empty(len(prompts), len(layers), states.shape[-1])
            out[torch.tensor(chunk)] = states
            bar.update(len(chunk))
    assert out is not None
    if cache_path is not None:
        try:
            atomic_save_tensors({"states": out}, cache_path)
        except (OSError, SafetensorError) as error:  # a full or read-only cache costs speed only
            warnings.warn(
                f"could not write the states cache {cache_path} ({' '.join(str(error).split())}); "
                "continuing without it",
                stacklevel=2,
            )
    return out


def extract_corpus(
    model: nn.Module,
    tokenizer,
    corpus,
    layers: Sequence[int],
    pooling: Pooling = "last",
    chat_template: bool = False,
    batch_size: int = 16,
    cache_dir: str | Path | None | Literal[False] = None,
    progress: bool = True,
    module_names: ModuleNames | None = None,
    share_prefix: bool = True,
    representation: Representation = "residual",
    max_tokens: int | None = None,
) -> CorpusStates:
    """Pooled states of every language of a :class:`~lenssteer.data.ParallelCorpus`.

    Returns ``{language: (n_items, len(layers), hidden)}`` in the corpus' language order, carrying
    its :class:`Provenance` (``.provenance``) for :func:`~lenssteer.subspace.compute_subspace`.
    """
    provenance = provenance_of(
        model,
        tokenizer,
        corpus,
        layers,
        pooling,
        chat_template,
        module_names,
        representation=representation,
    )
    states = {
        language: extract_states(
            model,
            tokenizer,
            corpus.texts[language],
            layers,
            pooling=pooling,
            chat_template=chat_template,
            batch_size=batch_size,
            cache_dir=cache_dir,
            progress=progress,
            module_names=module_names,
            description=f"extract {language}",
            share_prefix=share_prefix,
            representation=representation,
            max_tokens=max_tokens,
        )
        for language in corpus.languages
    }
    return CorpusStates(states, provenance)
