"""The one-command pipeline on the tiny random model: every stage runs, a re-run skips them all,
a changed stage refuses until --from redoes it, and the shipped configs validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nlakit.errors import ConfigMismatchError, NLAError
from nlakit.run.pipeline import STAGES, Pipeline, load_config, plan, run_pipeline, stage_config

pytestmark = pytest.mark.usefixtures("private_cache")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(tmp_path, model_dir, **changes) -> Path:
    cfg = {
        "name": "tiny", "model": str(model_dir), "layer": 2, "runs_dir": str(tmp_path / "runs"),
        "extract": {"corpus": "builtin:docs", "max_docs": 24, "max_tokens_per_doc": 160,
                    "positions_per_doc": 4, "min_position": 20, "shard_docs": 8},
        "label": {"labeller": "context", "splits": ["av_sft", "ar_sft", "heldout"]},
        "train_av": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "eval_rows": 4,
                     "max_response_tokens": 32},
        "train_ar": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "eval_rows": 4},
        "train_rl": {"max_steps": 2, "batch_size": 2, "group_size": 2, "max_new_tokens": 12,
                     "eval_every": 2, "eval_rows": 2, "save_every": 1},
        "eval": {"max_rows": 6, "max_new_tokens": 12, "n_boot": 50, "quote_tokens": [4]},
        "audit": {"max_rows": 6, "max_new_tokens": 12, "n_boot": 50},
    }
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_runs_every_stage_then_skips_them(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir)
    summary = run_pipeline(config, progress=False)
    assert [s["stage"] for s in summary["stages"]] == list(STAGES)
    off_by_default = ("train_control", "label_ar")
    assert all(s["status"] == ("disabled" if s["stage"] in off_by_default else "done")
               for s in summary["stages"])
    run = tmp_path / "runs" / "tiny"
    for path in ("acts/meta.yaml", "labels/meta.yaml", "sft/av/nla_meta.yaml",
                 "sft/ar/nla_meta.yaml", "rl/metrics.jsonl", "nla/av/nla_meta.yaml",
                 "nla/ar/value_head.safetensors", "eval/eval.json", "audit/audit.json",
                 "report/report.html", "summary.json"):
        assert (run / path).is_file(), path
    ev = json.loads((run / "eval/eval.json").read_text())
    assert {"nla", "mean_direction", "quote_4", "label"} <= set(ev["methods"])
    assert summary["eval"]["nla"] == ev["methods"]["nla"]["fve_nrm"]["mean"]
    # the final NLA is the RL output (hard links), loadable as a normal checkpoint
    from nlakit.nla.facade import NLA

    nla = NLA.load(run / "nla")
    assert nla.layer == 2
    assert (run / "nla/av/model.safetensors").stat().st_ino == \
        (run / "rl/av/model.safetensors").stat().st_ino
    # the audit reused the eval's explanations (same rows)
    au = json.loads((run / "audit/audit.json").read_text())
    assert au["explanations_source"].startswith("given")

    again = run_pipeline(config, progress=False)
    assert all(s["status"] in ("skipped", "disabled") for s in again["stages"])
    assert dict(plan(config)) == {s: "disabled" if s in off_by_default else "complete"
                                  for s in STAGES}

    # enabling the shuffled control adds its stage and redoes the eval (now with a control)
    controlled = tiny_config(tmp_path, tiny_model_dir, train_control={"enabled": True})
    status = dict(plan(controlled))
    assert status["train_control"] == "todo" and status["eval"] == "changed"
    assert status["train_rl"] == "complete"
    run_pipeline(controlled, start="train_control", progress=False)
    ev = json.loads((run / "eval/eval.json").read_text())
    assert "control" in ev["methods"]
    meta = yaml.safe_load((run / "control/av/nla_meta.yaml").read_text())
    assert meta["nlakit"]["provenance"]["config"]["control"] == "shuffled"

    # a changed stage refuses (naming the setting and the fix); later stages depend on it
    changed = tiny_config(tmp_path, tiny_model_dir, eval={"max_rows": 8})
    status = dict(plan(changed))
    assert status["eval"] == "changed" and status["audit"] == "changed"
    assert status["train_rl"] == "complete"
    with pytest.raises(ConfigMismatchError, match=r"max_rows.*--from eval"):
        run_pipeline(changed, progress=False)
    redone = run_pipeline(changed, start="eval", progress=False)
    by_stage = {s["stage"]: s["status"] for s in redone["stages"]}
    assert by_stage["train_rl"] == "skipped" and by_stage["eval"] == "done"
    assert by_stage["report"] == "done"


def test_pipeline_without_rl_uses_the_sft_checkpoint(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, train_rl={"enabled": False},
                         audit={"enabled": False})
    summary = run_pipeline(config, stop="nla", progress=False)
    by_stage = {s["stage"]: s["status"] for s in summary["stages"]}
    assert by_stage["train_rl"] == "disabled" and by_stage["nla"] == "done"
    assert "eval" not in by_stage
    run = tmp_path / "runs" / "tiny"
    assert not (run / "rl").exists()
    assert (run / "nla/av/model.safetensors").stat().st_ino == \
        (run / "sft/av/model.safetensors").stat().st_ino


def test_a_throughput_setting_keeps_finished_stages(tmp_path, tiny_model_dir):
    """A batch size changes a stage's speed, not its output: finished stages stay complete
    (and so do the stages after them); a setting that changes the output still refuses."""
    off = {"train_rl": {"enabled": False}, "audit": {"enabled": False}}
    run_pipeline(tiny_config(tmp_path, tiny_model_dir, **off), stop="train_av", progress=False)
    faster = tiny_config(tmp_path, tiny_model_dir, extract={"batch_size": 3},
                         label={"options": {"batch_size": 5}}, **off)
    status = dict(plan(faster))
    assert [status[s] for s in ("extract", "label", "train_av")] == ["complete"] * 3
    summary = run_pipeline(faster, stop="train_av", progress=False)
    assert [s["status"] for s in summary["stages"]] == ["skipped"] * 3
    pipe = Pipeline(load_config(faster))  # filling in the labeller's dtype edits no hash
    pipe.config("label")
    assert pipe.stage_config("label")["options"] == {"batch_size": 5}
    other = tiny_config(tmp_path, tiny_model_dir, extract={"batch_size": 3, "min_position": 21},
                        **off)
    status = dict(plan(other))
    assert status["extract"] == status["train_av"] == "changed"
    with pytest.raises(ConfigMismatchError, match="min_position"):
        run_pipeline(other, stop="train_av", progress=False)


def test_bad_configs_fail_before_any_work(tmp_path, tiny_model_dir):
    with pytest.raises(NLAError, match="unknown key.*lrr"):
        load_config(tiny_config(tmp_path, tiny_model_dir, train_av={"lrr": 1}))
    with pytest.raises(NLAError, match="reward must be one of"):
        load_config(tiny_config(tmp_path, tiny_model_dir, train_rl={"reward": "nope"}))
    with pytest.raises(NLAError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(NLAError, match="plain run name"):
        load_config(tiny_config(tmp_path, tiny_model_dir), ["name=../elsewhere"])
    with pytest.raises(NLAError, match="KEY=VALUE"):
        load_config(tiny_config(tmp_path, tiny_model_dir), ["train_av.max_steps"])
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir), ["train_av.max_steps=7",
                                                              "name=other"])
    assert cfg.train_av["max_steps"] == 7 and cfg.name == "other"
    assert not (tmp_path / "runs").exists()


def test_numbers_without_a_dot_are_numbers(tmp_path, tiny_model_dir):
    """PyYAML reads 2e-4 and 1e-3 (no dot) as strings, in a file and in --set: a config field's
    type makes them numbers; text that is no number is an error naming the field."""
    path = tiny_config(tmp_path, tiny_model_dir, train_av={"lr": "LR"})
    path.write_text(path.read_text().replace("lr: LR", "lr: 2e-4"))
    assert yaml.safe_load(path.read_text())["train_av"]["lr"] == "2e-4"
    cfg = load_config(path, ["train_rl.av_lr=1e-3", "train_rl.failure_reward=none",
                             "train_rl.max_steps=3"])
    pipe = Pipeline(cfg)
    assert pipe.config("train_av").lr == 2e-4 and isinstance(pipe.config("train_av").lr, float)
    rl = pipe.config("train_rl")
    assert (rl.av_lr, rl.failure_reward, rl.max_steps) == (1e-3, None, 3)
    assert stage_config("train_control", {"lr": "5e-5"}).lr == 5e-5  # the CLI's --config
    with pytest.raises(NLAError, match=r"train_rl.av_lr must be a number, got 'fast'"):
        load_config(path, ["train_rl.av_lr=fast"])
    with pytest.raises(NLAError, match=r"train_rl.max_steps must be an integer, got '1e3'"):
        load_config(path, ["train_rl.max_steps=1e3"])


@pytest.mark.parametrize("name", ["cpu-demo", "cpu-reference", "cpu-quality", "gpu-smollm2-quality",
                                  "gpu-qwen2.5-0.5b"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name


def test_the_truth_rl_config_validates():
    from nlakit.fileio import read_yaml

    rl = stage_config("train_rl", read_yaml(CONFIGS / "smollm2-truth-rl.yaml"))
    assert rl.truth_reward == 0.5 and rl.keep_adapters


def test_interrupted_stage_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from nlakit.train import rl

    config = tiny_config(tmp_path, tiny_model_dir, train_rl={"max_steps": 3})
    real, calls = rl.R.group_advantages, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # inside RL step 3, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rl.R, "group_advantages", dying)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, progress=False)
    status = dict(plan(config))
    assert status["train_av"] == "complete" and status["train_rl"] == "todo"
    monkeypatch.setattr(rl.R, "group_advantages", real)
    summary = run_pipeline(config, stop="train_rl", progress=False)
    by_stage = {s["stage"]: s["status"] for s in summary["stages"]}
    assert by_stage["train_av"] == "skipped" and by_stage["train_rl"] == "done"
    rl_summary = json.loads((tmp_path / "runs/tiny/rl/.train-rl/summary.json").read_text())
    assert rl_summary["resumed_from"] == 2


def test_raising_max_steps_continues_the_checkpoint(tmp_path, tiny_model_dir):
    """A training stage changed only by a larger max_steps (or its eval cadence) continues
    from its checkpoint under --from; any other change, or fewer steps, still starts over."""
    base = {"train_rl": {"enabled": False}, "audit": {"enabled": False}}
    run_pipeline(tiny_config(tmp_path, tiny_model_dir, **base), stop="train_ar", progress=False)
    longer = tiny_config(tmp_path, tiny_model_dir, train_av={"max_steps": 4, "eval_every": 4},
                         **base)
    status = dict(plan(longer))
    assert status["train_av"] == "extends" and status["train_ar"] == "complete"
    with pytest.raises(ConfigMismatchError, match=r"continues its training.*2 -> 4"):
        run_pipeline(longer, stop="train_av", progress=False)
    run_pipeline(longer, start="train_av", stop="train_av", progress=False)
    summary = json.loads((tmp_path / "runs/tiny/sft/.train-av/summary.json").read_text())
    assert (summary["resumed_from"], summary["steps"]) == (2, 4)
    assert dict(plan(longer))["train_av"] == "complete"
    for other in ({"max_steps": 3}, {"max_steps": 6, "lr": 1e-3}):
        edited = tiny_config(tmp_path, tiny_model_dir, train_av=other, **base)
        assert dict(plan(edited))["train_av"] == "changed"
    run_pipeline(tiny_config(tmp_path, tiny_model_dir, train_av={"max_steps": 3}, **base),
                 start="train_av", stop="train_av", progress=False)
    summary = json.loads((tmp_path / "runs/tiny/sft/.train-av/summary.json").read_text())
    assert (summary["resumed_from"], summary["steps"]) == (0, 3)


def test_raising_rl_max_steps_continues_the_rl_checkpoint(tmp_path, tiny_model_dir):
    base = {"audit": {"enabled": False}}
    run_pipeline(tiny_config(tmp_path, tiny_model_dir, **base), stop="train_rl", progress=False)
    longer = tiny_config(tmp_path, tiny_model_dir, train_rl={"max_steps": 4}, **base)
    assert dict(plan(longer))["train_rl"] == "extends"
    run_pipeline(longer, start="train_rl", stop="train_rl", progress=False)
    summary = json.loads((tmp_path / "runs/tiny/rl/.train-rl/summary.json").read_text())
    assert (summary["resumed_from"], summary["steps"]) == (2, 4)
    other = tiny_config(tmp_path, tiny_model_dir, train_rl={"max_steps": 6, "av_lr": 1e-3},
                        **base)
    assert dict(plan(other))["train_rl"] == "changed"


def test_partial_output_of_other_settings_names_the_pipeline_fix(tmp_path, tiny_model_dir):
    run_pipeline(tiny_config(tmp_path, tiny_model_dir), stop="extract", progress=False)
    # a crash between the store and its stamp, then a config edit
    (tmp_path / "runs/tiny/.pipeline/extract.json").unlink()
    edited = tiny_config(tmp_path, tiny_model_dir, extract={"max_docs": 16})
    with pytest.raises(ConfigMismatchError, match="--from extract"):
        run_pipeline(edited, stop="extract", progress=False)
    summary = run_pipeline(edited, start="extract", stop="extract", progress=False)
    assert summary["stages"][0]["status"] == "done"


# the stage hashes nlakit 0.1 (commit b0dc7c6, before the stage table) stamped for this config
LEGACY_HASHES = {
    "extract": "5533291d08bd110da4fa4a968eb2d5ec93a3f773aa0560f742c42863ff492130",
    "label": "a1019afe59ea01fd6f2b1e9cafdae12af8e3c63d6a82a59d12b33720acbd77ae",
    "train_av": "eed13738fa7ec7ed5de8c4a5b457f49680d1544ee0df27411fceee639bbf4789",
    "train_ar": "89245e4b6a197038cec8aaf3f0ce42ce890c10d6a7dacaeae2c24d0b6d00f832",
    "train_control": "8486a8f9aff0dbd232176d7824c19287a350fd6c40c0741831f341e53cf10f02",
    "train_rl": "b177c912f6fdc7c151476a9420dbf4637a393daf63aded7868689a88ca9fbb67",
    "nla": "8de580a3747d0ed453e19189544130c8de5d4373f3e2963db2859ebda2622e7a",
    "eval": "ab1f7fb647db6acc85548fde4e444d8e134f17e014e2db708c7557895e1068e4",
    "audit": "5f7760b26d9204645af56fbe6f0393df9a0ad64830ceab42fcd4e92f282e8f07",
    "report": "5d60a65bb95df6a4f840e6fee4a9cceb1df6f558d5e48334a21d3751136c9d07",
}


def test_an_old_run_directory_still_resumes(tmp_path):
    """Stamps written before the stage table keep matching: the hash of an unchanged config
    is the same, so an old run's finished stages are skipped, not refused or redone."""
    from nlakit.run.pipeline import Pipeline

    config = tiny_config(tmp_path, "/models/tiny", train_control={"enabled": True, "lr": 1e-3})
    cfg = load_config(config)
    pipe = Pipeline(cfg)
    # every stage of 0.1 hashes as it did; stages added since (off by default) are new
    assert {s: pipe.stage_hash(s) for s in LEGACY_HASHES} == LEGACY_HASHES
    assert set(STAGES) - set(LEGACY_HASHES) == {"label_ar"}
    stamps = tmp_path / "runs" / "tiny" / ".pipeline"
    stamps.mkdir(parents=True)
    for stage, digest in LEGACY_HASHES.items():  # the 0.1 stamp format
        (stamps / f"{stage}.json").write_text(json.dumps(
            {"stage": stage, "hash": digest, "config": {}, "seconds": 1.0,
             "finished": "2026-11-20T10:00:00+0000"}))
    assert set(dict(plan(config)).values()) == {"complete", "disabled"}
    summary = run_pipeline(config, progress=False)
    assert {s["stage"]: s["status"] for s in summary["stages"]} == {
        s: "disabled" if s == "label_ar" else "skipped" for s in STAGES}


def test_label_ar_trains_the_ar_on_the_avs_own_explanations(tmp_path, tiny_model_dir,
                                                           monkeypatch):
    from nlakit.labels import ParsedLabel
    from nlakit.nla.prompt import parse_explanation
    from nlakit.train.label_ar import VerbalizerLabeller

    # a 2-step tiny AV writes no closed 2-line explanations; keep whatever it wrote
    monkeypatch.setattr(VerbalizerLabeller, "parse", lambda self, raw: ParsedLabel(
        [parse_explanation(raw)[0] or "(empty)", "tiny AV output"]))
    config = tiny_config(tmp_path, tiny_model_dir, label_ar={"enabled": True,
                                                              "max_new_tokens": 12},
                         train_rl={"enabled": False}, audit={"enabled": False})
    summary = run_pipeline(config, stop="train_ar", progress=False)
    assert {s["stage"]: s["status"] for s in summary["stages"]}["label_ar"] == "done"
    run = tmp_path / "runs" / "tiny"
    from nlakit.labels import LabelSet

    labels = LabelSet(run / "labels_ar")
    assert labels.meta["labeller"]["kind"] == "nla" and labels.splits == ["ar_sft"]
    ar = yaml.safe_load((run / "sft/ar/nla_meta.yaml").read_text())
    assert Path(ar["nlakit"]["provenance"]["labels"]) == (run / "labels_ar").resolve()
    # the labels are the AV's greedy explanations of those rows' vectors
    from nlakit.extract.store import ActivationStore
    from nlakit.nla.facade import load_av

    table = labels.table("ar_sft")
    store = ActivationStore(run / "acts")
    av, _ = load_av(run / "sft/av", None, "cpu")
    ids = table.column("row_id").to_pylist()[:3]
    import numpy as np
    import torch

    from nlakit.extract.store import vectors_from_arrow

    rows = store.rows(ids, ["row_id", "vector"])
    v = torch.from_numpy(np.array(vectors_from_arrow(rows.column("vector"), store.d_model)))
    again = [e.text for e in av.generate(v, temperature=0.0, max_new_tokens=12)]
    raws = dict(zip(table.column("row_id").to_pylist(), table.column("raw").to_pylist()))
    assert [parse_explanation(raws[i])[0] for i in ids] == again
