"""The NLA checkpoint format: an ``av/`` and an ``ar/`` Hugging Face model directory, each with
``nla_meta.yaml`` in the official release's field names plus an ``nlakit:`` section.

nlakit layout (``NLA_DIR/av``, ``NLA_DIR/ar``) and the official release layout (two separate
directories) hold the same files; nlakit's may keep the AV as LoRA adapters over the target
(``nlakit.weights: adapter``), the official one always has plain merged weights.

AV ``nla_meta.yaml``: kind: nla_model, role: av, d_model, extraction.injection_scale,
tokens.{injection_char, injection_token_id, injection_left_neighbor_id,
injection_right_neighbor_id}, prompt_templates.av (with ``{injection_char}``).
AR ``nla_meta.yaml``: kind, role: ar, d_model, extraction.mse_scale (= sqrt(d)),
prompt_templates.ar (with ``{explanation}``); ``config.json`` has num_hidden_layers = K+1 and
``value_head.safetensors`` holds the head under key ``weight``.
Older official files say actor/critic instead of av/ar; both are read.

Both sidecars also carry the official schema-2 keys: ``schema_version: 2``, ``stage`` (sft or
rl) and ``extraction_layer_index`` (K; the AR's also under ``critic:``).

The AR's tokenization contract: AR prompts are raw text tokenized with
``add_special_tokens=True``, and the official client asserts that this prepends the tokenizer's
BOS whenever the tokenizer names one. A GGUF-converted SmolLM2 tokenizer names BOS (id 1) but
never prepends it, and nlakit's ARs were trained on those BOS-less tokens; so an AR directory
is written with a tokenizer that names no BOS (the tokens it produces are unchanged, which is
checked), and the sidecar records ``nlakit.ar_prepends_bos``, which the loader verifies.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nlakit import __version__
from nlakit.errors import NLAError
from nlakit.fileio import file_sha256, make_temp_dir, read_yaml, stable_hash, write_yaml
from nlakit.nla.prompt import MarkerTokens, locate_marker, render_av_prompt

NLA_META_FILE = "nla_meta.yaml"
VALUE_HEAD_FILE = "value_head.safetensors"
ROLE_ALIASES = {"av": "av", "actor": "av", "ar": "ar", "critic": "ar"}
SCHEMA_VERSION = 2
STAGES = ("untrained", "sft", "rl")


def av_meta(*, d_model: int, layer: int, injection_scale: float, marker: MarkerTokens,
            av_template: str, ar_template: str, nlakit: dict, stage: str = "sft") -> dict:
    return {
        "kind": "nla_model",
        "schema_version": SCHEMA_VERSION,
        "role": "av",
        "stage": stage,
        "d_model": d_model,
        "extraction_layer_index": layer,
        "extraction": {"layer": layer, "injection_scale": float(injection_scale),
                       "mse_scale": math.sqrt(d_model)},
        "tokens": {
            "injection_char": marker.char,
            "injection_token_id": marker.token_id,
            "injection_left_neighbor_id": marker.left_id,
            "injection_right_neighbor_id": marker.right_id,
        },
        "prompt_templates": {"av": av_template, "ar": ar_template},
        "nlakit": {"version": __version__, **nlakit},
    }


def ar_meta(*, d_model: int, layer: int, ar_template: str, nlakit: dict,
            stage: str = "sft") -> dict:
    return {
        "kind": "nla_model",
        "schema_version": SCHEMA_VERSION,
        "role": "ar",
        "stage": stage,
        "d_model": d_model,
        "extraction_layer_index": layer,
        "critic": {"extraction_layer_index": layer},
        # an AR injects nothing: the official sidecars say null here
        "extraction": {"layer": layer, "injection_scale": None, "mse_scale": math.sqrt(d_model)},
        "prompt_templates": {"ar": ar_template},
        "nlakit": {"version": __version__, **nlakit},
    }


def read_meta(directory: str | Path, role: str) -> dict:
    """Read and validate a directory's nla_meta.yaml for `role` ('av' or 'ar')."""
    directory = Path(directory)
    path = directory / NLA_META_FILE
    if not path.is_file():
        raise NLAError(f"{directory} has no {NLA_META_FILE}: not an NLA {role.upper()} directory")
    meta = read_yaml(path) or {}
    if meta.get("kind") != "nla_model":
        raise NLAError(f"{path}: kind is {meta.get('kind')!r}, expected 'nla_model'")
    found_role = ROLE_ALIASES.get(str(meta.get("role")))
    if found_role != role:
        raise NLAError(f"{path}: role is {meta.get('role')!r}, expected {role!r}")
    required = ["d_model", "prompt_templates"]
    if role == "av":
        required += ["extraction.injection_scale", "tokens.injection_char",
                     "tokens.injection_token_id", "tokens.injection_left_neighbor_id",
                     "tokens.injection_right_neighbor_id"]
    for key in required:
        node = meta
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise NLAError(f"{path}: missing required field {key!r}")
            node = node[part]
    templates = meta["prompt_templates"]
    name = "av" if role == "av" else "ar"
    legacy = "actor" if role == "av" else "critic"
    template = templates.get(name, templates.get(legacy))
    if template is None:
        raise NLAError(f"{path}: missing prompt_templates.{name}")
    meta["template"] = template
    return meta


def marker_from_meta(meta: dict) -> MarkerTokens:
    t = meta["tokens"]
    return MarkerTokens(str(t["injection_char"]), int(t["injection_token_id"]),
                        int(t["injection_left_neighbor_id"]),
                        int(t["injection_right_neighbor_id"]))


def verify_av_tokenizer(tokenizer, meta: dict, where: str) -> MarkerTokens:
    """The live tokenizer must encode the marker to the stored id with the stored neighbours."""
    marker = marker_from_meta(meta)
    ids = tokenizer(marker.char, add_special_tokens=False)["input_ids"]
    if ids != [marker.token_id]:
        raise NLAError(f"{where}: the tokenizer encodes marker {marker.char!r} as {ids}, but the "
                       f"checkpoint stores id {marker.token_id}; wrong tokenizer for this AV")
    try:
        locate_marker(render_av_prompt(tokenizer, meta["template"], marker.char), marker)
    except NLAError as e:
        raise NLAError(f"{where}: {e}") from e
    return marker


def save_value_head(head: torch.nn.Linear, directory: Path) -> None:
    save_file({"weight": head.weight.detach().float().cpu().contiguous()},
              str(directory / VALUE_HEAD_FILE))


def load_value_head(directory: Path, d_model: int) -> torch.nn.Linear:
    path = Path(directory) / VALUE_HEAD_FILE
    if not path.is_file():
        raise NLAError(f"{directory} has no {VALUE_HEAD_FILE}: not an NLA AR directory")
    weight = load_file(str(path)).get("weight")
    if weight is None or tuple(weight.shape) != (d_model, d_model):
        raise NLAError(f"{path}: expected key 'weight' of shape ({d_model}, {d_model}), got "
                       f"{None if weight is None else tuple(weight.shape)}")
    head = torch.nn.Linear(d_model, d_model, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def write_dir_atomic(target: Path, write) -> None:
    """Run write(tmp_dir) and swap the result into `target`; a crash never leaves half a dir."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_schema_keys(meta: dict, stage: str | None = None) -> dict:
    """`meta` with the official schema-2 keys filled in from its own layer and provenance
    (sidecars written before nlakit wrote them lack them); `stage` overrides the recorded one."""
    meta = copy.deepcopy(meta)
    layer = meta.get("extraction", {}).get("layer", meta.get("extraction_layer_index"))
    meta["schema_version"] = SCHEMA_VERSION
    ran_rl = "rl" in meta.get("nlakit", {}).get("provenance", {})  # what RL's export adds
    meta["stage"] = stage or meta.get("stage") or ("rl" if ran_rl else "sft")
    if meta["stage"] not in STAGES:
        raise NLAError(f"sidecar stage must be one of {STAGES}, got {meta['stage']!r}")
    if layer is not None:
        meta["extraction_layer_index"] = int(layer)
        if ROLE_ALIASES.get(str(meta.get("role"))) == "ar":
            meta["critic"] = {**meta.get("critic", {}), "extraction_layer_index": int(layer)}
            meta.setdefault("extraction", {}).setdefault("injection_scale", None)
    return meta


def prepends_bos(tokenizer) -> bool:
    """Whether `add_special_tokens=True` (how AR prompts are tokenized) prepends a BOS."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def ar_tokenizer_for_export(tokenizer):
    """The AR's tokenizer in the official BOS contract, producing the same tokens.

    Where the tokenizer names a BOS that `add_special_tokens=True` does not prepend, a copy
    that names none: the official client's rule (a named BOS is prepended) then holds without
    changing a single token the AR was trained on."""
    if tokenizer.bos_token_id is None or prepends_bos(tokenizer):
        return tokenizer
    out = copy.deepcopy(tokenizer)
    out.bos_token = None
    probe = "Summary: <text>a b\nc</text>"
    before = tokenizer(probe, add_special_tokens=True)["input_ids"]
    if out(probe, add_special_tokens=True)["input_ids"] != before or out.bos_token_id is not None:
        raise NLAError("could not write the AR tokenizer without a BOS without changing its "
                       "tokens; export this AR with its original tokenizer (nlakit layout)")
    return out


def verify_ar_tokenizer(tokenizer, meta: dict, where: str) -> None:
    """The live tokenizer must prepend a BOS to AR prompts exactly when training did."""
    recorded = meta.get("nlakit", {}).get("ar_prepends_bos")
    if recorded is not None and bool(recorded) != prepends_bos(tokenizer):
        said = "prepends" if recorded else "does not prepend"
        raise NLAError(f"{where}: the AR was trained on prompts whose tokenization {said} a "
                       "BOS, and this tokenizer does otherwise; use the tokenizer saved with "
                       "the AR")


def save_av_dir(directory: Path, model, tokenizer, meta: dict) -> None:
    """Write an AV directory: merged weights (or peft adapters), tokenizer and nla_meta.yaml."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_yaml(tmp / NLA_META_FILE, with_schema_keys(meta))

    write_dir_atomic(directory, write)


def save_ar_dir(directory: Path, body, head, tokenizer, meta: dict) -> None:
    """Write an AR directory: truncated body (K+1 blocks), value head, tokenizer, sidecar."""
    exported = ar_tokenizer_for_export(tokenizer)
    meta = with_schema_keys(meta)
    meta.setdefault("nlakit", {})["ar_prepends_bos"] = prepends_bos(exported)

    def write(tmp: Path) -> None:
        body.save_pretrained(tmp, safe_serialization=True)
        exported.save_pretrained(tmp)
        save_value_head(head, tmp)
        write_yaml(tmp / NLA_META_FILE, meta)

    write_dir_atomic(directory, write)


def av_digest(directory: str | Path) -> str:
    """sha256 over an AV directory's weights and sidecars: what determines its explanations
    (the key of every cache of them)."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir()
                   if p.suffix in (".safetensors", ".yaml", ".json") and p.is_file())
    if not files:
        raise NLAError(f"{directory} holds no AV weights; pass the AV directory of a trained NLA")
    return "sha256:" + stable_hash([(p.name, file_sha256(p)) for p in files])
