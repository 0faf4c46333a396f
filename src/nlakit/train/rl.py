"""Reinforcement learning of the AV (GRPO) with the AR trained alongside.

One step, per process, on m activations of the store's ``rl`` split:

1. **rollout** — sample G explanations per activation from the current AV (temperature 1,
   batched generation with a KV cache), keeping the generated token ids;
2. **scoring** — the *current* AR reads every explanation (one batched forward); reward =
   −mse_nrm (or −log mse_nrm, or the contrastive InfoNCE reward), −2 for a missing closing tag
   or for hitting the length cap, optionally minus a length penalty;
3. **AV update** — teacher-forced log-probs of the sampled tokens with the vector injected;
   group-normalised advantages; PPO clipped-ratio loss (ε = 0.2); KL to the frozen SFT policy
   (the same peft model with its adapters disabled, or a frozen copy with ``full=True``);
4. **AR update** — one regression step (mean mse_nrm) on (explanation, true vector), reusing
   the scoring forward: the rewards come from its detached output, so they are the AR's
   predictions *before* its update.

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
``OUT/metrics.jsonl``, one JSON object per step; the result is a normal NLA directory.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__, metrics
from ..checkpoint import write_dir_atomic
from ..errors import ConfigMismatchError, NLAError
from ..fileio import stable_hash, stable_seed, write_json
from ..reconstructor import Reconstructor
from ..store import ActivationStore, vectors_from_arrow
from ..verbalizer import (
    Explanation,
    Verbalizer,
    check_vectors,
    locate_marker,
    parse_explanation,
)
from . import rewards as R
from .common import rng_state as _rng_state
from .common import set_rng_state as _set_rng_state
from .common import trainable_state as _trainable_state
from .data import epoch_order

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class RLConfig:
    max_steps: int = 200
    batch_size: int = 4  # activations per process per step
    group_size: int | None = None  # samples per activation; default 4 on CPU, 8 on GPU
    av_lr: float = 1e-5
    ar_lr: float = 5e-5
    lora_rank: int = 16  # AV LoRA rank on top of the merged SFT AV; 0 = full fine-tuning
    lora_alpha: int | None = None  # default 2 * rank
    ar_lora_rank: int = 16  # AR body LoRA rank (the head is always trained); 0 = full
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 150  # response cap; hitting it counts as a failure
    reward: str = "negmse"  # negmse | neglog | contrastive (InfoNCE over the m activations
    #                          of each process's batch)
    contrastive_temperature: float = 0.1
    failure_reward: float | None = R.FAILURE_REWARD  # None: no penalty for failures
    length_penalty: float = 0.0  # reward lost by a response of full length (linear in tokens)
    kl_coef: float = 0.01
    kl_estimator: str = "k1"  # k1 (reward penalty) | k3 (loss term)
    clip: float = 0.2
    truncate_explanations: bool = False  # matryoshka: score a random-length prefix per group
    truncate_min_tokens: int = 4
    max_grad_norm: float = 1.0
    eval_every: int = 25
    eval_rows: int = 32  # 0: no held-out evaluation
    eval_max_new_tokens: int | None = None  # default max_new_tokens
    save_every: int = 25
    rollout_batch_size: int = 64  # sequences per generate() call
    sampler: str = "fast"  # fast: nlakit's batched KV-cache sampler; hf: Verbalizer.generate
    shared_prefix: bool = True  # compute the prompt tokens before the marker once, not per row
    seed: int = 0
    dtype: str | None = None


def _default_group_size() -> int:
    return 8 if torch.cuda.is_available() else 4


def _lora(model, rank: int, alpha: int | None):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                     target_modules="all-linear", bias="none")
    return get_peft_model(model, cfg)


def _pad_responses(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [n, T] response ids and their 0/1 mask."""
    width = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for i, t in enumerate(token_ids):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = 1
    return ids, mask


def shared_prefix_len(av: Verbalizer) -> int:
    """Prompt tokens before the marker's left neighbour. They are the same in every row and,
    under causal attention, never see the injected vector: computing them once for the whole
    batch (and repeating their KV cache) gives exactly the per-row result."""
    return max(0, locate_marker(av.prompt_ids, av.marker) - 1)


def _prefix_cache(model, av: Verbalizer, rows: int):
    """(KV cache of the shared prompt prefix repeated for `rows` rows, prefix length); gradients
    flow through it when enabled."""
    k = shared_prefix_len(av)
    if k == 0:
        return None, 0
    prompt = torch.tensor(av.prompt_ids[:k], device=av.device)[None]
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(rows)
    return cache, k


def response_logprobs(model, av: Verbalizer, vectors: torch.Tensor, resp: torch.Tensor,
                      resp_mask: torch.Tensor, temperature: float = 1.0,
                      shared_prefix: bool = True) -> torch.Tensor:
    """Log-probabilities [n, T] of the response tokens under `model` (the AV or a wrapper of
    it) with `vectors` [n, d] injected: a teacher-forced pass over prompt + response. All
    prompts are the same length, responses are right-padded; padding gets log-prob 0. Only the
    T + 1 last positions go through the LM head; with `shared_prefix` the prompt tokens before
    the marker run once for the whole batch."""
    dev = av.device
    n, width = resp.shape
    cache, k = _prefix_cache(model, av, n) if shared_prefix else (None, 0)
    prompt = torch.tensor(av.prompt_ids, device=dev).expand(n, -1)
    ids = torch.cat([prompt[:, k:], resp.to(dev)], 1)
    mask = torch.cat([torch.ones_like(prompt), resp_mask.to(dev)], 1)  # covers the prefix too
    extra = {"past_key_values": cache, "use_cache": True} if cache is not None \
        else {"use_cache": False}
    with av.injection.active(vectors.to(dev)):
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=width + 1, **extra)
    logits = out.logits[:, -(width + 1) : -1].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), resp.to(dev).reshape(-1),
                            reduction="none").view(n, width)
    return logp * resp_mask.to(dev)


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                 gen: torch.Generator) -> torch.Tensor:
    """One token per row from [a, V] logits: greedy for temperature 0, else softmax(logits/T)
    restricted to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        srt, idx = logits.sort(-1, descending=True)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        logits = torch.full_like(logits, float("-inf")).scatter(
            -1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)


@torch.no_grad()
def fast_generate(av: Verbalizer, vectors, *, n: int = 1, temperature: float = 1.0,
                  top_p: float = 1.0, max_new_tokens: int = 150, batch_size: int = 64,
                  seed: int = 0) -> list[Explanation]:
    """`Verbalizer.generate` for rollouts, same output (with token ids), less work:
    the shared prompt prefix runs once per call; the prompt prefill computes logits for the
    last position only; decoding is a plain loop over the model with a KV cache and no
    attention mask (every live row has the same length); rows that wrote EOS leave the batch
    (their cache rows are dropped), so finished samples cost nothing. Sampling uses its own
    seeded generator (a different random stream from `generate`'s)."""
    v = check_vectors(vectors, av.d_model).repeat_interleave(n, 0)
    if max_new_tokens < 1 or batch_size < 1:
        raise NLAError("max_new_tokens and batch_size must be >= 1")
    model, dev, eos = av.model, av.device, av.eos_id
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    k = shared_prefix_len(av)
    prompt = torch.tensor(av.prompt_ids, device=dev)
    results: list[Explanation] = []
    for start in range(0, v.shape[0], batch_size):
        chunk = v[start : start + batch_size]
        b = chunk.shape[0]
        cache, _ = _prefix_cache(model, av, b)
        with av.injection.active(chunk):
            out = model(input_ids=prompt[k:].expand(b, -1), past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        tokens = torch.full((b, max_new_tokens), av.pad_id, dtype=torch.long)
        lengths = torch.full((b,), max_new_tokens, dtype=torch.long)
        alive = torch.arange(b)
        for t in range(max_new_tokens):
            nxt = _sample_next(logits, temperature, top_p, gen)
            tokens[alive, t] = nxt.cpu()
            if t == max_new_tokens - 1:
                break
            done = (nxt == eos).cpu()
            if bool(done.any()):
                lengths[alive[done]] = t + 1
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                alive, nxt = alive[keep], nxt[keep.to(dev)]
                cache.batch_select_indices(keep.to(dev))
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
        for row, n_tok in zip(tokens.tolist(), lengths.tolist()):
            ids = row[:n_tok]
            raw = av.tokenizer.decode(ids, skip_special_tokens=True)
            text, complete = parse_explanation(raw)
            hit_cap = n_tok >= max_new_tokens and ids[-1] != eos
            results.append(Explanation(text, complete, raw, n_tok, hit_cap, ids))
    return results


def sample_rollouts(av: Verbalizer, vectors: torch.Tensor, group_size: int, temperature: float,
                    top_p: float, max_new_tokens: int, batch_size: int, *, seed: int,
                    sampler: str = "fast") -> list:
    """G explanations per vector (activation-major), with their generated token ids."""
    if sampler == "hf":
        return av.generate(vectors, n=group_size, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    if sampler != "fast":
        raise NLAError(f"unknown sampler {sampler!r}; use fast or hf")
    return fast_generate(av, vectors, n=group_size, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)


def _prefixes(tokenizer, texts: list[str], lengths: torch.Tensor) -> list[str]:
    """The first lengths[i] tokens of each text (matryoshka truncation)."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[: int(n)]) for ids, n in zip(enc, lengths)]


def _finite_grads(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
    return rows


def _write_log(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tmp.replace(path)


class _TensorBoard:
    """Scalars to TensorBoard when it is installed; a no-op otherwise."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(log_dir))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self.writer.add_scalar(f"rl/{k}", v, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train_rl(nla_dir: str | Path, acts: str | Path, out_dir: str | Path,
             cfg: RLConfig | None = None, *, resume: bool = False, overwrite: bool = False,
             progress: bool = True, export: bool = True) -> dict | None:
    """GRPO on the AV of the NLA at `nla_dir` (usually the SFT warm start) with its AR trained
    alongside, on the ``rl`` split of the activation store `acts`; held-out evaluation on its
    ``heldout`` split. Writes ``out_dir/metrics.jsonl``, a checkpoint under
    ``out_dir/.train-rl`` and finally the NLA (``out_dir/av``, ``out_dir/ar``; export=False
    skips it, for benchmarks).
    Returns a summary on the main process (None elsewhere)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from ..nla import NLA

    cfg = copy.deepcopy(cfg or RLConfig())
    if cfg.group_size is None:
        cfg.group_size = _default_group_size()
    if cfg.reward not in R.REWARDS:
        raise NLAError(f"unknown reward {cfg.reward!r}; choose one of {', '.join(R.REWARDS)}")
    if cfg.kl_estimator not in R.KL_ESTIMATORS:
        raise NLAError(f"unknown KL estimator {cfg.kl_estimator!r}; choose k1 or k3")
    if cfg.group_size < 2:
        raise NLAError(f"--group-size must be >= 2 for group-normalised advantages, got "
                       f"{cfg.group_size}")
    if cfg.batch_size < 1 or cfg.max_steps < 1 or cfg.max_new_tokens < 1:
        raise NLAError("batch size, max steps and max new tokens must be >= 1")
    if cfg.reward == "contrastive" and cfg.batch_size < 2:
        raise NLAError("the contrastive reward needs --batch-size >= 2 (activations per process)")
    nla_dir, out_dir = Path(nla_dir), Path(out_dir)
    if out_dir.resolve() == nla_dir.resolve():
        raise NLAError("--out must differ from --nla: RL writes a new NLA and never overwrites "
                       "its starting point")
    for sub in ("av", "ar"):
        if not (nla_dir / sub).is_dir():
            raise NLAError(f"{nla_dir} has no {sub}/ directory: pass an NLA directory (train "
                           "both halves with `nlakit train av|ar --out DIR`)")

    ddp_kwargs = DistributedDataParallelKwargs(
        find_unused_parameters=cfg.lora_rank == 0 or cfg.ar_lora_rank == 0)
    acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp_kwargs])
    store = ActivationStore(acts)
    train_dir = out_dir / ".train-rl"
    log_path = out_dir / METRICS_FILE
    ckpt_path = train_dir / "checkpoint" / "state.pt"
    if overwrite and acc.is_main_process:
        shutil.rmtree(train_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    if ckpt_path.is_file() and not resume:
        raise NLAError(f"{out_dir} holds an RL checkpoint; pass --resume to continue it or "
                       "--overwrite to start over")

    torch.manual_seed(cfg.seed)
    nla = NLA.load(nla_dir, device=str(acc.device), dtype=cfg.dtype)
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
    n_rl = store.num_rows("rl")
    if n_rl < cfg.batch_size:
        raise NLAError(f"{store.path} has {n_rl} rows in its rl split; need at least "
                       f"--batch-size {cfg.batch_size}")
    rl_vectors = store.vectors("rl")
    rawvar = float(store.stats("all")["rawvar"])
    has_heldout = cfg.eval_rows > 0 and "heldout" in store.splits \
        and store.num_rows("heldout") > 0
    if has_heldout:
        held = store.table("heldout", columns=["row_id", "vector", "token_text", "prefix"])
        held = held.slice(0, min(held.num_rows, cfg.eval_rows))
        held_vectors = torch.from_numpy(vectors_from_arrow(held.column("vector"),
                                                           store.d_model).copy())
        held_prefix = held.column("prefix").to_pylist()
        held_ids = held.column("row_id").to_pylist()
    elif cfg.eval_rows > 0:
        log.warning("%s has no heldout split: no held-out evaluation", store.path)

    # ---- the AV policy: fresh LoRA over the merged SFT AV; reference = adapters disabled ----
    base_av = nla.av
    tok = base_av.tokenizer
    if cfg.lora_rank > 0:
        policy = _lora(base_av.model, cfg.lora_rank, cfg.lora_alpha)
        ref_av = None  # the same model with disable_adapter()
    else:
        ref_model = copy.deepcopy(base_av.model).eval().requires_grad_(False)
        policy = base_av.model.requires_grad_(True)
        ref_av = Verbalizer(ref_model, tok, base_av.marker, base_av.injection_scale,
                            base_av.template)
    av = Verbalizer(policy, tok, base_av.marker, base_av.injection_scale, base_av.template)
    ar = nla.ar
    ar.body = _lora(ar.body, cfg.ar_lora_rank, None) if cfg.ar_lora_rank > 0 \
        else ar.body.requires_grad_(True)
    ar.head.requires_grad_(True)
    av_params = [p for p in policy.parameters() if p.requires_grad]
    ar_params = [p for p in ar.parameters() if p.requires_grad]
    av_opt = torch.optim.AdamW(av_params, lr=cfg.av_lr, weight_decay=0.0)
    ar_opt = torch.optim.AdamW(ar_params, lr=cfg.ar_lr, weight_decay=0.0)

    config_hash = stable_hash("rl", asdict(cfg), str(nla_dir.resolve()),
                              str(store.path.resolve()), acc.num_processes)
    start = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["config_hash"] != config_hash:
            raise ConfigMismatchError(
                f"{train_dir} holds a checkpoint of a different RL configuration; pass "
                "--overwrite to start over or choose another --out")
        with torch.no_grad():
            for module, key in ((policy, "av_params"), (ar, "ar_params")):
                named = dict(module.named_parameters())
                for k, v in state[key].items():
                    named[k].copy_(v)
        av_opt.load_state_dict(state["av_optimizer"])
        ar_opt.load_state_dict(state["ar_optimizer"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
    av_module, ar_module, av_opt, ar_opt = acc.prepare(policy, ar, av_opt, ar_opt)

    G, m, P = cfg.group_size, cfg.batch_size, acc.num_processes
    per_step = m * P
    total = cfg.max_steps * per_step
    order = epoch_order(n_rl, total / n_rl, cfg.seed)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        train_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in _read_log(log_path) if r.get("step", 0) <= start]
        _write_log(log_path, kept)  # drop steps logged after the checkpoint we resume from
        write_json(train_dir / "config.json", {"config": asdict(cfg), "nla": str(nla_dir),
                                               "acts": str(store.path), "processes": P})
    acc.wait_for_everyone()
    tb = _TensorBoard(train_dir / "tensorboard", acc.is_main_process)
    eval_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens

    def evaluate() -> dict:
        """Greedy explanations of the first eval_rows held-out rows, scored by the AR."""
        policy.eval()
        ar.eval()
        exps = sample_rollouts(av, held_vectors, 1, 0.0, 1.0, eval_tokens,
                               cfg.rollout_batch_size, seed=0, sampler=cfg.sampler)
        pred = ar.reconstruct([e.text for e in exps], batch_size=cfg.rollout_batch_size)
        fve = metrics.fve_nrm(pred, held_vectors, rawvar)
        examples = [{"row_id": int(held_ids[i]), "context": held_prefix[i][-120:],
                     "explanation": exps[i].text, "complete": exps[i].complete,
                     "fve_nrm": round(float(fve[i]), 4)} for i in range(min(3, len(exps)))]
        return {"heldout_fve_nrm": float(fve.mean()),
                "heldout_complete_rate": sum(e.complete for e in exps) / len(exps),
                "heldout_response_len": sum(e.n_tokens for e in exps) / len(exps),
                "examples": examples}

    def save_checkpoint(step: int) -> None:
        def write(tmp: Path) -> None:
            torch.save({"step": step, "data_position": step * per_step,
                        "config_hash": config_hash,
                        "av_params": _trainable_state(acc.unwrap_model(av_module)),
                        "ar_params": _trainable_state(acc.unwrap_model(ar_module)),
                        "av_optimizer": av_opt.state_dict(), "ar_optimizer": ar_opt.state_dict(),
                        "rng": _rng_state()}, tmp / "state.pt")

        write_dir_atomic(train_dir / "checkpoint", write)

    bar = tqdm(total=cfg.max_steps, initial=start, desc="train rl", unit="step",
               disable=not (progress and acc.is_main_process))
    t_start = time.time()
    last = {}
    if (start == 0 and has_heldout and acc.is_main_process
            and not any(r.get("step") == 0 for r in _read_log(log_path))):
        # step 0: the warm start's held-out score, so every curve starts where RL began (once:
        # a run killed before its first checkpoint restarts at 0 and keeps the earlier record)
        t0 = time.perf_counter()
        record0 = {"step": 0, **evaluate()}
        record0["time_eval_s"] = round(time.perf_counter() - t0, 4)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record0, ensure_ascii=False) + "\n")
        tb.write(record0)
    acc.wait_for_everyone()
    for step in range(start, cfg.max_steps):
        lo = step * per_step + acc.process_index * m
        vectors = rl_vectors[order[lo : lo + m]]  # [m, d]
        vec_rep = vectors.repeat_interleave(G, 0)  # [m*G, d]
        times = {}

        # 1. rollout: G samples per activation, batched, KV cache
        t0 = time.perf_counter()
        policy.eval()
        seed = stable_seed("rl-sample", cfg.seed, step, acc.process_index) % (2**63)
        exps = sample_rollouts(av, vectors, G, cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                               cfg.rollout_batch_size, seed=seed, sampler=cfg.sampler)
        times["rollout"] = time.perf_counter() - t0

        # 2. scoring by the current AR (its forward is reused for its update)
        t0 = time.perf_counter()
        ar_module.train()
        texts = [e.text for e in exps]
        if cfg.truncate_explanations:
            gen = torch.Generator().manual_seed(
                stable_seed("rl-truncate", cfg.seed, step, acc.process_index) % (2**63))
            lengths = R.truncate_lengths(m, G, cfg.max_new_tokens, cfg.truncate_min_tokens, gen)
            texts = _prefixes(tok, texts, lengths)
        enc = ar.encode(texts)
        pred = ar_module(enc["input_ids"].to(acc.device), enc["attention_mask"].to(acc.device))
        pred_d = pred.detach().float().cpu()
        raw = R.compute_rewards(cfg.reward, pred_d, vectors, G, cfg.contrastive_temperature)
        failed = torch.tensor([(not e.complete) or e.hit_cap for e in exps])
        n_tokens = torch.tensor([e.n_tokens for e in exps], dtype=torch.float32)
        reward = R.length_penalty(raw, n_tokens, cfg.max_new_tokens, cfg.length_penalty)
        reward = R.apply_failures(reward, failed, cfg.failure_reward)  # flat -2, no length term
        fve = metrics.fve_nrm(pred_d, vec_rep, rawvar)
        times["scoring"] = time.perf_counter() - t0

        # 3. AR gradients: one regression step on (explanation, true vector)
        t0 = time.perf_counter()
        ar_loss = metrics.mse_nrm(pred, vec_rep.to(pred.device, pred.dtype)).mean()
        acc.backward(ar_loss)
        times["ar_update"] = time.perf_counter() - t0

        # 4. AV gradients: clipped policy loss with group-normalised advantages and KL
        t0 = time.perf_counter()
        policy.train()
        resp, resp_mask = _pad_responses([e.token_ids for e in exps], av.pad_id)
        with torch.no_grad():
            if ref_av is None:
                with policy.disable_adapter():
                    ref_logp = response_logprobs(policy, av, vec_rep, resp, resp_mask,
                                                 cfg.temperature, cfg.shared_prefix)
            else:
                ref_logp = response_logprobs(ref_av.model, ref_av, vec_rep, resp, resp_mask,
                                             cfg.temperature, cfg.shared_prefix)
        logp = response_logprobs(av_module, av, vec_rep, resp, resp_mask, cfg.temperature,
                                 cfg.shared_prefix)
        mask_d = resp_mask.to(logp.device)
        kl_tok = R.kl_per_token(logp.detach(), ref_logp, cfg.kl_estimator)
        shaped = reward
        if cfg.kl_estimator == "k1" and cfg.kl_coef:
            shaped = reward - cfg.kl_coef * (kl_tok * mask_d).sum(1).cpu()
        adv = R.group_advantages(shaped, G).to(logp.device)
        policy_loss, info = R.clipped_policy_loss(logp, logp.detach(), adv, mask_d, cfg.clip)
        loss = policy_loss
        if cfg.kl_estimator == "k3" and cfg.kl_coef:
            k3 = R.kl_per_token(logp, ref_logp, "k3")
            loss = loss + cfg.kl_coef * R.masked_mean(k3, mask_d, dim=1).mean()
        acc.backward(loss)

        ok = _finite_grads(av_params) and _finite_grads(ar_params) and \
            bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(ar_loss.detach()))
        ok = bool(acc.reduce(torch.tensor(float(ok), device=acc.device), "min") > 0)
        if ok:
            av_gn = float(acc.clip_grad_norm_(av_params, cfg.max_grad_norm))
            av_opt.step()
        else:
            av_gn = float("nan")
            log.warning("RL step %d: non-finite gradients or loss, update skipped", step + 1)
        av_opt.zero_grad(set_to_none=True)
        times["av_update"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if ok:
            ar_gn = float(acc.clip_grad_norm_(ar_params, cfg.max_grad_norm))
            ar_opt.step()
        else:
            ar_gn = float("nan")
        ar_opt.zero_grad(set_to_none=True)
        times["ar_update"] += time.perf_counter() - t0

        # 5. log: per-sample tensors gathered from every process
        local = torch.stack([reward, raw, fve, n_tokens, failed.float(),
                             torch.tensor([float(e.hit_cap) for e in exps]),
                             torch.tensor([float(not e.complete) for e in exps]),
                             (kl_tok * mask_d).sum(1).cpu() / mask_d.sum(1).cpu().clamp(min=1)],
                            1).to(acc.device)
        allrows = acc.gather(local).cpu()
        scal = torch.tensor([float(policy_loss.detach()), float(ar_loss.detach()),
                             info["clip_fraction"], sum(times.values())],
                            device=acc.device)
        scal = acc.reduce(scal, "mean").cpu()
        record = {
            "step": step + 1,
            "reward_mean": float(allrows[:, 0].mean()),
            "reward_std": float(allrows[:, 0].std()) if allrows.shape[0] > 1 else 0.0,
            "raw_reward_mean": float(allrows[:, 1].mean()),
            "fve_nrm": float(allrows[:, 2].mean()),
            "kl": float(allrows[:, 7].mean()),
            "response_len": float(allrows[:, 3].mean()),
            "failure_rate": float(allrows[:, 4].mean()),
            "truncation_rate": float(allrows[:, 5].mean()),
            "incomplete_rate": float(allrows[:, 6].mean()),
            "policy_loss": float(scal[0]),
            "ar_loss": float(scal[1]),
            "clip_fraction": float(scal[2]),
            "av_grad_norm": av_gn,
            "ar_grad_norm": ar_gn,
            "skipped": not ok,
            **{f"time_{k}_s": round(v, 4) for k, v in times.items()},
            "time_step_s": round(float(scal[3]), 4),
            "samples": int(allrows.shape[0]),
        }
        if acc.is_main_process:
            record["example"] = exps[0].text[:300]
        done = step + 1 == cfg.max_steps
        if has_heldout and acc.is_main_process and (done or (step + 1) % cfg.eval_every == 0):
            t0 = time.perf_counter()
            record.update(evaluate())
            record["time_eval_s"] = round(time.perf_counter() - t0, 4)
        if acc.is_main_process:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            tb.write(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", fve=f"{record['fve_nrm']:.3f}")
        last = record
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 and not done:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(step + 1)
        acc.wait_for_everyone()
    bar.close()
    tb.close()
    # every replica must hold the same weights after the all-reduced updates: compare checksums
    with torch.no_grad():
        sums = torch.tensor([sum(float(p.double().abs().sum()) for p in av_params),
                             sum(float(p.double().abs().sum()) for p in ar_params)],
                            dtype=torch.float64, device=acc.device)
    checksums = acc.gather(sums[None]).cpu().view(-1, 2)
    in_sync = bool(torch.allclose(checksums, checksums[:1].expand_as(checksums), rtol=1e-9,
                                  atol=0.0))
    acc.wait_for_everyone()
    summary = {"steps": cfg.max_steps, "resumed_from": start, "processes": P,
               "group_size": G, "batch_size": m, "rl_rows": n_rl,
               "seconds": round(time.time() - t_start, 1),
               "replica_checksums": checksums.tolist(), "replicas_in_sync": in_sync,
               "final": {k: v for k, v in last.items() if k not in ("examples", "example")}}
    if acc.is_main_process:
        save_checkpoint(cfg.max_steps)
    if acc.is_main_process and export:
        _export(nla, acc.unwrap_model(av_module), acc.unwrap_model(ar_module), av, out_dir,
                {"rl": {"config": asdict(cfg), "from_nla": str(nla_dir.resolve()),
                        "acts": str(store.path.resolve()), "summary": summary,
                        "nlakit_version": __version__}})
    if acc.is_main_process:
        write_json(train_dir / "summary.json", summary)
    acc.wait_for_everyone()
    return summary if acc.is_main_process else None


def _export(nla, policy, ar: Reconstructor, av: Verbalizer, out_dir: Path,
            provenance: dict) -> None:
    """Merge the RL adapters and write OUT/av, OUT/ar (+ nla.yaml): a normal NLA directory."""
    from ..nla import NLA

    model = policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
    body = ar.body.merge_and_unload() if hasattr(ar.body, "merge_and_unload") else ar.body
    av_meta, ar_meta = copy.deepcopy(nla.av_meta), copy.deepcopy(nla.ar_meta)
    for meta in (av_meta, ar_meta):
        nl = meta.setdefault("nlakit", {})
        nl.setdefault("provenance", {})
        nl["provenance"] = {**nl["provenance"], **provenance}
        nl["weights"] = "merged"
    out_av = Verbalizer(model, av.tokenizer, av.marker, av.injection_scale, av.template)
    out_ar = Reconstructor(body, ar.head, ar.tokenizer, ar.template, ar.max_length)
    NLA(out_av, out_ar, av_meta, ar_meta).save(out_dir)

