"""Seconds per RL (GRPO) step on the embedded SmolLM2, broken down by phase.

    python benchmarks/rl_step.py [--nla DIR] [--acts DIR] [--steps 3] [--batch-size 4]
                                 [--group-size 4] [--max-new-tokens 64] [--no-shared-prefix]

Runs the real `train_rl` loop for a few steps and reads the per-phase timings it logs
(rollout = sampling G explanations per activation; scoring = the AR's batched forward and the
rewards; AV update = reference and policy log-probs, backward, optimizer step; AR update =
backward and step). The first step is a warm-up and is reported separately.

Without --nla it uses runs/dev/nla when that holds a complete NLA (av/ and ar/), else an
untrained NLA built from SmolLM2 at layer 20 (speed does not depend on training; an untrained AV
rarely closes its tag, so most samples run to the cap — the slow case for generation).
Without --acts it uses runs/dev/acts, else extracts a small store.

--compare-samplers times rollouts of the same vectors with HF `generate` (`Verbalizer.generate`)
and with nlakit's rollout sampler (the one RL uses), alternating. RL keeps only nlakit's sampler:
HF `generate` also applies the model's generation_config (top_k, repetition penalty), so its
samples would not follow the distribution the policy loss assumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("rollout", "scoring", "av_update", "ar_update")


def _nla_dir(arg: str | None, work: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), arg
    dev = ROOT / "runs" / "dev" / "nla"
    if (dev / "av" / "nla_meta.yaml").is_file() and (dev / "ar" / "nla_meta.yaml").is_file():
        return dev, str(dev)
    cached = Path(tempfile.gettempdir()) / "nlakit-bench-untrained-smollm2-l20"
    if not (cached / "ar" / "nla_meta.yaml").is_file():
        from nlakit import load_model
        from nlakit.nla.facade import NLA

        NLA.from_target(load_model("smollm2-135m"), 20, injection_scale=250.0).save(cached)
    return cached, "untrained (NLA.from_target(smollm2-135m, 20, injection_scale=250))"


def _acts_dir(arg: str | None, work: Path) -> Path:
    if arg:
        return Path(arg)
    dev = ROOT / "runs" / "dev" / "acts"
    if (dev / "meta.yaml").is_file():
        return dev
    from nlakit import load_model
    from nlakit.corpus.load import load_corpus
    from nlakit.extract.extraction import ExtractConfig, extract

    model = load_model("smollm2-135m")
    corpus = load_corpus("builtin", tokenizer=model[1], max_docs=30)
    extract(model, corpus, work / "acts", ExtractConfig(positions_per_doc=4,
                                                        max_tokens_per_doc=192),
            layer=20, progress=False)
    return work / "acts"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", default=None)
    ap.add_argument("--acts", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                    help="log-prob passes compute the prompt prefix once per batch (the default; "
                         "--no-shared-prefix: every row computes its whole prompt, as before)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--compare-samplers", type=int, default=0, metavar="REPEATS",
                    help="also A/B time samplers x threads and the log-prob passes")
    ap.add_argument("--compare-max-new-tokens", type=int, default=32)
    ap.add_argument("--compare-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--compare-only", action="store_true", help="skip the train_rl steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="nlakit-rl-bench-"))
    nla_dir, nla_desc = _nla_dir(args.nla, work)
    acts = _acts_dir(args.acts, work)
    result = {"args": vars(args), "nla": nla_desc}
    if not args.compare_only:
        result.update(run_steps(nla_dir, nla_desc, acts, args, work))
    if args.compare_samplers:
        result["compare"] = compare_samplers(nla_dir, acts, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def run_steps(nla_dir: Path, nla_desc: str, acts: Path, args, work: Path) -> dict:
    """A few real train_rl steps; per-phase medians over the steps after the warm-up."""
    from nlakit.train.rl import RLConfig, train_rl

    cfg = RLConfig(max_steps=args.steps, batch_size=args.batch_size,
                   group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                   eval_every=10**9, eval_rows=0, save_every=10**9,
                   shared_prefix=args.shared_prefix)
    t0 = time.perf_counter()
    train_rl(nla_dir, acts, work / "out", cfg, progress=False, export=False)
    wall = time.perf_counter() - t0
    with open(work / "out" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    timed = rows[1:] or rows

    def med(key):
        return statistics.median(r[key] for r in timed)

    step = med("time_step_s")
    print(f"NLA {nla_desc}")
    print(f"acts {acts}; {args.batch_size} activations x G={args.group_size}, cap "
          f"{args.max_new_tokens} tokens, shared prefix {args.shared_prefix}, threads "
          f"{torch.get_num_threads()}, {len(timed)} timed steps (+1 warm-up)")
    print(f"{'phase':<12}{'s/step':>9}{'share':>8}")
    for ph in PHASES:
        v = med(f"time_{ph}_s")
        print(f"{ph:<12}{v:>9.2f}{v / step:>8.1%}")
    print(f"{'step':<12}{step:>9.2f}")
    print(f"warm-up step {rows[0]['time_step_s']:.2f} s; mean response "
          f"{statistics.mean(r['response_len'] for r in rows):.1f} tokens; failure rate "
          f"{statistics.mean(r['failure_rate'] for r in rows):.2f}; whole run {wall:.1f} s "
          "(incl. loading; no evaluation, no export)")
    return {"rows": rows, "median": {ph: med(f"time_{ph}_s") for ph in PHASES}, "step": step}


def compare_samplers(nla_dir: Path, acts: Path, args) -> dict:
    """A/B timings in one process, alternating so background load falls on all variants alike:
    rollouts with the HF `generate` path vs the fast sampler, each with 1 and 2 torch threads;
    and the AV update's log-prob passes (reference forward + policy forward/backward) with
    and without the shared prompt prefix."""
    from nlakit.extract.store import ActivationStore
    from nlakit.model.batching import right_pad
    from nlakit.nla.facade import NLA
    from nlakit.nla.sampling import response_logprobs, sample_rollouts

    nla = NLA.load(nla_dir)
    vectors = ActivationStore(acts).vectors("rl")[: args.batch_size]
    av = nla.av
    G, cap = args.group_size, args.compare_max_new_tokens
    variants = [(s, t) for t in args.compare_threads for s in ("hf", "fast")]
    times = {f"{s}/{t}t": [] for s, t in variants}
    tokens = {k: [] for k in times}
    def rollouts(sampler, cap, seed):
        if sampler == "hf":
            return av.generate(vectors, n=G, temperature=1.0, top_p=1.0, max_new_tokens=cap,
                               batch_size=64, seed=seed)
        return sample_rollouts(av, vectors, G, 1.0, 1.0, cap, 64, seed=seed)

    rollouts("fast", 4, 0)  # warm-up
    for rep in range(args.compare_samplers):
        for s, t in (variants if rep % 2 == 0 else variants[::-1]):
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            exps = rollouts(s, cap, rep)
            times[f"{s}/{t}t"].append(time.perf_counter() - t0)
            tokens[f"{s}/{t}t"].append(sum(e.n_tokens for e in exps))
    print(f"rollouts of {args.batch_size} x G={G}, cap {cap} tokens, {args.compare_samplers} "
          "alternating repeats:")
    for k, v in times.items():
        print(f"  {k:<8} median {statistics.median(v):7.2f} s  runs "
              f"{', '.join(f'{x:.2f}' for x in v)}  tokens {tokens[k]}")

    torch.set_num_threads(min(args.compare_threads))
    model = av.model.requires_grad_(False)
    for name, p in model.named_parameters():  # a stand-in for LoRA: train the q projections
        p.requires_grad_("q_proj" in name)
    exps = sample_rollouts(av, vectors, G, 1.0, 1.0, args.max_new_tokens, 64, seed=0)
    resp, mask = right_pad([e.token_ids for e in exps], av.pad_id)
    vec = vectors.repeat_interleave(G, 0)
    lp_times = {"per-row prompt": [], "shared prefix": []}
    for rep in range(args.compare_samplers):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for shared in order:
            t0 = time.perf_counter()
            with torch.no_grad():
                response_logprobs(model, av, vec, resp, mask, shared_prefix=shared)
            lp = response_logprobs(model, av, vec, resp, mask, shared_prefix=shared)
            lp.sum().backward()
            model.zero_grad(set_to_none=True)
            lp_times["shared prefix" if shared else "per-row prompt"].append(
                time.perf_counter() - t0)
    print(f"AV log-prob passes (no-grad + grad forward, backward) on {resp.shape[0]} x "
          f"{resp.shape[1]} response tokens, {torch.get_num_threads()} thread(s):")
    for k, v in lp_times.items():
        print(f"  {k:<15} median {statistics.median(v):7.2f} s  runs "
              f"{', '.join(f'{x:.2f}' for x in v)}")
    return {"rollout_times": times, "rollout_tokens": tokens, "logprob_times": lp_times}


if __name__ == "__main__":
    main()
