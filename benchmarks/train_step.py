"""Training throughput: the float32 path and bf16 autocast, side by side in one run.

    python benchmarks/train_step.py [--repeats 3] [--batch-size 8] [--rl-batch 4] [--group 4]
                                    [--max-new-tokens 48] [--label-rows 16] [--threads 2]

Each piece of work runs once per mode and repeat, the modes alternating (A B, B A, A B, ...) so
that load from other processes falls on both alike; the table shows the median seconds of each
mode and their ratio (float32 / bf16: above 1 = bf16 faster), and per phase where a step has
phases (the profile):

- **AV SFT step**: `Verbalizer.sft_batch` + `sft_loss` on a batch of real explanation-length
  targets, backward, AdamW step (LoRA rank 16, every linear layer), as `nlakit train av`;
- **AR SFT step**: `Reconstructor.loss`, backward, AdamW step, as `nlakit train ar`;
- **RL step**: the phases `nlakit train rl` times: rollout (`sample_rollouts`, G samples per
  activation at temperature 1), scoring (the AR's forward on every sample), AR update
  (backward + step), AV update (reference and policy log-probs, clipped policy loss, backward,
  step);
- **label_ar**: greedy explanations (`NLA.explain`, what the label_ar stage runs) of
  --label-rows rows, float32 in both columns: batches of 32 rows (the old default) against 128
  (the new one); bf16 does not pay in generation on this CPU (measured, docs/benchmarks.md).

bf16 is `torch.autocast("cpu", torch.bfloat16)` around the same calls: float32 weights and
AdamW state, bf16 matmuls (what `mixed_precision: bf16` does through accelerate). The work is
the shipped NLA (`smollm2-135m`, layer 10) on activations of built-in documentation text, so
explanation lengths are those of a trained AV; fresh LoRA adapters are trained on top.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

MODES = ("float32", "bf16")


def _autocast(mode: str):
    if mode == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _vectors(nla, n: int) -> torch.Tensor:
    """Block-K activations at n positions of built-in documentation text (past token 20)."""
    from nlakit.corpus.load import load_corpus

    out = []
    for doc in load_corpus("builtin:docs", max_docs=40):
        ids, acts = nla.activations(doc.text[:1500])
        out.extend(acts[20::7])
        if len(out) >= n:
            break
    return torch.stack(out[:n])


class Work:
    """The trainable halves and the optimizer state shared by every repeat of both modes."""

    def __init__(self, args):
        from nlakit.nla.facade import NLA
        from nlakit.train.common import make_trainable, trainable_params

        self.args = args
        self.nla = NLA.load("smollm2-135m")
        need = max(args.batch_size, args.rl_batch, args.label_rows)
        self.vectors = _vectors(self.nla, need)
        self.texts = [e.text for e in self.nla.explain(self.vectors[: args.batch_size],
                                                       max_new_tokens=96)]
        av, ar = self.nla.av, self.nla.ar
        av.model = make_trainable(av.model, 16)
        ar.body = make_trainable(ar.body, 16)
        ar.head.requires_grad_(True)
        self.av_opt = torch.optim.AdamW(trainable_params(av.model), lr=1e-5)
        self.ar_opt = torch.optim.AdamW(trainable_params(ar.body, ar.head), lr=1e-5)

    def av_sft(self, mode: str) -> dict:
        av, b = self.nla.av, self.args.batch_size
        av.model.train()
        t0 = time.perf_counter()
        with _autocast(mode):
            loss = av.sft_loss(self.vectors[:b], av.sft_batch(self.texts, 96))
        loss.backward()
        self.av_opt.step()
        self.av_opt.zero_grad()
        return {"step": time.perf_counter() - t0}

    def ar_sft(self, mode: str) -> dict:
        ar, b = self.nla.ar, self.args.batch_size
        ar.train()
        t0 = time.perf_counter()
        with _autocast(mode):
            loss = ar.loss(self.texts, self.vectors[:b])
        loss.backward()
        self.ar_opt.step()
        self.ar_opt.zero_grad()
        return {"step": time.perf_counter() - t0}

    def rl(self, mode: str) -> dict:
        from nlakit import metrics
        from nlakit.model.batching import right_pad
        from nlakit.nla.sampling import response_logprobs, sample_rollouts
        from nlakit.train import rewards as R

        a, av, ar = self.args, self.nla.av, self.nla.ar
        vec = self.vectors[: a.rl_batch]
        times = {}
        with _autocast(mode):
            t = time.perf_counter()
            av.model.eval()
            exps = sample_rollouts(av, vec, a.group, 1.0, 1.0, a.max_new_tokens, 64, seed=0)
            times["rollout"] = time.perf_counter() - t
            t = time.perf_counter()
            ar.train()
            pred = ar(**{k: v for k, v in ar.encode([e.text for e in exps]).items()
                         if k in ("input_ids", "attention_mask")})
            reward = -metrics.mse_nrm(pred.detach().float(), vec.repeat_interleave(a.group, 0))
            times["scoring"] = time.perf_counter() - t
            t = time.perf_counter()
            metrics.mse_nrm(pred, vec.repeat_interleave(a.group, 0)).mean().backward()
            self.ar_opt.step()
            self.ar_opt.zero_grad()
            times["ar_update"] = time.perf_counter() - t
            t = time.perf_counter()
            av.model.train()
            rep = vec.repeat_interleave(a.group, 0)
            resp, mask = right_pad([e.token_ids for e in exps], av.pad_id)
            with torch.no_grad(), av.model.disable_adapter():
                ref = response_logprobs(av.model, av, rep, resp, mask)
            logp = response_logprobs(av.model, av, rep, resp, mask)
            adv = R.group_advantages(reward, a.group)
            loss, _ = R.clipped_policy_loss(logp, logp.detach(), adv, mask.float(), 0.2)
            k3 = R.masked_mean(R.kl_per_token(logp, ref, "k3"), mask.float(), dim=1).mean()
            (loss + 0.01 * k3).backward()  # as train_rl with kl_estimator k3
            self.av_opt.step()
            self.av_opt.zero_grad()
            times["av_update"] = time.perf_counter() - t
        times["step"] = sum(times.values())
        times["mean_tokens"] = statistics.mean(e.n_tokens for e in exps)
        return times

    def label_ar(self, mode: str) -> dict:
        """float32 both: today's batch of 32 rows against the new default of 128 (bf16 does
        not pay in generation here; see docs/benchmarks.md)."""
        n = self.args.label_rows
        batch = 32 if mode == "float32" else 128
        self.nla.av.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            exps = self.nla.explain(self.vectors[:n], max_new_tokens=80, batch_size=batch)
        dt = time.perf_counter() - t0
        return {"step": dt, "explanations_per_s": n / dt,
                "mean_tokens": statistics.mean(e.n_tokens for e in exps)}


def run(args) -> dict:
    from nlakit.run.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Work(args)
    jobs = {"AV SFT step": work.av_sft, "AR SFT step": work.ar_sft, "RL step": work.rl,
            "label_ar rows": work.label_ar}
    results = {name: {m: [] for m in MODES} for name in jobs}
    for name, fn in jobs.items():
        fn("float32")  # warm-up (allocations, first-call costs), not timed
        fn("bf16")
        for r in range(args.repeats):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                results[name][mode].append(fn(mode))
    return results


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def print_table(results: dict) -> None:
    print(f"{'work':<26} {'today s':>10} {'new s':>10} {'ratio':>7}   (today = float32; "
          "new = bf16 autocast; label_ar: batch 32 -> 128, both float32)")
    for name, by_mode in results.items():
        keys = [k for k in by_mode["float32"][0] if k not in ("mean_tokens",
                                                              "explanations_per_s")]
        for key in keys:
            f32, bf = _median(by_mode["float32"], key), _median(by_mode["bf16"], key)
            label = name if key == "step" else f"  {key}"
            print(f"{label:<26} {f32:>10.2f} {bf:>10.2f} {f32 / bf:>6.2f}x")
        if "explanations_per_s" in by_mode["float32"][0]:
            rate = [_median(by_mode[m], "explanations_per_s") for m in MODES]
            print(f"{'  explanations per second':<26} {rate[0]:>10.2f} {rate[1]:>10.2f} "
                  f"{rate[1] / rate[0]:>6.2f}x")
        if "mean_tokens" in by_mode["float32"][0]:
            tokens = [_median(by_mode[m], "mean_tokens") for m in MODES]
            print(f"{'  mean tokens generated':<26} {tokens[0]:>10.1f} {tokens[1]:>10.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="SFT rows per step")
    p.add_argument("--rl-batch", type=int, default=4, help="activations per RL step")
    p.add_argument("--group", type=int, default=4, help="RL samples per activation (G)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="RL rollout cap")
    p.add_argument("--label-rows", type=int, default=128, help="rows label_ar explains")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the raw timings here")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or '?'}, "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}; median of {args.repeats} "
          "alternating repeats after one warm-up each")
    results = run(args)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
