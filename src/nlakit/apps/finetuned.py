"""A fine-tuned model and its base: loading it, and checking the two can be compared.

A fine-tuned model is any `nlakit.model.load.load_model` spec (alias, .gguf, Hugging Face directory
or id), or a directory of peft LoRA adapters (it holds adapter_config.json) that is applied to
its base and merged (`load_finetuned`). The adapters' base is the one given, else the adapter's
``base_model_name_or_path``; a given base that differs from the adapter's is refused by weights
hash where nlakit recorded the base's hash beside the adapters (`record_adapter_base`), else by
resolved path or hub id. `model_facts` and `check_models` read configs and tokenizers only (no
weights), so a model diff (`nlakit.apps.diff`) refuses incomparable models before any heavy work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from nlakit.errors import NLAError
from nlakit.fileio import file_sha256, read_yaml, stable_hash, write_json
from nlakit.model.load import load_model, resolve_model, weights_hash

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
BASE_RECORD = "nlakit_base.json"  # {"spec", "weights_hash"} of the base an adapter was trained on
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PROBE = ("Fine-tuning changes weights, not the tokenizer: naïve café, 12345 + 0.5 = x;\n"
         "  def f(y): return y ** 2  # 東京 🙂")


def is_adapter_dir(spec: str | Path) -> bool:
    """True for a peft adapter directory (it holds adapter_config.json)."""
    return Path(str(spec)).expanduser().joinpath(ADAPTER_CONFIG).is_file()


def _adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NLAError(f"cannot read {path}: {e}") from e


def record_adapter_base(adapter_dir: str | Path, base_model) -> Path:
    """Write OUT/nlakit_base.json: the spec and weights hash of the loaded base model (as
    `load_model` records them) that adapters in `adapter_dir` were trained on, so that
    `load_finetuned` can refuse another base by content, not just by name."""
    source = getattr(base_model, "nlakit_source", None) or {}
    if not source.get("weights_hash"):
        raise NLAError("the base model carries no nlakit_source weights hash; load it with "
                       "nlakit.load_model")
    path = Path(adapter_dir) / BASE_RECORD
    write_json(path, {"spec": source.get("spec"), "weights_hash": source["weights_hash"]})
    return path


def _recorded_base_hash(adapter_dir: Path) -> str | None:
    """The base weights hash nlakit recorded beside the adapters (nlakit_base.json, or an NLA
    half's nla_meta.yaml), if any."""
    if (adapter_dir / BASE_RECORD).is_file():
        return json.loads((adapter_dir / BASE_RECORD).read_text()).get("weights_hash")
    if (adapter_dir / "nla_meta.yaml").is_file():
        meta = read_yaml(adapter_dir / "nla_meta.yaml") or {}
        return meta.get("nlakit", {}).get("target_model", {}).get("weights_hash")
    return None


def _where(spec: str) -> tuple[str, str]:
    """("local", resolved path) / ("hub", id) / ("missing", spec) of a model spec."""
    try:
        resolved = resolve_model(spec)
    except NLAError:
        return "missing", spec
    if resolved.kind == "hub":
        return "hub", spec
    return "local", str(Path(resolved.path).resolve())


def check_adapter_base(adapter_dir: str | Path, base_spec: str | None = None) -> str:
    """The base model spec to apply the adapters in `adapter_dir` to: `base_spec`, or the
    adapter's base_model_name_or_path. NLAError when the two disagree: by weights hash where
    nlakit recorded the adapter's base hash, else by resolved path (both local) or by name
    (both hub ids); a comparison that cannot be made is a warning."""
    adapter_dir = Path(adapter_dir)
    named = _adapter_config(adapter_dir).get("base_model_name_or_path") or None
    base = base_spec or named
    if not base:
        raise NLAError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model; pass --base MODEL")
    recorded = _recorded_base_hash(adapter_dir)
    if recorded and recorded.startswith("sha256:"):
        have = weights_hash(resolve_model(base))
        if have.startswith("sha256:"):
            if have != recorded:
                raise NLAError(f"the adapters in {adapter_dir} were trained on base weights "
                               f"{recorded}, but {base!r} has {have}; pass the base they were "
                               "trained on")
            return base
    if not (named and base_spec) or named == base_spec:
        return base
    (kind_a, a), (kind_b, b) = _where(named), _where(base_spec)
    if kind_a == kind_b and kind_a != "missing" and a != b:
        raise NLAError(f"the adapters in {adapter_dir} were trained on {named!r} "
                       f"({ADAPTER_CONFIG}), but the base given is {base_spec!r}; pass the base "
                       "they were trained on (or fix base_model_name_or_path)")
    if kind_a != kind_b or kind_a == "missing":
        log.warning("cannot verify that the adapters in %s (trained on %r) fit the base %r; "
                    "record the base with nlakit.apps.finetuned.record_adapter_base to check by "
                    "hash",
                    adapter_dir, named, base_spec)
    return base


def _adapter_hash(adapter_dir: Path, base_hash: str) -> str:
    files = [f for f in ADAPTER_WEIGHTS if (adapter_dir / f).is_file()]
    if not files:
        raise NLAError(f"{adapter_dir} has {ADAPTER_CONFIG} but no adapter weights "
                       f"({' or '.join(ADAPTER_WEIGHTS)})")
    return "sha256:" + stable_hash(base_hash, [(f, file_sha256(adapter_dir / f)) for f in files])


def load_finetuned(spec: str, base_spec: str | None = None, *, dtype=None, device=None):
    """``(model, tokenizer)`` of a fine-tuned model: any `load_model` spec, or a peft LoRA
    adapter directory applied to its base (`check_adapter_base`) and merged. A merged model's
    ``nlakit_source`` has kind "lora", the base's provenance, and a weights hash of the base
    hash and the adapter files."""
    if not is_adapter_dir(spec):
        return load_model(spec, dtype=dtype, device=device)
    from peft import PeftModel

    adapter_dir = Path(spec).expanduser()
    base = check_adapter_base(adapter_dir, base_spec)
    model, tok = load_model(base, dtype=dtype, device=device)
    source = dict(model.nlakit_source)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise NLAError(f"cannot apply the LoRA adapters in {adapter_dir} to {base!r}: {e}") from e
    merged.eval().requires_grad_(False)
    merged.nlakit_source = {"spec": str(spec), "kind": "lora", "base": source,
                            "weights_hash": _adapter_hash(adapter_dir, source["weights_hash"])}
    return merged, tok


# ---- what can be checked without loading weights ------------------------------------------------


@dataclass
class ModelFacts:
    """What can be known of a model without loading its weights."""

    spec: str
    kind: str  # alias, gguf, dir, hub or lora
    d_model: int
    n_layers: int
    tokenizer: object
    base: str | None = None  # lora: the base spec the adapters are applied to


def model_facts(spec: str, base_spec: str | None = None) -> ModelFacts:
    """d_model, block count and tokenizer of a model spec (an adapter directory: of its base)."""
    from transformers import AutoConfig, AutoTokenizer

    from nlakit.model.load import materialize_gguf

    if is_adapter_dir(spec):
        base = check_adapter_base(Path(spec).expanduser(), base_spec)
        facts = model_facts(base)
        return ModelFacts(str(spec), "lora", facts.d_model, facts.n_layers, facts.tokenizer, base)
    resolved = resolve_model(spec)
    source = str(materialize_gguf(Path(resolved.path))) if resolved.kind in ("alias", "gguf") \
        else resolved.path
    try:
        cfg = AutoConfig.from_pretrained(source)
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise NLAError(f"cannot read the config or tokenizer of {spec!r}: {e}") from e
    cfg = getattr(cfg, "text_config", None) or cfg
    return ModelFacts(str(spec), resolved.kind, int(cfg.hidden_size),
                      int(cfg.num_hidden_layers), tok)


def same_tokenizer(a, b) -> str | None:
    """None when two tokenizers agree (vocabulary, special-token ids, a probe string's ids),
    else what differs."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only = sorted(set(va) ^ set(vb))[:5]
        return (f"vocabularies differ ({len(va)} vs {len(vb)} entries"
                + (f"; e.g. {only}" if only else "; same tokens, other ids") + ")")
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} differs ({getattr(a, name)} vs {getattr(b, name)})"
    if a(PROBE)["input_ids"] != b(PROBE)["input_ids"]:
        return "they tokenize the same probe string differently"
    return None


def check_models(base: ModelFacts, finetuned: ModelFacts, layer: int) -> None:
    """NLAError unless both models share tokenizer and d_model and both have block `layer`."""
    if base.d_model != finetuned.d_model:
        raise NLAError(f"the base {base.spec!r} has d_model {base.d_model} but the fine-tuned "
                       f"{finetuned.spec!r} has {finetuned.d_model}: diffing needs a fine-tune "
                       "of the same architecture")
    for m in (base, finetuned):
        if not 0 <= layer < m.n_layers:
            raise NLAError(f"{m.spec!r} has blocks 0..{m.n_layers - 1}, no block {layer}; "
                           "diffing needs both models to have the NLA's layer")
    why = same_tokenizer(base.tokenizer, finetuned.tokenizer)
    if why:
        raise NLAError(f"the base {base.spec!r} and the fine-tuned {finetuned.spec!r} have "
                       f"different tokenizers ({why}): the same positions of the same documents "
                       "would be different tokens. Diff a fine-tune that kept the base tokenizer")


__all__ = ["ADAPTER_CONFIG", "BASE_RECORD", "ModelFacts", "check_adapter_base", "check_models",
           "is_adapter_dir", "load_finetuned", "model_facts", "record_adapter_base",
           "same_tokenizer"]
