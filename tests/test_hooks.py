"""The shared hook utilities: early stop, replacement outputs, and clean removal."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from lenssteer.hooks import hooked, last_real_positions, run_until_stopped, stop_after
from lenssteer.models import find_decoder_layers


def test_stop_after_ends_the_pass_after_reading_the_layer_and_leaves_no_hook():
    model = make_tiny_model("llama", n_layers=4)
    layers = find_decoder_layers(model)
    ran: list[int] = []
    seen: dict[int, torch.Tensor] = {}

    def record(index: int):
        def hook(_module, hidden):
            ran.append(index)
            seen[index] = hidden.clone()

        return hook

    ids = torch.tensor([[5, 6, 7, 8]])
    before = [len(layer._forward_hooks) for layer in layers]
    hooks = [(layer, record(i)) for i, layer in enumerate(layers)]
    with torch.no_grad(), hooked([*hooks[:2], stop_after(layers[1]), *hooks[2:]]):
        run_until_stopped(model, input_ids=ids)
    assert ran == [0, 1]  # layers 2 and 3 never ran
    assert [len(layer._forward_hooks) for layer in layers] == before
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(seen[1], full[2])


def test_run_until_stopped_lets_other_errors_through():
    def fails():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_until_stopped(fails)


def test_last_real_positions_left_and_right_padding_and_empty_rows():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert last_real_positions(right).tolist() == [2, 3]
    assert last_real_positions(left).tolist() == [3, 3]
    with pytest.raises(ValueError, match="no real token"):
        last_real_positions(torch.tensor([[0, 0]]))
