"""Hooks on block K: read, replace or add to the output of one decoder block, and run a model
only up to block K. Every hook on a block's output in nlakit goes through `on_block_output`."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from nlakit.errors import NLAError
from nlakit.model.arch import decoder_layers, decoder_stack


@contextlib.contextmanager
def on_block_output(model: nn.Module, layer: int,
                    edit: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Inside the with-block, every forward through decoder block `layer` calls ``edit(h)`` on
    its hidden-state output h [b, t, d]; a tensor it returns replaces h (the block's other
    outputs, e.g. attention weights, pass through), None leaves it. The hook is removed on
    exit, also when the forward raises."""
    def hook(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = edit(h)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by a hook after block K so later blocks are never computed."""


def forward_to_layer(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
    *, grad: bool = False,
) -> torch.Tensor:
    """Output of decoder block ``layer`` (= ``hidden_states[layer + 1]``), shape [b, t, d].

    Only blocks 0..layer run: a forward hook on block ``layer`` captures its output and stops
    the forward pass, so neither later blocks nor the LM head cost anything.
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(h):
        captured["h"] = h
        raise _StopForward

    try:
        with on_block_output(model, layer, capture), torch.set_grad_enabled(grad):
            decoder_stack(model)(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False)
    except _StopForward:
        pass
    if "h" not in captured:
        raise NLAError(f"block {layer} never ran; the model's forward skipped it")
    return captured["h"]
