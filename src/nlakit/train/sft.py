"""Supervised warm start of the AV (response-only cross-entropy) and the AR (normalised MSE).

Runs through `accelerate`: the same code trains on one CPU, several processes (gloo) or GPUs
(`accelerate launch -m nlakit.run.cli train ...`). Data parallelism is done by hand over a fixed,
seeded order of rows (`data.epoch_order`): step s, micro-batch a, process r reads a fixed slice,
so a resumed run — or a run on more processes with the same global batch — sees the same rows;
accelerate accumulates the gradients of the micro-batches (all-reduced on the last one only).
Checkpoints (`common.Checkpoint`) hold only trainable tensors (LoRA weights and the AR head), the
optimizer, the RNG states and the step, and are written atomically; `resume` continues exactly.
The log is ``OUT/.train-ROLE/log.jsonl`` (plus TensorBoard there when it is installed).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from nlakit import __version__, metrics
from nlakit.config import check_range, option
from nlakit.errors import NLAError
from nlakit.extract.store import AR_SFT, AV_SFT, HELDOUT, VAL
from nlakit.fileio import stable_hash, write_json
from nlakit.model.load import load_model, resolve_device, resolve_dtype
from nlakit.nla.checkpoint import ar_meta, av_meta, save_ar_dir, save_av_dir
from nlakit.nla.prompt import DEFAULT_AV_TEMPLATE, choose_marker, nice_injection_scale
from nlakit.nla.reconstructor import DEFAULT_AR_TEMPLATE, Reconstructor
from nlakit.nla.verbalizer import Verbalizer
from nlakit.train.adapters import stack_onto_target
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
from nlakit.train.data import Rows, epoch_order, has_split, load_labelled, split_by_document
from nlakit.train.init_from import fingerprint, load_start, resolve_half

log = logging.getLogger(__name__)

CONTROLS = ("shuffled",)


@dataclass
class SFTConfig:
    """Settings of one supervised run (`nlakit train av|ar`, pipeline sections train_av,
    train_ar, train_control). Every field is part of the run's identity (its config hash)."""

    lr: float = option(2e-4, "AdamW learning rate (constant)")
    batch_size: int = option(8, "rows per process per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    epochs: float = option(1.0, "passes over the training rows (fractions allowed); "
                                "max_steps, when given, decides instead")
    max_steps: int | None = option(None, "train this many optimizer steps (the rows cycle "
                                         "past the epochs if needed); default: the epochs decide")
    lora_rank: int = option(16, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: int | None = option(None, "LoRA alpha; default 2 * rank")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this value")
    eval_every: int = option(25, "held-out evaluation every N steps (and after the last)")
    save_every: int = option(25, "checkpoint every N steps")
    eval_rows: int = option(64, "held-out rows evaluated")
    eval_fraction: float = option(0.1, "fraction of training documents held out for "
                                       "evaluation when the labels have no heldout split")
    seed: int = option(0, "seed of the row order, the held-out documents and the LoRA init")
    max_response_tokens: int = option(96, "AV: label tokens trained on (longer labels are cut)")
    control: str | None = option(None, "'shuffled': permute the vectors across rows, the "
                                       "control that must end worse (AV only)")
    injection_scale: float | None = option(None, "AV: norm of the injected vector; default a "
                                                 "round number above the data's mean norm")
    marker: str | None = option(None, "AV: the marker character; default chosen from the "
                                      "tokenizer")
    av_template: str = option(DEFAULT_AV_TEMPLATE, "AV prompt (one user turn) with an "
                                                   "{injection_char} placeholder")
    ar_template: str = option(DEFAULT_AR_TEMPLATE, "AR prompt with an {explanation} "
                                                   "placeholder")
    no_repeat_ngram_size: int = option(0, "AV: greedy decoding never repeats an n-gram of this "
                                          "size (0 = off); written to the checkpoint's "
                                          "nla_meta.yaml `decoding:`, used by explain, eval, "
                                          "label_ar; does not change training")
    repetition_penalty: float = option(1.0, "AV: decoding's repetition penalty (1 = off), "
                                            "stored like no_repeat_ngram_size")
    keep_adapters: bool = option(False, "save LoRA adapters (and, for the AR, its head) instead "
                                        "of merged weights: small, packable NLAs")
    dtype: str | None = option(None, "model dtype (float32, bfloat16, ...); default: the "
                                     "device's")
    mixed_precision: str = option("auto", "bf16 compute with float32 weights, gradients and "
                                          "optimizer state: auto (bf16 where the device has it "
                                          "natively: AVX512-BF16/AMX CPUs, bf16 GPUs), bf16, or "
                                          "no (float32); evaluation stays float32")
    extra_splits: tuple[str, ...] | str = option((), "more labelled splits to train on besides "
                                                     "the role's own (av_sft / ar_sft), e.g. rl "
                                                     "when RL does not run (comma-separated)")
    init_from: str | None = option(None, "continue a trained half (an NLA directory, its av/ "
                                         "or ar/, or a shipped NLA's name) instead of starting "
                                         "from the target: a fresh LoRA over its merged "
                                         "weights, stacked onto its adapters when "
                                         "keep_adapters is set; an AV keeps its marker, scale "
                                         "and decoding")

    def __post_init__(self):
        name = type(self).__name__
        for key, low, low_open in (("lr", 0, True), ("batch_size", 1, False),
                                   ("grad_accum", 1, False), ("epochs", 0, True),
                                   ("lora_rank", 0, False), ("weight_decay", 0, False),
                                   ("max_grad_norm", 0, True), ("eval_every", 1, False),
                                   ("save_every", 1, False), ("eval_rows", 1, False),
                                   ("max_response_tokens", 1, False),
                                   ("no_repeat_ngram_size", 0, False),
                                   ("repetition_penalty", 0, True)):
            check_range(name, key, getattr(self, key), low=low, low_open=low_open)
        check_range(name, "max_steps", self.max_steps, low=1, optional=True)
        check_range(name, "lora_alpha", self.lora_alpha, low=1, optional=True)
        check_range(name, "injection_scale", self.injection_scale, low=0, low_open=True,
                    optional=True)
        resolve_mixed_precision(self.mixed_precision)  # a clear error for an unknown mode
        if not 0 < self.eval_fraction < 1:
            raise NLAError(f"{name}.eval_fraction must be in (0, 1), got {self.eval_fraction!r}; "
                           "set --eval-fraction to e.g. 0.1")
        if isinstance(self.extra_splits, str):
            self.extra_splits = [x.strip() for x in self.extra_splits.split(",") if x.strip()]
        self.extra_splits = tuple(self.extra_splits)
        scored = [x for x in self.extra_splits if x in (VAL, HELDOUT)]
        if scored:
            raise NLAError(f"{name}.extra_splits: {scored} are the splits choices and results "
                           "are scored on; train on training splits only (e.g. rl)")
        if self.control not in (None, *CONTROLS):
            raise NLAError(f"unknown control {self.control!r}; the only control is 'shuffled' "
                           f"({name}.control; leave it unset for normal training)")


def ar_loss(ar: Reconstructor, module, vectors: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """The AR's training loss: mean mse_nrm of `module` (the AR or a wrapper of it) reading
    `texts` against `vectors`."""
    enc = ar.encode(texts)
    dev = ar.device
    pred = module(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
    return metrics.mse_nrm(pred, vectors.to(dev)).mean()


def sft_update(acc, module, loss_of, micro_batches, optimizer, params, precision: str,
               max_grad_norm: float) -> tuple[float, float, bool]:
    """One optimizer step of supervised training, the only one in nlakit (the SFT stages and
    the eval's fitted baselines): each (vectors, texts) micro-batch's ``loss_of(module,
    vectors, texts)`` under `precision`'s autocast, gradients accumulated (accelerate syncs on
    the last), then a step clipped to `max_grad_norm`, skipped when a gradient is not finite.
    Returns (mean loss over processes, gradient norm before clipping, stepped)."""
    step_loss = torch.zeros((), device=acc.device)
    for vectors, texts in micro_batches:
        with acc.accumulate(module):
            with autocast(precision, acc.device):
                loss = loss_of(module, vectors, texts)
            acc.backward(loss)  # divides by the accelerator's accumulation steps
        step_loss += loss.detach() / len(micro_batches)
    ok = all_finite(acc, params)
    grad_norm = guarded_step(acc, ok, optimizer, params, max_grad_norm)
    return float(acc.reduce(step_loss, "mean")), grad_norm, ok


def fit_reconstructor(ar: Reconstructor, texts: list[str], vectors: torch.Tensor, budget):
    """Train a *fresh* AR (``ar``, changed in place) on in-memory (text, vector) pairs the way
    the train_ar stage trains the NLA's AR: the same LoRA, AdamW, seeded epoch order, autocast,
    clipping and guarded step (`sft_update`), for `budget` (`nlakit.eval.baselines.FitBudget`:
    the NLA's AR's own recorded settings). Returns it in eval mode. No label set, checkpoint or
    resume: the eval's fitted baselines make their pairs at eval time."""
    if len(texts) != vectors.shape[0] or not texts:
        raise NLAError(f"{len(texts)} texts for {vectors.shape[0]} vectors")
    acc = make_accelerator()
    precision = resolve_mixed_precision(budget.mixed_precision, acc.device)
    ar.body = make_trainable(ar.body, budget.lora_rank, budget.lora_alpha)
    ar.head.requires_grad_(True)
    ar.train()
    params = trainable_params(ar)
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=budget.weight_decay)
    size = min(budget.batch_size, len(texts))
    order = epoch_order(len(texts), budget.steps * size / len(texts), budget.seed)
    for step in range(budget.steps):
        batch = order[step * size:(step + 1) * size]
        sft_update(acc, ar, lambda m, v, t: ar_loss(ar, m, v, t),
                   [(vectors[batch], [texts[i] for i in batch])], optimizer, params, precision,
                   budget.max_grad_norm)
    return ar.eval()


class _Task:
    """What differs between AV and AR training: the module, its loss and its evaluation."""

    def __init__(self, role, cfg, store, model, tok, start=None):
        """`start`: (its directory, the Verbalizer or Reconstructor, its meta) of a continued
        half (`init_from`), when `model` and `tok` are None; else None: start from the target."""
        self.role, self.cfg, self.store, self.start = role, cfg, store, start
        if role == "av" and start:  # the start's marker, scale and tokenizer (load_start checks)
            av = start[1]
            self.marker, self.scale = av.marker, av.injection_scale
            self.module = make_trainable(av.model, cfg.lora_rank, cfg.lora_alpha)
            self.av = Verbalizer(self.module, av.tokenizer, self.marker, self.scale, av.template)
            self.av.decoding = dict(av.decoding)
        elif role == "av":
            self.marker = choose_marker(tok, cfg.av_template, cfg.marker)
            self.scale = cfg.injection_scale or nice_injection_scale(
                store.stats("all")["mean_norm"])
            self.module = make_trainable(model, cfg.lora_rank, cfg.lora_alpha)
            self.av = Verbalizer(self.module, tok, self.marker, self.scale, cfg.av_template)
        else:
            ar = start[1] if start else Reconstructor.from_target(model, tok, store.layer,
                                                                  cfg.ar_template)
            ar.body = make_trainable(ar.body, cfg.lora_rank, cfg.lora_alpha)
            ar.head.requires_grad_(True)
            self.module = self.ar = ar

    def loss(self, module, vectors: torch.Tensor, texts: list[str]) -> torch.Tensor:
        if self.role == "av":
            batch = self.av.sft_batch(texts, self.cfg.max_response_tokens)
            return self.av.sft_loss(vectors, batch, model=module)
        return ar_loss(self.ar, module, vectors, texts)

    @torch.no_grad()
    def evaluate(self, rows: Rows) -> dict:
        """AV: mean held-out loss (real vectors). AR: fve_nrm against the store's rawvar."""
        self.module.eval()
        bs = self.cfg.batch_size
        if self.role == "av":
            losses, weights = [], []
            for s in range(0, len(rows), bs):
                r = rows.subset(range(s, min(s + bs, len(rows))))
                batch = self.av.sft_batch(r.texts, self.cfg.max_response_tokens)
                loss = self.av.sft_loss(torch.from_numpy(r.vectors), batch)
                n_tok = int((batch["labels"][:, 1:] != -100).sum())
                losses.append(float(loss) * n_tok)
                weights.append(n_tok)
            self.module.train()
            return {"eval_loss": sum(losses) / sum(weights)}
        pred = self.ar.reconstruct(rows.texts, batch_size=bs)
        truth = torch.from_numpy(rows.vectors)
        stats = self.store.stats("all")
        self.module.train()
        return {
            "eval_fve_nrm": float(metrics.fve_nrm(pred, truth, stats["rawvar"]).mean()),
            "eval_mse_nrm": float(metrics.mse_nrm(pred, truth).mean()),
            "eval_cos": float(metrics.cos(pred, truth).mean()),
        }

    def export(self, role_dir: Path, provenance: dict) -> None:
        store, cfg = self.store, self.cfg
        stats = store.stats("all")
        nlakit = {
            "target_model": dict(store.meta["model"]),
            "layer": store.layer,
            "num_layers": store.meta["num_layers"],
            "dataset_stats": {k: stats[k] for k in ("n", "mean_norm", "rawvar", "meannorm",
                                                    "mean_unit_direction_norm")},
            "provenance": provenance,
        }
        d = store.d_model
        if self.role == "av":
            model = self.module
            keep = cfg.keep_adapters and hasattr(model, "peft_config")
            if keep and self.start:
                model = stack_onto_target(self.start[2]["nlakit"]["target_model"]["spec"],
                                          None, self.start[0], model)
            elif hasattr(model, "merge_and_unload") and not keep:
                model = model.merge_and_unload()
            nlakit["weights"] = "adapter" if keep else "merged"
            meta = av_meta(d_model=d, layer=store.layer, injection_scale=self.scale,
                           marker=self.marker, av_template=cfg.av_template,
                           ar_template=cfg.ar_template, nlakit=nlakit)
            # a continued AV keeps its start's decoding unless this run sets its own
            decoding = _decoding(cfg) or (self.start[2].get("decoding") if self.start else None)
            if decoding:
                meta["decoding"] = decoding
            save_av_dir(role_dir, model, self.av.tokenizer, meta)
        else:
            body = self.ar.body
            keep = cfg.keep_adapters and hasattr(body, "peft_config")
            if keep and self.start:
                body = stack_onto_target(self.start[2]["nlakit"]["target_model"]["spec"],
                                         store.layer, self.start[0], body)
            elif hasattr(body, "merge_and_unload") and not keep:
                body = body.merge_and_unload()
            nlakit["weights"] = "adapter" if keep else "merged"
            meta = ar_meta(d_model=d, layer=store.layer, ar_template=cfg.ar_template,
                           nlakit=nlakit)
            save_ar_dir(role_dir, body, self.ar.head, self.ar.tokenizer, meta)


def train_sft(role: str, labels_dir: str | Path, out_dir: str | Path,
              cfg: SFTConfig | None = None, *, acts: str | Path | None = None,
              overwrite: bool = False, progress: bool = True) -> dict:
    """Train the AV (`role="av"`, on the av_sft split) or the AR (`"ar"`, on ar_sft) and write
    ``out_dir/av`` or ``out_dir/ar`` (an NLA half; train both into one dir to get an NLA).
    Returns a summary with the final evaluation (None on processes other than the main one)."""
    if role not in ("av", "ar"):
        raise NLAError(f"role must be 'av' or 'ar', got {role!r}")
    cfg = cfg or SFTConfig()
    cfg.__post_init__()  # again: fields may have been set after construction
    if cfg.control and role != "av":
        raise NLAError("the shuffled-activation control applies to the AV only")
    return SFTTrainer(role, labels_dir, out_dir, cfg, acts=acts, progress=progress).run(
        overwrite=overwrite)


# Settings that do not change the steps already taken: a checkpoint survives their change.
EXTENSIBLE_SETTINGS = ("max_steps", "eval_every", "save_every", "eval_rows",
                       "no_repeat_ngram_size", "repetition_penalty")
DECODING_DEFAULTS = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0}
# settings added after runs existed, hashed only when set, so those runs' hashes stay the same
LATER_DEFAULTS = {**DECODING_DEFAULTS, "extra_splits": (), "init_from": None}


def _decoding(cfg: SFTConfig) -> dict:
    """The AV's decoding settings that differ from plain greedy decoding."""
    return {k: getattr(cfg, k) for k, v in DECODING_DEFAULTS.items() if getattr(cfg, k) != v}


def _identity(cfg: SFTConfig) -> dict:
    """The config as hashed: later settings only when set, so the hashes of runs made before
    they existed stay the same; mixed_precision never (the run hash holds what it resolves to)."""
    return {k: v for k, v in asdict(cfg).items() if k != "mixed_precision"
            and (k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k])}


class SFTTrainer:
    """One supervised run: rows and model set up once, then `run` = restore, steps (each: the
    micro-batches' losses and gradients, the guarded optimizer step, evaluation, log,
    checkpoint), export."""

    def __init__(self, role: str, labels_dir: str | Path, out_dir: str | Path, cfg: SFTConfig,
                 *, acts: str | Path | None = None, progress: bool = True):
        self.role, self.cfg, self.progress = role, cfg, progress
        self.labels_dir, out_dir = Path(labels_dir), Path(out_dir)
        self.init_dir = resolve_half(cfg.init_from, role) if cfg.init_from else None
        self.init_fingerprint = fingerprint(self.init_dir) if self.init_dir else None
        self.train_dir, self.role_dir = out_dir / f".train-{role}", out_dir / role
        self.acc = make_accelerator(self.train_dir, cfg.grad_accum)
        self.precision = resolve_mixed_precision(cfg.mixed_precision, self.acc.device)
        torch.manual_seed(cfg.seed)
        self._load_rows(acts)
        self._plan_steps()
        self.config_hash = self._run_hash(cfg)
        # The checkpoint ignores the settings that do not change the steps already taken (the
        # learning rate is constant and the row order a prefix-stable cycle), so a finished run
        # can be extended by raising max_steps.
        self.checkpoint = Checkpoint(self.train_dir, self._run_hash(cfg, trajectory_only=True),
                                     also_accept=self._legacy_hashes())
        self.metrics = MetricsLog(self.acc, self.train_dir / "log.jsonl", f"sft_{role}")

    def _run_hash(self, cfg: SFTConfig, trajectory_only: bool = False) -> str:
        settings = _identity(cfg)
        if trajectory_only:
            settings = {k: v for k, v in settings.items() if k not in EXTENSIBLE_SETTINGS}
        parts = [self.role, settings, str(self.labels_dir.resolve()), self.store.meta["model"],
                 self.acc.num_processes]
        if self.init_fingerprint:  # only when set: earlier runs keep their hashes
            parts.append(self.init_fingerprint)
        if self.precision != "no":  # float32 runs keep the hashes they had before bf16
            parts.append({"mixed_precision": self.precision})
        return stable_hash(*parts)

    def _legacy_hashes(self) -> tuple[str, ...]:
        """Checkpoints written before the trajectory hash carry the full config's hash: accept
        one whose recorded config (train_dir/config.json) differs from this one only in the
        extensible settings."""
        old = recorded_config(self.train_dir, SFTConfig)
        if old is None:
            return ()
        same = {k: v for k, v in _identity(old).items() if k not in EXTENSIBLE_SETTINGS} == \
            {k: v for k, v in _identity(self.cfg).items() if k not in EXTENSIBLE_SETTINGS}
        return (self._run_hash(old),) if same else ()

    def _load_rows(self, acts) -> None:
        """Training rows, evaluation rows (the heldout split, else held-out documents)."""
        cfg = self.cfg
        split = AV_SFT if self.role == "av" else AR_SFT
        self.store, rows = load_labelled(self.labels_dir, split, acts)
        for extra in cfg.extra_splits:
            if extra == split:
                raise NLAError(f"extra_splits names {split!r}, which the {self.role} trains on "
                               "already; list only other splits")
            rows = rows.concat(load_labelled(self.labels_dir, extra, acts)[1])
        split = "+".join((split, *cfg.extra_splits))
        if has_split(self.labels_dir, HELDOUT):
            _, eval_rows = load_labelled(self.labels_dir, HELDOUT, acts)
            self.train_rows, self.eval_source = rows, "labelled heldout split"
        else:
            self.train_rows, eval_rows = split_by_document(rows, cfg.eval_fraction, cfg.seed)
            self.eval_source = (f"{cfg.eval_fraction:.0%} of {split} documents held out from "
                                "training")
        self.eval_rows = eval_rows.subset(range(min(len(eval_rows), cfg.eval_rows)))
        if cfg.control == "shuffled":
            perm = np.random.default_rng(cfg.seed + 1).permutation(len(self.train_rows))
            self.train_rows.vectors = self.train_rows.vectors[perm]

    def run(self, overwrite: bool = False) -> dict | None:
        acc = self.acc
        if overwrite and acc.is_main_process:
            shutil.rmtree(self.train_dir, ignore_errors=True)
        acc.wait_for_everyone()
        previous = self._finished()
        if previous is not None:
            log.info("%s already holds this training's result; nothing to do", self.role_dir)
            return previous if acc.is_main_process else None
        self._setup_model()
        start = self.checkpoint.load({"params": self.task.module},
                                     {"optimizer": self.optimizer})
        self.module, self.optimizer = acc.prepare(self.task.module, self.optimizer)
        if start and self.checkpoint.loaded_hash != self.checkpoint.config_hash:
            self._save(start)  # re-key an older checkpoint now: config.json is rewritten below
        if start > self.n_steps:
            raise NLAError(f"{self.train_dir} holds a checkpoint at step {start}, past this "
                           f"run's {self.n_steps} steps; raise --max-steps or pass --overwrite")
        if acc.is_main_process:
            self.train_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.train_dir / "config.json",
                       {"role": self.role, "config": asdict(self.cfg),
                        "labels": str(self.labels_dir), "processes": acc.num_processes})
        self.metrics.start(keep_until=start)
        t0, last = time.time(), {}
        with tqdm(total=self.n_steps, initial=start, desc=f"train {self.role}", unit="step",
                  disable=not (self.progress and acc.is_main_process)) as bar:
            for step in range(start, self.n_steps):
                last = self.train_step(step, t0)
                self.evaluate_log_save(step, last)
                bar.set_postfix(loss=f"{last['loss']:.3f}")
                bar.update(1)
        self.metrics.close()
        return self._finish(start, last, t0)

    def _finished(self) -> dict | None:
        """The summary of a finished run of this very configuration, if the output holds one."""
        done = self.train_dir / "summary.json"
        if done.is_file() and (self.role_dir / "nla_meta.yaml").is_file():
            previous = json.loads(done.read_text())
            # the steps too: before max_steps could outrun the epochs, a run asking for more
            # steps than its epochs held stopped at the epochs' end under the same hash
            if previous.get("config_hash") == self.config_hash and \
                    previous.get("steps") == self.n_steps:
                return previous
        return None

    def _setup_model(self) -> None:
        store, cfg = self.store, self.cfg
        device = str(self.acc.device)
        model = tok = start = None
        if self.init_dir:  # the start brings its own copy of the target (load_start checks it)
            half, meta = load_start(self.role, self.init_dir, store, cfg,
                                    resolve_dtype(cfg.dtype, resolve_device(device)), device)
            start = (self.init_dir, half, meta)
        else:
            model, tok = load_model(store.meta["model"]["spec"], dtype=cfg.dtype, device=device)
            want = store.meta["model"].get("weights_hash")
            have = model.nlakit_source["weights_hash"]
            if want and want != have:
                raise NLAError(f"the store was extracted from weights {want}, but "
                               f"{store.meta['model']['spec']!r} now has {have}")
        self.task = _Task(self.role, cfg, store, model, tok, start)
        self.task.module.train()
        self.params = trainable_params(self.task.module)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)

    def _plan_steps(self) -> None:
        """The fixed row order of the whole run and its number of optimizer steps: max_steps
        when given (past the epochs the rows cycle through further epochs of the same seeded,
        prefix-stable sequence), else as many as the epochs fill."""
        cfg, n = self.cfg, len(self.train_rows)
        per_step = cfg.batch_size * self.acc.num_processes * cfg.grad_accum
        epochs = max(cfg.epochs, cfg.max_steps * per_step / n) if cfg.max_steps else cfg.epochs
        self.order = epoch_order(n, epochs, cfg.seed)
        self.n_steps = cfg.max_steps or max(1, len(self.order) // per_step)

    def micro_batch(self, step: int, micro: int) -> Rows:
        """This process's rows of micro-batch `micro` of optimizer step `step`."""
        cfg, acc = self.cfg, self.acc
        base = (step * cfg.grad_accum + micro) * cfg.batch_size * acc.num_processes
        lo = base + acc.process_index * cfg.batch_size
        return self.train_rows.subset(self.order[lo : lo + cfg.batch_size])

    def train_step(self, step: int, t0: float) -> dict:
        """Accumulate the micro-batches' gradients (accelerate syncs on the last one), then one
        guarded optimizer step. Returns the step's log record."""
        cfg = self.cfg
        micro = [self.micro_batch(step, m) for m in range(cfg.grad_accum)]
        loss, grad_norm, ok = sft_update(
            self.acc, self.module, self.task.loss,
            [(torch.from_numpy(rows.vectors), rows.texts) for rows in micro],
            self.optimizer, self.params, self.precision, cfg.max_grad_norm)
        if not ok:
            log.warning("step %d: non-finite gradients, update skipped", step)
        return {"step": step + 1, "loss": loss, "grad_norm": grad_norm, "skipped": not ok,
                "elapsed_s": round(time.time() - t0, 2)}

    def evaluate_log_save(self, step: int, record: dict) -> None:
        """Held-out evaluation every eval_every steps and at the end, the log record, and a
        checkpoint every save_every steps (the last one is saved by `_finish`)."""
        acc, cfg = self.acc, self.cfg
        done = step + 1 == self.n_steps
        if acc.is_main_process and ((step + 1) % cfg.eval_every == 0 or done):
            record.update(self.task.evaluate(self.eval_rows))
        self.metrics.write(record)
        if (step + 1) % cfg.save_every == 0 and not done:
            acc.wait_for_everyone()
            if acc.is_main_process:
                self._save(step + 1)

    def _save(self, step: int) -> None:
        self.checkpoint.save(step, {"params": self.acc.unwrap_model(self.module)},
                             {"optimizer": self.optimizer})

    def _finish(self, start: int, last: dict, t0: float) -> dict | None:
        """Final checkpoint, export of the NLA half, summary.json; the summary (main only)."""
        acc, cfg = self.acc, self.cfg
        acc.wait_for_everyone()
        summary = {"role": self.role, "steps": self.n_steps, "resumed_from": start,
                   "mixed_precision": self.precision,
                   "train_rows": len(self.train_rows), "eval_rows": len(self.eval_rows),
                   "eval_source": self.eval_source, "control": cfg.control,
                   "seconds": round(time.time() - t0, 1), "processes": acc.num_processes,
                   "config_hash": self.config_hash,
                   "final": last if acc.is_main_process else {}}
        if acc.is_main_process:
            self._save(self.n_steps)  # checkpoint first: exporting merges LoRA in place
            provenance = {
                "labels": str(self.labels_dir.resolve()), "acts": str(self.store.path.resolve()),
                "config": asdict(cfg),
                "summary": {k: v for k, v in summary.items() if k != "final"},
                "final_eval": {k: v for k, v in last.items() if k.startswith("eval_")},
                "nlakit_version": __version__}
            if self.task.start:  # the chain of trainings this half holds (evaluate.ar_budget)
                provenance["init"] = {
                    "from": str(self.init_dir.resolve()), "fingerprint": self.init_fingerprint,
                    "provenance": self.task.start[2].get("nlakit", {}).get("provenance", {})}
            self.task.module = acc.unwrap_model(self.module)
            self.task.export(self.role_dir, provenance)
            write_json(self.train_dir / "summary.json", summary)
        acc.wait_for_everyone()
        return summary if acc.is_main_process else None
