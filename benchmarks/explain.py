"""Explanation and AR-scoring throughput: batched vs one at a time, measured side by side.

    python benchmarks/explain.py [--nla DIR] [--n 16] [--max-new-tokens 48] [--repeats 2]

Without --nla, an untrained NLA is built from the embedded SmolLM2 (speed does not depend on
training). Both methods use identical settings (greedy decoding, the same vectors and the same
max_new_tokens, no early stop: generation runs to the cap so the token counts are equal) and
alternate within the run, so background load affects both alike. Prints explanations/s of
each and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", default=None)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from nlakit import load_model
    from nlakit.nla.facade import NLA

    if args.nla:
        nla = NLA.load(args.nla)
    else:
        nla = NLA.from_target(load_model("smollm2-135m"), 20, injection_scale=250.0)
    av = nla.av
    torch.manual_seed(0)
    vectors = torch.randn(args.n, nla.d_model) * 10
    av.eos_id = -1  # never stop early: both methods generate exactly max_new_tokens per row

    def batched():
        return av.generate(vectors, temperature=0, max_new_tokens=args.max_new_tokens,
                           batch_size=args.n)

    def one_at_a_time():
        # the naive loop: one generate call per vector, same code path otherwise
        return [av.generate(vectors[i : i + 1], temperature=0,
                            max_new_tokens=args.max_new_tokens)[0] for i in range(args.n)]

    texts = [f"The text is about topic number {i}, in a formal register." for i in range(args.n)]

    def ar_batched():
        return nla.ar.reconstruct(texts, batch_size=args.n)

    def ar_single():
        return torch.cat([nla.ar.reconstruct([t]) for t in texts])

    timings = {name: [] for name in ("batched", "single", "ar_batched", "ar_single")}
    batched()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("single", one_at_a_time),
                         ("ar_batched", ar_batched), ("ar_single", ar_single)):
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)

    def rate(name):
        return args.n / min(timings[name])

    print(f"vectors {args.n}, max_new_tokens {args.max_new_tokens}, threads "
          f"{torch.get_num_threads()}, best of {args.repeats}")
    print(f"AV batched        {rate('batched'):8.2f} explanations/s")
    print(f"AV one-at-a-time  {rate('single'):8.2f} explanations/s")
    print(f"AV ratio          {rate('batched') / rate('single'):8.2f}x")
    print(f"AR batched        {rate('ar_batched'):8.2f} explanations/s")
    print(f"AR one-at-a-time  {rate('ar_single'):8.2f} explanations/s")
    print(f"AR ratio          {rate('ar_batched') / rate('ar_single'):8.2f}x")


if __name__ == "__main__":
    main()
