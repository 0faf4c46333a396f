"""The SAE ladder on a store: TopK SAEs (k = 1, 4, 16, 64) trained on the training splits and
scored on the held-out rows with fve_nrm, kl and ce_recovered, next to baselines (and an NLA).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sae_ladder.py --store ACTS --out OUT \
        [--ks 1,4,16,64] [--source tokens] [--epochs 8] [--nla NLA_DIR] [--tails 8,32]

Writes OUT/ladder.json, OUT/ladder.md (the table), OUT/ladder.png (metric vs k with the NLA and
the baselines as horizontal lines) and OUT/sae_k{k}/ (weights, SAELens tensor names).
Baselines: mean_direction_train (the training splits' mean direction, a constant) and
tail_N_frozen (the frozen target re-reading BOS + the last N tokens of the row's context, its
last-token block-K state: what "the activation is mostly local text" predicts, no training).
With --nla, the NLA's greedy explanation read by its AR is scored too, with its mean length.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _eval_helpers():
    """The eval's row selection and scoring, wherever the evaluate refactor puts them."""
    import importlib

    mod = importlib.import_module("nlakit.evaluate")

    def get(*names):
        for n in names:
            if hasattr(mod, n):
                return getattr(mod, n)
        raise ImportError(f"nlakit.evaluate has none of {names}")

    return (get("denominators"), get("row_metrics"), get("select_rows"),
            get("bootstrap_summary", "summarize"), get("training_mean_direction"))


@torch.no_grad()
def tail_predictions(model, tok, tokens, rows, layer: int, n: int, batch_size: int = 16):
    """Block-`layer` state of the last token of BOS + the last n tokens of each row's context."""
    from nlakit.models import forward_to_layer

    bos = tok.bos_token_id
    seqs = []
    for i in range(len(rows.positions)):
        ids = tokens.doc_tokens[str(rows.doc_ids[i])][: int(rows.positions[i]) + 1][-n:]
        seqs.append(([bos] if bos is not None and ids[0] != bos else []) + list(ids))
    out = torch.zeros(len(seqs), rows.vectors.shape[1])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        w = max(map(len, chunk))
        x = torch.full((len(chunk), w), pad, dtype=torch.long)
        m = torch.zeros((len(chunk), w), dtype=torch.long)
        for j, ids in enumerate(chunk):
            x[j, :len(ids)] = torch.tensor(ids)
            m[j, :len(ids)] = 1
        h = forward_to_layer(model, x, m, layer)
        out[s:s + len(chunk)] = h[torch.arange(len(chunk)), m.sum(1) - 1].float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--width-mult", type=int, default=8)
    ap.add_argument("--source", default="tokens", choices=["tokens", "rows"])
    ap.add_argument("--max-vectors", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--tails", default="8,32")
    ap.add_argument("--nla", default=None, help="an NLA directory to score on the same rows")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from nlakit.sae import (
        SAETrainConfig,
        TopKSAE,
        directions,
        plot_ladder,
        train_sae,
        training_vectors,
        worth_k,
    )
    from nlakit.splice import load_target, row_tokens, spliced_eval
    from nlakit.store import ActivationStore

    denominators, row_metrics, select_rows, summarize, training_mean_direction = _eval_helpers()
    t_start = time.perf_counter()
    timings = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = ActivationStore(args.store)
    target = load_target(store)
    model, tok = target
    rows = select_rows(store, args.split)
    den = denominators(store, rows)

    # ---- SAEs
    t = time.perf_counter()
    cache = out / f"train_vectors_{args.source}.pt"
    if cache.is_file():
        blob = torch.load(cache)
        train, info = blob["vectors"], blob["info"]
    else:
        train, info = training_vectors(store, source=args.source, target=target,
                                       max_vectors=args.max_vectors, seed=args.seed,
                                       progress=True)
        torch.save({"vectors": train, "info": info}, cache)
    timings["training_vectors"] = time.perf_counter() - t
    x = directions(train)
    ks = [int(k) for k in args.ks.split(",")]
    preds, logs = {}, {}
    for k in ks:
        t = time.perf_counter()
        path = out / f"sae_k{k}"
        if (path / "cfg.json").is_file():
            sae = TopKSAE.load(path)
            logs[k] = json.loads((path / "cfg.json").read_text()).get("train_log", {})
        else:
            sae, log = train_sae(x, SAETrainConfig(k=k, width=args.width_mult * x.shape[1],
                                                   epochs=args.epochs, lr=args.lr,
                                                   batch_size=args.batch_size, seed=args.seed),
                                 progress=True)
            sae.save(path, extra={"layer": store.layer, "store": str(store.path),
                                  "train_log": log})
            logs[k] = log
        timings[f"sae_k{k}"] = time.perf_counter() - t
        preds[f"sae_k{k}"] = sae.reconstruct(rows.vectors)
        print(f"k={k}: {logs[k]}", flush=True)

    # ---- baselines
    t = time.perf_counter()
    tokens = row_tokens(store, rows, tok, chat_model=target)
    tm = training_mean_direction(store, rows.split)
    if tm is not None:
        mu, _ = tm
        preds["mean_direction_train"] = (mu / mu.norm()).expand(len(rows), -1).clone()
    for n in [int(v) for v in args.tails.split(",") if v]:
        preds[f"tail_{n}_frozen"] = tail_predictions(model, tok, tokens, rows, store.layer, n)
    timings["baselines"] = time.perf_counter() - t
    nla_tokens = None
    if args.nla:
        from nlakit.nla import NLA

        t = time.perf_counter()
        nla = NLA.load(args.nla, target=target)
        exps = nla.explain(rows.vectors, n=1, temperature=0.0, batch_size=16)
        preds["nla"] = nla.reconstruct([e.text for e in exps], batch_size=16)
        nla_tokens = float(np.mean([e.n_tokens for e in exps]))
        timings["nla"] = time.perf_counter() - t

    # ---- scores
    fve = {}
    for name, p in preds.items():
        pr = row_metrics(p, rows.vectors, den)
        fve[name] = summarize(pr, rows.doc_ids, n_boot=args.n_boot, seed=args.seed)
    t = time.perf_counter()
    spliced, _ = spliced_eval(store, rows, preds, target=target, n_boot=args.n_boot,
                              seed=args.seed, progress=True)
    timings["splice"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    def val(name, metric):
        if metric == "fve_nrm":
            return fve[name]["fve_nrm"]
        return spliced["methods"][name].get(metric)

    table = []
    for name in preds:
        table.append({"method": name, **{m: val(name, m) for m in
                                         ("fve_nrm", "kl", "ce_recovered", "delta_ce")}})
    ladder = {m: {k: val(f"sae_k{k}", m)["mean"] for k in ks}
              for m in ("fve_nrm", "kl", "ce_recovered")}
    others = [n for n in preds if not n.startswith("sae_k")]
    lines = {m: {n: val(n, m)["mean"] for n in others} for m in ladder}
    worth = {}
    for n in others:
        worth[n] = {"fve_nrm": worth_k(ladder["fve_nrm"], lines["fve_nrm"][n])["text"],
                    "ce_recovered": worth_k(ladder["ce_recovered"],
                                            lines["ce_recovered"][n])["text"],
                    "kl": worth_k({k: -v for k, v in ladder["kl"].items()},
                                  -lines["kl"][n])["text"]}
    result = {"store": str(store.path), "split": rows.split, "n_rows": len(rows),
              "n_docs": rows.n_docs, "layer": store.layer, "training": info,
              "sae_logs": {str(k): v for k, v in logs.items()},
              "denominator": f"fve_nrm: rawvar = {den.rawvar:.6f} from {den.rawvar_source}",
              "spliced": spliced, "fve": fve, "table": table, "worth": worth,
              "nla_mean_tokens": nla_tokens, "timings_s": {k: round(v, 1) for k, v in
                                                           timings.items()}}
    (out / "ladder.json").write_text(json.dumps(result, indent=1, default=float))
    plot_ladder(ladder, lines, out / "ladder.png",
                title=f"{store.meta['model']['spec']} layer {store.layer}, {len(rows)} "
                      f"{rows.split} rows / {rows.n_docs} docs")

    def cell(s, fmt="+.3f"):
        return "n/a" if s is None else (f"{s['mean']:{fmt}} [{s['ci'][0]:{fmt}}, "
                                        f"{s['ci'][1]:{fmt}}]")

    md = ["| method | fve_nrm [95% CI] | kl (nats) [95% CI] | ce_recovered [95% CI] | "
          "delta_ce (nats) |", "|---|---|---|---|---|"]
    for r in table:
        md.append(f"| {r['method']} | {cell(r['fve_nrm'])} | {cell(r['kl'], '.3f')} | "
                  f"{cell(r['ce_recovered'])} | {cell(r['delta_ce'], '+.3f')} |")
    md.append("")
    for n, w in worth.items():
        md.append(f"- {n}: by fve_nrm {w['fve_nrm']}; by kl {w['kl']}; by ce_recovered "
                  f"{w['ce_recovered']}")
    (out / "ladder.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps(result["timings_s"]))


if __name__ == "__main__":
    main()
