"""The truths behind claim checks: one target forward per row vs one per document, side by side.

    python benchmarks/claim_checks.py [--docs 3] [--positions 10] [--max-tokens 384] [--repeats 2]

Rows are built as a store's are: positions of built-in documents, each row's prefix the text up
to its token. "per row" calls `truths_for_prefixes` on one row at a time (a forward per row, as
eval did before 2026-12-06); "grouped" calls it on all rows (one forward per group of rows that
are prefixes of one another). Both alternate within the run, so background load affects both
alike. Prints seconds of each, the ratio, and the largest difference of the truths' top-5
probabilities (they must agree).
"""

from __future__ import annotations

import argparse
import time

import torch


def rows(tokenizer, docs: int, positions: int, max_tokens: int) -> list[str]:
    from nlakit.corpus.load import load_corpus

    prefixes = []
    for doc in load_corpus("builtin:docs", max_docs=docs):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"][:max_tokens]
        step = max(1, (len(ids) - 50) // positions)
        prefixes += [tokenizer.decode(ids[: p + 1]) for p in range(50, len(ids), step)][:positions]
    return prefixes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--positions", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from nlakit import load_model
    from nlakit.nla.claims import Claims, truths_for_prefixes

    model, tok = load_model("smollm2-135m")
    prefixes = rows(tok, args.docs, args.positions, args.max_tokens)
    claims = [Claims() for _ in prefixes]
    times: dict[str, list[float]] = {"per row": [], "grouped": []}
    results = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name in times:
                t0 = time.perf_counter()
                if name == "per row":
                    out = [truths_for_prefixes(model, tok, [p], [c])[0]
                           for p, c in zip(prefixes, claims)]
                else:
                    out = truths_for_prefixes(model, tok, prefixes, claims)
                times[name].append(time.perf_counter() - t0)
                results[name] = out
    diff = max(abs(p - q) for a, b in zip(results["per row"], results["grouped"])
               for (_, p), (_, q) in zip(a.top, b.top))
    same = all([t for t, _ in a.top] == [t for t, _ in b.top]
               for a, b in zip(results["per row"], results["grouped"]))
    best = {k: min(v) for k, v in times.items()}
    print(f"{len(prefixes)} rows of {args.docs} documents, torch threads {torch.get_num_threads()}")
    for k, v in best.items():
        print(f"{k:>8}: {v:7.2f} s  ({len(prefixes) / v:6.2f} rows/s)")
    print(f"ratio per row / grouped: {best['per row'] / best['grouped']:.2f}x; "
          f"same top-5 tokens: {same}; max top-5 probability difference {diff:.2e}")


if __name__ == "__main__":
    main()
