"""Extraction benchmark: truncated forward vs a naive full forward, and peak memory vs corpus size.

1. Throughput (tokens/s) of ``nlakit.model.hooks.forward_to_layer`` (stops after block K) against a
   naive ``model(..., output_hidden_states=True).hidden_states[K + 1]`` that runs every block and
   the LM head, on the same batches of documents. The two methods alternate within one run
   (A B, B A, A B, ...) so that load from other processes hits both alike; the ratio of median
   times is printed. Expected: close to L / (K + 1) = 30 / 21 = 1.43 for SmolLM2-135M at K = 20.
2. Peak resident memory of the real ``nlakit.extract.extraction.extract`` run in a fresh
   subprocess at
   two corpus sizes: activations stream to parquet shards, so the peak must not grow with the
   number of documents.

Run:  .venv/bin/python benchmarks/extract.py            (see --help for sizes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _batches(tok, n_batches: int, docs: int, tokens: int) -> list[tuple[torch.Tensor, ...]]:
    """`n_batches` batches of `docs` builtin:docs documents, each cut to exactly `tokens`."""
    from nlakit.corpus.load import load_corpus

    rows = []
    for doc in load_corpus("builtin:docs"):
        ids = tok(doc.text, add_special_tokens=True)["input_ids"]
        if len(ids) >= tokens:
            rows.append(ids[:tokens])
        if len(rows) == n_batches * docs:
            break
    if len(rows) < n_batches * docs:
        sys.exit(f"only {len(rows)} built-in documents have >= {tokens} tokens; lower --tokens")
    out = []
    for b in range(n_batches):
        ids = torch.tensor(rows[b * docs : (b + 1) * docs])
        out.append((ids, torch.ones_like(ids)))
    return out


def throughput(args) -> dict:
    from nlakit import load_model
    from nlakit.model.arch import check_layer, num_layers
    from nlakit.model.hooks import forward_to_layer

    model, tok = load_model(args.model)
    layer = check_layer(model, args.layer)
    n_layers = num_layers(model)
    batches = _batches(tok, args.batches, args.docs, args.tokens)

    def truncated(ids, mask):
        return forward_to_layer(model, ids, mask, layer)

    @torch.no_grad()
    def naive(ids, mask):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                    use_cache=False)
        return out.hidden_states[layer + 1]

    methods = {"truncated": truncated, "naive": naive}
    # same numbers from both (the benchmark compares equal work)
    ids, mask = batches[0]
    diff = (truncated(ids, mask) - naive(ids, mask)).abs().max().item()
    if diff > 1e-3:
        sys.exit(f"truncated and naive forward disagree (max abs diff {diff})")
    for _ in range(args.warmup):
        for fn in methods.values():
            fn(ids, mask)

    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
            start = time.perf_counter()
            for ids, mask in batches:
                methods[name](ids, mask)
            times[name].append(time.perf_counter() - start)
    n_tokens = args.batches * args.docs * args.tokens
    res = {"layer": layer, "num_layers": n_layers, "tokens_per_rep": n_tokens,
           "max_abs_diff": diff, "expected_ratio": n_layers / (layer + 1)}
    for name, ts in times.items():
        res[name] = {"seconds": ts, "median_s": statistics.median(ts),
                     "tokens_per_s": n_tokens / statistics.median(ts)}
    res["ratio"] = res["naive"]["median_s"] / res["truncated"]["median_s"]
    # per-rep paired ratios (each pair ran back to back)
    res["paired_ratios"] = [n / t for n, t in zip(times["naive"], times["truncated"])]
    return res


def _child_extract(args) -> None:
    """Run in a fresh process: one real extraction; print peak RSS as JSON."""
    from nlakit.corpus.load import load_corpus
    from nlakit.extract.extraction import ExtractConfig, extract
    from nlakit.model.load import load_model

    model, tok = load_model(args.model)
    corpus = load_corpus("builtin:docs", tokenizer=tok, max_docs=args.child_docs)
    start = time.perf_counter()
    cfg = ExtractConfig(max_tokens_per_doc=args.mem_max_tokens, batch_size=args.batch_size)
    store = extract((model, tok), corpus, args.child_out, cfg, layer=args.layer,
                    progress=False)
    seconds = time.perf_counter() - start
    hwm = None
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024  # kB -> MiB
    print(json.dumps({"docs": store.meta["counts"]["docs"], "rows": store.meta["counts"]["rows"],
                      "tokens": store.meta["counts"]["tokens"],
                      "parts": len(store.meta["parts"]), "extract_s": seconds,
                      "vmhwm_mib": hwm}))


def memory(args) -> list[dict]:
    results = []
    for n in args.mem_docs:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--child-docs", str(n), "--child-out",
                   os.path.join(tmp, "store"), "--model", args.model,
                   "--mem-max-tokens", str(args.mem_max_tokens),
                   "--batch-size", str(args.batch_size)]
            if args.layer is not None:
                cmd += ["--layer", str(args.layer)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"child extraction failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            # ru_maxrss of children is the max over every child so far (kB on Linux)
            res["children_maxrss_mib_so_far"] = (
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
            results.append(res)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=None, help="block K (default floor(2L/3))")
    p.add_argument("--docs", type=int, default=8, help="documents per batch")
    p.add_argument("--tokens", type=int, default=512, help="tokens per document")
    p.add_argument("--batches", type=int, default=1, help="batches per repetition")
    p.add_argument("--reps", type=int, default=4, help="timed repetitions of each method")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-docs", type=lambda s: [int(x) for x in s.split(",")],
                   default=[40, 160], help="corpus sizes for the memory test (default 40,160)")
    p.add_argument("--mem-max-tokens", type=int, default=256,
                   help="max_tokens_per_doc in the memory test (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="extract() batch size")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--child-docs", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child_docs is not None:
        _child_extract(args)
        return

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    out: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    if not args.skip_throughput:
        r = throughput(args)
        out["throughput"] = r
        print(f"\nthroughput: {args.model}, K={r['layer']} of {r['num_layers']} blocks, "
              f"{args.batches} x {args.docs} docs x {args.tokens} tokens per repetition, "
              f"{args.reps} alternating repetitions (max |diff| {r['max_abs_diff']:.1e})")
        for name in ("truncated", "naive"):
            m = r[name]
            print(f"  {name:9s}  median {m['median_s']:.3f} s  {m['tokens_per_s']:8.1f} tok/s  "
                  f"(runs: {', '.join(f'{t:.2f}' for t in m['seconds'])})")
        print(f"  ratio naive/truncated = {r['ratio']:.3f}  (paired: "
              f"{', '.join(f'{x:.2f}' for x in r['paired_ratios'])}; expected "
              f"L/(K+1) = {r['expected_ratio']:.3f}; target >= 1.3)")
    if not args.skip_memory:
        mem = memory(args)
        out["memory"] = mem
        print(f"\npeak memory of extract() in a fresh process (builtin:docs, "
              f"max_tokens_per_doc {args.mem_max_tokens}, batch {args.batch_size}):")
        for m in mem:
            print(f"  {m['docs']:5d} docs  {m['tokens']:7d} tokens  {m['rows']:5d} rows  "
                  f"{m['parts']} parts  {m['extract_s']:6.1f} s  peak RSS (VmHWM) "
                  f"{m['vmhwm_mib']:.0f} MiB")
        growth = mem[-1]["vmhwm_mib"] - mem[0]["vmhwm_mib"]
        print(f"  growth {growth:+.0f} MiB for {mem[-1]['docs'] / mem[0]['docs']:.0f}x the "
              "documents")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
