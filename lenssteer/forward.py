"""How lenssteer reads and passes the arguments of a decoder's forward calls, without keyword names.

transformers renames the arguments of its forward methods between minor releases (5.24 renamed the
KV cache ``past_key_values`` -> ``cache``, on the model and on every decoder layer). Logic keyed to
such a name fails silently when it changes: a guard that looks for ``kwargs["past_key_values"]`` never
fires again. So everything here finds things **by type and position**:

* the KV cache of a call is the :class:`transformers.Cache` instance among its arguments;
* a layer's hidden states are its first parameter, passed by position or by that parameter's name
  (read from the layer's own signature);
* the keyword under which a model *takes* a cache is read from its ``forward`` signature: the
  parameter annotated with ``Cache``;
* the cache a model *returns* is the ``Cache`` instance among its output's fields.

It is also the one place that runs part of a decoder: a prompt prefix that every row shares, run
once (:func:`run_prefix`, :class:`PrefixCache`); the layers below a boundary passed through
(:func:`layers_passed_through`) or replayed from a recorded pass (:class:`LowerLayerReplay`).
"""

from __future__ import annotations

import copy
import inspect
import typing
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from lenssteer.models import ModuleNames, find_decoder_layers

__all__ = [
    "LowerLayerReplay",
    "PrefixCache",
    "cache_in_call",
    "cache_keyword",
    "cache_of_output",
    "common_prefix_length",
    "hidden_states_of_call",
    "input_dtype",
    "layers_passed_through",
    "pack_continuations",
    "packable_length",
    "packing_works",
    "pool_real_positions",
    "run_prefix",
]


def _cache_class() -> type:
    from transformers import Cache

    return Cache


def cache_in_call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any | None:
    """The KV cache passed to a forward call (any ``transformers.Cache`` among its arguments)."""
    cache_class = _cache_class()
    for value in (*args, *kwargs.values()):
        if isinstance(value, cache_class):
            return value
    return None


@lru_cache(maxsize=256)
def _first_parameter(function: Any) -> str:
    parameters = [
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self"
        and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    if not parameters:
        raise TypeError(
            f"{function!r} takes no positional parameter: cannot find its hidden states"
        )
    return parameters[0]


def hidden_states_of_call(
    layer: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> torch.Tensor:
    """The hidden states ``(batch, seq, hidden)`` a decoder layer was called with.

    They are the layer's first parameter, whether passed by position or by name; the name is read
    from the layer class's own ``forward``, so no library keyword is assumed.
    """
    if args:
        return args[0]
    name = _first_parameter(type(layer).forward)
    if name not in kwargs:
        raise TypeError(
            f"{type(layer).__name__} was called without its first argument {name!r}: cannot find "
            "its hidden states"
        )
    return kwargs[name]


def _mentions_cache(annotation: Any, cache_class: type) -> bool:
    if isinstance(annotation, str):
        return "Cache" in annotation
    if isinstance(annotation, type):
        return issubclass(annotation, cache_class)
    return any(_mentions_cache(arg, cache_class) for arg in typing.get_args(annotation))


@lru_cache(maxsize=256)
def _cache_keyword_of(function: Any) -> str:
    cache_class = _cache_class()
    parameters = inspect.signature(function).parameters
    for name, parameter in parameters.items():
        if parameter.annotation is not parameter.empty and _mentions_cache(
            parameter.annotation, cache_class
        ):
            return name
    for name in ("cache", "past_key_values"):  # unannotated signatures, newest name first
        if name in parameters:
            return name
    raise TypeError(f"{getattr(function, '__qualname__', function)} takes no KV cache argument")


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a KV cache (``cache`` or, before transformers
    5.24, ``past_key_values``), found by the parameter's ``Cache`` annotation. A wrapper that passes
    ``**kwargs`` through (a PEFT model) takes what the model it wraps takes."""
    try:
        return _cache_keyword_of(type(model).forward)
    except TypeError:
        get_base_model = getattr(model, "get_base_model", None)
        if callable(get_base_model) and get_base_model() is not model:
            return cache_keyword(get_base_model())
        raise


def cache_of_output(output: Any) -> Any:
    """The KV cache in a model's output (the ``Cache`` instance among its fields)."""
    cache_class = _cache_class()
    values = output.values() if isinstance(output, Mapping) else output
    for value in values:
        if isinstance(value, cache_class):
            return value
    raise TypeError(
        f"no KV cache in the model output ({type(output).__name__}); pass use_cache=True"
    )


def pool_real_positions(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    prefix_sum: torch.Tensor | None = None,
    prefix_length: int = 0,
) -> torch.Tensor:
    """Pool ``(N, S, H)`` states over real tokens: the last real one (``"last"``) or their mean
    (``"mean"``). Returns ``(N, H)`` float32.

    ``prefix_sum`` ``(H,)`` / ``prefix_length``: the summed states and count of tokens that sit
    before every row in a shared cached prefix; the mean counts them too.
    """
    if pooling == "last":
        from lenssteer.hooks import last_real_positions

        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_real_positions(attention_mask)].float()
    if pooling != "mean":
        raise ValueError(f"unknown pooling {pooling!r}; choose last or mean")
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    total = (hidden.float() * mask).sum(1)
    count = mask.sum(1)
    if prefix_sum is not None:
        total = total + prefix_sum.to(total.device)
        count = count + prefix_length
    return total / count


# --------------------------------------------------------------------------------------------------
# A prompt prefix that every row shares, run once


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``sequences`` share, leaving each at least one of its own."""
    if not sequences:
        return 0
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    length = 0
    while length < shortest - 1 and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


@dataclass
class PrefixCache:
    """The KV cache of ``length`` tokens that every row of later calls starts with, run once by
    :func:`run_prefix`; :meth:`continuing` gives the arguments of a batch that continues it."""

    cache: Any
    length: int

    def continuing(
        self,
        module: nn.Module,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        copy_cache: bool = True,
    ) -> dict[str, Any]:
        """The arguments of a ``module`` call whose rows continue the prefix.

        ``attention_mask`` and ``position_ids`` ``(batch, seq)`` describe the new tokens alone
        (positions from 0): the mask gains the prefix's columns, the positions start after it, and
        the cache, under ``module``'s own keyword, is a copy repeated for each row.
        ``copy_cache=False`` repeats the prefix's own cache instead (one use only, for a call that
        back-propagates through it).
        """
        rows = attention_mask.shape[0]
        cache = copy.deepcopy(self.cache) if copy_cache else self.cache
        cache.batch_repeat_interleave(rows)
        ones = attention_mask.new_ones(rows, self.length)
        return {
            "attention_mask": torch.cat([ones, attention_mask], dim=1),
            "position_ids": position_ids + self.length,
            cache_keyword(module): cache,
            "use_cache": True,
        }


def run_prefix(
    module: nn.Module,
    call: Callable[..., Any] | None = None,
    /,
    skipped_layers: int = 0,
    **inputs: Any,
) -> PrefixCache:
    """Run one prefix row through ``module`` once, keeping the KV cache it fills.

    ``inputs``: the call's arguments, every tensor among them ``(1, length, ...)``; a fresh cache
    goes in under ``module``'s own keyword. ``call(**arguments)`` runs it (default: ``module``
    itself; :func:`~lenssteer.hooks.run_until_stopped` may stop after the layers a caller needs).
    ``skipped_layers``: the first layers were passed through (:func:`layers_passed_through`) and
    left their slots empty; they get zeros of the prefix's length, which they never read but the
    model takes the cache's length from.
    """
    from transformers import DynamicCache

    length = next(value.shape[1] for value in inputs.values() if torch.is_tensor(value))
    cache = DynamicCache(config=module.config)
    (call or module)(**inputs, **{cache_keyword(module): cache}, use_cache=True)
    if skipped_layers:
        _fill_skipped_layers(cache, skipped_layers, length)
    return PrefixCache(cache, length)


def _fill_skipped_layers(cache: Any, count: int, length: int) -> None:
    """Zeros of ``length`` tokens in the slots of layers ``0 .. count - 1``, shaped as ``count``'s."""
    reference = cache.layers[count]
    keys, values = reference.keys, reference.values
    for layer in range(count):
        cache.update(
            keys.new_zeros((1, keys.shape[1], length, keys.shape[3])),
            values.new_zeros((1, values.shape[1], length, values.shape[3])),
            layer,
        )


# --------------------------------------------------------------------------------------------------
# Layers passed through: the bottom of a decoder skipped, or replayed from a record


@contextmanager
def layers_passed_through(
    layers: Sequence[nn.Module],
    last: Callable[[torch.Tensor], torch.Tensor] | None = None,
    check: Callable[[tuple[Any, ...], Mapping[str, Any]], None] | None = None,
) -> Iterator[None]:
    """Inside the block, each of ``layers`` returns the hidden states it is called with (found as
    :func:`hidden_states_of_call` does), so a forward call skips them; the modules stay in place.

    ``last(hidden)``: what the last of them returns instead. ``check(args, kwargs)`` sees every
    call first and may refuse it. A KV cache passes through with its slots for these layers left
    empty (:func:`run_prefix` fills them).
    """

    def passing(layer: nn.Module, emit: Callable[[torch.Tensor], torch.Tensor] | None):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            if check is not None:
                check(args, kwargs)
            hidden = hidden_states_of_call(layer, args, kwargs)
            return hidden if emit is None else emit(hidden)

        return forward

    patched = list(layers)
    own = [vars(layer).get("forward") for layer in patched]  # a wrapper set on the instance
    try:
        for index, layer in enumerate(patched):
            layer.forward = passing(layer, last if index == len(patched) - 1 else None)
        yield
    finally:
        for layer, forward in zip(patched, own, strict=True):
            if forward is None:
                vars(layer).pop("forward", None)  # the class's own forward again
            else:
                layer.forward = forward


class LowerLayerReplay:
    """Run the layers below a top-layer edit once, and reuse their output for every such system.

    A Lens adapter on the top 2 layers, or a hook on them, leaves everything below unchanged, so
    for the same inputs the output of decoder layer ``first_changed_layer - 1`` is the same as the
    unsteered model's. Inside :meth:`record`, each forward call's output of that layer is stored,
    in call order; inside :meth:`replay`, the same forward calls (same inputs, same batches, same
    order) skip layers ``0 .. first_changed_layer - 1`` and take the stored output instead. The
    result is exact (tests compare against the full computation); a replayed call whose shape does
    not match the stored one, a different number of calls, or a call that carries a KV cache is an
    error, never a silent reuse.
    Only layers that return a plain tensor (every transformers 5 decoder) can be replayed;
    otherwise :attr:`supported` turns False and callers compute in full.
    """

    def __init__(
        self, model: nn.Module, first_changed_layer: int, module_names: ModuleNames | None = None
    ) -> None:
        self.model = model
        self.layers = find_decoder_layers(model, module_names)
        if not 0 < first_changed_layer < len(self.layers):
            raise ValueError(
                f"first_changed_layer must be in 1..{len(self.layers) - 1}, got {first_changed_layer}"
            )
        self.boundary = first_changed_layer - 1
        self.outputs: list[torch.Tensor] = []
        self.supported = True
        self.recorded = False

    @contextmanager
    def record(self) -> Iterator[None]:
        """Store the boundary layer's output of every forward call in the block."""
        self.outputs = []
        packing_works(self.model)  # its own forward calls happen now, not inside the record

        def keep(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self.outputs.append(output.detach().clone())
            else:
                self.supported = False

        handle = self.layers[self.boundary].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
        self.recorded = True

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Skip the layers up to the boundary; feed the stored outputs back in call order."""
        if not (self.recorded and self.supported):
            raise RuntimeError("nothing to replay: record() a pass of the same inputs first")
        position = {"next": 0}

        def refuse_cache(args: tuple, kwargs: Mapping[str, Any]) -> None:
            if cache_in_call(args, kwargs) is not None:
                # Skipped layers would leave their part of the cache empty: refuse, never guess.
                raise RuntimeError("a forward call with a KV cache cannot be replayed")

        def emit(hidden: torch.Tensor) -> torch.Tensor:
            index = position["next"]
            if index >= len(self.outputs):
                raise RuntimeError(
                    f"replay out of step: forward call {index + 1}, but only "
                    f"{len(self.outputs)} were recorded"
                )
            stored = self.outputs[index]
            if stored.shape != hidden.shape:
                raise RuntimeError(
                    f"replay out of step: call {index + 1} has shape {tuple(hidden.shape)}, the "
                    f"recorded one {tuple(stored.shape)}"
                )
            position["next"] = index + 1
            return stored.to(hidden.device, hidden.dtype)

        with layers_passed_through(self.layers[: self.boundary + 1], emit, refuse_cache):
            yield
        if position["next"] != len(self.outputs):
            raise RuntimeError(
                f"replay out of step: {position['next']} forward calls replayed, "
                f"{len(self.outputs)} recorded"
            )


# --------------------------------------------------------------------------------------------------
# Several continuations of one context in one row


@dataclass(frozen=True)
class PackedBatch:
    """Rows that each hold a context once and, after it, several continuation blocks.

    ``input_ids``/``position_ids`` ``(B, L)`` and an additive ``attention_mask`` ``(B, 1, L, L)``:
    every block sees the whole context and itself (causally), never another block, and takes the
    positions that follow the context, so each block is computed exactly as if it came alone after
    the context. ``context_end[r]`` is the column of row ``r``'s last context token and
    ``block_columns[r][k]`` the columns of its block ``k``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    context_end: list[int]
    block_columns: list[list[range]]


def pack_continuations(
    rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    pad_id: int,
    dtype: torch.dtype,
    padding_side: str = "left",
) -> PackedBatch:
    """Lay out ``(context, blocks)`` rows for one forward pass (see :class:`PackedBatch`).

    A block may be empty (a one-token continuation needs only the context's last logits). Padding
    positions see only themselves, so no attention row is empty.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(context) + sum(len(block) for block in blocks) for context, blocks in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    context_end, block_columns = [], []
    for r, ((context, blocks), length) in enumerate(zip(rows, lengths, strict=True)):
        if not context:
            raise ValueError(f"row {r + 1}: empty context")
        start = width - length if padding_side == "left" else 0
        n = len(context)
        ids[r, start : start + n] = torch.tensor(list(context))
        positions[r, start : start + n] = torch.arange(n)
        allowed[r, start : start + n, start : start + n] = causal[:n, :n]
        column, columns = start + n, []
        for block in blocks:
            k = len(block)
            if k:
                ids[r, column : column + k] = torch.tensor(list(block))
                positions[r, column : column + k] = torch.arange(n, n + k)
                allowed[r, column : column + k, start : start + n] = True
                allowed[r, column : column + k, column : column + k] = causal[:k, :k]
            columns.append(range(column, column + k))
            column += k
        context_end.append(start + n - 1)
        block_columns.append(columns)
    mask = torch.zeros((len(rows), 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return PackedBatch(ids, positions, mask, context_end, block_columns)


@contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Hand the LM head a contiguous input while inside.

    A model asked for the last ``k`` positions' logits slices its hidden states
    (``h[:, -k:]``: not contiguous when the batch has more than one row) before the head. With a
    frozen head weight (``requires_grad=False``: any PEFT-wrapped model, or one frozen for
    inference) torch's matmul then takes its batched path, which expands and copies the whole
    ``(batch, hidden, vocab)`` weight on every call: on Qwen2.5-0.5B (vocabulary 152k) a batch of
    8 took 15.5 s instead of 2.7 s. Copying the small sliced input instead avoids it; the logits
    differ only by the other kernel's rounding (below 1e-5 in float32).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def make_contiguous(_module: nn.Module, args: tuple) -> tuple | None:
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    handle = head.register_forward_pre_hook(make_contiguous)
    try:
        yield
    finally:
        handle.remove()


_PACKING_WORKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's decoder computes in (its input embeddings' dtype)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.dtype if embeddings is not None else next(model.parameters()).dtype


@torch.no_grad()
def packing_works(model: nn.Module) -> bool:
    """Whether ``model`` honours a per-row 4D attention mask (checked once per model, then cached).

    Not every attention implementation does (flash attention ignores custom masks); rather than
    reading the implementation's name, run two continuations of a tiny context packed and alone
    and compare their logits. The check is itself a forward call: a
    :class:`LowerLayerReplay` runs it before it starts recording.
    """
    if model in _PACKING_WORKS:
        return _PACKING_WORKS[model]
    device = next(model.parameters()).device
    vocabulary = model.get_input_embeddings().weight.shape[0]
    context, first, second = [11, 12, 13], [14, 15], [16]
    if vocabulary <= 16:
        _PACKING_WORKS[model] = False
        return False
    packed = pack_continuations([(context, [first, second])], 0, input_dtype(model))
    try:
        logits = (
            model(
                input_ids=packed.input_ids.to(device),
                attention_mask=packed.attention_mask.to(device),
                position_ids=packed.position_ids.to(device),
                use_cache=False,
            )
            .logits[0]
            .float()
        )
    except (TypeError, ValueError, RuntimeError):  # a model that refuses a 4D mask
        _PACKING_WORKS[model] = False
        return False
    tolerance = 1e-3 if input_dtype(model) == torch.float32 else 5e-2
    works = True
    for block, columns in zip((first, second), packed.block_columns[0], strict=True):
        alone = model(input_ids=torch.tensor([context + block], device=device), use_cache=False)
        expected = alone.logits[0, len(context) - 1 :].float()
        got = logits[[packed.context_end[0], *columns]]
        scale = expected.abs().max().clamp(min=1.0)
        works = works and bool(((got - expected) / scale).abs().max() < tolerance)
    _PACKING_WORKS[model] = works
    return works


def packable_length(model: nn.Module) -> int | None:
    """The longest packed row whose 4D mask means the same on every layer: a model with
    sliding-window layers applies our mask to them as-is, which is exact only within the window."""
    window = getattr(model.config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None
