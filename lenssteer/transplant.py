"""XTransplant: does a model answer better in one language when it borrows one activation from another?

XTransplant (Ye et al. 2024, arXiv 2412.12686) probes whether a multilingual model already holds what
it needs to answer a question in language xx and only fails to use it. The same question is run in
two languages: the *donor* (e.g. English) and the *recipient* (e.g. German). At the donor's last real
prompt token we record the output of one module of source layer ``s``, before it joins the residual
stream: the feed-forward block (granularity ``ffn``) or the self-attention block (``attn``). On the
recipient's prefill pass, that module's output at the recipient's last real prompt token in target
layer ``t`` is replaced by the recorded vector. Everything else stays the recipient's own: its other
tokens and layers and every decoding step. Directions: ``en -> xx`` for multilingual tasks (borrow
English competence) and ``xx -> en`` for culture tasks (borrow local knowledge).

What it measures (the grid of ``(s, t)`` pairs, its upper bound, control and pair selection) is
in :mod:`lenssteer.transplant_pairs`; this module is the patch itself and its uses.

Mechanics. Patches are forward hooks on modules found by :mod:`lenssteer.models` (any decoder
architecture, no wrapper classes, no global state); hooks live inside a ``with`` block and are
removed on error. A patch targets an *absolute column* of the sequence, and every forward call works
out which columns it computes (from its attention mask / cache), so the patch lands exactly where
that column is computed: once on a cached prefill (decoding steps never touch it), on every call
without a cache (each call recomputes the prompt). Recorded activations are copies, never views of
the model's buffers.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lenssteer.forward import (
    cache_in_call,
    contiguous_head_input,
    input_dtype,
    pack_continuations,
    packable_length,
    packing_works,
)
from lenssteer.hooks import (
    hooked,
    last_real_positions,
    position_ids_from_mask,
    run_until_stopped,
    stop_after,
)
from lenssteer.models import (
    ModuleNames,
    find_decoder_layers,
    find_layer_modules,
    pad_token_id,
    resolve_layers,
)

__all__ = [
    "GRANULARITIES",
    "encode_prompts",
    "generate_transplanted",
    "record_donor_activations",
    "record_module_outputs",
    "transplant_generate",
    "transplant_loglikelihoods",
    "transplanted",
]

GRANULARITIES = ("ffn", "attn")
_MODULE_KEY = {"ffn": "mlp", "attn": "attn"}  # granularity -> key of find_layer_modules

DonorActivations = dict[str, torch.Tensor]  # granularity -> (n_items, n_layers, hidden)


def _check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)} "
            "(ffn = MLP output, attn = self-attention output)"
        )
    return granularity


def _layer_index(model: nn.Module, layer: int, names: ModuleNames | None) -> int:
    """Absolute index of ``layer`` (negative counts from the top); out of range is a ValueError."""
    return resolve_layers([int(layer)], len(find_decoder_layers(model, names)))[0]


def _check_aligned(donor_prompts: Sequence[Any], recipient_prompts: Sequence[Any]) -> None:
    if len(donor_prompts) != len(recipient_prompts):
        raise ValueError(
            f"donor and recipient lists must be aligned item by item: got {len(donor_prompts)} "
            f"donor and {len(recipient_prompts)} recipient prompts"
        )
    if not recipient_prompts:
        raise ValueError("no prompts given")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits_kwargs(model: nn.Module, keep: int) -> dict[str, int]:
    """``logits_to_keep`` when the model accepts it: skips the LM head on positions we never read."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": keep}
    return {}


# --------------------------------------------------------------------------------------------------
# Encoding


def _encode_one(tokenizer, text: str, add_special_tokens: bool | None) -> list[int]:
    if not text:
        raise ValueError("empty prompt")
    if add_special_tokens is None:  # templated text already starts with its BOS: do not add another
        bos = getattr(tokenizer, "bos_token", None)
        add_special_tokens = not (bos and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {text[:40]!r} has no tokens")
    return list(ids)


def _left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            input_ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


def encode_prompts(
    tokenizer, prompts: Sequence[str], add_special_tokens: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``, both ``(batch, seq)``.

    ``add_special_tokens=None`` adds them unless the text already starts with the BOS token (as
    chat-templated text does).
    """
    return _left_pad(
        [_encode_one(tokenizer, p, add_special_tokens) for p in prompts], pad_token_id(tokenizer)
    )


def _continuation_ids(tokenizer, prompt: str, continuation: str) -> list[int]:
    """Tokens of ``continuation`` as they follow ``prompt`` (:func:`lenssteer.evaluate.continuation_tokens`)."""
    from lenssteer.evaluate import continuation_tokens

    ids = continuation_tokens(tokenizer, prompt, continuation)
    if not ids:
        raise ValueError(f"continuation {continuation!r} has no tokens")
    return ids


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, shortest first, so padding stays small (results go back in input order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------
# Recording (donor side)


@torch.no_grad()
def record_module_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int] | None = None,
    granularities: Sequence[str] = GRANULARITIES,
    names: ModuleNames | None = None,
) -> DonorActivations:
    """Module outputs at each row's last real token, for every requested layer, in one pass.

    ``input_ids``, ``attention_mask``: ``(batch, seq)``, any padding side. ``layers``: indices
    (default all). Returns ``{granularity: (batch, len(layers), hidden)}``, float32 copies.
    """
    granularities = [_check_granularity(g) for g in granularities]
    n_layers = len(find_decoder_layers(model, names))
    layers = (
        list(range(n_layers)) if layers is None else [_layer_index(model, i, names) for i in layers]
    )
    positions = last_real_positions(attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    store: dict[str, dict[int, torch.Tensor]] = {g: {} for g in granularities}

    def recorder(granularity: str, layer: int):
        def hook(_module: nn.Module, hidden: torch.Tensor) -> None:
            # A copy: the reference code kept a view and the block's in-place residual add then
            # turned the "attention output" into the whole residual stream.
            store[granularity][layer] = hidden[rows, positions].detach().to(torch.float32).clone()

        return hook

    hooks = []
    for layer in layers:
        modules = find_layer_modules(model, layer, names)
        hooks += [(modules[_MODULE_KEY[g]], recorder(g, layer)) for g in granularities]
    hooks.append(stop_after(find_decoder_layers(model, names)[max(layers)]))
    with hooked(hooks):
        run_until_stopped(
            model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    return {g: torch.stack([store[g][i] for i in layers], dim=1) for g in granularities}


def record_donor_activations(
    model: nn.Module,
    tokenizer,
    donor_prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    granularities: Sequence[str] = GRANULARITIES,
    batch_size: int = 8,
    add_special_tokens: bool | None = None,
    names: ModuleNames | None = None,
    progress: bool = False,
) -> DonorActivations:
    """Run each donor prompt once; ``{granularity: (n_prompts, len(layers), hidden)}``.

    ``layers`` defaults to all decoder layers, so one pass serves every source layer of a grid.
    """
    encoded = [_encode_one(tokenizer, p, add_special_tokens) for p in donor_prompts]
    pad_id = pad_token_id(tokenizer)
    device = _device(model)
    out: DonorActivations = {}
    with tqdm(total=len(encoded), desc="donors", unit="item", disable=not progress) as bar:
        for batch in _batches([len(ids) for ids in encoded], batch_size):
            input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id)
            recorded = record_module_outputs(
                model, input_ids.to(device), attention_mask.to(device), layers, granularities, names
            )
            for granularity, values in recorded.items():
                if granularity not in out:
                    out[granularity] = torch.empty(len(encoded), *values.shape[1:])
                out[granularity][torch.tensor(batch)] = values.cpu()
            bar.update(len(batch))
    return out


# --------------------------------------------------------------------------------------------------
# Patching (recipient side)


def _call_tracker(state: dict[str, int]):
    """A pre-hook on the model that notes the absolute column at which each forward call starts."""

    def track(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        seq = tokens.shape[1]
        mask = kwargs.get("attention_mask")
        past = cache_in_call(args, kwargs)  # found by type: the keyword was renamed in 5.24
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            start = mask.shape[1] - seq  # a 2-D mask always spans past + current columns
        elif past is not None:
            start = int(past.get_seq_length())
        else:
            start = 0
        state["start"] = start

    return track


def _patcher(
    state: dict[str, int],
    rows: torch.Tensor,
    positions: torch.Tensor,
    activations: torch.Tensor,
):
    """Replace ``hidden[row, positions[row] - start]`` by ``activations[row]`` for ``rows``, when that
    column is computed in the current call."""

    def hook(_module: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        if hidden.dim() != 3 or hidden.shape[0] != activations.shape[0]:
            raise ValueError(
                f"transplant expects a module output of shape (batch={activations.shape[0]}, seq, "
                f"hidden), got {tuple(hidden.shape)} (beam search and other batch expansions are "
                "not supported)"
            )
        local = positions.to(hidden.device) - state["start"]
        hit = rows.to(hidden.device) & (local >= 0) & (local < hidden.shape[1])
        if not bool(hit.any()):
            return None
        index = hit.nonzero().squeeze(1)
        patched = hidden.clone()
        patched[index, local[index]] = activations.to(hidden.device, hidden.dtype)[index]
        return patched

    return hook


@contextmanager
def transplanted(
    model: nn.Module,
    activations: torch.Tensor,
    positions: torch.Tensor,
    target_layers: int | torch.Tensor,
    granularity: str = "ffn",
    names: ModuleNames | None = None,
) -> Iterator[None]:
    """Within the block, row ``b``'s ``granularity`` output of layer ``target_layers[b]`` at absolute
    column ``positions[b]`` is replaced by ``activations[b]``, whenever a forward call computes it.

    ``activations``: ``(batch, hidden)``; ``positions``: ``(batch,)`` column in the padded batch
    (e.g. :func:`lenssteer.hooks.last_real_positions`); a negative position leaves the row alone.
    ``target_layers``: an int or ``(batch,)`` indices (negative counts from the top). With a KV
    cache, only the call that computes that column (the prefill) is patched; without one, every call
    recomputes it and is patched, so both give the same result.
    """
    granularity = _check_granularity(granularity)
    if activations.dim() != 2:
        raise ValueError(f"activations must be (batch, hidden), got {tuple(activations.shape)}")
    batch = activations.shape[0]
    if positions.shape != (batch,):
        raise ValueError(f"positions must be ({batch},), got {tuple(positions.shape)}")
    if isinstance(target_layers, int):
        target_layers = torch.full((batch,), target_layers, dtype=torch.long)
    if target_layers.shape != (batch,):
        raise ValueError(
            f"target_layers must be an int or ({batch},), got {tuple(target_layers.shape)}"
        )
    absolute = {int(t): _layer_index(model, int(t), names) for t in target_layers.unique().tolist()}
    targets = torch.tensor([absolute[int(t)] for t in target_layers.tolist()], dtype=torch.long)
    state = {"start": 0}
    hooks = []
    for layer in sorted(set(absolute.values())):
        module = find_layer_modules(model, layer, names)[_MODULE_KEY[granularity]]
        hooks.append((module, _patcher(state, targets == layer, positions.long(), activations)))
    with hooked(output_hooks=hooks, input_hooks=[(model, _call_tracker(state))]):
        yield


# --------------------------------------------------------------------------------------------------
# Uses: generation and log-likelihood scoring on the patched recipient


@torch.no_grad()
def generate_transplanted(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    activations: torch.Tensor | None,
    target_layer: int | None,
    granularity: str = "ffn",
    max_new_tokens: int = 32,
    use_cache: bool = True,
    pad_token_id: int | None = None,
    names: ModuleNames | None = None,
) -> torch.Tensor:
    """Greedy generation on a left-padded recipient batch, patched at each row's last real token.

    ``input_ids``, ``attention_mask``: ``(batch, seq)``; ``activations``: ``(batch, hidden)`` or
    ``None`` for the unpatched model. Returns the new tokens ``(batch, <= max_new_tokens)``.
    """
    from transformers import GenerationConfig

    if attention_mask[:, -1].eq(0).any():
        raise ValueError("generation needs left padding (the last column must be real tokens)")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=use_cache,
        eos_token_id=eos,
        pad_token_id=pad_token_id
        if pad_token_id is not None
        else (eos if isinstance(eos, int) else 0),
    )
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    if activations is None or target_layer is None:
        with contiguous_head_input(model):
            output = model.generate(**kwargs)
    else:
        positions = last_real_positions(attention_mask)
        with transplanted(model, activations, positions, target_layer, granularity, names):
            with contiguous_head_input(model):
                output = model.generate(**kwargs)
    return output[:, input_ids.shape[1] :]


def _donor_vectors(
    model,
    tokenizer,
    donor_prompts,
    source_layer,
    granularity,
    batch_size,
    add_special_tokens,
    names,
    recorded: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(n, hidden)``: the donors' ``granularity`` output at ``source_layer``, last real token
    (``recorded``, checked, when given)."""
    if recorded is not None:
        if recorded.dim() != 2 or recorded.shape[0] != len(donor_prompts):
            raise ValueError(
                f"donor_vectors must be (n_donors={len(donor_prompts)}, hidden), got "
                f"{tuple(recorded.shape)}"
            )
        return recorded
    source = _layer_index(model, source_layer, names)
    recorded = record_donor_activations(
        model,
        tokenizer,
        donor_prompts,
        [source],
        [granularity],
        batch_size,
        add_special_tokens,
        names,
    )
    return recorded[granularity][:, 0]


def _check_pair(source_layer, target_layer) -> bool:
    """True when a transplant is asked for; both layers or neither must be given."""
    if (source_layer is None) != (target_layer is None):
        raise ValueError("give both source_layer and target_layer, or neither for the base model")
    return source_layer is not None


def transplant_generate(
    model: nn.Module,
    tokenizer,
    donor_prompts: Sequence[str],
    recipient_prompts: Sequence[str],
    source_layer: int | None,
    target_layer: int | None,
    granularity: str = "ffn",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    use_cache: bool = True,
    add_special_tokens: bool | None = None,
    names: ModuleNames | None = None,
    progress: bool = False,
    donor_vectors: torch.Tensor | None = None,
) -> list[str]:
    """Greedy continuations of each recipient prompt, patched from its aligned donor.

    ``source_layer=target_layer=None`` generates with the unpatched model (donors unused).
    ``donor_vectors``: the donors' outputs at ``source_layer``, ``(n, hidden)``, when already
    recorded (:func:`record_donor_activations`); the donor prompts are then not run again.
    """
    _check_aligned(donor_prompts, recipient_prompts)
    granularity = _check_granularity(granularity)
    patch = _check_pair(source_layer, target_layer)
    if patch:
        target_layer = _layer_index(model, target_layer, names)
        donors = _donor_vectors(
            model,
            tokenizer,
            donor_prompts,
            source_layer,
            granularity,
            batch_size,
            add_special_tokens,
            names,
            donor_vectors,
        )
    encoded = [_encode_one(tokenizer, p, add_special_tokens) for p in recipient_prompts]
    pad_id, device = pad_token_id(tokenizer), _device(model)
    texts: list[str] = [""] * len(encoded)
    batches = _batches([len(ids) for ids in encoded], batch_size)
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id)
        new = generate_transplanted(
            model,
            input_ids.to(device),
            attention_mask.to(device),
            donors[torch.tensor(batch)].to(device) if patch else None,
            target_layer,
            granularity,
            max_new_tokens,
            use_cache,
            pad_id,
            names,
        )
        for row, index in enumerate(batch):
            texts[index] = tokenizer.decode(new[row], skip_special_tokens=True)
    return texts


def _score_rows(
    logits: torch.Tensor, targets: list[list[int]], first_columns: list[int]
) -> torch.Tensor:
    """Sum of log-probabilities of ``targets[r]`` read from ``logits[r, first_columns[r] + j]``."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    scores = torch.empty(len(targets))
    for row, (tokens, first) in enumerate(zip(targets, first_columns, strict=True)):
        columns = torch.arange(first, first + len(tokens))
        scores[row] = log_probs[row, columns, torch.tensor(tokens)].sum()
    return scores


@torch.no_grad()
def transplant_loglikelihoods(
    model: nn.Module,
    tokenizer,
    donor_prompts: Sequence[str],
    recipient_prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    source_layer: int | None,
    target_layer: int | None,
    granularity: str = "ffn",
    batch_size: int = 8,
    add_special_tokens: bool | None = None,
    names: ModuleNames | None = None,
    progress: bool = False,
    donor_vectors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-likelihood of each continuation after each patched recipient prompt, from scratch.

    One donor pass and one full recipient pass per call; :func:`transplant_grid` is the fast way
    to score many pairs. Returns ``(n_items, max_options)``; missing options are ``-inf``.
    ``source_layer=target_layer=None`` scores the unpatched model. ``donor_vectors``: as in
    :func:`transplant_generate`.
    """
    _check_aligned(donor_prompts, recipient_prompts)
    if len(continuations) != len(recipient_prompts):
        raise ValueError(
            f"got {len(continuations)} continuation lists for {len(recipient_prompts)} prompts"
        )
    granularity = _check_granularity(granularity)
    patch = _check_pair(source_layer, target_layer)
    if patch:
        target_layer = _layer_index(model, target_layer, names)
        donors = _donor_vectors(
            model,
            tokenizer,
            donor_prompts,
            source_layer,
            granularity,
            batch_size,
            add_special_tokens,
            names,
            donor_vectors,
        )
    pad_id, device = pad_token_id(tokenizer), _device(model)
    prompts = [_encode_one(tokenizer, p, add_special_tokens) for p in recipient_prompts]
    conts = [
        [_continuation_ids(tokenizer, p, c) for c in options]
        for p, options in zip(recipient_prompts, continuations, strict=True)
    ]
    n_options = max(len(options) for options in conts)
    scores = torch.full((len(prompts), n_options), -math.inf)
    pack, window = packing_works(model), packable_length(model)
    for batch in tqdm(
        _batches([len(ids) for ids in prompts], batch_size),
        desc="score",
        unit="batch",
        disable=not progress,
    ):
        # One row per item when every option is one token (read them all from the same logits);
        # otherwise one row per item with its options packed after the prompt
        # (lenssteer.forward.pack_continuations), or, where the model cannot take that mask, one
        # row per (item, option): prompt + option minus its last token.
        single = all(len(c) == 1 for i in batch for c in conts[i])
        lengths = [len(prompts[i]) + sum(len(c) - 1 for c in conts[i]) for i in batch]
        packed = not single and pack and (window is None or max(lengths) <= window)
        if packed:
            row_items = list(batch)
            layout = pack_continuations(
                [(prompts[i], [c[:-1] for c in conts[i]]) for i in batch],
                pad_id,
                input_dtype(model),
            )
            input_ids, attention_mask = layout.input_ids, layout.attention_mask
            position_ids, last_prompt = layout.position_ids, torch.tensor(layout.context_end)
        else:
            row_items, row_options, sequences, targets = [], [], [], []
            for i in batch:
                for o, cont in enumerate([None] if single else conts[i]):
                    row_items.append(i)
                    row_options.append(o)
                    sequences.append(prompts[i] + ([] if cont is None else cont[:-1]))
                    targets.append([c[0] for c in conts[i]] if cont is None else cont)
            input_ids, attention_mask = _left_pad(sequences, pad_id)
            position_ids = position_ids_from_mask(attention_mask)
            # Column of each row's last prompt token: rows end at the last column.
            last_prompt = torch.tensor(
                [
                    input_ids.shape[1] - (len(seq) - len(prompts[i])) - 1
                    for seq, i in zip(sequences, row_items, strict=True)
                ]
            )
        width = input_ids.shape[1]
        keep = int((width - last_prompt).max())
        forward = dict(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
            **_logits_kwargs(model, keep),
        )
        if patch:
            with transplanted(
                model,
                donors[torch.tensor(row_items)],
                last_prompt,
                target_layer,
                granularity,
                names,
            ):
                with contiguous_head_input(model):
                    logits = model(**forward).logits
        else:
            with contiguous_head_input(model):
                logits = model(**forward).logits
        logits = logits[:, -keep:].cpu()
        first = (last_prompt - (width - keep)).tolist()
        if packed:
            for row, i in enumerate(batch):
                for o, cont in enumerate(conts[i]):
                    columns = [
                        first[row],
                        *(c - (width - keep) for c in layout.block_columns[row][o]),
                    ]
                    log_probs = torch.log_softmax(logits[row, columns].float(), dim=-1)
                    scores[i, o] = log_probs.gather(-1, torch.tensor(cont)[:, None]).sum()
        elif single:
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(row_items):
                scores[i, : len(targets[row])] = log_probs[
                    row, first[row], torch.tensor(targets[row])
                ]
        else:
            row_scores = _score_rows(logits, targets, first)
            for row, (i, o) in enumerate(zip(row_items, row_options, strict=True)):
                scores[i, o] = row_scores[row]
    return scores
