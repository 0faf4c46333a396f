"""The training infrastructure shared by SFT and RL: checkpoint round trip (tensors, optimizer,
RNG, step), the non-finite guard, the metrics log, LoRA wrapping, config validation."""

import copy
import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch

from nlakit import NLAError
from nlakit.errors import ConfigMismatchError
from nlakit.fileio import stable_hash
from nlakit.train.common import (
    Checkpoint,
    MetricsLog,
    all_finite,
    guarded_step,
    make_accelerator,
    make_trainable,
    trainable_params,
)
from nlakit.train.rl import RLConfig
from nlakit.train.sft import SFTConfig


def _model(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    m[0].requires_grad_(False)  # frozen tensors are not checkpointed
    return m


def _train_once(model, opt):
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def _draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in "abc"])


def test_checkpoint_round_trip_restores_tensors_optimizer_rng_and_step(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(trainable_params(model), lr=0.1)
    _train_once(model, opt)
    ckpt = Checkpoint(tmp_path, "hash-a")
    assert not ckpt.exists() and ckpt.load({"params": model}, {"optimizer": opt}) == 0
    ckpt.save(7, {"params": model}, {"optimizer": opt}, data_position=28)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    after_save = _draws()
    state = torch.load(ckpt.path, weights_only=False)
    # the on-disk keys the code before the shared module wrote (old checkpoints still resume)
    assert set(state) == {"step", "data_position", "config_hash", "params", "optimizer", "rng"}
    assert set(state["params"]) == {"1.weight", "1.bias"}

    _train_once(model, opt)  # move on: weights, optimizer moments and RNG all change
    fresh = _model(seed=1)
    fresh_opt = torch.optim.AdamW(trainable_params(fresh), lr=0.1)
    assert Checkpoint(tmp_path, "hash-a").load({"params": fresh}, {"optimizer": fresh_opt}) == 7
    assert torch.equal(fresh[1].weight, saved["1.weight"])
    assert not torch.equal(fresh[0].weight, saved["0.weight"])  # frozen: not in the checkpoint
    assert _draws() == after_save  # the RNG streams continue where the checkpoint left them
    moments = fresh_opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, state["optimizer"]["state"][0]["exp_avg"])
    assert fresh_opt.state_dict()["state"][0]["step"] == 1

    ckpt.save(8, {"params": model}, {"optimizer": opt})  # replaces atomically, no leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert torch.load(ckpt.path, weights_only=False)["step"] == 8
    with pytest.raises(ConfigMismatchError, match="different RL configuration.*--overwrite"):
        Checkpoint(tmp_path, "hash-b", what="RL").load({"params": fresh}, {})


def test_guard_skips_a_non_finite_step_on_every_model():
    acc = make_accelerator()
    model = torch.nn.Linear(3, 1)
    params = trainable_params(model)
    opt = torch.optim.SGD(params, lr=0.5)
    before = [p.detach().clone() for p in params]
    loss = model(torch.tensor([[1.0, float("nan"), 0.0]])).sum()
    loss.backward()
    assert not all_finite(acc, params)
    norm = guarded_step(acc, False, opt, params, 1.0)
    assert math.isnan(norm)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)  # the bad gradients do not leak into the next
    # finite gradients but a non-finite loss also count as a bad step
    good = model(torch.ones(1, 3)).sum()
    good.backward()
    assert all_finite(acc, params) and not all_finite(acc, params, (torch.tensor(float("inf")),))
    norm = guarded_step(acc, True, opt, params, 1.0)
    assert math.isfinite(norm) and norm > 0
    assert not torch.equal(params[0], before[0])


def test_metrics_log_appends_cuts_back_to_a_resumed_step_and_skips_a_torn_line(tmp_path):
    acc = make_accelerator(tmp_path / "tb")
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(acc, path, "rl")
    log.start()
    for step in range(4):
        log.write({"step": step, "loss": 1.0 / (step + 1), "skipped": False, "text": "é"})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 4, "loss"')  # a process killed mid-write
    log.close()
    assert [r["step"] for r in log.records()] == [0, 1, 2, 3]
    resumed = MetricsLog(acc, path, "rl")
    resumed.start(keep_until=2)
    assert [r["step"] for r in resumed.records()] == [0, 1, 2]
    resumed.write({"step": 3, "loss": 0.5})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3] and "é" in lines[0]


def test_make_trainable_lora_or_full(tiny):
    model = copy.deepcopy(tiny[0])
    full = make_trainable(copy.deepcopy(model), 0)
    assert all(p.requires_grad for p in full.parameters())
    lora = make_trainable(model, 4)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert lora.peft_config["default"].lora_alpha == 8  # default 2 * rank


def test_configs_have_help_validate_and_keep_their_defaults():
    for cls in (SFTConfig, RLConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    # the defaults are part of every stamp and checkpoint hash: these are the values of the
    # code before the configs moved (a changed default would make old runs refuse to resume);
    # SFT hashes its config without decoding settings left at their defaults (`_identity`)
    from nlakit.train.sft import _identity

    assert stable_hash(_identity(SFTConfig())) == \
        "6f0bce369f51f017c67b048a8e71bd29f052703eb352ed588c1cbbd7fc328e5f"
    from nlakit.train.rl import trajectory

    # RL checkpoints written before runs could be extended hashed max_steps too; they resume
    # through that form (rebuilt from their recorded config), so it must not change either
    assert stable_hash(trajectory(RLConfig(), extensible=False)) == \
        "eda0667928951dd81a6763f684dec5a9d4c8629880389af6def0ffee500b7dc1"
    assert stable_hash(trajectory(RLConfig())) == \
        "be8792d6cbe723eedd146b467d94603471b45fce7ed04bfd7e968b8ca6051e16"
    with pytest.raises(NLAError, match=r"SFTConfig\.lr must be > 0.*--lr"):
        SFTConfig(lr=0)
    with pytest.raises(NLAError, match=r"SFTConfig\.lora_rank must be >= 0.*--lora-rank"):
        SFTConfig(lora_rank=-1)
    with pytest.raises(NLAError, match=r"SFTConfig\.lr must be a number, got '2e-4'"):
        SFTConfig(lr="2e-4")  # what YAML 1.1 makes of 2e-4
    with pytest.raises(NLAError, match="unknown control"):
        SFTConfig(control="permuted")
    with pytest.raises(NLAError, match="reward must be one of negmse"):
        RLConfig(reward="cosine")
    with pytest.raises(NLAError, match="KL estimator"):
        RLConfig(kl_estimator="k2")
    with pytest.raises(NLAError, match=r"RLConfig\.group_size must be >= 2.*--group-size"):
        RLConfig(group_size=1)
    with pytest.raises(NLAError, match=r"RLConfig\.top_p must be > 0 and <= 1"):
        RLConfig(top_p=1.5)
    with pytest.raises(NLAError, match=r"RLConfig\.ar_lr must be > 0"):
        RLConfig(ar_lr=-1e-5)
    with pytest.raises(NLAError, match="sampler 'hf' is no longer available"):
        RLConfig(sampler="hf")
    with pytest.raises(NLAError, match="contrastive reward needs --batch-size >= 2"):
        RLConfig(reward="contrastive", batch_size=1)
    assert RLConfig(failure_reward=None, group_size=2, temperature=0.0).group_size == 2


def test_metrics_reach_tensorboard_when_it_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = make_accelerator(tmp_path)
    log = MetricsLog(acc, tmp_path / "metrics.jsonl", "rl")
    log.start()
    log.write({"step": 0, "heldout_fve_nrm": 0.25, "examples": [{"text": "x"}]})
    log.write({"step": 1, "loss": 0.5, "skipped": False, "example": "text"})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["rl/heldout_fve_nrm", "rl/loss"]
    assert [(e.step, e.value) for e in events.Scalars("rl/loss")] == [(1, 0.5)]
