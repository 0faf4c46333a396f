"""Supervised warm start of the AV (response-only cross-entropy) and the AR (normalised MSE).

Runs through `accelerate`: the same code trains on one CPU, several processes (gloo) or GPUs
(`accelerate launch -m nlakit.cli train ...`). Data parallelism is done by hand over a fixed,
seeded order of rows (`data.epoch_order`): step s, micro-batch a, process r reads a fixed slice,
so a resumed run — or a run on more processes with the same global batch — sees the same rows.
Checkpoints hold only trainable tensors (LoRA weights and the AR head), the optimizer, the RNG
states and the step, and are written atomically; `resume` continues exactly.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__, metrics
from ..checkpoint import ar_meta, av_meta, save_ar_dir, save_av_dir, write_dir_atomic
from ..errors import ConfigMismatchError, NLAError
from ..fileio import stable_hash, write_json
from ..models import load_model
from ..reconstructor import DEFAULT_AR_TEMPLATE, Reconstructor
from ..verbalizer import DEFAULT_AV_TEMPLATE, Verbalizer, choose_marker, nice_injection_scale
from .data import Rows, epoch_order, has_split, load_labelled, split_by_document

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    lr: float = 2e-4
    batch_size: int = 8  # rows per process per micro-batch
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lora_rank: int = 16  # 0 = full fine-tuning
    lora_alpha: int | None = None  # default 2 * rank
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 25
    save_every: int = 25
    eval_rows: int = 64
    eval_fraction: float = 0.1  # of training documents, when the labels have no heldout split
    seed: int = 0
    max_response_tokens: int = 96
    control: str | None = None  # "shuffled": permute vectors across rows (AV only)
    injection_scale: float | None = None  # default: a round number above the mean norm
    marker: str | None = None
    av_template: str = DEFAULT_AV_TEMPLATE
    ar_template: str = DEFAULT_AR_TEMPLATE
    keep_adapters: bool = False  # AV: save LoRA adapters instead of merged weights
    dtype: str | None = None


def _make_trainable(model, cfg: SFTConfig):
    if cfg.lora_rank and cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                          lora_dropout=0.0, target_modules="all-linear", bias="none")
        return get_peft_model(model, lora)
    return model.requires_grad_(True)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _trainable_state(module) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}


def _save_checkpoint(train_dir: Path, step: int, module, optimizer, config_hash: str) -> None:
    def write(tmp: Path) -> None:
        torch.save({"step": step, "config_hash": config_hash, "params": _trainable_state(module),
                    "optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "state.pt")

    write_dir_atomic(train_dir / "checkpoint", write)


def _load_checkpoint(train_dir: Path, module, optimizer, config_hash: str) -> int:
    path = train_dir / "checkpoint" / "state.pt"
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config_hash"] != config_hash:
        raise ConfigMismatchError(
            f"{train_dir} holds a checkpoint of a different training configuration; pass "
            "--overwrite to start over or choose another --out")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in state["params"].items():
            params[k].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["step"])


class _Task:
    """What differs between AV and AR training: the module, its loss and its evaluation."""

    def __init__(self, role, cfg, store, model, tok):
        self.role, self.cfg, self.store = role, cfg, store
        if role == "av":
            self.marker = choose_marker(tok, cfg.av_template, cfg.marker)
            self.scale = cfg.injection_scale or nice_injection_scale(
                store.stats("all")["mean_norm"])
            self.module = _make_trainable(model, cfg)
            self.av = Verbalizer(self.module, tok, self.marker, self.scale, cfg.av_template)
        else:
            ar = Reconstructor.from_target(model, tok, store.layer, cfg.ar_template)
            ar.body = _make_trainable(ar.body, cfg)
            ar.head.requires_grad_(True)
            self.module = self.ar = ar

    def loss(self, module, vectors: torch.Tensor, texts: list[str]) -> torch.Tensor:
        if self.role == "av":
            batch = self.av.sft_batch(texts, self.cfg.max_response_tokens)
            return self.av.sft_loss(vectors, batch, model=module)
        enc = self.ar.encode(texts)
        dev = self.ar.device
        pred = module(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        return metrics.mse_nrm(pred, vectors.to(dev)).mean()

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
            if hasattr(model, "merge_and_unload") and not keep:
                model = model.merge_and_unload()
            nlakit["weights"] = "adapter" if keep else "merged"
            meta = av_meta(d_model=d, layer=store.layer, injection_scale=self.scale,
                           marker=self.marker, av_template=cfg.av_template,
                           ar_template=cfg.ar_template, nlakit=nlakit)
            save_av_dir(role_dir, model, self.av.tokenizer, meta)
        else:
            body = self.ar.body
            if hasattr(body, "merge_and_unload"):
                body = body.merge_and_unload()
            nlakit["weights"] = "merged"
            meta = ar_meta(d_model=d, layer=store.layer, ar_template=cfg.ar_template,
                           nlakit=nlakit)
            save_ar_dir(role_dir, body, self.ar.head, self.ar.tokenizer, meta)


def train_sft(role: str, labels_dir: str | Path, out_dir: str | Path,
              cfg: SFTConfig | None = None, *, acts: str | Path | None = None,
              overwrite: bool = False, progress: bool = True) -> dict:
    """Train the AV (`role="av"`, on the av_sft split) or the AR (`"ar"`, on ar_sft) and write
    ``out_dir/av`` or ``out_dir/ar`` (an NLA half; train both into one dir to get an NLA).
    Returns a summary with the final evaluation (None on processes other than the main one)."""
    from accelerate import Accelerator

    if role not in ("av", "ar"):
        raise NLAError(f"role must be 'av' or 'ar', got {role!r}")
    cfg = cfg or SFTConfig()
    if cfg.control not in (None, "shuffled"):
        raise NLAError(f"unknown control {cfg.control!r}; the only control is 'shuffled'")
    if cfg.control and role != "av":
        raise NLAError("the shuffled-activation control applies to the AV only")
    out_dir = Path(out_dir)
    train_dir = out_dir / f".train-{role}"
    role_dir = out_dir / role
    # cpu=True when there is no GPU: only then does accelerate form a gloo process group from
    # torchrun / `accelerate launch` environment variables on a CPU-only machine.
    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)

    split = "av_sft" if role == "av" else "ar_sft"
    store, rows = load_labelled(labels_dir, split, acts)
    if has_split(labels_dir, "heldout"):
        _, eval_rows = load_labelled(labels_dir, "heldout", acts)
        train_rows, eval_source = rows, "labelled heldout split"
    else:
        train_rows, eval_rows = split_by_document(rows, cfg.eval_fraction, cfg.seed)
        eval_source = f"{cfg.eval_fraction:.0%} of {split} documents held out from training"
    eval_rows = eval_rows.subset(range(min(len(eval_rows), cfg.eval_rows)))
    if cfg.control == "shuffled":
        perm = np.random.default_rng(cfg.seed + 1).permutation(len(train_rows))
        train_rows.vectors = train_rows.vectors[perm]

    config_hash = stable_hash(role, asdict(cfg), str(Path(labels_dir).resolve()),
                              store.meta["model"], acc.num_processes)
    if overwrite and acc.is_main_process:
        shutil.rmtree(train_dir, ignore_errors=True)
    acc.wait_for_everyone()
    done_path = train_dir / "summary.json"
    if done_path.is_file() and (role_dir / "nla_meta.yaml").is_file():
        previous = json.loads(done_path.read_text())
        if previous.get("config_hash") == config_hash:
            log.info("%s already holds this training's result; nothing to do", role_dir)
            return previous if acc.is_main_process else None

    model, tok = load_model(store.meta["model"]["spec"], dtype=cfg.dtype, device=str(acc.device))
    want = store.meta["model"].get("weights_hash")
    have = model.nlakit_source["weights_hash"]
    if want and want != have:
        raise NLAError(f"the store was extracted from weights {want}, but "
                       f"{store.meta['model']['spec']!r} now has {have}")
    task = _Task(role, cfg, store, model, tok)
    task.module.train()
    params = [p for p in task.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = _load_checkpoint(train_dir, task.module, optimizer, config_hash)
    module, optimizer = acc.prepare(task.module, optimizer)

    order = epoch_order(len(train_rows), cfg.epochs, cfg.seed)
    per_step = cfg.batch_size * acc.num_processes * cfg.grad_accum
    n_steps = max(1, len(order) // per_step)
    if cfg.max_steps:
        n_steps = min(n_steps, cfg.max_steps)
        while len(order) < n_steps * per_step:  # max_steps beyond the epochs: keep cycling
            order += epoch_order(len(train_rows), 1, cfg.seed + len(order))
    log_path = train_dir / "log.jsonl"
    if acc.is_main_process:
        train_dir.mkdir(parents=True, exist_ok=True)
        write_json(train_dir / "config.json", {"role": role, "config": asdict(cfg),
                                               "labels": str(labels_dir),
                                               "processes": acc.num_processes})
    t0 = time.time()
    bar = tqdm(total=n_steps, initial=start, desc=f"train {role}", unit="step",
               disable=not (progress and acc.is_main_process))
    history = []
    for step in range(start, n_steps):
        step_loss = torch.zeros((), device=acc.device)
        for micro in range(cfg.grad_accum):
            base = (step * cfg.grad_accum + micro) * cfg.batch_size * acc.num_processes
            lo = base + acc.process_index * cfg.batch_size
            idx = order[lo : lo + cfg.batch_size]
            r = train_rows.subset(idx)
            vectors = torch.from_numpy(r.vectors)
            sync = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(module) if not sync and acc.num_processes > 1 else _null()
            with ctx:
                loss = task.loss(module, vectors, r.texts) / cfg.grad_accum
                acc.backward(loss)
            step_loss += loss.detach()
        grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        grads_ok = bool(acc.reduce(torch.tensor(float(grads_ok), device=acc.device),
                                   "min") > 0)
        if grads_ok:
            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
        else:
            grad_norm = float("nan")
            log.warning("step %d: non-finite gradients, update skipped", step)
        optimizer.zero_grad(set_to_none=True)
        mean_loss = float(acc.reduce(step_loss, "mean"))
        record = {"step": step + 1, "loss": mean_loss, "grad_norm": float(grad_norm),
                  "skipped": not grads_ok, "elapsed_s": round(time.time() - t0, 2)}
        done = step + 1 == n_steps
        if acc.is_main_process and ((step + 1) % cfg.eval_every == 0 or done):
            record.update(task.evaluate(eval_rows))
        if acc.is_main_process:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            history.append(record)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 and not done:
            acc.wait_for_everyone()
            if acc.is_main_process:
                _save_checkpoint(train_dir, step + 1, acc.unwrap_model(module), optimizer,
                                 config_hash)
    bar.close()
    acc.wait_for_everyone()
    summary = {"role": role, "steps": n_steps, "resumed_from": start,
               "train_rows": len(train_rows), "eval_rows": len(eval_rows),
               "eval_source": eval_source, "control": cfg.control,
               "seconds": round(time.time() - t0, 1), "processes": acc.num_processes,
               "config_hash": config_hash, "final": history[-1] if history else {}}
    if acc.is_main_process:
        # checkpoint first: exporting merges LoRA into the weights in place
        _save_checkpoint(train_dir, n_steps, acc.unwrap_model(module), optimizer, config_hash)
        provenance = {"labels": str(Path(labels_dir).resolve()), "acts": str(store.path.resolve()),
                      "config": asdict(cfg), "summary": {k: v for k, v in summary.items()
                                                         if k != "final"},
                      "final_eval": {k: v for k, v in summary["final"].items()
                                     if k.startswith("eval_")},
                      "nlakit_version": __version__}
        task.module = acc.unwrap_model(module)
        task.export(role_dir, provenance)
        write_json(done_path, summary)
    acc.wait_for_everyone()
    return summary if acc.is_main_process else None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
