"""What spliced metrics cost next to plain eval's reconstruction scoring, measured side by side.

    OMP_NUM_THREADS=1 python benchmarks/spliced.py --store ACTS [--max-rows N] [--repeats 2]
        [--methods 8] [--gen-rows 16] [--max-new-tokens 150]

On the store's held-out rows (embedded SmolLM2 store: docs/benchmarks.md, "Spliced metrics") it
times, alternating within one run so that background load hits all alike (the minimum over
--repeats is printed):
  ar_score_1      what plain eval spends per scored method: the AR reading one text per row
                  (quote_32 texts, an untrained AR built from the target: speed does not depend
                  on training) plus the fve/mse/cos metrics;
  splice_1        spliced metrics for 1 method (queries: true vector + ablation + the method);
  splice_M        spliced metrics for M methods at once; (splice_M - splice_1)/(M - 1) is the
                  marginal cost of one more method;
  doc_forward     one plain forward of the target over the same documents (the floor: the
                  unmodified distributions alone cost this);
  naive_1         the direct splice (`splice_logits`: one forward over each row's prefix per
                  spliced vector) for 1 method, on the first --naive-rows rows only (slow),
                  next to splice_1 on the same rows;
  generate        AV greedy generation of --gen-rows rows to --max-new-tokens tokens (no early
                  stop), scaled to all rows: what an eval of an NLA spends on explanations.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _select_rows():
    import importlib

    mod = importlib.import_module("nlakit.eval.evaluate")  # a module or a package
    return mod.denominators, mod.row_metrics, mod.select_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", type=int, default=8)
    ap.add_argument("--batch-docs", type=int, default=4)
    ap.add_argument("--naive-rows", type=int, default=4)
    ap.add_argument("--gen-rows", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=150)
    args = ap.parse_args()

    from nlakit.eval.splice import (
        load_target,
        mean_activation,
        row_tokens,
        splice_logits,
        spliced_metrics,
    )
    from nlakit.extract.store import ActivationStore
    from nlakit.model.arch import decoder_stack
    from nlakit.nla.facade import NLA

    denominators, row_metrics, select_rows = _select_rows()
    torch.manual_seed(0)
    store = ActivationStore(args.store)
    target = load_target(store)
    model, tok = target
    rows = select_rows(store, args.split, args.max_rows)
    den = denominators(store, rows)
    tokens = row_tokens(store, rows, tok, chat_model=target)
    abl, _ = mean_activation(store, exclude=rows.split)
    nla = NLA.from_target(target, store.layer,
                          injection_scale=float(store.stats()["norm_percentiles"]["p75"]))
    n, d = rows.vectors.shape
    g = torch.Generator().manual_seed(0)
    preds = [rows.vectors + torch.randn(n, d, generator=g) * rows.vectors.norm(dim=1,
                                                                              keepdim=True) / 30
             for _ in range(args.methods)]
    quotes = []
    for i in range(n):
        ids = tokens.doc_tokens[str(rows.doc_ids[i])][: int(rows.positions[i]) + 1][-32:]
        quotes.append(tok.decode(ids))
    T = {}  # name -> list of seconds

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        T.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def ar_score():
        p = nla.reconstruct(quotes, batch_size=16)
        return row_metrics(p, rows.vectors, den)

    def splice(m):
        return spliced_metrics(model, rows, tokens, {f"m{j}": preds[j] for j in range(m)},
                               layer=store.layer, ablation=abl, batch_docs=args.batch_docs)

    docs = {}
    for i in range(n):
        docs.setdefault(str(rows.doc_ids[i]), []).append(int(rows.positions[i]))

    @torch.no_grad()
    def doc_forward():
        items = sorted(docs.items(), key=lambda kv: -max(kv[1]))
        for s in range(0, len(items), args.batch_docs):
            chunk = items[s:s + args.batch_docs]
            w = max(max(p) + 1 for _, p in chunk)
            x = torch.full((len(chunk), w), tok.pad_token_id or 0, dtype=torch.long)
            m = torch.zeros((len(chunk), w), dtype=torch.long)
            for j, (dd, p) in enumerate(chunk):
                ids = tokens.doc_tokens[dd][: max(p) + 1]
                x[j, :len(ids)] = torch.tensor(ids)
                m[j, :len(ids)] = 1
            h = decoder_stack(model)(input_ids=x, attention_mask=m, use_cache=False)
            model.get_output_embeddings()(h.last_hidden_state[:, -1])

    naive_idx = np.arange(min(args.naive_rows, n))

    class _Sub:
        split = rows.split
        doc_ids = rows.doc_ids[naive_idx]
        positions = rows.positions[naive_idx]
        vectors = rows.vectors[naive_idx]

    sub_tokens = type(tokens)(tokens.doc_tokens, tokens.next_token[naive_idx],
                              tokens.ok[naive_idx], tokens.source)

    def naive():
        for i in naive_idx:
            ids = tokens.doc_tokens[str(rows.doc_ids[i])][: int(rows.positions[i]) + 1]
            p = int(rows.positions[i])
            splice_logits(model, ids, store.layer, [], torch.zeros(0, d))  # unmodified
            for v in (rows.vectors[i], abl, preds[0][i]):
                splice_logits(model, ids, store.layer, [p], v[None])

    def batched_sub():
        spliced_metrics(model, _Sub, sub_tokens, {"m0": preds[0][naive_idx]},
                        layer=store.layer, ablation=abl, batch_docs=args.batch_docs)

    av = nla.av
    av.eos_id = -1  # no early stop: every row generates max_new_tokens
    gen_vectors = rows.vectors[: args.gen_rows]

    def generate():
        av.generate(gen_vectors, temperature=0, max_new_tokens=args.max_new_tokens,
                    batch_size=args.gen_rows)

    ar_score()  # warm-up
    for _ in range(args.repeats):
        timed("ar_score_1", ar_score)
        timed("splice_1", lambda: splice(1))
        timed(f"splice_{args.methods}", lambda: splice(args.methods))
        timed("doc_forward", doc_forward)
        timed("naive_1_subset", naive)
        timed("splice_1_subset", batched_sub)
    if args.gen_rows:
        timed("generate_subset", generate)
    best = {k: min(v) for k, v in T.items()}
    gen_all = best.get("generate_subset", float("nan")) * n / max(args.gen_rows, 1)
    M = args.methods
    marginal = (best[f"splice_{M}"] - best["splice_1"]) / (M - 1)
    n_tok = sum(max(p) + 1 for p in docs.values())
    print(f"store {store.path}: {n} {rows.split} rows, {len(docs)} documents, {n_tok} document "
          f"tokens, layer {store.layer} of {len(decoder_stack(model).layers)}; "
          f"torch threads {torch.get_num_threads()}; min of {args.repeats} repeats")
    print(f"{'measurement':<36} {'seconds':>9} {'ms/row':>9}  ratio")
    ref = best["ar_score_1"]
    rows_out = [
        ("ar_score_1 (plain eval, 1 method)", best["ar_score_1"], n, "1.00 (reference)"),
        ("doc_forward (floor)", best["doc_forward"], n, f"{best['doc_forward'] / ref:.2f}x ar"),
        ("splice_1", best["splice_1"], n, f"{best['splice_1'] / ref:.2f}x ar"),
        (f"splice_{M}", best[f"splice_{M}"], n, f"{best[f'splice_{M}'] / ref:.2f}x ar; "
         f"{best[f'splice_{M}'] / (M * ref):.2f}x ar per method"),
        ("marginal method", marginal, n, f"{marginal / ref:.2f}x ar"),
        ("naive_1_subset", best["naive_1_subset"], naive_idx.size,
         f"{best['naive_1_subset'] / best['splice_1_subset']:.2f}x splice_1_subset"),
        ("splice_1_subset", best["splice_1_subset"], naive_idx.size, ""),
    ]
    if args.gen_rows:
        rows_out.append((f"generate ({args.gen_rows} rows -> all)", gen_all, n,
                         f"{gen_all / ref:.2f}x ar; splice_1 = "
                         f"{best['splice_1'] / gen_all:.1%} of generation"))
    for name, s, k, ratio in rows_out:
        print(f"{name:<36} {s:>9.2f} {1000 * s / k:>9.1f}  {ratio}")


if __name__ == "__main__":
    main()
