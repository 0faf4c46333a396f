"""Supervised AV/AR training on the tiny model: learning, exact resume, 2-process equivalence."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from nlakit import NLAError
from nlakit.nla.facade import NLA
from nlakit.train.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def labels_dir(tiny, tiny_store, tmp_path_factory):
    """Context labels (grounded in the tiny model's logits) for av_sft, ar_sft and heldout."""
    from nlakit.labels import label_store
    from nlakit.labels.context import ContextLabeller

    cache = tmp_path_factory.mktemp("labelcache") / "labels.sqlite"
    labeller = ContextLabeller(tiny[0].nlakit_source["spec"], loaded=tiny)
    out = tmp_path_factory.mktemp("labels") / "labels"
    label_store(tiny_store, labeller, out, splits=["av_sft", "ar_sft", "heldout"], cache=cache,
                progress=False)
    return out


def _log(out, role):
    with open(out / f".train-{role}" / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_av_and_ar_learn_and_form_a_loadable_nla(labels_dir, tmp_path, tiny):
    # full fine-tuning (lora_rank=0) here: LoRA on a d=64 random model learns too slowly to
    # show in a dozen steps; LoRA itself is exercised by the other tests
    cfg = SFTConfig(lr=3e-3, batch_size=8, max_steps=12, eval_every=4, save_every=100,
                    lora_rank=0)
    av = train_sft("av", labels_dir, tmp_path / "nla", cfg, progress=False)
    ar = train_sft("ar", labels_dir, tmp_path / "nla", cfg, progress=False)
    av_log, ar_log = _log(tmp_path / "nla", "av"), _log(tmp_path / "nla", "ar")
    assert av_log[-1]["eval_loss"] < av_log[0]["loss"] * 0.8, "AV did not learn its labels"
    # the AR learns its training rows; its held-out fve_nrm over a dozen steps on labels of a
    # random model is noise (it moved either way when the labels' escaping changed)
    losses = [r["loss"] for r in ar_log]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), "AR did not learn its rows"
    evals = [r["eval_fve_nrm"] for r in ar_log if "eval_fve_nrm" in r]
    assert len(evals) == 3 and np.isfinite(evals).all()  # steps 4, 8 and 12 were evaluated
    assert av["eval_source"] == "labelled heldout split"
    meta = yaml.safe_load((tmp_path / "nla" / "av" / "nla_meta.yaml").read_text())
    assert meta["nlakit"]["dataset_stats"]["rawvar"] > 0
    assert meta["extraction"]["injection_scale"] > meta["nlakit"]["dataset_stats"]["mean_norm"]
    nla = NLA.load(tmp_path / "nla", target=tiny)
    out = nla.explain(torch.randn(2, 64), max_new_tokens=30)
    assert len(out) == 2
    assert ar["final"]["eval_fve_nrm"] == pytest.approx(ar_log[-1]["eval_fve_nrm"])


def test_resume_continues_exactly(labels_dir, tmp_path, monkeypatch):
    cfg = SFTConfig(lr=1e-3, batch_size=4, max_steps=6, eval_every=100, save_every=3)
    train_sft("ar", labels_dir, tmp_path / "straight", cfg, progress=False)

    from nlakit.train import sft

    calls = {"n": 0}
    real_loss = sft._Task.loss

    def dying_loss(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # inside step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real_loss(self, *a, **k)

    monkeypatch.setattr(sft._Task, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train_sft("ar", labels_dir, tmp_path / "resumed", cfg, progress=False)
    assert not (tmp_path / "resumed" / "ar").exists(), "a half-trained AR was exported"
    monkeypatch.setattr(sft._Task, "loss", real_loss)
    summary = train_sft("ar", labels_dir, tmp_path / "resumed", cfg, progress=False)
    assert summary["resumed_from"] == 3
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "ar" / "value_head.safetensors"))["weight"]
    b = load_file(str(tmp_path / "resumed" / "ar" / "value_head.safetensors"))["weight"]
    assert torch.equal(a, b)
    straight = [r["loss"] for r in _log(tmp_path / "straight", "ar")]
    resumed = [r["loss"] for r in _log(tmp_path / "resumed", "ar")]
    assert resumed[-3:] == straight[-3:]


def test_changed_config_refuses_to_resume(labels_dir, tmp_path):
    cfg = SFTConfig(batch_size=4, max_steps=4, save_every=2)
    first = train_sft("ar", labels_dir, tmp_path / "nla", cfg, progress=False)
    head = (tmp_path / "nla" / "ar" / "value_head.safetensors").read_bytes()
    again = train_sft("ar", labels_dir, tmp_path / "nla", cfg, progress=False)
    assert again == first  # a finished run is not repeated ...
    # ... nor re-exported
    assert (tmp_path / "nla" / "ar" / "value_head.safetensors").read_bytes() == head
    with pytest.raises(NLAError, match="different training configuration"):
        train_sft("ar", labels_dir, tmp_path / "nla", SFTConfig(batch_size=4, max_steps=4,
                                                                save_every=2, lr=1.0),
                  progress=False)


def test_shuffled_control_and_bad_options(labels_dir, tmp_path):
    s = train_sft("av", labels_dir, tmp_path / "ctl", SFTConfig(max_steps=2, batch_size=4,
                                                                control="shuffled"),
                  progress=False)
    assert s["control"] == "shuffled"
    meta = yaml.safe_load((tmp_path / "ctl" / "av" / "nla_meta.yaml").read_text())
    assert meta["nlakit"]["provenance"]["config"]["control"] == "shuffled"
    with pytest.raises(NLAError, match="AV only"):
        train_sft("ar", labels_dir, tmp_path / "x", SFTConfig(control="shuffled"))
    with pytest.raises(NLAError, match="label set"):
        train_sft("av", tmp_path / "missing", tmp_path / "x")


def test_two_processes_match_one(labels_dir, tmp_path):
    """torchrun with 2 gloo processes × batch 2 takes the same steps as 1 process × batch 4,
    in float32 (in bf16 the split batch rounds differently: 3e-4 relative, measured)."""
    def run(launcher, out, batch):
        cmd = [*launcher, "-m", "nlakit.run.cli", "train", "ar", "--data", str(labels_dir), "--out",
               str(out), "--max-steps", "3", "--batch-size", str(batch), "--eval-every", "100",
               "--mixed-precision", "no"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count('"processes"') == 1  # the summary, printed by the main process
        return [r["loss"] for r in _log(out, "ar")]

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = run([torchrun, "--nproc_per_node", "2", "--master_port", "29561"], tmp_path / "two", 2)
    one = run([sys.executable], tmp_path / "one", 4)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    summary = json.loads((tmp_path / "two" / ".train-ar" / "summary.json").read_text())
    assert summary["processes"] == 2


def test_kept_adapters_load_like_merged_weights(labels_dir, tmp_path, tiny):
    """--keep-adapters saves LoRA adapters over the target; loading them gives the same AV as
    the merged export of the same training."""
    cfg = dict(lr=1e-2, batch_size=4, max_steps=2)
    train_sft("av", labels_dir, tmp_path / "merged", SFTConfig(**cfg), progress=False)
    train_sft("av", labels_dir, tmp_path / "adapter", SFTConfig(**cfg, keep_adapters=True),
              progress=False)
    train_sft("ar", labels_dir, tmp_path / "merged", SFTConfig(**cfg), progress=False)
    import shutil

    shutil.copytree(tmp_path / "merged" / "ar", tmp_path / "adapter" / "ar")
    assert (tmp_path / "adapter" / "av" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "av" / "model.safetensors").exists()
    v = torch.randn(3, 64)
    merged = NLA.load(tmp_path / "merged", target=tiny).explain(v, max_new_tokens=12)
    adapter = NLA.load(tmp_path / "adapter", target=tiny).explain(v, max_new_tokens=12)
    assert [e.raw for e in merged] == [e.raw for e in adapter]


def test_a_kept_adapter_ar_reconstructs_like_its_merged_export(labels_dir, tmp_path, tiny):
    cfg = dict(lr=1e-2, batch_size=4, max_steps=2)
    train_sft("ar", labels_dir, tmp_path / "merged", SFTConfig(**cfg), progress=False)
    train_sft("ar", labels_dir, tmp_path / "adapter", SFTConfig(**cfg, keep_adapters=True),
              progress=False)
    adapter_dir = tmp_path / "adapter" / "ar"
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "value_head.safetensors").is_file()
    assert not (adapter_dir / "model.safetensors").exists()
    from nlakit.nla.facade import load_ar

    texts = ["Kind of text: prose.", "the end of a line"]
    merged, _ = load_ar(tmp_path / "merged" / "ar", torch.float32, torch.device("cpu"))
    adapter, meta = load_ar(adapter_dir, torch.float32, torch.device("cpu"))
    assert meta["nlakit"]["weights"] == "adapter"
    assert torch.allclose(merged.reconstruct(texts), adapter.reconstruct(texts), atol=1e-5)


def test_raising_max_steps_extends_a_finished_run_exactly(labels_dir, tmp_path):
    """Constant LR and a prefix-stable row order: 3 steps, then extended to 6, equal 6."""
    from safetensors.torch import load_file

    def cfg(steps):
        return SFTConfig(lr=1e-3, batch_size=4, max_steps=steps, eval_every=100, save_every=3)

    train_sft("ar", labels_dir, tmp_path / "straight", cfg(6), progress=False)
    train_sft("ar", labels_dir, tmp_path / "extended", cfg(3), progress=False)
    summary = train_sft("ar", labels_dir, tmp_path / "extended", cfg(6), progress=False)
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
    head = "ar/value_head.safetensors"
    assert torch.equal(load_file(str(tmp_path / "straight" / head))["weight"],
                       load_file(str(tmp_path / "extended" / head))["weight"])
    with pytest.raises(NLAError, match="past this run's 2 steps"):
        train_sft("ar", labels_dir, tmp_path / "extended", cfg(2), progress=False)


def test_max_steps_runs_past_the_epochs(labels_dir, tmp_path):
    """max_steps decides the length even beyond the epochs (the rows cycle), and a finished run
    that stopped at its epochs' end under an older reading of max_steps is not taken as done."""
    one = train_sft("ar", labels_dir, tmp_path / "one", SFTConfig(batch_size=4, epochs=1.0),
                    progress=False)
    longer = one["steps"] + 3
    summary = train_sft("ar", labels_dir, tmp_path / "one",
                        SFTConfig(batch_size=4, epochs=1.0, max_steps=longer), progress=False)
    assert (summary["resumed_from"], summary["steps"]) == (one["steps"], longer)
    summary_path = tmp_path / "one" / ".train-ar" / "summary.json"
    old = {**json.loads(summary_path.read_text()), "steps": one["steps"]}
    summary_path.write_text(json.dumps(old))  # as the capped run left it
    again = train_sft("ar", labels_dir, tmp_path / "one",
                      SFTConfig(batch_size=4, epochs=1.0, max_steps=longer), progress=False)
    assert again["steps"] == longer


def test_a_checkpoint_with_the_older_full_config_hash_can_be_extended(labels_dir, tmp_path,
                                                                       monkeypatch):
    """Checkpoints written before the trajectory hash carry the hash of the whole config."""
    from nlakit.train import sft

    train_sft("ar", labels_dir, tmp_path / "old", SFTConfig(batch_size=4, max_steps=2),
              progress=False)
    state_path = tmp_path / "old" / ".train-ar" / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state["config_hash"] = json.loads(
        (tmp_path / "old" / ".train-ar" / "summary.json").read_text())["config_hash"]
    torch.save(state, state_path)

    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed before its first save rewrote config.json
        m.setattr(sft._Task, "loss", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train_sft("ar", labels_dir, tmp_path / "old", SFTConfig(batch_size=4, max_steps=5),
                      progress=False)
    summary = train_sft("ar", labels_dir, tmp_path / "old", SFTConfig(batch_size=4, max_steps=4),
                        progress=False)
    assert summary["resumed_from"] == 2
    with pytest.raises(NLAError, match="different training configuration"):  # lr changes steps
        train_sft("ar", labels_dir, tmp_path / "old",
                  SFTConfig(batch_size=4, max_steps=6, lr=1.0), progress=False)


def test_decoding_settings_go_into_the_av_checkpoint(labels_dir, tmp_path):
    from nlakit.nla.checkpoint import read_meta
    from nlakit.nla.facade import load_av

    cfg = SFTConfig(batch_size=4, max_steps=2, no_repeat_ngram_size=3)
    first = train_sft("av", labels_dir, tmp_path / "nla", cfg, progress=False)
    assert read_meta(tmp_path / "nla" / "av", "av")["decoding"] == {"no_repeat_ngram_size": 3}
    av, _ = load_av(tmp_path / "nla" / "av", torch.float32, torch.device("cpu"))
    assert av.decoding == {"no_repeat_ngram_size": 3, "repetition_penalty": 1.0}
    # a new decoding setting re-exports the finished run without training again
    again = train_sft("av", labels_dir, tmp_path / "nla", SFTConfig(
        batch_size=4, max_steps=2, repetition_penalty=1.3), progress=False)
    assert again["resumed_from"] == 2
    assert read_meta(tmp_path / "nla" / "av", "av")["decoding"] == {"repetition_penalty": 1.3}
    assert first["config_hash"] != again["config_hash"]
    with pytest.raises(NLAError, match="no_repeat_ngram_size"):
        SFTConfig(no_repeat_ngram_size=-1)
    meta_path = tmp_path / "nla" / "av" / "nla_meta.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    meta["decoding"] = {"top_k": 5}
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(NLAError, match="unknown setting under `decoding:`"):
        load_av(tmp_path / "nla" / "av", torch.float32, torch.device("cpu"))


def test_extra_splits_add_their_rows_and_never_the_scored_ones(labels_dir, tmp_path):
    from nlakit.train.data import load_labelled

    n_ar = len(load_labelled(labels_dir, "ar_sft")[1])
    n_av = len(load_labelled(labels_dir, "av_sft")[1])
    own = train_sft("ar", labels_dir, tmp_path / "own", SFTConfig(batch_size=4, max_steps=1),
                    progress=False)
    both = train_sft("ar", labels_dir, tmp_path / "both",
                     SFTConfig(batch_size=4, max_steps=1, extra_splits="av_sft"), progress=False)
    assert (own["train_rows"], both["train_rows"]) == (n_ar, n_ar + n_av)
    assert SFTConfig(extra_splits=["rl"]).extra_splits == ("rl",)
    for scored in ("val", "heldout"):
        with pytest.raises(NLAError, match="scored on"):
            SFTConfig(extra_splits=f"rl,{scored}")
    with pytest.raises(NLAError, match="trains on already"):
        train_sft("ar", labels_dir, tmp_path / "twice", SFTConfig(batch_size=4, max_steps=1,
                                                                  extra_splits="ar_sft"),
                  progress=False)
    with pytest.raises(NLAError, match="split 'rl' was not labelled"):
        train_sft("ar", labels_dir, tmp_path / "rl", SFTConfig(batch_size=4, max_steps=1,
                                                               extra_splits="rl"), progress=False)


def test_an_ar_continued_from_another_starts_from_it_and_stacks_its_adapters(labels_dir,
                                                                            tmp_path):
    """init_from: the run starts from the given AR (not the target), its export with
    keep_adapters stacks both adapters exactly, and its provenance chains the two trainings,
    whose steps the fitted quote baseline's budget then adds up."""
    from types import SimpleNamespace

    from nlakit.eval.evaluate import ar_budget, ar_training_splits
    from nlakit.nla.facade import load_ar

    def load(d):
        return load_ar(d, torch.float32, torch.device("cpu"))

    texts = ["Kind of text: prose.", "the end of a line", "x = 1"]
    kept = dict(batch_size=4, keep_adapters=True, lora_rank=8)
    train_sft("ar", labels_dir, tmp_path / "start", SFTConfig(
        lr=1e-2, max_steps=3, extra_splits=("av_sft",), **kept), progress=False)
    start = load(tmp_path / "start" / "ar")[0].reconstruct(texts)
    # a negligible learning rate: the continued AR is still the start, far from a fresh one
    train_sft("ar", labels_dir, tmp_path / "same", SFTConfig(
        lr=1e-12, max_steps=1, init_from=str(tmp_path / "start"), **kept), progress=False)
    assert torch.allclose(load(tmp_path / "same" / "ar")[0].reconstruct(texts), start, atol=1e-4)
    train_sft("ar", labels_dir, tmp_path / "fresh", SFTConfig(lr=1e-12, max_steps=1, **kept),
              progress=False)
    fresh = load(tmp_path / "fresh" / "ar")[0].reconstruct(texts)
    assert not torch.allclose(fresh, start, atol=1e-2)

    # trained for real: the stacked adapters reconstruct like the merged export
    go = dict(lr=1e-2, max_steps=2, init_from=str(tmp_path / "start" / "ar"), batch_size=4,
              lora_rank=8)
    train_sft("ar", labels_dir, tmp_path / "stacked", SFTConfig(**go, keep_adapters=True),
              progress=False)
    train_sft("ar", labels_dir, tmp_path / "merged", SFTConfig(**go), progress=False)
    stacked, meta = load(tmp_path / "stacked" / "ar")
    merged = load(tmp_path / "merged" / "ar")[0]
    assert json.loads((tmp_path / "stacked" / "ar" / "adapter_config.json").read_text())["r"] == 16
    assert torch.allclose(stacked.reconstruct(texts), merged.reconstruct(texts), atol=1e-5)
    assert not torch.allclose(stacked.reconstruct(texts), start, atol=1e-3)

    prov = meta["nlakit"]["provenance"]
    assert prov["init"]["from"] == str((tmp_path / "start" / "ar").resolve())
    assert prov["init"]["provenance"]["summary"]["steps"] == 3
    nla = SimpleNamespace(ar_meta=meta)
    assert ar_budget(nla).steps == 3 + 2 and ar_budget(nla).lr == pytest.approx(1e-2)
    assert ar_training_splits(nla) == ("ar_sft", "av_sft")  # the start's extra split too


def test_an_av_continued_from_another_keeps_its_marker_scale_and_decoding(labels_dir, tmp_path,
                                                                         tiny):
    """init_from on the AV: it starts from the given AV (same explanations after a negligible
    step), keeps its injection settings and stored decoding, and stacks its adapters."""
    kept = dict(batch_size=4, keep_adapters=True, lora_rank=8)
    train_sft("av", labels_dir, tmp_path / "start", SFTConfig(
        lr=1e-2, max_steps=2, injection_scale=7.0, no_repeat_ngram_size=3, **kept),
        progress=False)
    train_sft("ar", labels_dir, tmp_path / "start", SFTConfig(lr=1e-2, max_steps=1, **kept),
              progress=False)
    for name, lr, keep in (("same", 1e-12, True), ("moved", 1e-2, True),
                           ("moved_merged", 1e-2, False)):
        train_sft("av", labels_dir, tmp_path / name, SFTConfig(
            lr=lr, max_steps=2, init_from=str(tmp_path / "start"),
            **{**kept, "keep_adapters": keep}), progress=False)
        (tmp_path / name / "ar").symlink_to(tmp_path / "start" / "ar")
    v = torch.randn(3, 64)

    def explain(d):
        return [e.raw for e in NLA.load(tmp_path / d, target=tiny).explain(v, max_new_tokens=12)]

    assert explain("same") == explain("start")
    assert explain("moved") == explain("moved_merged")  # the stacked adapters are exact
    meta = yaml.safe_load((tmp_path / "moved" / "av" / "nla_meta.yaml").read_text())
    start = yaml.safe_load((tmp_path / "start" / "av" / "nla_meta.yaml").read_text())
    assert meta["extraction"]["injection_scale"] == 7.0
    assert meta["tokens"] == start["tokens"] and meta["decoding"] == {"no_repeat_ngram_size": 3}
    assert json.loads((tmp_path / "moved" / "av" / "adapter_config.json").read_text())["r"] == 16
    with pytest.raises(NLAError, match="injection_scale"):
        train_sft("av", labels_dir, tmp_path / "x", SFTConfig(
            max_steps=1, injection_scale=9.0, init_from=str(tmp_path / "start")), progress=False)


def test_init_from_refuses_what_it_cannot_continue(labels_dir, tmp_path):
    train_sft("ar", labels_dir, tmp_path / "merged", SFTConfig(lr=1e-2, batch_size=4,
                                                               max_steps=1), progress=False)
    start = str(tmp_path / "merged")
    with pytest.raises(NLAError, match="neither a shipped NLA"):
        train_sft("ar", labels_dir, tmp_path / "x",
                  SFTConfig(max_steps=1, init_from=str(tmp_path / "nowhere")))
    with pytest.raises(NLAError, match="no adapter to stack onto"):
        train_sft("ar", labels_dir, tmp_path / "x",
                  SFTConfig(max_steps=1, init_from=start, keep_adapters=True), progress=False)
    with pytest.raises(NLAError, match="set --ar-template"):
        train_sft("ar", labels_dir, tmp_path / "x", SFTConfig(
            max_steps=1, init_from=start, ar_template="{explanation}"), progress=False)


def test_mixed_precision_modes_resolve_and_train(labels_dir, tmp_path):
    """bf16 compute trains from the same start on the same rows to nearly the same losses
    (not the very same: the path really changed), under another run hash."""
    from nlakit.train.common import native_bf16, resolve_mixed_precision

    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("bf16") == "bf16"
    assert resolve_mixed_precision("auto") == ("bf16" if native_bf16() else "no")
    with pytest.raises(NLAError, match="mixed_precision must be one of auto, bf16, no"):
        SFTConfig(mixed_precision="fp16")
    runs = {}
    for mode in ("no", "bf16"):
        cfg = SFTConfig(batch_size=4, max_steps=3, save_every=100, mixed_precision=mode)
        runs[mode] = train_sft("av", labels_dir, tmp_path / mode, cfg, progress=False)
        assert runs[mode]["mixed_precision"] == mode
    assert runs["no"]["config_hash"] != runs["bf16"]["config_hash"]
    f32, bf = _log(tmp_path / "no", "av"), _log(tmp_path / "bf16", "av")
    assert f32[0]["loss"] != bf[0]["loss"]
    np.testing.assert_allclose([r["loss"] for r in bf], [r["loss"] for r in f32], rtol=0.02)
