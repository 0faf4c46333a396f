"""The stage subcommands are generated from the stage table: every one rejects a flag that does
not apply to it, ``--config FILE`` and flags build the same config, help shows real defaults,
and the pipeline and the CLI run the same stage code to the same outputs."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
import yaml

from nlakit.errors import NLAError
from nlakit.run.cli import build_parser, main, stage_from_args
from nlakit.run.pipeline import STAGE_TABLE, run_pipeline

COMMANDS = [s.command for s in STAGE_TABLE if s.command]
# the inputs each subcommand requires, so that parsing reaches the flag under test
REQUIRED = {("extract",): ["--out", "o"], ("label",): ["--acts", "a", "--out", "o"],
            ("train", "av"): ["--data", "d", "--out", "o"],
            ("train", "ar"): ["--data", "d", "--out", "o"],
            ("train", "control"): ["--data", "d", "--out", "o"],
            ("train", "rl"): ["--nla", "n", "--acts", "a", "--out", "o"],
            ("eval",): ["--acts", "a"], ("audit",): ["--acts", "a"], ("report",): ["--out", "o"]}
# a flag of another subcommand that does not belong to this one (among them the ones the old
# CLI accepted and silently ignored)
FOREIGN = {("extract",): ["--labeller", "context"], ("label",): ["--quote-tokens", "4"],
           ("train", "av"): ["--kl-coef", "1"], ("train", "ar"): ["--control", "shuffled"],
           ("train", "control"): ["--group-size", "2"], ("train", "rl"): ["--epochs", "3"],
           ("eval",): ["--paraphraser", "rules"], ("audit",): ["--quote-tokens", "4"],
           ("report",): ["--max-rows", "3"]}


def _parse(argv):
    return stage_from_args(build_parser(argv).parse_args(argv))


def test_every_stage_subcommand_is_covered():
    assert set(COMMANDS) == set(REQUIRED) == set(FOREIGN)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_flag_that_does_not_apply_is_an_error(command, capsys):
    argv = [*command, *REQUIRED[command]]
    _parse(argv)  # the required inputs alone parse
    with pytest.raises(SystemExit) as exc:
        _parse([*argv, *FOREIGN[command]])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: a flag is spelled in full
        _parse([*argv, "--see", "0"])


@pytest.mark.parametrize("argv, message", [
    (["label", "--acts", "a", "--out", "o", "--labeller", "context", "--api-model", "m"],
     "api_model do not apply to the 'context' labeller"),
    (["audit", "--acts", "a", "--paraphraser", "rules", "--paraphraser-model", "m"],
     "model do not apply to the 'rules' paraphraser"),
])
def test_an_option_of_another_labeller_or_paraphraser_is_an_error(argv, message):
    with pytest.raises(NLAError, match=message):
        _parse(argv)
    assert main(argv) == 2


# section values (as a pipeline YAML writes them) and the same settings as flags
SAME = {
    ("extract",): ({"corpus": "builtin:docs", "max_docs": 7, "positions_per_doc": 3,
                    "splits": {"av_sft": 0.5, "ar_sft": 0.25, "rl": 0.25}, "blocks": True},
                   ["--corpus", "builtin:docs", "--max-docs", "7", "--positions-per-doc", "3",
                    "--splits", "av_sft=0.5,ar_sft=0.25,rl=0.25", "--blocks"]),
    ("label",): ({"labeller": "context", "splits": ["av_sft"], "max_rows": 5,
                  "options": {"top_k": 2, "batch_size": 4}},
                 ["--labeller", "context", "--splits", "av_sft", "--max-rows", "5", "--top-k", "2",
                  "--batch-size", "4"]),
    ("train", "av"): ({"lr": 0.001, "max_steps": 3, "lora_rank": 0, "keep_adapters": True},
                      ["--lr", "1e-3", "--max-steps", "3", "--full", "--keep-adapters"]),
    ("train", "ar"): ({"batch_size": 2, "epochs": 2.5, "lora_alpha": 8},
                      ["--batch-size", "2", "--epochs", "2.5", "--lora-alpha", "8"]),
    ("train", "control"): ({"max_steps": 4, "seed": 3}, ["--max-steps", "4", "--seed", "3"]),
    ("train", "rl"): ({"kl_coef": 0.1, "failure_reward": None, "group_size": 2,
                       "reward": "neglog", "shared_prefix": False},
                      ["--kl-coef", "0.1", "--no-failure-penalty", "--group-size", "2",
                       "--reward", "neglog", "--no-shared-prefix"]),
    ("eval",): ({"max_rows": 6, "quote_tokens": [4, 16], "labels": False, "n_boot": 50},
                ["--max-rows", "6", "--quote-tokens", "4,16", "--no-labels", "--n-boot", "50"]),
    ("audit",): ({"edits": ["shuffle_units"], "paraphraser": "local",
                  "paraphraser_options": {"model": "m", "per_unit": True}},
                 ["--edits", "shuffle_units", "--paraphraser", "local", "--paraphraser-model", "m",
                  "--paraphraser-per-unit"]),
    ("report",): ({"title": "T"}, ["--title", "T"]),
}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_config_file_and_flags_give_identical_configs(command, tmp_path):
    section, flags = SAME[command]
    stage = next(s for s in STAGE_TABLE if s.command == command)
    if stage.enabled is not None:  # the pipeline's on/off switch is a key of the section too
        section = {**section, "enabled": True}
    path = tmp_path / "section.yaml"
    path.write_text(yaml.safe_dump(section))
    base = [*command, *REQUIRED[command]]
    _, from_file, inputs_a = _parse([*base, "--config", str(path)])
    _, from_flags, inputs_b = _parse([*base, *flags])
    _, default, _ = _parse(base)
    assert from_file == from_flags != default
    assert inputs_a == inputs_b


def test_flags_override_the_config_file_and_unknown_keys_fail(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump({"kl_coef": 0.5, "max_steps": 9}))
    _, cfg, _ = _parse(["train", "rl", *REQUIRED[("train", "rl")], "--config", str(path),
                        "--kl-coef", "0.2"])
    assert cfg.kl_coef == 0.2 and cfg.max_steps == 9
    path.write_text(yaml.safe_dump({"epochs": 3}))  # an SFT key in an RL section
    with pytest.raises(NLAError, match="unknown key.*epochs"):
        _parse(["train", "rl", *REQUIRED[("train", "rl")], "--config", str(path)])


def test_help_shows_the_real_defaults(capsys):
    from nlakit.train.rl import RLConfig

    with pytest.raises(SystemExit):
        main(["train", "rl", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in fields(RLConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert f"(default: {RLConfig().kl_coef})" in out and "(default: 0.01)" in out
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: av_sft,ar_sft,heldout)" in out


def test_import_nlakit_is_lazy_and_exports_the_api():
    import subprocess
    import sys

    code = ("import sys, nlakit; assert 'torch' not in sys.modules; "
            "print(nlakit.NLA.__name__, nlakit.extract.__name__, nlakit.run_eval.__name__, "
            "nlakit.ExtractConfig.__name__, nlakit.load_model.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["NLA", "extract", "run_eval", "ExtractConfig", "load_model"]


# ---- the pipeline and the CLI run the same stages to the same outputs --------------------------


@pytest.mark.usefixtures("private_cache")
def test_pipeline_and_cli_produce_the_same_stage_outputs(tmp_path, tiny_model_dir):
    from nlakit.extract.store import ActivationStore
    from nlakit.labels import LabelSet

    sections = {
        "extract": {"corpus": "builtin:docs", "max_docs": 16, "max_tokens_per_doc": 128,
                    "positions_per_doc": 3, "min_position": 20, "shard_docs": 8},
        "label": {"labeller": "context", "max_rows": 6},
        "train_av": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "eval_rows": 2,
                     "max_response_tokens": 16},
        "train_ar": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "eval_rows": 2},
        "eval": {"max_rows": 4, "max_new_tokens": 6, "n_boot": 20, "quote_tokens": [4]},
        "audit": {"max_rows": 4, "max_new_tokens": 6, "n_boot": 20},
    }
    config = {"name": "same", "model": str(tiny_model_dir), "layer": 2,
              "runs_dir": str(tmp_path / "runs"), "train_rl": {"enabled": False}, **sections}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    run_pipeline(tmp_path / "p.yaml", progress=False)
    run = tmp_path / "runs" / "same"

    files = {}
    for name, section in sections.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(section))
    cli = tmp_path / "cli"
    steps = [
        ["extract", "--model", str(tiny_model_dir), "--layer", "2", "--out", str(cli / "acts")],
        ["label", "--acts", str(cli / "acts"), "--out", str(cli / "labels")],
        ["train", "av", "--data", str(cli / "labels"), "--out", str(cli / "sft")],
        ["train", "ar", "--data", str(cli / "labels"), "--out", str(cli / "sft")],
        ["eval", "--nla", str(cli / "sft"), "--acts", str(cli / "acts"), "--label-set",
         str(cli / "labels"), "--json", str(cli / "eval.json")],
        ["audit", "--nla", str(cli / "sft"), "--acts", str(cli / "acts"), "--explanations",
         str(cli / "eval.json"), "--json", str(cli / "audit.json")],
    ]
    for argv, name in zip(steps, sections):
        assert main([*argv, "--config", str(files[name]), "--no-progress"]) == 0, argv

    a, b = ActivationStore(run / "acts"), ActivationStore(cli / "acts")
    assert a.table(columns=["row_id", "split", "prefix"]) == b.table(
        columns=["row_id", "split", "prefix"])
    assert torch.equal(a.vectors(), b.vectors())
    assert LabelSet(run / "labels").table() == LabelSet(cli / "labels").table()
    for half in ("av", "ar"):
        ours = (run / "sft" / half / "model.safetensors").read_bytes()
        assert ours == (cli / "sft" / half / "model.safetensors").read_bytes(), half
    ev_p = json.loads((run / "eval/eval.json").read_text())
    ev_c = json.loads((cli / "eval.json").read_text())
    assert "label" in ev_p["methods"]
    assert ev_p["methods"] == ev_c["methods"] and ev_p["rows"] == ev_c["rows"]
    au_p = json.loads((run / "audit/audit.json").read_text())
    au_c = json.loads((cli / "audit.json").read_text())
    assert au_p["explanations_source"] == au_c["explanations_source"]
    assert au_p["tests"] == au_c["tests"]


def test_every_labeller_and_paraphraser_option_flag_applies_to_one_of_them():
    from nlakit.eval.audit import PARAPHRASER_OPTIONS, ParaphraserOptions
    from nlakit.labels import LabellerOptions, get_labeller_class

    taken = set()
    for name in ("local", "context", "openai", "nla"):
        taken |= set(get_labeller_class(name).OPTIONS)
    assert {f.name for f in fields(LabellerOptions)} <= taken
    assert {f.name for f in fields(ParaphraserOptions)} <= set().union(
        *PARAPHRASER_OPTIONS.values())


# ---- nlakit serve: flags generated from ServeInputs and ServeLimits ----------------------------


def test_serve_subcommand_flags_and_wiring(capsys, monkeypatch, tmp_path):
    import nlakit.apps.serve.server as server
    from nlakit.apps.serve.config import ServeInputs, ServeLimits

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for cls in (ServeInputs, ServeLimits):
        for f in fields(cls):
            assert "--" + f.name.replace("_", "-") in out, f.name
    assert "(default: 127.0.0.1)" in out and f"(default: {ServeLimits().max_tokens})" in out

    for foreign in (["--max-steps", "3"], ["--acts-dir", "x"], ["--max-tok", "9"]):
        with pytest.raises(SystemExit) as exc:  # another command's flag; no abbreviations
            main(["serve", "--nla", "n", *foreign])
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err

    seen = []
    monkeypatch.setattr(server, "run_serve", lambda inputs, limits: seen.append(
        (inputs, limits)) or 0)
    assert main(["serve", "--nla", "n", "--port", "8125", "--max-best-of", "3",
                 "--eval", "runs/x"]) == 0
    assert seen == [(ServeInputs(nla="n", port=8125, eval="runs/x"), ServeLimits(max_best_of=3))]
    limits = tmp_path / "limits.yaml"  # --config holds the limits, as every table command's
    limits.write_text("max_best_of: 5\nmax_tokens: 300\n")
    assert main(["serve", "--nla", "n", "--config", str(limits), "--max-tokens", "200"]) == 0
    assert seen[-1][1] == ServeLimits(max_best_of=5, max_tokens=200)  # the flag wins
    limits.write_text("max_bestof: 5\n")
    assert main(["serve", "--nla", "n", "--config", str(limits)]) == 2
    assert "unknown keys ['max_bestof']" in capsys.readouterr().err
    assert main(["serve", "--av", "a"]) == 2  # an NLAError: --nla, or --av and --ar
    assert "--nla NLA_DIR, or both" in capsys.readouterr().err
    assert main(["serve", "--nla", "n", "--max-tokens", "0"]) == 2
    assert "max_tokens must be >= 1" in capsys.readouterr().err
