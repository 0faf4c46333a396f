"""Training infrastructure shared by SFT (`train.sft`) and RL (`train.rl`), written once.

- `make_trainable`: LoRA (peft, all linear layers) or full fine-tuning;
- `Checkpoint`: trainable tensors of named modules, their optimizers, the RNG states, the step
  (and any extra entries) in ``TRAIN_DIR/checkpoint/state.pt``, written atomically; loading
  refuses a checkpoint of another configuration;
- `all_finite` / `guarded_step`: the non-finite-gradient guard (every process agrees to skip);
- `MetricsLog`: one JSON object per step in a JSONL file, cut back to a resumed step, and the
  same numbers to TensorBoard through `accelerate`'s tracker when tensorboard is installed;
- `resolve_mixed_precision` / `autocast`: bf16 compute where the device has it natively;
- `make_accelerator`: an `Accelerator` on the GPU when there is one, else on the CPU (gloo
  under torchrun / `accelerate launch`), with gradient accumulation and the tracker set up;
  `process_state`: the same process state without an Accelerator (rank, main process, barrier).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from nlakit.errors import ConfigMismatchError, NLAError
from nlakit.nla.checkpoint import write_dir_atomic


def make_trainable(model, rank: int, alpha: int | None = None):
    """`model` with a fresh LoRA of `rank` (alpha default 2·rank, no dropout, every linear
    layer) when rank > 0; else the model itself with every parameter trainable."""
    if rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                          target_modules="all-linear", bias="none")
        return get_peft_model(model, lora)
    return model.requires_grad_(True)


def trainable_params(*modules) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def rng_state() -> dict:
    """The torch (CPU), numpy and python RNG states."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def trainable_state(module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that require grad (LoRA weights, heads), by name."""
    return {k: p.detach().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module, params: dict[str, torch.Tensor]) -> None:
    named = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in params.items():
            named[k].copy_(v)


class Checkpoint:
    """``train_dir/checkpoint/state.pt``: {"step", "config_hash", "rng", one entry per module
    (its trainable tensors) and per optimizer (its state dict), extra entries}. `modules` and
    `optimizers` map the entry names to the objects, so SFT keeps its ``params`` /
    ``optimizer`` keys and RL its ``av_params`` / ``ar_params`` / ``av_optimizer`` /
    ``ar_optimizer`` ones."""

    def __init__(self, train_dir: str | Path, config_hash: str, what: str = "training",
                 also_accept: tuple[str, ...] = ()):
        self.dir = Path(train_dir) / "checkpoint"
        self.path = self.dir / "state.pt"
        self.config_hash, self.what = config_hash, what
        self.accepted = {config_hash, *also_accept}  # e.g. the hash older versions wrote
        self.loaded_hash: str | None = None  # the hash of the checkpoint `load` restored

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, step: int, modules: dict, optimizers: dict, **extra) -> None:
        """Write atomically (a temp dir swapped in): a crash leaves the previous checkpoint."""
        state = {"step": step, **extra, "config_hash": self.config_hash,
                 **{k: trainable_state(m) for k, m in modules.items()},
                 **{k: o.state_dict() for k, o in optimizers.items()}, "rng": rng_state()}
        write_dir_atomic(self.dir, lambda tmp: torch.save(state, tmp / "state.pt"))

    def load(self, modules: dict, optimizers: dict) -> int:
        """Restore tensors, optimizers and RNG states; the step to continue from (0: none)."""
        if not self.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        self.loaded_hash = state["config_hash"]
        if state["config_hash"] not in self.accepted:
            raise ConfigMismatchError(
                f"{self.dir.parent} holds a checkpoint of a different {self.what} configuration; "
                "pass --overwrite to start over or choose another --out")
        for key, module in modules.items():
            load_trainable_state(module, state[key])
        for key, optimizer in optimizers.items():
            optimizer.load_state_dict(state[key])
        set_rng_state(state["rng"])
        return int(state["step"])


def recorded_config(train_dir: Path, config_cls):
    """The config a run recorded in ``train_dir/config.json``, as `config_cls`; None when there
    is none or it no longer fits the class (how older checkpoints' hashes are rebuilt)."""
    try:
        return config_cls(**json.loads((Path(train_dir) / "config.json").read_text())["config"])
    except (OSError, TypeError, KeyError, ValueError, NLAError):
        return None


def all_finite(acc, params, losses=()) -> bool:
    """True when every gradient in `params` and every loss is finite on every process (all
    processes must agree, or only some would step and the replicas would drift apart)."""
    ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
    ok = ok and all(bool(torch.isfinite(loss.detach()).all()) for loss in losses)
    return bool(acc.reduce(torch.tensor(float(ok), device=acc.device), "min") > 0)


def guarded_step(acc, ok: bool, optimizer, params, max_grad_norm: float) -> float:
    """Clip and step when `ok`, else skip the update; zero the gradients either way. Returns
    the gradient norm before clipping (NaN for a skipped step)."""
    norm = float(acc.clip_grad_norm_(params, max_grad_norm)) if ok else math.nan
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def process_state():
    """accelerate's `PartialState`: this process's rank (`is_main_process`, `process_index`,
    `num_processes`) and `wait_for_everyone` (a no-op alone). Under torchrun / `accelerate
    launch` the first call forms the process group (gloo without a GPU, as `make_accelerator`
    does); a single process gets one without any group."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


MIXED_PRECISION = ("auto", "bf16", "no")


def native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether the device computes bf16 matmuls natively: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than float32)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_mixed_precision(setting: str, device=None) -> str:
    """'bf16' or 'no' (accelerate's names): 'auto' is bf16 where `native_bf16`, else no."""
    if setting not in MIXED_PRECISION:
        raise NLAError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got "
                       f"{setting!r}; set --mixed-precision (or `mixed_precision:`)")
    if setting == "auto":
        return "bf16" if native_bf16(device) else "no"
    return setting


def autocast(mode: str, device):
    """bf16 autocast on `device` for mode 'bf16' (float32 weights, optimizer state and
    gradients; matmuls in bf16), a no-op for 'no'. torch's own autocast, not accelerate's
    `mixed_precision`: that one is process-global state, and one process (a test session, a
    pipeline) may run trainers of both modes."""
    if mode != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def make_accelerator(log_dir: str | Path | None = None, grad_accum: int = 1, **kwargs):
    """`Accelerator` with `grad_accum` gradient accumulation steps and, when tensorboard is
    installed and `log_dir` is given, a TensorBoard tracker writing under ``log_dir``.
    cpu=True when there is no GPU: only then does accelerate form a gloo process group from
    torchrun / `accelerate launch` environment variables on a CPU-only machine."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    tb = log_dir is not None and bool(is_tensorboard_available())
    return Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=grad_accum,
                       log_with="tensorboard" if tb else None,
                       project_dir=str(log_dir) if tb else None, **kwargs)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a last line cut short by a killed process is skipped."""
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class MetricsLog:
    """Per-step records: appended to a JSONL file (main process only) and, when the
    accelerator has a tracker, their numbers logged to TensorBoard as ``{prefix}/{key}``."""

    def __init__(self, acc, path: str | Path, prefix: str):
        self.acc, self.path, self.prefix = acc, Path(path), prefix
        self.tracking = False

    def start(self, keep_until: int | None = None) -> None:
        """Open the log; with `keep_until`, drop the records of later steps first (a resumed
        run rewrites the steps logged after its checkpoint). Collective: call everywhere."""
        if self.acc.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if keep_until is not None:
                kept = [r for r in self.records() if r.get("step", 0) <= keep_until]
                tmp = self.path.with_name(self.path.name + ".tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
                tmp.replace(self.path)
        if self.acc.log_with:
            self.acc.init_trackers("tensorboard")
            self.tracking = True

    def records(self) -> list[dict]:
        return read_jsonl(self.path)

    def write(self, record: dict) -> None:
        """Append one record (it must hold "step"); main process only."""
        if not self.acc.is_main_process:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tracking:
            scalars = {f"{self.prefix}/{k}": v for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.acc.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tracking:  # not acc.end_training(): that also ends the process group
            for tracker in self.acc.trackers:
                tracker.finish()
            self.tracking = False
