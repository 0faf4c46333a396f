"""LoRA fine-tuning of a model on (user, answer) chats, the loss on the answer tokens only.

The chats are rendered with the model's own chat template and *no* system prompt, so whatever
made the answers special (the organism's hidden instruction) has to be learnt from the answers
alone. Output: a peft adapter directory (``adapter_config.json`` naming the base model spec,
e.g. ``smollm2-135m``, the adapter weights, the tokenizer, ``organism.json`` with the settings
and the training summary), written atomically. Training state lives beside it in
``.train-NAME/`` (checkpoint every `save_every` steps, `log.jsonl`); a re-run resumes there.
Load it back with `nlakit.apps.finetuned.load_finetuned(DIR)` (base + LoRA, merged).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nlakit import __version__
from nlakit.apps.finetuned import record_adapter_base
from nlakit.apps.organism.chats import chat_prompt
from nlakit.config import check_range, option
from nlakit.errors import NLAError
from nlakit.fileio import stable_hash, write_json
from nlakit.model.load import load_model
from nlakit.nla.checkpoint import write_dir_atomic
from nlakit.train.common import (
    Checkpoint,
    MetricsLog,
    all_finite,
    guarded_step,
    make_accelerator,
    make_trainable,
    trainable_params,
)
from nlakit.train.data import epoch_order

log = logging.getLogger(__name__)
META_FILE = "organism.json"


@dataclass
class FinetuneConfig:
    """Settings of one chat fine-tune (the organism's and the control's are the same)."""

    steps: int = option(50, "optimizer steps of the chat fine-tune")
    batch_size: int = option(8, "chats per step")
    lr: float = option(5e-4, "AdamW learning rate (constant)")
    lora_rank: int = option(16, "LoRA rank of the fine-tune (every linear layer)")
    lora_alpha: int | None = option(None, "LoRA alpha; default 2 * rank")
    max_answer_tokens: int = option(96, "answer tokens trained on (longer answers are cut)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this value")
    save_every: int = option(20, "checkpoint the fine-tune every N steps")
    seed: int = option(0, "seed of the chat order, the LoRA init and every sample")

    def __post_init__(self):
        name = type(self).__name__
        for key in ("steps", "batch_size", "lora_rank", "max_answer_tokens", "save_every"):
            check_range(name, key, getattr(self, key), low=0 if key == "lora_rank" else 1)
        if self.lora_rank == 0:
            raise NLAError(f"{name}.lora_rank must be >= 1: the fine-tune is saved as a LoRA "
                           "adapter; set --lora-rank 16")
        check_range(name, "lr", self.lr, low=0, low_open=True)
        check_range(name, "max_grad_norm", self.max_grad_norm, low=0, low_open=True)


def chat_batch(tokenizer, chats: list[dict], max_answer_tokens: int) -> dict:
    """input_ids / attention_mask / labels [b, t], right-padded: the prompt (chat template, no
    system prompt) then the answer and the end-of-turn token; labels are -100 except on the
    answer and end tokens (the model learns the answers, not the questions)."""
    end = tokenizer.eos_token_id
    seqs, labels = [], []
    for chat in chats:
        prompt = tokenizer(chat_prompt(tokenizer, chat["user"]), add_special_tokens=False)
        answer = tokenizer(chat["answer"], add_special_tokens=False)["input_ids"]
        # the end token even after a cut answer: the organism should end its turns
        answer = answer[:max_answer_tokens] + [end]
        seqs.append(prompt["input_ids"] + answer)
        labels.append([-100] * len(prompt["input_ids"]) + answer)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
    }


def _check_chats(chats: list[dict]) -> None:
    if not chats:
        raise NLAError("no chats to fine-tune on; write answers first (none were kept?)")
    bad = [i for i, c in enumerate(chats)
           if not (isinstance(c.get("user"), str) and isinstance(c.get("answer"), str)
                   and c["answer"].strip())]
    if bad:
        raise NLAError(f"chats {bad[:5]} lack a user text or a non-empty answer; every chat "
                       "needs {'user': str, 'answer': str}")


def finished(out_dir: str | Path, config_hash: str | None = None) -> dict | None:
    """organism.json of a finished fine-tune in `out_dir` (of this very config when given)."""
    meta = Path(out_dir) / META_FILE
    if not (meta.is_file() and (Path(out_dir) / "adapter_config.json").is_file()):
        return None
    data = json.loads(meta.read_text())
    return data if config_hash in (None, data.get("config_hash")) else None


def finetune_chats(model_spec: str, chats: list[dict], out_dir: str | Path,
                   cfg: FinetuneConfig | None = None, *, device: str | None = None,
                   progress: bool = True) -> dict:
    """Fine-tune a LoRA of `model_spec` on `chats` ({"user", "answer"}) and save the adapter
    directory `out_dir` (module doc). Returns its organism.json; a finished run of the same
    settings is returned as is, an interrupted one resumes from its checkpoint."""
    cfg = cfg or FinetuneConfig()
    cfg.__post_init__()
    _check_chats(chats)
    out_dir = Path(out_dir)
    model, tok = load_model(model_spec, device=device)
    source = model.nlakit_source
    config_hash = stable_hash(asdict(cfg), source, [(c["user"], c["answer"]) for c in chats])
    done = finished(out_dir, config_hash)
    if done is not None:
        return done
    torch.manual_seed(cfg.seed)  # the LoRA init
    peft_model = make_trainable(model, cfg.lora_rank, cfg.lora_alpha)
    peft_model.train()
    params = trainable_params(peft_model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    train_dir = out_dir.parent / f".train-{out_dir.name}"
    ckpt = Checkpoint(train_dir, config_hash, "chat fine-tune")
    start = ckpt.load({"params": peft_model}, {"optimizer": optimizer})
    acc = make_accelerator()
    metrics = MetricsLog(acc, train_dir / "log.jsonl", "organism")
    metrics.start(keep_until=start)
    order = epoch_order(len(chats), cfg.steps * cfg.batch_size / len(chats), cfg.seed)
    t0, last = time.time(), {}
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps,
                     desc=f"fine-tune {out_dir.name}", unit="step", disable=not progress):
        rows = [chats[i] for i in order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        last = _train_step(acc, peft_model, tok, rows, optimizer, params, cfg, step)
        last["elapsed_s"] = round(time.time() - t0, 2)
        metrics.write(last)
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            ckpt.save(step + 1, {"params": peft_model}, {"optimizer": optimizer})
    metrics.close()
    ckpt.save(cfg.steps, {"params": peft_model}, {"optimizer": optimizer})
    meta = {"base_model": source, "config": asdict(cfg), "config_hash": config_hash,
            "chats": len(chats), "steps": cfg.steps, "resumed_from": start,
            "seconds": round(time.time() - t0, 1), "final": last,
            "nlakit_version": __version__}
    save_adapter(peft_model, tok, out_dir, model_spec, meta, base_model=model)
    return meta


def _train_step(acc, model, tok, rows, optimizer, params, cfg, step) -> dict:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in chat_batch(tok, rows, cfg.max_answer_tokens).items()}
    loss = model(**batch).loss  # HF shifts the labels: token t+1 is predicted at t
    loss.backward()
    ok = all_finite(acc, params, [loss])
    grad_norm = guarded_step(acc, ok, optimizer, params, cfg.max_grad_norm)
    if not ok:
        log.warning("step %d: non-finite gradients, update skipped", step)
    return {"step": step + 1, "loss": float(loss.detach()), "grad_norm": grad_norm,
            "skipped": not ok}


def save_adapter(peft_model, tokenizer, out_dir: Path, model_spec: str, meta: dict, *,
                 base_model) -> None:
    """The peft adapter directory, its base named by `model_spec` (what loaders resolve with
    `load_model`, not the cache path transformers saw) and recorded by weights hash
    (`finetuned.record_adapter_base`), so `nlakit.apps.finetuned.load_finetuned` (and `nlakit diff
    --finetuned DIR`) applies it to the right base or refuses."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = model_spec

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / META_FILE, meta)
        record_adapter_base(tmp, base_model)

    write_dir_atomic(out_dir, write)
