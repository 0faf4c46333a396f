"""NLA checkpoint format: save/load round trip, official layout, validation errors, explain API."""

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nlakit import NLAError
from nlakit.nla.facade import NLA, parse_positions
from official_contract import check_official_pair, official_ar_ids  # tests/official_contract.py


@pytest.fixture(scope="module")
def untrained(tiny):
    return NLA.from_target(tiny, 2, injection_scale=10.0,
                           dataset_stats={"rawvar": 0.5, "mean_norm": 9.0})


@pytest.fixture(scope="module")
def saved(untrained, tmp_path_factory):
    return untrained.save(tmp_path_factory.mktemp("nla") / "nla")


def _meta(path):
    return yaml.safe_load((path / "nla_meta.yaml").read_text())


def test_saved_files_follow_the_official_field_names(saved):
    av, ar = _meta(saved / "av"), _meta(saved / "ar")
    assert av["kind"] == "nla_model" and av["role"] == "av" and av["d_model"] == 64
    for key in ("injection_char", "injection_token_id", "injection_left_neighbor_id",
                "injection_right_neighbor_id"):
        assert key in av["tokens"]
    assert av["extraction"]["injection_scale"] == 10.0
    assert "{injection_char}" in av["prompt_templates"]["av"]
    assert ar["role"] == "ar" and ar["extraction"]["mse_scale"] == pytest.approx(8.0)
    assert "{explanation}" in ar["prompt_templates"]["ar"]
    cfg = yaml.safe_load((saved / "ar" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    head = load_file(str(saved / "ar" / "value_head.safetensors"))
    assert list(head) == ["weight"] and tuple(head["weight"].shape) == (64, 64)
    assert av["nlakit"]["target_model"]["weights_hash"].startswith("sha256:")


def test_round_trip_gives_identical_outputs(untrained, saved, tiny):
    loaded = NLA.load(saved, target=tiny)
    v = torch.randn(2, 64)
    a = [e.raw for e in untrained.explain(v, max_new_tokens=6)]
    b = [e.raw for e in loaded.explain(v, max_new_tokens=6)]
    assert a == b
    texts = ["alpha beta", "gamma"]
    assert torch.allclose(untrained.reconstruct(texts), loaded.reconstruct(texts), atol=1e-5)


def test_official_pair_loads_with_legacy_role_names(saved, tmp_path, tiny):
    av, ar = tmp_path / "release_av", tmp_path / "release_ar"
    shutil.copytree(saved / "av", av)
    shutil.copytree(saved / "ar", ar)
    for d, new, tkey in ((av, "actor", "av"), (ar, "critic", "ar")):
        meta = _meta(d)
        meta["role"] = new
        meta["prompt_templates"] = {new: meta["prompt_templates"][tkey]}
        meta.pop("nlakit")
        (d / "nla_meta.yaml").write_text(yaml.safe_dump(meta))
    nla = NLA.load(av=av, ar=ar, target=tiny)
    assert nla.layer == 2 and nla.d_model == 64
    scores = nla.score(["x", "y", "z"], torch.randn(3, 64))
    assert scores["fve_nrm"].shape == (3,)


def test_export_official_layout(saved, tmp_path):
    from nlakit.run.cli import main

    assert main(["export", "--nla", str(saved), "--out", str(tmp_path / "off")]) == 0
    assert (tmp_path / "off" / "av" / "nla_meta.yaml").is_file()
    assert (tmp_path / "off" / "ar" / "value_head.safetensors").is_file()
    assert not (tmp_path / "off" / "nla.yaml").exists()
    NLA.load(av=tmp_path / "off" / "av", ar=tmp_path / "off" / "ar")


def test_an_official_export_meets_the_official_client_s_rules(untrained, saved, tmp_path):
    """The rules the official client checks at load time hold, and its critic reads exactly
    the tokens nlakit's AR reads (the BOS contract changes no token)."""
    from nlakit.run.cli import main

    out = tmp_path / "off"
    assert main(["export", "--nla", str(saved), "--out", str(out)]) == 0
    check_official_pair(out / "av", out / "ar")
    for text in ("alpha beta", "Current token: ' the'\nEnding: x", ""):
        ours = untrained.ar.encode([text])["input_ids"][0].tolist()
        if text:  # an empty explanation: nlakit fills one token, the client sends none
            assert official_ar_ids(out / "ar", text) == ours
    ar, av = _meta(out / "ar"), _meta(out / "av")
    assert ar["stage"] == av["stage"] == "untrained"
    assert ar["extraction_layer_index"] == ar["critic"]["extraction_layer_index"] == 2
    assert av["extraction_layer_index"] == 2 and ar["schema_version"] == 2
    assert ar["extraction"]["injection_scale"] is None


def test_the_bos_rule_is_read_back(saved, tmp_path):
    """A sidecar that records a BOS the tokenizer does not prepend is refused on load."""
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    _edit(broken / "ar", lambda m: m["nlakit"].update(ar_prepends_bos=True))
    with pytest.raises(NLAError, match="BOS"):
        NLA.load(broken)
    _edit(broken / "ar", lambda m: m["nlakit"].pop("ar_prepends_bos"))
    NLA.load(broken)  # sidecars from before the contract still load


@pytest.mark.parametrize("spec, parsed", [
    ("last", "last"), ("all", "all"), ("-3,-2,-1", [-3, -2, -1]), (" 4 ", [4]), (7, [7]),
    ([1, -1], [1, -1]), ((0,), [0]),
])
def test_positions_take_the_cli_s_forms_in_python_too(spec, parsed):
    assert parse_positions(spec) == parsed


@pytest.mark.parametrize("spec", ["first", "1,,2", "1.5", 1.5, None, [], [1, "2"], True])
def test_bad_positions_name_the_accepted_forms(untrained, spec):
    with pytest.raises(NLAError, match="positions must be 'last', 'all'"):
        untrained.explain_text("def f(x): return x", spec)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: _edit(d / "av", lambda m: m.pop("tokens")), "missing required field"),
    (lambda d: _edit(d / "av", lambda m: m.update(kind="other")), "kind"),
    (lambda d: _edit(d / "av", lambda m: m["tokens"].update(injection_token_id=3)), "tokenizer"),
    (lambda d: _edit(d / "av", lambda m: m["tokens"].update(injection_left_neighbor_id=1)),
     "neighbours"),
    (lambda d: _edit(d / "av", lambda m: m.update(d_model=32)), "d_model"),
    (lambda d: _edit(d / "ar", lambda m: m["extraction"].update(layer=1)), "num_hidden_layers"),
    (lambda d: save_file({"weight": torch.zeros(3, 3)}, str(d / "ar" / "value_head.safetensors")),
     "shape"),
    (lambda d: _edit(d / "ar", lambda m: m["nlakit"]["target_model"].update(
        weights_hash="sha256:other")), "not a pair"),
])
def test_validation_errors(saved, tmp_path, breakage, message):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    breakage(broken)
    with pytest.raises(NLAError, match=message):
        NLA.load(broken)


def _edit(directory, change):
    meta = _meta(directory)
    change(meta)
    (directory / "nla_meta.yaml").write_text(yaml.safe_dump(meta))


def test_load_errors_for_missing_and_single_dirs(saved, tmp_path):
    with pytest.raises(NLAError, match="does not exist"):
        NLA.load(tmp_path / "nothing")
    with pytest.raises(NLAError, match="single AV"):
        NLA.load(saved / "av")


def test_explain_text_and_score(untrained):
    rows = untrained.explain_text("def add(a, b):\n    return a + b\n", positions=[2, -1],
                                  max_new_tokens=5)
    assert [r.position for r in rows][0] == 2 and len(rows) == 2
    as_text = untrained.explain_text("def add(a, b):\n    return a + b\n", positions="2,-1",
                                     max_new_tokens=5)
    assert [r.position for r in as_text] == [r.position for r in rows]
    assert all(-4 <= r.mse_nrm - 4 <= 0 for r in rows)
    assert all(abs(r.mse_nrm - 2 * (1 - r.cos)) < 1e-4 for r in rows)
    best = untrained.explain_text("hello there", "last", best_of=3, max_new_tokens=5)
    assert len(best) == 1
    with pytest.raises(NLAError, match="out of range"):
        untrained.explain_text("hi", [50])
    with pytest.raises(NLAError, match="empty"):
        untrained.explain_text("   ")
    with pytest.raises(NLAError, match="context"):
        untrained.explain_text("word " * 3000)
    with pytest.raises(NLAError, match="texts for"):
        untrained.score(["a"], torch.randn(2, 64))
