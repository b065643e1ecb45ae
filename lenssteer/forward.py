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
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn

__all__ = [
    "cache_in_call",
    "cache_keyword",
    "cache_of_output",
    "hidden_states_of_call",
    "pool_real_positions",
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
