"""Steering from text: the hook adds exactly scale * vector where asked and nowhere else, is
removed even after an error, lines up with cached generation; the measurement reports every
control at the right norm; bad input is an NLAError; `nlakit steer` runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from nlakit import NLAError
from nlakit.apps.steering import (
    SteerConfig,
    concept_pattern,
    default_concept_words,
    measure_steering,
    steer,
    text_vector,
)
from nlakit.model.arch import decoder_layers, decoder_stack, returned_cache, with_cache
from nlakit.model.hooks import forward_to_layer
from nlakit.nla.facade import NLA
from nlakit.report.tables import format_steer
from nlakit.run.cli import main

TEXT = "The text is about the function and its value."
CONTRAST = "The text is about nothing in particular."
LAYER = 2


@pytest.fixture(scope="module")
def nla(tiny):
    return NLA.from_target(tiny, LAYER, injection_scale=10.0,
                           dataset_stats={"rawvar": 0.5, "mean_norm": 9.0})


def _ids(tiny, text="def f(x):\n    return x + 1  # the value of the function at x\n"):
    ids = tiny[1](text, return_tensors="pt")["input_ids"]
    return ids, torch.ones_like(ids)


def _hooks(model):
    return (len(decoder_layers(model)[LAYER]._forward_hooks),
            len(decoder_stack(model)._forward_pre_hooks))


def test_the_hook_adds_scale_times_vector_from_start_on_and_nowhere_else(tiny):
    model = tiny[0]
    ids, mask = _ids(tiny)
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    plain = forward_to_layer(model, ids, mask, LAYER)
    with steer(model, v, LAYER, 3.0, start=5):
        steered = forward_to_layer(model, ids, mask, LAYER)
    assert torch.equal(steered[:, :5], plain[:, :5])
    torch.testing.assert_close(steered[:, 5:] - plain[:, 5:],
                               (3.0 * v).expand_as(plain[:, 5:]), atol=1e-5, rtol=0)
    with steer(model, v, LAYER, -1.0):  # start 0: every position
        everywhere = forward_to_layer(model, ids, mask, LAYER)
    torch.testing.assert_close(everywhere - plain, (-v).expand_as(plain), atol=1e-5, rtol=0)
    assert torch.equal(forward_to_layer(model, ids, mask, LAYER), plain)  # gone after exit


def test_cached_generation_steps_are_steered_like_a_full_forward(tiny):
    model = tiny[0]
    ids, _ = _ids(tiny)
    p = ids.shape[1] - 3  # "prompt" = the first p tokens, then three generated ones
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), steer(model, v, LAYER, 2.0, start=p - 1):
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :p], use_cache=True)
        steps = [out.logits]
        for t in range(p, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], **with_cache(returned_cache(out)),
                        use_cache=True)
            steps.append(out.logits)
    cached = torch.cat(steps, 1)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        unsteered = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(unsteered[:, :p - 1], full[:, :p - 1])  # before start: untouched
    assert not torch.allclose(unsteered[:, p:], full[:, p:], atol=1e-3)  # the steps moved


def test_generate_is_steered_from_the_prompt_end_like_full_forwards(tiny):
    model, tok = tiny
    ids, _ = _ids(tiny, "The value of the function")
    p = ids.shape[1]
    v = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 4
    with torch.no_grad(), steer(model, v, LAYER, 1.0, start=p - 1):
        fast = model.generate(ids, do_sample=False, max_new_tokens=5, min_new_tokens=5,
                              pad_token_id=tok.pad_token_id)[0, p:]
        slow = ids
        for _ in range(5):  # no cache: every step re-reads the whole sequence
            nxt = model(input_ids=slow, use_cache=False).logits[:, -1].argmax(-1)
            slow = torch.cat([slow, nxt[:, None]], 1)
    with torch.no_grad():
        plain = model.generate(ids, do_sample=False, max_new_tokens=5, min_new_tokens=5,
                               pad_token_id=tok.pad_token_id)[0, p:]
    assert fast.tolist() == slow[0, p:].tolist()
    assert fast.tolist() != plain.tolist()


def test_the_hooks_are_removed_after_an_exception_in_the_block(tiny):
    model = tiny[0]
    before = _hooks(model)
    with pytest.raises(ZeroDivisionError), steer(model, torch.ones(64), LAYER, 1.0):
        assert _hooks(model) == (before[0] + 1, before[1] + 1)
        _ = 1 / 0
    assert _hooks(model) == before


@pytest.mark.parametrize("vector, layer, scale, message", [
    (torch.ones(63), LAYER, 1.0, "d_model 64"),
    (torch.ones(2, 64), LAYER, 1.0, r"shape \(2, 64\)"),
    (torch.full((64,), float("nan")), LAYER, 1.0, "NaN"),
    (torch.ones(64), 9, 1.0, "out of range"),
    (torch.ones(64), None, 1.0, "block index"),
    (torch.ones(64), LAYER, float("inf"), "finite"),
])
def test_bad_steering_input_is_an_nla_error(tiny, vector, layer, scale, message):
    before = _hooks(tiny[0])
    with pytest.raises(NLAError, match=message), steer(tiny[0], vector, layer, scale):
        pass
    assert _hooks(tiny[0]) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"text": "  "}, "text is empty"),
    ({"text": TEXT, "contrast": ""}, "contrast is empty"),
    ({"text": TEXT, "scale": ""}, "scale is empty"),
    ({"text": TEXT, "scale": "1,nan"}, "finite"),
    ({"text": TEXT, "scale": "1,x"}, "comma-separated numbers"),
    ({"text": TEXT, "mode": "middle"}, "mode must be one of"),
    ({"text": TEXT, "norm": -1.0}, "norm must be a positive"),
    ({"text": TEXT, "concept_words": " , "}, "concept_words is empty"),
])
def test_bad_config_is_an_nla_error(kwargs, message):
    with pytest.raises(NLAError, match=message):
        SteerConfig(**kwargs)


def test_concept_words_come_from_the_text_minus_stopwords_and_the_contrast():
    words = default_concept_words("The text is about the ocean, the sea, waves and ships.",
                                  "The text is about nothing in particular.")
    assert words == ("ocean", "sea", "waves", "ships")
    pattern = concept_pattern(words)
    assert pattern.search("A Wave hit the SHIP") and pattern.search("two oceans")
    assert not pattern.search("the season of research")
    with pytest.raises(NLAError, match="--concept-words"):
        default_concept_words("The text is about it.")


def test_the_contrastive_vector_is_the_difference_of_the_two_readings(nla):
    a, b = nla.reconstruct([TEXT])[0], nla.reconstruct([CONTRAST])[0]
    torch.testing.assert_close(text_vector(nla, TEXT, CONTRAST), a - b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text_vector(nla, TEXT), a)
    with pytest.raises(NLAError, match="zero"):
        text_vector(nla, TEXT, TEXT)


def test_the_table_holds_every_control_at_the_right_norm(nla):
    config = SteerConfig(text=TEXT, contrast=CONTRAST, scale=(0.5, 2.0), samples=2,
                         max_new_tokens=4, logprob_positions=3, random_controls=2, n_boot=50)
    report = measure_steering(nla, config)
    names = ["steered", "random_0", "random_1", "mean_direction", "ar_empty"]
    assert [(r["vector"], r["scale"]) for r in report.rows] == [("unsteered", 0.0)] + [
        (n, s) for s in (0.5, 2.0) for n in names]
    for row in report.rows[1:]:
        assert row["added_norm"] == pytest.approx(row["scale"] * 9.0, rel=1e-5)
        assert row["delta_logp"]["n"] == 20 and row["ppl_ratio"] > 0
        lo, hi = row["delta_logp"]["ci"]
        assert lo <= row["delta_logp"]["mean"] <= hi
    assert report.rows[1]["cos_to_steered"] == pytest.approx(1.0)
    assert report.rows[0]["ppl_ratio"] == 1.0 and report.rows[0]["delta_logp"]["mean"] == 0
    # a control is not the steered vector: the added vectors really differ
    assert len({round(r["delta_logp"]["mean"], 6) for r in report.rows[1:6]}) > 1
    assert len(report.comparisons) == 2 * 2 * 4 and len(report.verdicts) == 2
    with pytest.raises(NLAError, match="rebuilds block 2"):
        measure_steering(nla, SteerConfig(text=TEXT, layer=1))


def test_a_given_vector_replaces_the_ar_reading(nla):
    with pytest.raises(NLAError, match="d_model 64"):
        measure_steering(nla, SteerConfig(text=TEXT), vector=torch.ones(63))
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    config = SteerConfig(text=TEXT, scale=1, samples=1, max_new_tokens=2, logprob_positions=2,
                         random_controls=0, n_boot=20)
    report = measure_steering(nla, config, vector=v, mean_direction=-v)
    assert report.setup["vector"] == "given" and "along a given vector" in format_steer(report)
    mean_row = next(r for r in report.rows if r["vector"] == "mean_direction")
    assert mean_row["cos_to_steered"] == pytest.approx(-1.0)


def test_no_mean_norm_anywhere_asks_for_norm(tiny):
    bare = NLA.from_target(tiny, LAYER, injection_scale=10.0)
    with pytest.raises(NLAError, match="pass --norm"):
        measure_steering(bare, SteerConfig(text=TEXT))


def test_the_cli_writes_the_table_and_refuses_another_layer(nla, tmp_path, capsys):
    saved = nla.save(tmp_path / "nla")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The value of\n\nA function that\nIn the class\n")
    out = tmp_path / "out"
    argv = ["steer", "--nla", str(saved), "--text", TEXT, "--contrast", CONTRAST,
            "--scale", "1,4", "--samples", "1", "--max-new-tokens", "3",
            "--logprob-positions", "2", "--random-controls", "1", "--n-boot", "20",
            "--prompts", str(prompts), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| steered | 4 |" in printed and "wrote" in printed
    data = json.loads((out / "steer.json").read_text())
    assert len(data["rows"]) == 1 + 2 * 4 and data["setup"]["prompts"] == 3
    assert data["setup"]["concept_words"] == ["function", "value"]
    assert "| random_0 | 1 |" in (out / "steer.md").read_text()
    assert main([*argv[:3], "--text", TEXT, "--layer", "1"]) == 2
    assert "rebuilds block 2" in capsys.readouterr().err
    assert main([*argv[:3], "--text", TEXT, "--prompts", str(tmp_path / "no.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
