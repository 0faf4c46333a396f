"""The steering hook: add a vector to the output of decoder block K, and remove it on exit."""

from __future__ import annotations

import contextlib
import math

import torch
from transformers.cache_utils import Cache

from nlakit.errors import NLAError
from nlakit.model.arch import check_layer, d_model, decoder_stack
from nlakit.model.hooks import on_block_output


class _AddVector:
    """Forward hooks that add `delta` [d] to block K's output at positions >= `start`.

    Positions are indices of the whole sequence: a pre-hook on the decoder stack reads how
    many tokens its KV cache already holds, so a generate call's one-token steps continue the
    prompt's numbering instead of restarting at 0. The cache is found by its type among the
    stack's arguments, not by the keyword's name (transformers 5 renamed `past_key_values` to
    `cache`, and a name lookup then silently read 0)."""

    def __init__(self, delta: torch.Tensor, start: int):
        self.delta, self.start, self.offset = delta, start, 0

    def see_cache(self, _module, args, kwargs):
        cache = next((a for a in (*args, *kwargs.values()) if isinstance(a, Cache)), None)
        self.offset = int(cache.get_seq_length()) if cache is not None else 0

    def add(self, h: torch.Tensor) -> torch.Tensor | None:
        pos = torch.arange(self.offset, self.offset + h.shape[1], device=h.device)
        on = pos >= self.start
        if not bool(on.any()):
            return None
        h = h.clone()
        h[:, on] += self.delta.to(device=h.device, dtype=h.dtype)
        return h


def _checked_delta(model, vector, layer, scale) -> torch.Tensor:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise NLAError(f"steer: layer must be a block index (int), got {layer!r}")
    check_layer(model, layer)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise NLAError(f"steer: scale must be a number, got {scale!r}") from None
    if not math.isfinite(scale):
        raise NLAError(f"steer: scale must be a finite number, got {scale!r}")
    v = torch.as_tensor(vector).detach().float().cpu()
    d = d_model(model)
    if v.shape != (d,):
        raise NLAError(f"steer: the vector has shape {tuple(v.shape)}, but block {layer}'s "
                       f"output has d_model {d}; pass one vector of {d} numbers")
    if not torch.isfinite(v).all():
        raise NLAError("steer: the vector holds NaN or inf")
    return scale * v


@contextlib.contextmanager
def steer(model, vector, layer: int, scale: float = 1.0, *, start: int = 0):
    """Inside the with-block, the output of decoder block `layer` of `model` is
    ``h + scale * vector`` at every position >= `start` (an index of the whole sequence,
    counted on across a generate call's cached steps; 0: every position) and untouched before.

    For "from the prompt's last token on" in a left-padded batch, start = padded prompt length
    - 1. vector: [d_model]. The hooks are removed on exit, also when the block raises."""
    delta = _checked_delta(model, vector, layer, scale)
    hook = _AddVector(delta, int(start))
    handle = decoder_stack(model).register_forward_pre_hook(hook.see_cache, with_kwargs=True)
    try:
        with on_block_output(model, layer, hook.add):
            yield hook
    finally:
        handle.remove()
