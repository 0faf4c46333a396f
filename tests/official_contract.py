"""The official single-file client's load-time rules for an exported NLA, written from its
documented contract (docs/formats.md, REFERENCE "Official checkpoint layout"), not from its code.

`check_official_pair(av_dir, ar_dir)` raises AssertionError naming the first rule broken."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def _meta(directory: Path) -> dict:
    path = directory / "nla_meta.yaml"
    assert path.is_file(), f"{directory}: no nla_meta.yaml"
    return yaml.safe_load(path.read_text())


def _flat_ids(ids) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list, a batch of one, or an encoding."""
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def check_official_av(av_dir: Path) -> dict:
    meta = _meta(av_dir)
    assert meta["kind"] == "nla_model" and meta["role"] in ("av", "actor"), meta.get("role")
    assert meta.get("schema_version") == 2, "schema_version must be 2"
    assert meta.get("stage"), "stage missing"
    assert isinstance(meta.get("extraction_layer_index"), int), "extraction_layer_index missing"
    scale = meta["extraction"]["injection_scale"]
    assert isinstance(scale, (int, float)) and scale > 0, f"injection_scale {scale!r}"
    tok = AutoTokenizer.from_pretrained(av_dir)
    t = meta["tokens"]
    live = tok.encode(t["injection_char"], add_special_tokens=False)
    assert live == [t["injection_token_id"]], f"marker encodes to {live}"
    assert live[0] != tok.unk_token_id, "marker is UNK"
    template = meta["prompt_templates"].get("av") or meta["prompt_templates"]["actor"]
    content = template.format(injection_char=t["injection_char"])
    ids = _flat_ids(tok.apply_chat_template([{"role": "user", "content": content}],
                                            tokenize=True, add_generation_prompt=True))
    hits = [i for i, x in enumerate(ids) if x == t["injection_token_id"]]
    assert len(hits) == 1, f"marker appears {len(hits)} times in the canonical prompt"
    p = hits[0]
    assert 0 < p < len(ids) - 1, "marker at the prompt's edge"
    assert ids[p - 1] == t["injection_left_neighbor_id"], "left neighbour drift"
    assert ids[p + 1] == t["injection_right_neighbor_id"], "right neighbour drift"
    with safe_open(str(av_dir / "model.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if k.endswith(EMBED_SUFFIXES)]
        assert len(keys) == 1, f"expected one input-embedding key, got {keys}"
        assert f.get_slice(keys[0]).get_shape()[1] == meta["d_model"], "embedding width"
    return meta


def check_official_ar(ar_dir: Path) -> dict:
    meta = _meta(ar_dir)
    assert meta["role"] in ("ar", "critic"), meta.get("role")
    assert meta.get("schema_version") == 2, "schema_version must be 2"
    assert meta.get("stage"), "stage missing"
    mse_scale = meta["extraction"]["mse_scale"]
    assert isinstance(mse_scale, (int, float)), "mse_scale must be a number"
    assert math.isclose(mse_scale, math.sqrt(meta["d_model"]), rel_tol=1e-6), "mse_scale"
    template = meta["prompt_templates"].get("ar") or meta["prompt_templates"]["critic"]
    assert "{explanation}" in template, "AR template lacks {explanation}"
    tok = AutoTokenizer.from_pretrained(ar_dir)
    bos = tok.bos_token_id
    probe = tok("x", add_special_tokens=True)["input_ids"]
    assert bos is None or probe[0] == bos, (
        f"BOS rule: bos_token_id {bos} but add_special_tokens=True starts with {probe[0]}")
    k = (meta.get("critic") or {}).get("extraction_layer_index")
    assert isinstance(k, int), "critic.extraction_layer_index missing"
    assert meta.get("extraction_layer_index") == k, "the two extraction_layer_index disagree"
    config = AutoConfig.from_pretrained(ar_dir)
    assert config.num_hidden_layers == k + 1, "num_hidden_layers must be K+1"
    with safe_open(str(ar_dir / "value_head.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["weight"], "value head must hold only `weight`"
        d = meta["d_model"]
        assert f.get_slice("weight").get_shape() == [d, d], "value head shape"
    return meta


def official_ar_ids(ar_dir: Path, explanation: str) -> list[int]:
    """The token ids the official critic reads for `explanation`: raw template, special
    tokens added, the exported tokenizer."""
    meta = _meta(ar_dir)
    template = meta["prompt_templates"].get("ar") or meta["prompt_templates"]["critic"]
    tok = AutoTokenizer.from_pretrained(ar_dir)
    return tok(template.format(explanation=explanation), add_special_tokens=True)["input_ids"]


def check_official_pair(av_dir: Path, ar_dir: Path) -> None:
    av, ar = check_official_av(Path(av_dir)), check_official_ar(Path(ar_dir))
    assert av["d_model"] == ar["d_model"], "AV and AR disagree on d_model"
    assert av["extraction_layer_index"] == ar["extraction_layer_index"], "layers disagree"
