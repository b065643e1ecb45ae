"""One small utility for forward hooks, shared by extraction, training and transplantation.

A hook function here receives the module's *main* output tensor (the first element when the module
returns a tuple, as attention modules do) and may return a replacement tensor; the tuple structure
is rebuilt around it. Hooks live only as long as a ``with`` block (:func:`hooked`) or until their
handle's ``.remove()``; nothing is kept in global state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

OutputFn = Callable[[nn.Module, torch.Tensor], torch.Tensor | None]
InputFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]


def main_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (tensor, tuple/list, or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(
        f"cannot find the hidden-state tensor in a module output of type {type(output)}"
    )


def _replace_main_output(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise TypeError(f"cannot replace the hidden-state tensor in an output of type {type(output)}")


def add_output_hook(module: nn.Module, fn: OutputFn) -> RemovableHandle:
    """Call ``fn(module, hidden)`` after ``module`` runs; a returned tensor replaces ``hidden``.

    The replacement is cast to the output's dtype and device inside the hook.
    """

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        hidden = main_output(output)
        new = fn(mod, hidden)
        if new is None:
            return None
        return _replace_main_output(output, new.to(dtype=hidden.dtype, device=hidden.device))

    return module.register_forward_hook(hook)


def add_input_hook(module: nn.Module, fn: InputFn) -> RemovableHandle:
    """Call ``fn(module, args, kwargs)`` before ``module`` runs (it sees keyword arguments too)."""

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        fn(mod, args, kwargs)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def hooked(
    output_hooks: Sequence[tuple[nn.Module, OutputFn]] = (),
    input_hooks: Sequence[tuple[nn.Module, InputFn]] = (),
) -> Iterator[list[RemovableHandle]]:
    """Install hooks for the duration of a ``with`` block; they are removed even on error."""
    handles: list[RemovableHandle] = []
    try:
        for module, fn in output_hooks:
            handles.append(add_output_hook(module, fn))
        for module, fn in input_hooks:
            handles.append(add_input_hook(module, fn))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once every needed layer has run."""


def stop_after(module: nn.Module) -> tuple[nn.Module, OutputFn]:
    """An output hook for :func:`hooked` that ends the forward pass once ``module`` has run.

    List it after the hooks that read ``module``'s output (hooks run in registration order), and
    make the call with :func:`run_until_stopped`.
    """

    def stop(_module: nn.Module, _hidden: torch.Tensor) -> None:
        raise StopForward

    return module, stop


def run_until_stopped(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
    """Call ``fn(*args, **kwargs)``; a :class:`StopForward` raised by a hook ends it quietly."""
    try:
        fn(*args, **kwargs)
    except StopForward:
        pass


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. ``(batch,)``

    Never ``[:, -1]``: on a right-padded batch that is a pad token.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got {tuple(attention_mask.shape)}")
    if (attention_mask.sum(dim=1) == 0).any():
        raise ValueError("a row of the batch has no real token (empty text?)")
    seq = attention_mask.shape[1]
    positions = torch.arange(seq, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift rotary positions."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
