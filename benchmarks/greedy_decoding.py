"""Greedy explanations: HF `generate` vs nlakit's decoding loop, measured side by side.

    python benchmarks/greedy_decoding.py --acts STORE [--nla smollm2-135m] [--split val]
        [--rows 64] [--batch-size 32] [--max-new-tokens 80] [--repeats 2]

Greedy decoding is what `label_ar`, `nlakit eval` and `nlakit explain` spend their time on.
`Verbalizer.generate` now runs it through `fast_generate`'s loop (the shared prompt prefix once,
finished rows leave the batch) wherever HF's greedy decoding is plain argmax plus the NLA's
n-gram ban. Both paths get the same real activations (a store's rows, so explanations end at
their natural length, as in a run), the NLA's stored decoding settings and the same batch size;
they alternate within the run, so background load affects both alike. Prints explanations/s
of each, the ratio, and how many rows got the very same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", default="smollm2-135m")
    ap.add_argument("--acts", required=True, help="an activation store at the NLA's layer")
    ap.add_argument("--split", default="val")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from nlakit.extract.store import ActivationStore
    from nlakit.nla.facade import NLA

    nla = NLA.load(args.nla)
    every = ActivationStore(args.acts).vectors(split=args.split)
    vectors = every[torch.linspace(0, len(every) - 1, args.rows).long()]  # spread over documents

    def run(sampler):
        return nla.av.generate(vectors, temperature=0, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, sampler=sampler)

    timings = {"hf": [], "auto": []}
    outputs = {}
    run("auto")  # warm-up
    for r in range(args.repeats):
        order = ("hf", "auto") if r % 2 == 0 else ("auto", "hf")
        for sampler in order:
            t = time.perf_counter()
            outputs[sampler] = run(sampler)
            timings[sampler].append(time.perf_counter() - t)

    n = len(vectors)
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs["hf"], outputs["auto"]))
    tokens = sum(e.n_tokens for e in outputs["auto"])
    print(f"{args.nla} on {n} {args.split} rows, batch {args.batch_size}, max_new_tokens "
          f"{args.max_new_tokens}, decoding {nla.av.decoding}, threads {torch.get_num_threads()}"
          f", best of {args.repeats}; {tokens / n:.1f} tokens per explanation")
    for sampler, label in (("hf", "HF generate"), ("auto", "nlakit loop")):
        runs = ", ".join(f"{s:.1f}" for s in timings[sampler])
        print(f"{label:12s} {n / min(timings[sampler]):7.2f} explanations/s (runs {runs} s)")
    print(f"ratio        {min(timings['hf']) / min(timings['auto']):7.2f}x")
    print(f"identical    {same}/{n} rows token for token")


if __name__ == "__main__":
    main()
