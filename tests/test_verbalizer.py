"""AV: marker choice and verification, injection, SFT batches, generation and parsing."""

import pytest
import torch

from nlakit import NLAError
from nlakit.nla.prompt import (
    DEFAULT_AV_TEMPLATE,
    Injection,
    choose_marker,
    format_target,
    locate_marker,
    marker_for,
    nice_injection_scale,
    parse_explanation,
    render_av_prompt,
)
from nlakit.nla.verbalizer import Verbalizer


def test_marker_is_single_token_once_with_tag_neighbours(tiny):
    _, tok = tiny
    marker = choose_marker(tok)
    assert tok(marker.char, add_special_tokens=False)["input_ids"] == [marker.token_id]
    ids = render_av_prompt(tok, DEFAULT_AV_TEMPLATE, marker.char)
    i = locate_marker(ids, marker)
    assert ids.count(marker.token_id) == 1
    assert tok.decode([ids[i - 1]]).endswith(">") and tok.decode([ids[i + 1]]).startswith("<")


def test_marker_override_and_bad_override(tiny):
    _, tok = tiny
    assert choose_marker(tok, override="~").char == "~"
    with pytest.raises(NLAError, match="tokens"):
        choose_marker(tok, override="µ")  # two bytes, two tokens in the tiny vocabulary


def test_locate_marker_rejects_drifted_neighbours(tiny):
    _, tok = tiny
    m = marker_for(tok, DEFAULT_AV_TEMPLATE, "~")
    ids = render_av_prompt(tok, "Look: [{injection_char}] now", "~")
    with pytest.raises(NLAError, match="neighbours"):
        locate_marker(ids, m)


def test_injection_overwrites_marker_embedding_with_scaled_vector(tiny):
    model, tok = tiny
    marker = choose_marker(tok)
    av = Verbalizer(model, tok, marker, injection_scale=7.0)
    ids = torch.tensor([av.prompt_ids, av.prompt_ids])
    pos = locate_marker(av.prompt_ids, marker)
    v = torch.randn(2, 64)
    embed = model.get_input_embeddings()
    plain = embed(ids)
    with av.injection.active(v):
        injected = embed(ids)
    expected = v / v.norm(dim=-1, keepdim=True) * 7.0
    assert torch.allclose(injected[:, pos], expected, atol=1e-5)
    other = torch.ones(ids.shape[1], dtype=torch.bool)
    other[pos] = False
    assert torch.equal(injected[:, other], plain[:, other])
    # a hook that found no marker must refuse instead of silently not injecting
    with av.injection.active(v), pytest.raises(NLAError, match="marker"):
        embed(torch.tensor([[5, 6, 7, 8]] * 2))


def test_injected_vector_changes_the_output(tiny):
    model, tok = tiny
    av = Verbalizer(model, tok, choose_marker(tok), injection_scale=20.0)
    batch = av.sft_batch(["some explanation"] * 2)
    torch.manual_seed(0)
    v = torch.randn(2, 64)
    a = av.sft_loss(v, batch)
    b = av.sft_loss(-v, batch)
    assert not torch.isclose(a, b)


def test_sft_batch_masks_everything_but_the_response(tiny):
    model, tok = tiny
    av = Verbalizer(model, tok, choose_marker(tok), 10.0)
    batch = av.sft_batch(["short", "a somewhat longer explanation"])
    n_prompt = len(av.prompt_ids)
    assert (batch["labels"][:, :n_prompt] == -100).all()
    for row in range(2):
        resp = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert resp[-1] == tok.eos_token_id
        texts = ["short", "a somewhat longer explanation"]
        assert tok.decode(resp[:-1]) == format_target(texts[row])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_generate_shapes_determinism_and_bad_vectors(tiny):
    model, tok = tiny
    av = Verbalizer(model, tok, choose_marker(tok), 10.0)
    v = torch.randn(3, 64)
    out = av.generate(v, n=2, max_new_tokens=6, seed=1, batch_size=4)
    assert len(out) == 6 and all(e.n_tokens <= 6 for e in out)
    again = av.generate(v, n=2, max_new_tokens=6, seed=1, batch_size=4)
    assert [e.raw for e in out] == [e.raw for e in again]
    greedy = av.generate(v[:1], temperature=0, max_new_tokens=6)
    assert greedy[0].raw == av.generate(v[:1], temperature=0, max_new_tokens=6)[0].raw
    with pytest.raises(NLAError, match="size"):
        av.generate(torch.randn(2, 10))
    with pytest.raises(NLAError, match="NaN"):
        av.generate(torch.full((1, 64), float("nan")))
    with pytest.raises(NLAError, match="zeros"):
        av.generate(torch.zeros(1, 64))


def test_batched_generation_matches_one_at_a_time(tiny):
    model, tok = tiny
    av = Verbalizer(model, tok, choose_marker(tok), 10.0)
    v = torch.randn(4, 64)
    batched = [e.raw for e in av.generate(v, temperature=0, max_new_tokens=8)]
    single = [av.generate(v[i : i + 1], temperature=0, max_new_tokens=8)[0].raw for i in range(4)]
    assert batched == single


def test_parse_explanation():
    assert parse_explanation("<explanation>\nfoo bar\n</explanation>") == ("foo bar", True)
    assert parse_explanation("<explanation>\nfoo bar") == ("foo bar", False)
    assert parse_explanation("foo</explanation> trailing") == ("foo", True)


def test_nice_injection_scale():
    assert nice_injection_scale(233.0) == 250.0
    assert nice_injection_scale(140.0) == 150.0
    assert nice_injection_scale(71000.0) == 75000.0
    assert nice_injection_scale(233.0) > 233.0
    with pytest.raises(NLAError):
        nice_injection_scale(0.0)


def test_injection_class_rejects_wrong_batch(tiny):
    model, tok = tiny
    av = Verbalizer(model, tok, choose_marker(tok), 10.0)
    inj = Injection(model, av.marker, 5.0)
    with inj.active(torch.randn(3, 64)), pytest.raises(NLAError, match="vectors for a batch"):
        model.get_input_embeddings()(torch.tensor([av.prompt_ids] * 2))


def test_decoding_settings_stop_repeats_and_default_to_the_checkpoint(tiny):
    model, tok = tiny
    av = Verbalizer(model, tok, choose_marker(tok), 10.0)
    v = torch.randn(4, 64)

    def tokens(**kw):
        return [e.token_ids for e in av.generate(v, temperature=0, max_new_tokens=24, **kw)]

    plain = tokens()
    assert any(len(set(ids)) < len(ids) for ids in plain), "the random model never repeats"
    for ids in tokens(no_repeat_ngram_size=1):  # no token twice (a final EOS is new too)
        assert len(set(ids)) == len(ids)
    av.decoding["no_repeat_ngram_size"] = 1  # what nla_meta.yaml `decoding:` sets
    assert tokens() == tokens(no_repeat_ngram_size=1)
    assert tokens(no_repeat_ngram_size=0) == plain  # a call overrides the checkpoint's setting
    with pytest.raises(NLAError, match="repetition_penalty > 0"):
        av.generate(v, repetition_penalty=0.0)


def test_repeated_ngram_bans_name_the_tokens_that_would_repeat_an_ngram():
    from nlakit.nla.sampling import repeated_ngram_bans

    written = [1, 2, 3, 1, 2]
    assert repeated_ngram_bans(written, 3) == [3]  # "1 2" was followed by 3
    assert repeated_ngram_bans(written, 2) == [3]  # "2" was followed by 3
    assert sorted(repeated_ngram_bans(written, 1)) == [1, 1, 2, 2, 3]  # every token written
    assert repeated_ngram_bans(written, 0) == [] and repeated_ngram_bans([1], 3) == []
    assert repeated_ngram_bans([5, 5, 5], 2) == [5, 5]


def test_greedy_takes_the_fast_loop_and_writes_hfs_tokens(tiny, monkeypatch):
    import nlakit.nla.verbalizer as rollout  # the module that calls fast_generate

    model, tok = tiny
    av = Verbalizer(model, tok, choose_marker(tok), 10.0)
    v = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    calls = []
    real = rollout.fast_generate
    monkeypatch.setattr(rollout, "fast_generate", lambda *a, **k: calls.append(k) or real(*a, **k))

    def tokens(**kw):
        return [e.token_ids for e in av.generate(v, temperature=0, max_new_tokens=24,
                                                 batch_size=3, **kw)]

    for n in (0, 1, 2, 3):
        hf = tokens(no_repeat_ngram_size=n, sampler="hf")
        assert tokens(no_repeat_ngram_size=n) == hf, n
        assert calls[-1]["no_repeat_ngram_size"] == n
    assert len(calls) == 4
    # a repetition penalty, asked for or in the model's generation_config, keeps HF's path
    tokens(repetition_penalty=1.3)
    assert len(calls) == 4
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.1)
    assert not av.plain_greedy(av.decoding_settings())
    with pytest.raises(NLAError, match="sampler"):
        av.generate(v, sampler="fast")



def test_bf16_autocast_and_float32_agree_on_the_tiny_model(tiny):
    """bf16 compute (`mixed_precision`: SFT, RL rollouts and log-probs) against float32 on the
    tiny model: the same greedy tokens, and the teacher-forced AV loss within 1e-3 relative
    (measured 1.4e-5). On SmolLM2 greedy tokens need not agree: bf16 *weights* kept 32 of 128
    explanations identical (docs/benchmarks.md), which is why eval and label_ar stay float32."""
    from nlakit.nla.facade import NLA

    nla = NLA.from_target(tiny, 2, injection_scale=10.0, dataset_stats={"rawvar": 0.5})
    v = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    batch = nla.av.sft_batch(["Current token: ' and'.\nEnding: the expression list and"] * 4
                             + ["def f(x):\n    return x + 1"] * 4, 32)
    with torch.no_grad():
        f32_loss = float(nla.av.sft_loss(v, batch))
        f32 = [e.raw for e in nla.explain(v, max_new_tokens=16)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss = float(nla.av.sft_loss(v, batch))
            bf16 = [e.raw for e in nla.explain(v, max_new_tokens=16)]
    assert bf16 == f32
    assert bf16_loss != f32_loss  # bf16 really ran
    assert abs(bf16_loss - f32_loss) / f32_loss < 1e-3
