"""Reinforcement learning of the AV (GRPO) with the AR trained alongside.

One step, per process, on m activations of the store's ``rl`` split (`RLTrainer.train_step`):

1. **rollout** — sample G explanations per activation from the current AV (temperature 1,
   batched generation with a KV cache, `rollout.sample_rollouts`), keeping the token ids;
2. **scoring** — the *current* AR reads every explanation (one batched forward); reward =
   −mse_nrm (or −log mse_nrm, or the contrastive InfoNCE reward), −2 for a missing closing tag
   or for hitting the length cap, optionally plus ``truth_reward`` times the claim-truth
   score (`nlakit.train.truth`) and minus a length penalty;
3. **AR update** — one regression step (mean mse_nrm) on (explanation, true vector), reusing
   the scoring forward: the rewards come from its detached output, so they are the AR's
   predictions *before* its update;
4. **AV update** — teacher-forced log-probs of the sampled tokens with the vector injected;
   group-normalised advantages; PPO clipped-ratio loss (ε = 0.2); KL to the frozen SFT policy
   (the same peft model with its adapters disabled, or a frozen copy with ``lora_rank=0``);
   both optimizers step only when every gradient and loss is finite on every process;
5. **logging** and **checkpointing**.

KL: ``k1`` (default) is applied the classic RLHF way, as a per-sequence reward penalty
β·Σ_t (log π − log π_ref) before the group normalisation — the k1 estimator added to the loss
would have a zero-mean gradient. ``k3`` (exp(−x) + x − 1) is added to the loss per token, as
in GRPO. There is one optimiser step per rollout batch, so the old policy is the current one:
the old log-probs are the detached current ones (ρ = 1 at the update, the clip machinery is the
general one in `rewards.clipped_policy_loss`).

Runs through `accelerate` (data-parallel: every process rolls out its own activations; the AV
and AR gradients are all-reduced by DDP). Checkpoints (AV LoRA / trainable tensors, AR trainable
tensors, both optimizers, RNG states, step, data position) are written atomically; sampling is
seeded per (seed, step, process), so ``resume=True`` continues exactly. The log is
``OUT/metrics.jsonl``, one JSON object per step (plus TensorBoard under ``OUT/.train-rl`` when
it is installed); the result is a normal NLA directory.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nlakit import __version__, metrics
from nlakit.config import check_range, option
from nlakit.errors import NLAError
from nlakit.extract.store import HELDOUT, RL, ActivationStore, vectors_from_arrow
from nlakit.fileio import stable_hash, stable_seed, write_json
from nlakit.model.batching import right_pad
from nlakit.nla.prompt import Explanation
from nlakit.nla.reconstructor import Reconstructor
from nlakit.nla.sampling import response_logprobs, sample_rollouts, token_prefixes
from nlakit.nla.verbalizer import Verbalizer
from nlakit.train import rewards as R
from nlakit.train.adapters import check_stackable, stack_onto_target
from nlakit.train.common import (
    Checkpoint,
    MetricsLog,
    all_finite,
    autocast,
    guarded_step,
    make_accelerator,
    make_trainable,
    recorded_config,
    resolve_mixed_precision,
    trainable_params,
)
from nlakit.train.data import epoch_order
from nlakit.train.truth import RowTruths

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLERS = ("fast",)


@dataclass
class RLConfig:
    """Settings of one RL run (`nlakit train rl`, pipeline section train_rl). Every field is
    part of the run's identity (its config hash)."""

    max_steps: int = option(200, "RL steps (one rollout batch and one update each)")
    batch_size: int = option(4, "activations per process per step")
    group_size: int | None = option(None, "samples per activation (>= 2); default 4 on CPU, "
                                          "8 on GPU")
    av_lr: float = option(1e-5, "AV (policy) learning rate, constant")
    ar_lr: float = option(5e-5, "AR learning rate, constant")
    lora_rank: int = option(16, "AV LoRA rank on top of the merged SFT AV; 0 = full "
                                "fine-tuning")
    lora_alpha: int | None = option(None, "AV LoRA alpha; default 2 * rank")
    ar_lora_rank: int = option(16, "AR body LoRA rank (the head is always trained); 0 = full")
    temperature: float = option(1.0, "rollout sampling temperature")
    top_p: float = option(1.0, "rollout nucleus (top-p) sampling")
    max_new_tokens: int = option(150, "response cap; hitting it counts as a failure")
    reward: str = option("negmse", "negmse | neglog | contrastive (InfoNCE over the m "
                                   "activations of each process's batch)")
    contrastive_temperature: float = option(0.1, "temperature of the contrastive reward")
    failure_reward: float | None = option(R.FAILURE_REWARD, "reward of a response without "
                                                            "closing tag or at the cap; None: "
                                                            "no penalty")
    length_penalty: float = option(0.0, "reward lost by a response of full length (linear in "
                                        "tokens)")
    truth_reward: float = option(0.0, "weight of the claim-truth reward added to the "
                                      "reconstruction reward: each checkable claim of a sample "
                                      "(current token, tokens before it, kind, top prediction "
                                      "in the target's top 5 and top 1, ending words) scores "
                                      "+1 true, -1 false, 0 when left out, averaged over the 6 "
                                      "fields (nla.claims.truth_score); 0: off")
    kl_coef: float = option(0.01, "KL coefficient (to the SFT policy)")
    kl_estimator: str = option("k1", "k1 (reward penalty) | k3 (loss term)")
    clip: float = option(0.2, "PPO ratio clip epsilon")
    truncate_explanations: bool = option(False, "matryoshka: score a random-length prefix per "
                                                "group")
    truncate_min_tokens: int = option(4, "shortest matryoshka prefix, in tokens")
    max_grad_norm: float = option(1.0, "clip each model's gradient norm to this value")
    eval_every: int = option(25, "held-out evaluation every N steps (and after the last)")
    eval_rows: int = option(32, "held-out rows evaluated; 0: no held-out evaluation")
    eval_max_new_tokens: int | None = option(None, "evaluation response cap; default "
                                                   "max_new_tokens")
    save_every: int = option(25, "checkpoint every N steps")
    rollout_batch_size: int = option(64, "sequences per generation batch")
    sampler: str = option("fast", "rollout sampler; 'fast' (nlakit's batched KV-cache sampler) "
                                  "is the only one")
    shared_prefix: bool = option(True, "compute the prompt tokens before the marker once per "
                                       "batch, not per row")
    seed: int = option(0, "seed of the activation order, the sampling and the LoRA init")
    dtype: str | None = option(None, "model dtype (float32, bfloat16, ...); default: the "
                                     "device's")
    mixed_precision: str = option("auto", "bf16 compute (rollouts, scoring, log-probs) with "
                                          "float32 weights, gradients and optimizer state: auto "
                                          "(bf16 where the device has it natively), bf16, or no "
                                          "(float32); the held-out evaluation stays float32")
    keep_adapters: bool = option(False, "export LoRA adapters (the SFT NLA's and RL's, stacked "
                                        "exactly: rank lora_rank + the SFT rank) instead of "
                                        "merged weights: a small, packable NLA; needs an SFT "
                                        "NLA kept as adapters")

    def __post_init__(self):
        name = type(self).__name__
        if self.reward not in R.REWARDS:
            raise NLAError(f"{name}.reward: reward must be one of {', '.join(R.REWARDS)}, got "
                           f"{self.reward!r}; set --reward (or `reward:`)")
        if self.kl_estimator not in R.KL_ESTIMATORS:
            raise NLAError(f"unknown KL estimator {self.kl_estimator!r} ({name}.kl_estimator); "
                           "choose k1 or k3 with --kl-estimator")
        if self.sampler not in SAMPLERS:
            raise NLAError(f"{name}.sampler {self.sampler!r} is no longer available: rollouts "
                           "always use nlakit's sampler ('fast'), which samples the distribution "
                           "the policy loss assumes; remove the setting")
        for key, low, low_open in (("max_steps", 1, False), ("batch_size", 1, False),
                                   ("av_lr", 0, True), ("ar_lr", 0, True),
                                   ("lora_rank", 0, False), ("ar_lora_rank", 0, False),
                                   ("temperature", 0, False), ("max_new_tokens", 1, False),
                                   ("contrastive_temperature", 0, True), ("kl_coef", 0, False),
                                   ("clip", 0, True), ("truncate_min_tokens", 1, False),
                                   ("max_grad_norm", 0, True), ("eval_every", 1, False),
                                   ("eval_rows", 0, False), ("save_every", 1, False),
                                   ("rollout_batch_size", 1, False)):
            check_range(name, key, getattr(self, key), low=low, low_open=low_open)
        check_range(name, "top_p", self.top_p, low=0, high=1, low_open=True)
        check_range(name, "group_size", self.group_size, low=2, optional=True)
        check_range(name, "lora_alpha", self.lora_alpha, low=1, optional=True)
        check_range(name, "eval_max_new_tokens", self.eval_max_new_tokens, low=1, optional=True)
        check_range(name, "failure_reward", self.failure_reward, optional=True)
        check_range(name, "length_penalty", self.length_penalty)
        check_range(name, "truth_reward", self.truth_reward, low=0)
        if self.reward == "contrastive" and self.batch_size < 2:
            raise NLAError("the contrastive reward needs --batch-size >= 2 (activations per "
                           f"process), got {name}.batch_size = {self.batch_size}")


EXPORT_ONLY = ("keep_adapters",)  # settings that change how the result is written, not a step
# Settings a checkpoint survives: steps before max_steps do not depend on it (constant learning
# rates, a row order whose prefix is fixed, per-step seeds), so raising it extends a run.
EXTENSIBLE_SETTINGS = ("max_steps", *EXPORT_ONLY)
# Settings added after checkpoints were written: at this value they leave the identity out, so
# those checkpoints keep their hash.
NEUTRAL_SETTINGS = {"truth_reward": 0.0}


def trajectory(cfg: RLConfig, *, extensible: bool = True) -> dict:
    """The settings that decide the steps: a checkpoint's identity. extensible=False keeps
    max_steps in, as checkpoints written before a run could be extended did. mixed_precision
    is not in: the identity holds what it resolves to, and only when that is bf16."""
    skip = (*(EXTENSIBLE_SETTINGS if extensible else EXPORT_ONLY), "mixed_precision")
    return {k: v for k, v in asdict(cfg).items()
            if k not in skip and not (k in NEUTRAL_SETTINGS and v == NEUTRAL_SETTINGS[k])}


def _default_group_size() -> int:
    return 8 if torch.cuda.is_available() else 4


def train_rl(nla_dir: str | Path, acts: str | Path, out_dir: str | Path,
             cfg: RLConfig | None = None, *, resume: bool = False, overwrite: bool = False,
             progress: bool = True, export: bool = True) -> dict | None:
    """GRPO on the AV of the NLA at `nla_dir` (usually the SFT warm start) with its AR trained
    alongside, on the ``rl`` split of the activation store `acts`; held-out evaluation on its
    ``heldout`` split. Writes ``out_dir/metrics.jsonl``, a checkpoint under
    ``out_dir/.train-rl`` and finally the NLA (``out_dir/av``, ``out_dir/ar``; export=False
    skips it, for benchmarks).
    Returns a summary on the main process (None elsewhere)."""
    cfg = copy.deepcopy(cfg or RLConfig())
    if cfg.group_size is None:
        cfg.group_size = _default_group_size()
    cfg.__post_init__()  # again: fields may have been set after construction
    trainer = RLTrainer(nla_dir, acts, out_dir, cfg, progress=progress)
    return trainer.run(resume=resume, overwrite=overwrite, export=export)


@dataclass
class Scored:
    """The AR's reading of one rollout batch: `pred` [n, d] keeps its graph (the AR update
    reuses it); rewards and per-sample metrics [n] are detached, on the CPU."""

    pred: torch.Tensor
    reward: torch.Tensor  # after the length penalty and the failure reward
    raw: torch.Tensor  # the reward function's value
    truth: torch.Tensor  # claim-truth score in [-1, 1] (zeros when truth_reward is 0)
    fve: torch.Tensor
    failed: torch.Tensor  # bool: no closing tag or hit the cap
    n_tokens: torch.Tensor


@dataclass
class PolicyUpdate:
    """The AV update's loss terms (its backward is done)."""

    loss: torch.Tensor  # policy loss + k3 term
    policy_loss: torch.Tensor
    clip_fraction: float
    kl_seq: torch.Tensor  # [n] mean per-token KL to the reference, CPU


class RLTrainer:
    """One RL run. `run` = set up (models, data, checkpoint), `fit` (the loop), `_finish`
    (final checkpoint, export). A step is `train_step`: rollout, score, update_ar_grads,
    av_loss and its backward, the guarded optimizer steps, then `record`; `log_step` and
    `maybe_checkpoint` after it."""

    def __init__(self, nla_dir: str | Path, acts: str | Path, out_dir: str | Path,
                 cfg: RLConfig, *, progress: bool = True):
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg, self.progress = cfg, progress
        self.nla_dir, self.out_dir = Path(nla_dir), Path(out_dir)
        if self.out_dir.resolve() == self.nla_dir.resolve():
            raise NLAError("--out must differ from --nla: RL writes a new NLA and never "
                           "overwrites its starting point")
        for sub in ("av", "ar"):
            if not (self.nla_dir / sub).is_dir():
                raise NLAError(f"{self.nla_dir} has no {sub}/ directory: pass an NLA directory "
                               "(train both halves with `nlakit train av|ar --out DIR`)")
        self.train_dir = self.out_dir / ".train-rl"
        ddp = DistributedDataParallelKwargs(
            find_unused_parameters=cfg.lora_rank == 0 or cfg.ar_lora_rank == 0)
        self.acc = make_accelerator(self.train_dir, kwargs_handlers=[ddp])
        self.precision = resolve_mixed_precision(cfg.mixed_precision, self.acc.device)
        self.store = ActivationStore(acts)
        self.metrics = MetricsLog(self.acc, self.out_dir / METRICS_FILE, "rl")
        if cfg.keep_adapters:
            check_stackable(self.nla_dir, cfg.lora_rank, cfg.ar_lora_rank)
        identity = (str(self.nla_dir.resolve()), str(self.store.path.resolve()),
                    self.acc.num_processes)
        if self.precision != "no":  # float32 runs keep the hashes they had before bf16
            identity += ({"mixed_precision": self.precision},)
        self.checkpoint = Checkpoint(self.train_dir, stable_hash(trajectory(cfg), "rl", *identity),
                                     what="RL", also_accept=self._legacy_hashes(identity))
        self.per_step = cfg.batch_size * self.acc.num_processes
        self.row_truths: RowTruths | None = None  # set up by _load_data when truth_reward > 0

    def _legacy_hashes(self, identity: tuple) -> tuple[str, ...]:
        """Checkpoints written before a run could be extended carry a hash with max_steps in:
        accept the one of the recorded config (train_dir/config.json) when it differs from
        this one only in the extensible settings."""
        old = recorded_config(self.train_dir, RLConfig)
        if old is None or trajectory(old) != trajectory(self.cfg):
            return ()
        return (stable_hash("rl", trajectory(old, extensible=False), *identity),)

    # ---- set-up ------------------------------------------------------------------------------

    def run(self, *, resume: bool = False, overwrite: bool = False,
            export: bool = True) -> dict | None:
        acc = self.acc
        if overwrite and acc.is_main_process:
            shutil.rmtree(self.train_dir, ignore_errors=True)
            self.metrics.path.unlink(missing_ok=True)
        acc.wait_for_everyone()
        if self.checkpoint.exists() and not resume:
            raise NLAError(f"{self.out_dir} holds an RL checkpoint; pass --resume to continue "
                           "it or --overwrite to start over")
        torch.manual_seed(self.cfg.seed)
        self._load_nla()
        self._load_data()
        self._build_models()
        start = self.checkpoint.load(
            {"av_params": self.policy, "ar_params": self.ar},
            {"av_optimizer": self.av_opt, "ar_optimizer": self.ar_opt})
        if start > self.cfg.max_steps:
            raise NLAError(f"{self.out_dir} holds an RL checkpoint at step {start}, beyond "
                           f"--max-steps {self.cfg.max_steps}: raise --max-steps to extend the "
                           "run, or pass --overwrite to start over")
        self.av_module, self.ar_module, self.av_opt, self.ar_opt = acc.prepare(
            self.policy, self.ar, self.av_opt, self.ar_opt)
        if acc.is_main_process:
            self.train_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.train_dir / "config.json",
                       {"config": asdict(self.cfg), "nla": str(self.nla_dir),
                        "acts": str(self.store.path), "processes": acc.num_processes})
        self.metrics.start(keep_until=start)  # drop steps logged after the checkpoint
        acc.wait_for_everyone()
        t_start = time.time()
        last = self.fit(start)
        return self._finish(start, last, t_start, export)

    def _load_nla(self) -> None:
        from nlakit.nla.facade import NLA

        store = self.store
        self.nla = nla = NLA.load(self.nla_dir, device=str(self.acc.device), dtype=self.cfg.dtype)
        if nla.layer != store.layer:
            raise NLAError(f"the NLA rebuilds layer {nla.layer} but {store.path} holds layer "
                           f"{store.layer} activations")
        if nla.d_model != store.d_model:
            raise NLAError(f"the NLA has d_model {nla.d_model}, the store {store.d_model}")
        want = store.meta["model"].get("weights_hash")
        have = nla.target_info.get("weights_hash")
        if want and have and want != have:
            raise NLAError(f"the NLA was trained on target weights {have}, the store was "
                           f"extracted from {want}")

    def _load_data(self) -> None:
        """The rl split's vectors, its fixed order over all steps, and the held-out rows."""
        store, cfg = self.store, self.cfg
        self.n_rl = store.num_rows(RL)
        if self.n_rl < cfg.batch_size:
            raise NLAError(f"{store.path} has {self.n_rl} rows in its rl split; need at least "
                           f"--batch-size {cfg.batch_size}")
        self.rl_vectors = store.vectors(RL)
        if cfg.truth_reward > 0:
            self.row_truths = RowTruths(store, device=self.acc.device)
        self.order = epoch_order(self.n_rl, cfg.max_steps * self.per_step / self.n_rl, cfg.seed)
        self.rawvar = float(store.stats("all")["rawvar"])
        self.has_heldout = cfg.eval_rows > 0 and HELDOUT in store.splits \
            and store.num_rows(HELDOUT) > 0
        if self.has_heldout:
            held = store.table(HELDOUT, columns=["row_id", "vector", "token_text", "prefix"])
            held = held.slice(0, min(held.num_rows, cfg.eval_rows))
            self.held_vectors = torch.from_numpy(
                vectors_from_arrow(held.column("vector"), store.d_model).copy())
            self.held_prefix = held.column("prefix").to_pylist()
            self.held_ids = held.column("row_id").to_pylist()
        elif cfg.eval_rows > 0:
            log.warning("%s has no heldout split: no held-out evaluation", store.path)

    def _build_models(self) -> None:
        """The AV policy: a fresh LoRA over the merged SFT AV (reference = adapters disabled),
        or the whole AV (reference = a frozen copy); the AR with its body LoRA; optimizers."""
        cfg, base_av = self.cfg, self.nla.av
        if cfg.lora_rank > 0:
            self.policy = make_trainable(base_av.model, cfg.lora_rank, cfg.lora_alpha)
            self.ref_av = None  # the same model with disable_adapter()
        else:
            ref_model = copy.deepcopy(base_av.model).eval().requires_grad_(False)
            self.policy = make_trainable(base_av.model, 0)
            self.ref_av = Verbalizer(ref_model, base_av.tokenizer, base_av.marker,
                                     base_av.injection_scale, base_av.template)
        self.av = Verbalizer(self.policy, base_av.tokenizer, base_av.marker,
                             base_av.injection_scale, base_av.template)
        self.ar = self.nla.ar
        self.ar.body = make_trainable(self.ar.body, cfg.ar_lora_rank)
        self.ar.head.requires_grad_(True)
        self.av_params = trainable_params(self.policy)
        self.ar_params = trainable_params(self.ar)
        self.av_opt = torch.optim.AdamW(self.av_params, lr=cfg.av_lr, weight_decay=0.0)
        self.ar_opt = torch.optim.AdamW(self.ar_params, lr=cfg.ar_lr, weight_decay=0.0)

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, start: int) -> dict:
        """Steps `start`..max_steps (after the warm start's held-out score at step 0); returns
        the last step's record."""
        acc, cfg, last = self.acc, self.cfg, {}
        with tqdm(total=cfg.max_steps, initial=start, desc="train rl", unit="step",
                  disable=not (self.progress and acc.is_main_process)) as bar:
            if start == 0:
                self.log_warm_start()
            for step in range(start, cfg.max_steps):
                last = self.train_step(step)
                self.log_step(step, last)
                bar.set_postfix(reward=f"{last['reward_mean']:.3f}", fve=f"{last['fve_nrm']:.3f}")
                bar.update(1)
                self.maybe_checkpoint(step + 1)
        return last

    def train_step(self, step: int) -> dict:
        """One GRPO step on this process's activations; the step's record (all processes)."""
        times: dict[str, float] = {}
        lo = step * self.per_step + self.acc.process_index * self.cfg.batch_size
        rows = self.order[lo : lo + self.cfg.batch_size]
        vectors = self.rl_vectors[rows]  # [m, d]
        bf16 = functools.partial(autocast, self.precision, self.acc.device)
        with _timed(times, "rollout"), bf16():
            exps = self.rollout(step, vectors)
        with _timed(times, "scoring"), bf16():
            scored = self.score(step, vectors, exps, [int(r) for r in rows])
        with _timed(times, "ar_update"):
            ar_loss = self.update_ar_grads(scored, vectors)
        with _timed(times, "av_update"):
            with bf16():
                av = self.av_loss(exps, scored, vectors)
            self.acc.backward(av.loss)
            ok = all_finite(self.acc, self.av_params + self.ar_params, (av.loss, ar_loss))
            if not ok:
                log.warning("RL step %d: non-finite gradients or loss, update skipped", step + 1)
            av_gn = guarded_step(self.acc, ok, self.av_opt, self.av_params,
                                 self.cfg.max_grad_norm)
        with _timed(times, "ar_update"):
            ar_gn = guarded_step(self.acc, ok, self.ar_opt, self.ar_params,
                                 self.cfg.max_grad_norm)
        return self.record(step, exps, scored, av, ar_loss, times,
                           {"av_grad_norm": av_gn, "ar_grad_norm": ar_gn, "skipped": not ok})

    def rollout(self, step: int, vectors: torch.Tensor) -> list[Explanation]:
        """G samples per activation from the current policy, seeded by (seed, step, process)."""
        cfg = self.cfg
        self.policy.eval()
        seed = stable_seed("rl-sample", cfg.seed, step, self.acc.process_index) % (2**63)
        return sample_rollouts(self.av, vectors, cfg.group_size, cfg.temperature, cfg.top_p,
                               cfg.max_new_tokens, cfg.rollout_batch_size, seed=seed)

    def score(self, step: int, vectors: torch.Tensor, exps: list[Explanation],
              rows: list[int]) -> Scored:
        """The current AR reads every explanation (a matryoshka prefix with
        truncate_explanations); rewards from its detached predictions, plus truth_reward times
        the claim-truth score of the whole explanation (`rows`: the rl split's row indices)."""
        cfg, acc, G = self.cfg, self.acc, self.cfg.group_size
        self.ar_module.train()
        texts = [e.text for e in exps]
        if cfg.truncate_explanations:
            gen = torch.Generator().manual_seed(
                stable_seed("rl-truncate", cfg.seed, step, acc.process_index) % (2**63))
            lengths = R.truncate_lengths(len(vectors), G, cfg.max_new_tokens,
                                         cfg.truncate_min_tokens, gen)
            texts = token_prefixes(self.av.tokenizer, texts, lengths)
        enc = self.ar.encode(texts)
        pred = self.ar_module(enc["input_ids"].to(acc.device),
                              enc["attention_mask"].to(acc.device))
        pred_d = pred.detach().float().cpu()
        raw = R.compute_rewards(cfg.reward, pred_d, vectors, G, cfg.contrastive_temperature)
        failed = torch.tensor([(not e.complete) or e.hit_cap for e in exps])
        n_tokens = torch.tensor([e.n_tokens for e in exps], dtype=torch.float32)
        truth = (self.row_truths.scores(rows, [e.text for e in exps], G)
                 if self.row_truths is not None else torch.zeros_like(raw))
        reward = R.length_penalty(raw + cfg.truth_reward * truth, n_tokens, cfg.max_new_tokens,
                                  cfg.length_penalty)
        reward = R.apply_failures(reward, failed, cfg.failure_reward)  # flat -2, no length term
        fve = metrics.fve_nrm(pred_d, vectors.repeat_interleave(G, 0), self.rawvar)
        return Scored(pred, reward, raw, truth, fve, failed, n_tokens)

    def update_ar_grads(self, scored: Scored, vectors: torch.Tensor) -> torch.Tensor:
        """AR regression loss (mean mse_nrm to the true vectors) on the scoring forward;
        backward. Returns the loss."""
        pred = scored.pred
        target = vectors.repeat_interleave(self.cfg.group_size, 0).to(pred.device, pred.dtype)
        ar_loss = metrics.mse_nrm(pred, target).mean()
        self.acc.backward(ar_loss)
        return ar_loss

    def _ref_logprobs(self, vec_rep, resp, mask) -> torch.Tensor:
        if self.ref_av is None:
            ctx, model, av = self.policy.disable_adapter(), self.policy, self.av
        else:
            ctx, model, av = contextlib.nullcontext(), self.ref_av.model, self.ref_av
        with torch.no_grad(), ctx:
            return response_logprobs(model, av, vec_rep, resp, mask, self.cfg.temperature,
                                     self.cfg.shared_prefix)

    def av_loss(self, exps: list[Explanation], scored: Scored,
                vectors: torch.Tensor) -> PolicyUpdate:
        """Clipped policy loss with group-normalised advantages and the KL to the reference
        (the caller runs its backward, outside autocast)."""
        cfg = self.cfg
        self.policy.train()
        vec_rep = vectors.repeat_interleave(cfg.group_size, 0)
        resp, resp_mask = right_pad([e.token_ids for e in exps], self.av.pad_id)
        ref_logp = self._ref_logprobs(vec_rep, resp, resp_mask)
        logp = response_logprobs(self.av_module, self.av, vec_rep, resp, resp_mask,
                                 cfg.temperature, cfg.shared_prefix)
        mask = resp_mask.to(logp.device)
        kl_tok = R.kl_per_token(logp.detach(), ref_logp, cfg.kl_estimator)
        shaped = scored.reward
        if cfg.kl_estimator == "k1" and cfg.kl_coef:
            shaped = scored.reward - cfg.kl_coef * (kl_tok * mask).sum(1).cpu()
        adv = R.group_advantages(shaped, cfg.group_size).to(logp.device)
        policy_loss, info = R.clipped_policy_loss(logp, logp.detach(), adv, mask, cfg.clip)
        loss = policy_loss
        if cfg.kl_estimator == "k3" and cfg.kl_coef:
            k3 = R.kl_per_token(logp, ref_logp, "k3")
            loss = loss + cfg.kl_coef * R.masked_mean(k3, mask, dim=1).mean()
        kl_seq = (kl_tok * mask).sum(1).cpu() / mask.sum(1).cpu().clamp(min=1)
        return PolicyUpdate(loss, policy_loss, info["clip_fraction"], kl_seq)

    # ---- logging and checkpoints -------------------------------------------------------------

    def record(self, step: int, exps: list[Explanation], scored: Scored, av: PolicyUpdate,
               ar_loss: torch.Tensor, times: dict, updates: dict) -> dict:
        """The step's log record: per-sample values gathered from every process, per-process
        scalars averaged over processes."""
        acc = self.acc
        per_sample = {"reward": scored.reward, "raw_reward": scored.raw, "fve_nrm": scored.fve,
                      "truth": scored.truth,
                      "response_len": scored.n_tokens, "failed": scored.failed.float(),
                      "hit_cap": torch.tensor([float(e.hit_cap) for e in exps]),
                      "incomplete": torch.tensor([float(not e.complete) for e in exps]),
                      "kl": av.kl_seq.float()}
        s = {k: v.cpu() for k, v in acc.gather(
            {k: v.to(acc.device) for k, v in per_sample.items()}).items()}
        scalars = {"policy_loss": av.policy_loss.detach().float(),
                   "ar_loss": ar_loss.detach().float(),
                   "clip_fraction": torch.tensor(float(av.clip_fraction)),
                   "step_s": torch.tensor(sum(times.values()))}
        mean = {k: float(v) for k, v in acc.reduce(
            {k: v.to(acc.device) for k, v in scalars.items()}, "mean").items()}
        n = s["reward"].shape[0]
        record = {
            "step": step + 1, "reward_mean": float(s["reward"].mean()),
            "reward_std": float(s["reward"].std()) if n > 1 else 0.0,
            "raw_reward_mean": float(s["raw_reward"].mean()), "fve_nrm": float(s["fve_nrm"].mean()),
            "truth_score": float(s["truth"].mean()),
            "kl": float(s["kl"].mean()), "response_len": float(s["response_len"].mean()),
            "failure_rate": float(s["failed"].mean()),
            "truncation_rate": float(s["hit_cap"].mean()),
            "incomplete_rate": float(s["incomplete"].mean()),
            "policy_loss": mean["policy_loss"], "ar_loss": mean["ar_loss"],
            "clip_fraction": mean["clip_fraction"], **updates,
            **{f"time_{k}_s": round(v, 4) for k, v in times.items()},
            "time_step_s": round(mean["step_s"], 4), "samples": int(n)}
        if acc.is_main_process:
            record["example"] = exps[0].text[:300]
        return record

    def log_step(self, step: int, record: dict) -> None:
        """Held-out evaluation every eval_every steps and after the last; write the record."""
        done = step + 1 == self.cfg.max_steps
        if self.has_heldout and self.acc.is_main_process and \
                (done or (step + 1) % self.cfg.eval_every == 0):
            record.update(self.evaluate())
        self.metrics.write(record)

    def log_warm_start(self) -> None:
        """Step 0: the warm start's held-out score, so every curve starts where RL began (once:
        a run killed before its first checkpoint restarts at 0 and keeps the earlier record)."""
        if self.has_heldout and self.acc.is_main_process and \
                not any(r.get("step") == 0 for r in self.metrics.records()):
            self.metrics.write({"step": 0, **self.evaluate()})
        self.acc.wait_for_everyone()

    def evaluate(self) -> dict:
        """Greedy explanations of the first eval_rows held-out rows, scored by the AR."""
        cfg, t0 = self.cfg, time.perf_counter()
        self.policy.eval()
        self.ar.eval()
        exps = sample_rollouts(self.av, self.held_vectors, 1, 0.0, 1.0,
                               cfg.eval_max_new_tokens or cfg.max_new_tokens,
                               cfg.rollout_batch_size, seed=0)
        pred = self.ar.reconstruct([e.text for e in exps], batch_size=cfg.rollout_batch_size)
        fve = metrics.fve_nrm(pred, self.held_vectors, self.rawvar)
        examples = [{"row_id": int(self.held_ids[i]), "context": self.held_prefix[i][-120:],
                     "explanation": exps[i].text, "complete": exps[i].complete,
                     "fve_nrm": round(float(fve[i]), 4)} for i in range(min(3, len(exps)))]
        return {"heldout_fve_nrm": float(fve.mean()),
                "heldout_complete_rate": sum(e.complete for e in exps) / len(exps),
                "heldout_response_len": sum(e.n_tokens for e in exps) / len(exps),
                "examples": examples, "time_eval_s": round(time.perf_counter() - t0, 4)}

    def maybe_checkpoint(self, steps_done: int) -> None:
        """Every save_every steps (the last step is saved by `_finish`)."""
        if steps_done % self.cfg.save_every == 0 and steps_done != self.cfg.max_steps:
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                self._save(steps_done)
        self.acc.wait_for_everyone()

    def _save(self, step: int) -> None:
        unwrap = self.acc.unwrap_model
        self.checkpoint.save(step, {"av_params": unwrap(self.av_module),
                                    "ar_params": unwrap(self.ar_module)},
                             {"av_optimizer": self.av_opt, "ar_optimizer": self.ar_opt},
                             data_position=step * self.per_step)

    def _replica_checksums(self) -> tuple[list, bool]:
        """Every replica must hold the same weights after the all-reduced updates: per-process
        sums of |w| of the AV and AR trainable tensors, and whether they all agree."""
        with torch.no_grad():
            sums = torch.tensor([sum(float(p.double().abs().sum()) for p in self.av_params),
                                 sum(float(p.double().abs().sum()) for p in self.ar_params)],
                                dtype=torch.float64, device=self.acc.device)
        checksums = self.acc.gather(sums[None]).cpu().view(-1, 2)
        in_sync = bool(torch.allclose(checksums, checksums[:1].expand_as(checksums), rtol=1e-9,
                                      atol=0.0))
        return checksums.tolist(), in_sync

    def _finish(self, start: int, last: dict, t_start: float, export: bool) -> dict | None:
        """Final checkpoint, export of the NLA, summary.json; the summary (main only)."""
        acc, cfg = self.acc, self.cfg
        self.metrics.close()
        checksums, in_sync = self._replica_checksums()
        acc.wait_for_everyone()
        summary = {"steps": cfg.max_steps, "resumed_from": start,
                   "processes": acc.num_processes, "group_size": cfg.group_size,
                   "batch_size": cfg.batch_size, "rl_rows": self.n_rl,
                   "seconds": round(time.time() - t_start, 1),
                   "replica_checksums": checksums, "replicas_in_sync": in_sync,
                   "final": {k: v for k, v in last.items() if k not in ("examples", "example")}}
        if acc.is_main_process:
            self._save(cfg.max_steps)
            if export:
                _export(self.nla, acc.unwrap_model(self.av_module),
                        acc.unwrap_model(self.ar_module), self.av, self.out_dir,
                        self.nla_dir if cfg.keep_adapters else None,
                        {"rl": {"config": asdict(cfg), "from_nla": str(self.nla_dir.resolve()),
                                "acts": str(self.store.path.resolve()), "summary": summary,
                                "nlakit_version": __version__}})
            write_json(self.train_dir / "summary.json", summary)
        acc.wait_for_everyone()
        return summary if acc.is_main_process else None


@contextlib.contextmanager
def _timed(times: dict, phase: str):
    """Add the wall time of the block to times[phase] (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0


def _export(nla, policy, ar: Reconstructor, av: Verbalizer, out_dir: Path,
            adapters_from: Path | None, provenance: dict) -> None:
    """Write OUT/av, OUT/ar (+ nla.yaml), a normal NLA directory: the RL adapters merged, or,
    with `adapters_from` (the SFT NLA directory), stacked onto its adapters."""
    from nlakit.nla.facade import NLA

    av_meta, ar_meta = copy.deepcopy(nla.av_meta), copy.deepcopy(nla.ar_meta)
    for meta in (av_meta, ar_meta):
        meta["stage"] = "rl"
        nl = meta.setdefault("nlakit", {})
        old = nl.setdefault("provenance", {})
        new = copy.deepcopy(provenance)
        if old.get("rl"):  # RL continuing an RL'd NLA: the earlier run stays on record
            new["rl"]["previous"] = old["rl"]
        nl["provenance"] = {**old, **new}
    if adapters_from is None:
        model = policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
        body = ar.body.merge_and_unload() if hasattr(ar.body, "merge_and_unload") else ar.body
    else:
        model, body = _stacked(nla, policy, ar, adapters_from)
    out_av = Verbalizer(model, av.tokenizer, av.marker, av.injection_scale, av.template)
    out_ar = Reconstructor(body, ar.head, ar.tokenizer, ar.template, ar.max_length)
    NLA(out_av, out_ar, av_meta, ar_meta).save(out_dir)


def _stacked(nla, policy, ar: Reconstructor, sft_dir: Path):
    """The AV and the AR body as peft models over a fresh copy of the target, their one
    adapter the SFT adapters of `sft_dir` stacked with RL's (`adapters.stack_onto_target`)."""
    spec = nla.target_info.get("spec")
    return (stack_onto_target(spec, None, sft_dir / "av", policy),
            stack_onto_target(spec, nla.layer, sft_dir / "ar", ar.body))
