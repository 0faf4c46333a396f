"""Architecture facts every stage needs: the decoder stack and its blocks, layer checks,
special tokens, the chat template, and the KV-cache keyword of the installed transformers."""
from __future__ import annotations

import functools

from torch import nn

from nlakit.errors import NLAError

# ---- architecture facts -------------------------------------------------------------------


def decoder_stack(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (``model.model`` for Llama/Qwen/Gemma)."""
    if hasattr(model, "get_base_model"):  # a peft wrapper
        model = model.get_base_model()
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None:
            return dec
    if hasattr(model, "model"):
        return model.model
    raise NLAError(f"cannot find the decoder stack of {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    stack = decoder_stack(model)
    layers = getattr(stack, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise NLAError(f"{type(model).__name__} has no .layers ModuleList; unsupported "
                       "architecture")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def d_model(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.hidden_size)


def default_layer(n_layers: int) -> int:
    """The reference default K = floor(2L/3)."""
    return (2 * n_layers) // 3


def check_layer(model: nn.Module, layer: int | None) -> int:
    n = num_layers(model)
    if layer is None:
        return default_layer(n)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise NLAError(f"layer {layer!r} is out of range: this model has blocks 0..{n - 1} "
                       f"(default {default_layer(n)} = floor(2L/3))")
    return layer


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token (BOS/EOS/PAD, chat markers and other added special tokens)."""
    ids = set(tokenizer.all_special_ids)
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def require_chat_template(tokenizer, spec: str, purpose: str) -> None:
    """NLAError unless the tokenizer can render chat prompts (an instruct model)."""
    if not getattr(tokenizer, "chat_template", None):
        raise NLAError(f"the {purpose} needs an instruct model with a chat template; {spec!r} "
                       "has none")


@functools.cache
def cache_keyword() -> str:
    """The keyword a transformers model's forward takes its KV cache under, and the output
    attribute that returns it: ``cache`` from transformers 5.x (where ``past_key_values`` only
    warns, and is announced to go in 5.40), ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def with_cache(cache) -> dict:
    """Forward kwargs that pass `cache` under this transformers' name for it."""
    return {cache_keyword(): cache}


def returned_cache(output):
    """The KV cache a forward with use_cache=True returned."""
    return getattr(output, cache_keyword())
