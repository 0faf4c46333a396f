"""GRPO RL on the tiny model: reward functions, log-probs, the loop, exact resume, 2 processes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlakit import NLAError
from nlakit.fileio import stable_hash
from nlakit.model.batching import right_pad
from nlakit.nla.facade import NLA
from nlakit.nla.sampling import response_logprobs, token_prefixes
from nlakit.train import rewards as R
from nlakit.train.rl import RLConfig, train_rl, trajectory

# ---- pure reward functions -----------------------------------------------------------------


def test_negmse_and_neglog_follow_the_cosine():
    g = torch.randn(5, 16)
    p = g + 0.3 * torch.randn(5, 16)
    cos = torch.nn.functional.cosine_similarity(p, g)
    assert torch.allclose(R.negmse(p, g), -2 * (1 - cos), atol=1e-5)
    assert torch.allclose(R.neglog(p, g, eps=0.0), -torch.log(2 * (1 - cos)), atol=1e-4)
    assert float(R.negmse(g, g).max()) == pytest.approx(0.0, abs=1e-6)


def test_contrastive_pays_for_own_activation_over_others():
    acts = torch.randn(3, 32)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    own = acts[owner] + 0.05 * torch.randn(6, 32)
    wrong = acts[(owner + 1) % 3]
    r_own = R.contrastive(own, acts, owner)
    r_wrong = R.contrastive(wrong, acts, owner)
    assert (r_own <= 0).all() and (r_own > r_wrong).all()
    # adding the same direction to every activation and prediction changes nothing much: the
    # reward is relative to the batch; with 3 candidates chance level is log(1/3)
    mean_pred = acts.mean(0, keepdim=True).expand(6, -1)
    assert float(R.contrastive(mean_pred, acts, owner).mean()) < float(r_own.mean())
    with pytest.raises(NLAError, match="at least 2"):
        R.contrastive(own[:2], acts[:1], torch.zeros(2))
    via = R.compute_rewards("contrastive", own, acts, 2)
    assert torch.allclose(via, r_own)


def test_failures_length_penalty_and_group_advantages():
    r = torch.tensor([-0.5, -1.0, -0.2, -0.3])
    failed = torch.tensor([False, True, False, False])
    assert R.apply_failures(r, failed).tolist() == pytest.approx([-0.5, -2.0, -0.2, -0.3])
    assert torch.equal(R.apply_failures(r, failed, None), r)
    pen = R.length_penalty(r, torch.tensor([150, 75, 0, 30]), 150, 0.1)
    assert pen.tolist() == pytest.approx([-0.6, -1.05, -0.2, -0.32])
    adv = R.group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    assert adv[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # equal rewards: no signal, no NaN
    with pytest.raises(NLAError, match="group size"):
        R.group_advantages(torch.zeros(4), 1)
    with pytest.raises(NLAError, match="groups of 3"):
        R.group_advantages(torch.zeros(4), 3)


def test_clipped_policy_loss_clips_the_right_side():
    mask = torch.ones(1, 1)
    old = torch.zeros(1, 1)
    for adv, ratio, grad_zero in ((1.0, 1.5, True), (1.0, 1.1, False), (-1.0, 1.5, False),
                                  (-1.0, 0.5, True), (1.0, 0.5, False)):
        logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
        loss, info = R.clipped_policy_loss(logp, old, torch.tensor([adv]), mask, 0.2)
        loss.backward()
        clipped_ratio = min(max(ratio, 0.8), 1.2)
        expected = -min(ratio * adv, clipped_ratio * adv)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
        assert (float(logp.grad) == 0.0) == grad_zero, (adv, ratio)
        assert info["clip_fraction"] == (1.0 if grad_zero else 0.0)
    # padding tokens never count: a masked token with a huge ratio changes nothing
    logp = torch.tensor([[0.0, 5.0]])
    loss, _ = R.clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]),
                                    torch.tensor([[1, 0]]), 0.2)
    assert float(loss) == pytest.approx(-1.0)


def test_kl_estimators_and_truncation_lengths():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    assert R.kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.0, -1.0, 1.0])
    k3 = R.kl_per_token(logp, ref, "k3")
    assert float(k3[0]) == 0.0 and (k3 >= 0).all() and float(k3[1]) > 0
    with pytest.raises(NLAError, match="KL estimator"):
        R.kl_per_token(logp, ref, "k2")
    lengths = R.truncate_lengths(5, 4, 30, 3, torch.Generator().manual_seed(0))
    groups = lengths.view(5, 4)
    assert (groups == groups[:, :1]).all() and lengths.min() >= 3 and lengths.max() <= 30
    assert len(set(groups[:, 0].tolist())) > 1


def test_sample_next_greedy_temperature_and_top_p():
    from nlakit.nla.sampling import sample_next

    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(2000, -1)
    assert (sample_next(logits, 0.0, 1.0, gen) == 0).all()
    full = torch.bincount(sample_next(logits, 1.0, 1.0, gen), minlength=3) / 2000
    assert full.tolist() == pytest.approx([0.6, 0.3, 0.1], abs=0.04)
    nucleus = sample_next(logits, 1.0, 0.8, gen)  # keeps {0, 1}: 0.6 < 0.8 <= 0.9
    assert set(nucleus.tolist()) == {0, 1}
    assert float((nucleus == 0).float().mean()) == pytest.approx(2 / 3, abs=0.05)
    assert set(sample_next(logits, 1.0, 0.5, gen).tolist()) == {0}


# ---- the loop on the tiny model -----------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # two contended cores: one intra-op thread is several times faster than oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sft_nla(tiny, tiny_store, tmp_path_factory):
    """An untrained tiny NLA standing in for an SFT checkpoint."""
    path = tmp_path_factory.mktemp("sft") / "nla"
    NLA.from_target(tiny, 2, injection_scale=10.0,
                    dataset_stats=tiny_store.stats("all")).save(path)
    return path


def _cfg(**kw):
    base = {"max_steps": 3, "batch_size": 2, "group_size": 3, "max_new_tokens": 10,
            "eval_every": 2, "eval_rows": 4, "save_every": 2, "lora_rank": 4,
            "ar_lora_rank": 4, "av_lr": 1e-3, "ar_lr": 1e-3,
            "failure_reward": None}  # a random model fails every sample otherwise
    base.update(kw)
    return RLConfig(**base)


def _rows(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _updates(out):
    """The logged RL steps, without the step-0 held-out evaluation of the warm start."""
    return [r for r in _rows(out) if r["step"] > 0]


def _stable(row):
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def test_response_logprobs_ignore_padding(sft_nla, tiny):
    nla = NLA.load(sft_nla, target=tiny)
    av = nla.av
    vecs = torch.randn(2, 64)
    exps = av.generate(vecs, n=1, temperature=1.0, max_new_tokens=8, seed=3)
    short = exps[0].token_ids[:3]
    ids, mask = right_pad([short, exps[1].token_ids], av.pad_id)
    both = response_logprobs(av.model, av, vecs, ids, mask)
    alone = response_logprobs(av.model, av, vecs[:1], ids[:1, :3], mask[:1, :3])
    assert torch.allclose(both[0, :3], alone[0], atol=1e-5)
    assert (both[0, 3:] == 0).all() and (both[1] < 0).all()
    # the injected vector matters: another vector gives other log-probs for the same tokens
    other = response_logprobs(av.model, av, -vecs, ids, mask)
    assert not torch.allclose(other[1], both[1], atol=1e-4)
    assert token_prefixes(av.tokenizer, ["one two three four five"], torch.tensor([2]))[0] \
        == av.tokenizer.decode(av.tokenizer("one two three four five")["input_ids"][:2])


def test_rl_logs_updates_and_exports_a_loadable_nla(sft_nla, tiny_store, tiny, tmp_path):
    out = tmp_path / "rl"
    summary = train_rl(sft_nla, tiny_store.path, out, _cfg(), progress=False)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    start, rows = rows[0], rows[1:]
    # step 0 is the warm start's held-out score, before any update
    assert math.isfinite(start["heldout_fve_nrm"]) and "reward_mean" not in start
    assert len(start["examples"]) == 3
    for r in rows:
        for key in ("reward_mean", "reward_std", "fve_nrm", "kl", "response_len",
                    "failure_rate", "truncation_rate", "policy_loss", "ar_loss",
                    "av_grad_norm", "ar_grad_norm", "time_rollout_s", "time_scoring_s",
                    "time_av_update_s", "time_ar_update_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["samples"] == 6 and not r["skipped"]
        assert 1 <= r["response_len"] <= 10
    assert rows[0]["kl"] == 0.0  # a fresh LoRA is exactly the SFT policy
    assert rows[2]["kl"] != 0.0  # ... and moves away from it
    assert "heldout_fve_nrm" in rows[1] and "heldout_fve_nrm" in rows[2]
    assert "heldout_fve_nrm" not in rows[0]
    assert len(rows[1]["examples"]) == 3
    assert summary["final"]["step"] == 3 and summary["replicas_in_sync"]
    before, after = NLA.load(sft_nla, target=tiny), NLA.load(out, target=tiny)
    assert not torch.equal(before.ar.head.weight, after.ar.head.weight)
    w0 = before.av.model.model.layers[0].self_attn.q_proj.weight
    w1 = after.av.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w0, w1), "the RL adapters were not merged into the exported AV"
    assert after.av_meta["nlakit"]["provenance"]["rl"]["summary"]["steps"] == 3
    assert len(after.explain(torch.randn(1, 64), max_new_tokens=5)) == 1
    official = after.save(tmp_path / "official", layout="official")
    assert NLA.load(av=official / "av", ar=official / "ar").d_model == 64
    # RL continuing this RL'd NLA keeps the earlier run on record (quote_N_fit counts both)
    train_rl(out, tiny_store.path, tmp_path / "rl2", _cfg(max_steps=1, eval_rows=0),
             progress=False)
    rl2 = NLA.load(tmp_path / "rl2", target=tiny).ar_meta["nlakit"]["provenance"]["rl"]
    assert rl2["summary"]["steps"] == 1 and rl2["previous"]["summary"]["steps"] == 3


def test_kill_and_resume_reaches_the_same_state(sft_nla, tiny_store, tmp_path, monkeypatch):
    cfg = _cfg(max_steps=4, eval_every=3, reward="neglog", truncate_explanations=True)
    train_rl(sft_nla, tiny_store.path, tmp_path / "straight", cfg, progress=False)

    from nlakit.train import rl

    real = R.group_advantages
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # inside step 4, after the step-2 checkpoint and a logged step 3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rl.R, "group_advantages", dying)
    with pytest.raises(KeyboardInterrupt):
        train_rl(sft_nla, tiny_store.path, tmp_path / "resumed", cfg, progress=False)
    assert not (tmp_path / "resumed" / "ar").exists(), "a half-trained NLA was exported"
    assert [r["step"] for r in _rows(tmp_path / "resumed")] == [0, 1, 2, 3]
    monkeypatch.setattr(rl.R, "group_advantages", real)
    with pytest.raises(NLAError, match="--resume"):
        train_rl(sft_nla, tiny_store.path, tmp_path / "resumed", cfg, progress=False)
    summary = train_rl(sft_nla, tiny_store.path, tmp_path / "resumed", cfg, resume=True,
                       progress=False)
    assert summary["resumed_from"] == 2
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]  # the dead run's step 3 was replaced
    assert [_stable(r) for r in resumed] == [_stable(r) for r in straight]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "ar" / "value_head.safetensors"))["weight"]
    b = load_file(str(tmp_path / "resumed" / "ar" / "value_head.safetensors"))["weight"]
    assert torch.equal(a, b)
    with pytest.raises(NLAError, match="different RL configuration"):
        train_rl(sft_nla, tiny_store.path, tmp_path / "resumed", _cfg(max_steps=4, av_lr=2e-3),
                 resume=True, progress=False)


def test_a_finished_run_extended_by_max_steps_matches_a_longer_straight_run(
        sft_nla, tiny_store, tmp_path):
    """Raising max_steps continues a finished run: the same steps as one run of that length.
    float32: the checkpoints of the versions before runs could be extended were."""
    cfg = _cfg(max_steps=5, eval_rows=0, mixed_precision="no")
    train_rl(sft_nla, tiny_store.path, tmp_path / "straight", cfg, progress=False)
    short = _cfg(max_steps=3, eval_rows=0, mixed_precision="no")
    train_rl(sft_nla, tiny_store.path, tmp_path / "extended", short, progress=False)
    # as written before runs could be extended: max_steps in the checkpoint's hash
    state_path = tmp_path / "extended" / ".train-rl" / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state["config_hash"] = stable_hash("rl", trajectory(short, extensible=False),
                                       str(Path(sft_nla).resolve()),
                                       str(Path(tiny_store.path).resolve()), 1)
    torch.save(state, state_path)
    summary = train_rl(sft_nla, tiny_store.path, tmp_path / "extended", cfg, resume=True,
                       progress=False)
    assert summary["resumed_from"] == 3
    straight, extended = _rows(tmp_path / "straight"), _rows(tmp_path / "extended")
    assert [r["step"] for r in extended] == [1, 2, 3, 4, 5]
    assert [_stable(r) for r in extended] == [_stable(r) for r in straight]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "ar" / "value_head.safetensors"))["weight"]
    b = load_file(str(tmp_path / "extended" / "ar" / "value_head.safetensors"))["weight"]
    assert torch.equal(a, b)
    with pytest.raises(NLAError, match="beyond --max-steps 4"):
        train_rl(sft_nla, tiny_store.path, tmp_path / "extended",
                 _cfg(max_steps=4, eval_rows=0, mixed_precision="no"), resume=True,
                 progress=False)


def test_non_finite_step_is_skipped(sft_nla, tiny_store, tmp_path, monkeypatch, tiny):
    from nlakit.train import rl

    monkeypatch.setattr(rl.R, "group_advantages",
                        lambda r, g, eps=1e-6: torch.full_like(r, float("nan")))
    train_rl(sft_nla, tiny_store.path, tmp_path / "nan", _cfg(max_steps=1, eval_every=100),
             progress=False)
    row = _updates(tmp_path / "nan")[0]
    assert row["skipped"] and math.isnan(row["av_grad_norm"])
    before, after = NLA.load(sft_nla, target=tiny), NLA.load(tmp_path / "nan", target=tiny)
    assert torch.equal(before.ar.head.weight, after.ar.head.weight)
    assert all(torch.equal(p, q) for p, q in zip(before.av.model.parameters(),
                                                  after.av.model.parameters()))


def test_contrastive_k3_full_and_failure_penalty(sft_nla, tiny_store, tmp_path):
    cfg = _cfg(max_steps=1, reward="contrastive", kl_estimator="k3", lora_rank=0,
               failure_reward=-2.0, length_penalty=0.5, eval_every=100)
    train_rl(sft_nla, tiny_store.path, tmp_path / "c", cfg, progress=False)
    row = _updates(tmp_path / "c")[0]
    # a random model never closes its tag within 10 tokens: every sample fails and scores -2
    assert row["failure_rate"] == 1.0 and row["reward_mean"] == pytest.approx(-2.0)
    assert row["raw_reward_mean"] <= 0  # InfoNCE log-probabilities
    assert row["kl"] == 0.0  # the full-copy reference equals the policy at step 1
    with pytest.raises(NLAError, match="contrastive"):
        train_rl(sft_nla, tiny_store.path, tmp_path / "x", _cfg(reward="contrastive",
                                                                 batch_size=1))
    with pytest.raises(NLAError, match="must differ"):
        train_rl(sft_nla, tiny_store.path, sft_nla, _cfg())


def test_row_truths_score_true_claims_above_false_ones(tiny_store, tiny):
    from nlakit.train.truth import RowTruths

    truths = RowTruths(tiny_store)
    row = truths.truths([0])[0]
    current, top = row.tokens[-1], row.top[0][0]
    wrong = next(t for t in (" zebra", " qqq") if t != current)
    texts = [f"Current token: {current!r}. The model expects next: {top!r}.", "",
             f"Current token: {wrong!r}."]
    scores = truths.scores([0], texts, group_size=3)
    assert scores.tolist() == pytest.approx([3 / 6, 0.0, -1 / 6])
    assert truths.truths([0])[0] is row  # the target ran once for the row


def test_truth_reward_is_added_to_the_reconstruction_reward(sft_nla, tiny_store, tmp_path,
                                                            monkeypatch):
    from nlakit.train import truth

    # the random tiny AV states no claims: make every sample claim the row's real current
    # token, so the truth score is known (+1/6) and the reward must carry it
    def scores(self, rows, texts, group_size):
        return torch.full((len(rows) * group_size,), 1 / 6)

    monkeypatch.setattr(truth.RowTruths, "scores", scores)
    train_rl(sft_nla, tiny_store.path, tmp_path / "t", _cfg(max_steps=1, truth_reward=0.6,
                                                             eval_rows=0), progress=False)
    row = _updates(tmp_path / "t")[0]
    assert row["truth_score"] == pytest.approx(1 / 6)
    assert row["reward_mean"] == pytest.approx(row["raw_reward_mean"] + 0.1, abs=1e-5)
    assert "truth_reward" not in trajectory(RLConfig())  # old checkpoints keep their hash
    assert trajectory(RLConfig(truth_reward=0.6))["truth_reward"] == 0.6
    with pytest.raises(NLAError, match="truth_reward"):
        RLConfig(truth_reward=-1.0)


def test_two_processes_agree_and_export(sft_nla, tiny_store, tmp_path, tiny):
    """torchrun, 2 gloo processes: each rolls out its own activations, DDP keeps replicas equal."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "two"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29571", "-m", "nlakit.run.cli",
           "train", "rl", "--nla", str(sft_nla), "--acts", str(tiny_store.path), "--out",
           str(out), "--max-steps", "2", "--batch-size", "2", "--group-size", "2",
           "--max-new-tokens", "8", "--eval-every", "2", "--eval-rows", "2", "--lora-rank", "4",
           "--ar-lora-rank", "4", "--av-lr", "1e-3", "--ar-lr", "1e-3", "--no-failure-penalty"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["samples"] == 8  # 2 procs x 2 x 2
    summary = json.loads((out / ".train-rl" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["replicas_in_sync"]
    assert len(summary["replica_checksums"]) == 2
    nla = NLA.load(out, target=tiny)
    assert nla.layer == 2 and "heldout_fve_nrm" in rows[-1]


def test_fast_sampler_and_shared_prefix_match_the_plain_paths(sft_nla, tiny):
    import copy

    from nlakit.nla.sampling import fast_generate, shared_prefix_len
    from nlakit.nla.verbalizer import Verbalizer

    base = NLA.load(sft_nla, target=tiny).av
    # the random tiny model's greedy output is one repeated token; larger random weights make
    # rows diverge and sometimes stop early, which is what this test needs
    model = copy.deepcopy(base.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    av = Verbalizer(model, base.tokenizer, base.marker, 10.0, base.template)
    assert shared_prefix_len(av) > 10  # the chat preamble before the marker is shared
    vecs = torch.randn(6, 64, generator=gen)
    plain = av.generate(vecs, n=1, temperature=0.0, max_new_tokens=12, sampler="hf")
    fast = fast_generate(av, vecs, n=1, temperature=0.0, max_new_tokens=12, batch_size=4)
    assert [e.token_ids for e in fast] == [e.token_ids for e in plain]
    assert [(e.text, e.hit_cap, e.n_tokens) for e in fast] == \
        [(e.text, e.hit_cap, e.n_tokens) for e in plain]
    assert len({tuple(e.token_ids) for e in fast}) > 3

    def first(ids, t):
        return ids.index(t) if t in ids else len(ids)

    # a stand-in EOS that rows reach at different times (or never): rows leave the batch
    av.eos_id = next(t for e in fast for t in e.token_ids
                     if len({first(x.token_ids, t) for x in fast}) > 2)
    plain = av.generate(vecs, n=1, temperature=0.0, max_new_tokens=12, sampler="hf")
    fast = fast_generate(av, vecs, n=1, temperature=0.0, max_new_tokens=12, batch_size=6)
    assert [e.token_ids for e in fast] == [e.token_ids for e in plain]
    assert [e.hit_cap for e in fast] == [e.hit_cap for e in plain]
    assert len({e.n_tokens for e in fast}) > 2
    # greedy through Verbalizer.generate takes the fast loop and writes the same tokens
    assert av.plain_greedy(av.decoding_settings())
    auto = av.generate(vecs, n=1, temperature=0.0, max_new_tokens=12, batch_size=4)
    assert [e.token_ids for e in auto] == [e.token_ids for e in plain]
    sampled = fast_generate(av, vecs, n=4, temperature=1.0, max_new_tokens=8, seed=1)
    again = fast_generate(av, vecs, n=4, temperature=1.0, max_new_tokens=8, seed=1)
    assert [e.token_ids for e in sampled] == [e.token_ids for e in again]
    assert len({tuple(e.token_ids) for e in sampled}) > 1

    # log-probs and their gradients: shared prefix == every row computing its whole prompt
    model = av.model.requires_grad_(True)
    ids, mask = right_pad([e.token_ids for e in sampled[:6]], av.pad_id)
    v6 = vecs.repeat_interleave(4, 0)[:6]
    grads = []
    for shared in (True, False):
        model.zero_grad()
        lp = response_logprobs(model, av, v6, ids, mask, shared_prefix=shared)
        lp.sum().backward()
        grads.append((lp.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    rel = float((grads[0][1] - grads[1][1]).norm() / grads[1][1].norm())
    assert rel < 1e-4, rel  # float32 summation order differs; a wrong gradient is O(1) off
    assert grads[0][1].abs().sum() > 0


def test_sigkill_mid_run_then_resume_matches_a_straight_run(sft_nla, tiny_store, tmp_path):
    """A real kill (SIGKILL of the CLI process after its step-4 checkpoint), then --resume."""
    import signal
    import time

    args = ["train", "rl", "--nla", str(sft_nla), "--acts", str(tiny_store.path),
            "--max-steps", "16", "--batch-size", "2", "--group-size", "3", "--max-new-tokens",
            "10", "--eval-every", "5", "--eval-rows", "4", "--save-every", "4",
            "--lora-rank", "4", "--ar-lora-rank", "4", "--av-lr", "1e-3", "--ar-lr", "1e-3",
            "--no-failure-penalty"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nlakit.run.cli", *args, "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 6:  # step 0 + 5 steps
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "av").exists()
    assert 6 <= len(log.read_text().splitlines()) < 17
    from nlakit.run.cli import main

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    straight, resumed = _rows(tmp_path / "straight"), _rows(killed)
    assert [r["step"] for r in resumed] == list(range(0, 17))
    assert [_stable(r) for r in resumed] == [_stable(r) for r in straight]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "ar" / "value_head.safetensors"))["weight"]
    b = load_file(str(killed / "ar" / "value_head.safetensors"))["weight"]
    assert torch.equal(a, b)
    summary = json.loads((killed / ".train-rl" / "summary.json").read_text())
    assert summary["resumed_from"] in (4, 8, 12)


def test_rollouts_sample_the_distribution_the_policy_loss_assumes(sft_nla, tiny):
    """Why rollouts do not go through HF `generate`: it also applies the model's own
    generation_config (Qwen2.5-Instruct ships top_k 20 and a repetition penalty), so its
    samples would not follow softmax(logits / T), whose log-probs the policy loss uses."""
    import copy

    from nlakit.nla.sampling import sample_rollouts
    from nlakit.nla.verbalizer import Verbalizer

    base = NLA.load(sft_nla, target=tiny).av
    model = copy.deepcopy(base.model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model.generation_config.top_k = 1  # a shipped setting that HF generate would obey
    av = Verbalizer(model, base.tokenizer, base.marker, 10.0, base.template)
    vecs = torch.randn(2, 64, generator=gen)
    hf = av.generate(vecs, n=4, temperature=1.0, max_new_tokens=8, seed=0)
    assert len({tuple(e.token_ids) for e in hf[:4]}) == 1  # top_k 1: greedy, whatever T says
    ours = sample_rollouts(av, vecs, 4, 1.0, 1.0, 8, 64, seed=0)
    assert len({tuple(e.token_ids) for e in ours[:4]}) > 1
    assert [e.token_ids for e in ours] == \
        [e.token_ids for e in sample_rollouts(av, vecs, 4, 1.0, 1.0, 8, 64, seed=0)]


@pytest.fixture(scope="module")
def sft_adapter_nla(tiny, tiny_store, tmp_path_factory):
    """A tiny SFT NLA kept as LoRA adapters (2 steps of each half on context labels)."""
    from nlakit.labels import label_store
    from nlakit.labels.context import ContextLabeller
    from nlakit.train.sft import SFTConfig, train_sft

    labels = tmp_path_factory.mktemp("labels") / "labels"
    label_store(tiny_store, ContextLabeller(tiny[0].nlakit_source["spec"], loaded=tiny), labels,
                splits=["av_sft", "ar_sft", "heldout"],
                cache=tmp_path_factory.mktemp("cache") / "labels.sqlite", progress=False)
    out = tmp_path_factory.mktemp("sft-adapters") / "nla"
    cfg = SFTConfig(lr=1e-2, batch_size=4, max_steps=2, lora_rank=8, keep_adapters=True)
    for role in ("av", "ar"):
        train_sft(role, labels, out, cfg, progress=False)
    return out


def test_keep_adapters_stacks_sft_and_rl_adapters_exactly(sft_adapter_nla, tiny_store, tiny,
                                                          tmp_path):
    merged, kept = tmp_path / "merged", tmp_path / "kept"
    train_rl(sft_adapter_nla, tiny_store.path, merged, _cfg(), progress=False)
    train_rl(sft_adapter_nla, tiny_store.path, kept, _cfg(keep_adapters=True), progress=False)
    for half in ("av", "ar"):
        config = json.loads((kept / half / "adapter_config.json").read_text())
        assert config["r"] == 8 + 4 and config["lora_alpha"] == 12  # SFT rank + RL rank
        assert not (kept / half / "model.safetensors").exists()
    a, b = NLA.load(merged, target=tiny), NLA.load(kept, target=tiny)
    assert b.av_meta["nlakit"]["weights"] == "adapter" == b.ar_meta["nlakit"]["weights"]
    assert b.av_meta["nlakit"]["provenance"]["rl"]["summary"]["steps"] == 3
    w_a = a.av.model.model.layers[0].self_attn.q_proj.weight
    w_b = b.av.model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(w_a, w_b, atol=1e-5)
    sft = NLA.load(sft_adapter_nla, target=tiny).av.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(sft, w_b, atol=1e-5)  # the RL part is in the stacked adapter
    v = torch.randn(3, 64)
    assert [e.raw for e in a.explain(v, max_new_tokens=12)] == \
        [e.raw for e in b.explain(v, max_new_tokens=12)]
    texts = ["Kind of text: prose.", "the end of a line"]
    assert torch.allclose(a.reconstruct(texts), b.reconstruct(texts), atol=1e-5)


def test_keep_adapters_is_refused_before_training_when_it_cannot_be_kept(
        sft_nla, sft_adapter_nla, tiny_store, tmp_path):
    with pytest.raises(NLAError, match="holds merged weights, not LoRA adapters"):
        train_rl(sft_nla, tiny_store.path, tmp_path / "a", _cfg(keep_adapters=True))
    with pytest.raises(NLAError, match="needs LoRA on both halves"):
        train_rl(sft_adapter_nla, tiny_store.path, tmp_path / "b",
                 _cfg(keep_adapters=True, lora_rank=0))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_an_nla_loaded_from_adapters_saves_as_merged_weights_that_load(sft_adapter_nla, tiny,
                                                                       tmp_path):
    nla = NLA.load(sft_adapter_nla, target=tiny)
    nla.save(tmp_path / "again")
    again = NLA.load(tmp_path / "again", target=tiny)
    assert again.ar_meta["nlakit"]["weights"] == "merged" == again.av_meta["nlakit"]["weights"]
    texts = ["Kind of text: prose.", "the end of a line"]
    assert torch.allclose(nla.reconstruct(texts), again.reconstruct(texts), atol=1e-5)
