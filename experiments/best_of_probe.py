"""What does best-of-N reranking buy, and do quotes get the same rerank? (issue 11)

    python experiments/best_of_probe.py --nla DIR|NAME --acts STORE --split val --max-rows 240 \
        --samples 8 --temperature 1.0 --greedy-from val.jsonl --out best_of.json

Samples N explanations per row, reads each with the NLA's AR and prints, for k = 1, 2, 4 .. N,
the fve_nrm (document-bootstrap CI) of the sample the AR reconstructs best among the first k,
alone and with the greedy explanation (of --greedy-from, a decoding_probe output for the same
rows) as one more candidate. The rerank uses the true vector, which the AV is given anyway, so
the chosen text is still a function of the activation only; but a baseline deserves the same
rerank: `quote_rerank` is the best, by the same AR and the same vector, of the quotes of
--quote-lengths tokens.

    python experiments/best_of_probe.py --nla OTHER --acts STORE --split val \
        --samples-from best_of.json

reads an earlier run's samples with another NLA's AR: the texts chosen by the first AR, scored
by this one, say whether the rerank picked better text or only text that suits one AR.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from nlakit import NLA, metrics
from nlakit.eval.evaluate import quote_text
from nlakit.eval.scoring import denominators, select_rows
from nlakit.extract.store import ActivationStore


def ci(fve: np.ndarray, doc_ids) -> dict:
    out = metrics.bootstrap_ci(fve, groups=doc_ids, n_boot=1000, seed=0)
    return {"mean": round(out["mean"], 4), "ci": [round(c, 4) for c in out["ci"]]}


def mse_of(nla, texts: list[str], vectors: torch.Tensor, per_row: int) -> np.ndarray:
    """[rows, per_row] mse_nrm of the AR's reading of texts (row-major) against vectors."""
    pred = nla.reconstruct(texts)
    return metrics.mse_nrm(pred, vectors.repeat_interleave(per_row, 0)).view(-1, per_row).numpy()


def best_of_curve(mse: np.ndarray, greedy: np.ndarray | None, rawvar: float, doc_ids) -> dict:
    """fve_nrm of the best of the first k samples (and with the greedy one), k = 1, 2, 4 .. N
    and N-1 (greedy + N-1 samples is what `nlakit eval --best-of N` scores)."""
    n = mse.shape[1]
    ks = sorted({min(2 ** i, n) for i in range(8)} | {max(1, n - 1)})
    out = {}
    for k in ks:
        best = mse[:, :k].min(1)
        out[f"best_of_{k}"] = ci(1 - best / rawvar, doc_ids)
        if greedy is not None:
            out[f"greedy+best_of_{k}"] = ci(1 - np.minimum(best, greedy) / rawvar, doc_ids)
    if greedy is not None:
        out["greedy"] = ci(1 - greedy / rawvar, doc_ids)
    return out


def quote_rerank(nla, prefixes, vectors, lengths, rawvar, doc_ids) -> dict:
    tok = nla.ar.tokenizer
    texts = [quote_text(p, tok, n)[0] for p in prefixes for n in lengths]
    mse = mse_of(nla, texts, vectors, len(lengths))
    out = {f"quote_{n}": ci(1 - mse[:, i] / rawvar, doc_ids) for i, n in enumerate(lengths)}
    out["quote_rerank"] = ci(1 - mse.min(1) / rawvar, doc_ids)
    out["quote_rerank_lengths"] = list(lengths)
    return out


def sample(av, vectors, n: int, args):
    """n samples per vector from the chosen distribution (seed 0)."""
    if args.sampler == "rl":
        from nlakit.nla.sampling import fast_generate

        return fast_generate(av, vectors, n=n, temperature=args.temperature, seed=0, batch_size=32,
                             max_new_tokens=args.max_new_tokens,
                             no_repeat_ngram_size=av.decoding["no_repeat_ngram_size"])
    return av.generate(vectors, n=n, temperature=args.temperature,
                       max_new_tokens=args.max_new_tokens, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", required=True)
    ap.add_argument("--acts", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-rows", type=int, default=240)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--sampler", default="hf", choices=["hf", "rl"],
                    help="hf: what best-of-N uses (transformers' generate, with the model's "
                         "generation_config, e.g. top_k 50, and the AV's stored decoding); rl: "
                         "RL's rollout distribution, softmax(logits / T) with the AV's n-gram ban")
    ap.add_argument("--greedy-from", default=None, metavar="JSONL")
    ap.add_argument("--quote-lengths", default="4,8,12,16,20,24,28,32")
    ap.add_argument("--samples-from", default=None, metavar="JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.split == "heldout":
        raise SystemExit("choose on val, not heldout")
    store = ActivationStore(args.acts)
    rows = select_rows(store, args.split, args.max_rows)
    rawvar, v = denominators(store, rows).rawvar, rows.vectors
    nla = NLA.load(args.nla)
    t0 = time.time()
    result = {"nla": args.nla, "rows": len(rows), "rawvar": rawvar}
    if args.samples_from:
        with open(args.samples_from) as f:
            earlier = json.load(f)
        texts, n = earlier["samples"], earlier["n_samples"]
        mse = mse_of(nla, texts, v, n)
        chosen = np.asarray(earlier["mse"]).argmin(1)
        result["chosen_by_earlier_ar"] = ci(1 - mse[np.arange(len(rows)), chosen] / rawvar,
                                            rows.doc_ids)
    else:
        n = args.samples
        exps = sample(nla.av, v, n, args)
        texts = [e.text for e in exps]
        mse = mse_of(nla, texts, v, n)
        result.update(n_samples=n, temperature=args.temperature, sampler=args.sampler,
                      samples=texts,
                      closed=float(np.mean([e.complete for e in exps])))
    result["mse"] = mse.tolist()
    greedy = None
    if args.greedy_from:
        with open(args.greedy_from) as f:
            greedy = mse_of(nla, json.loads(f.readline())["texts"], v, 1)[:, 0]
    result["curve"] = best_of_curve(mse, greedy, rawvar, rows.doc_ids)
    result["quotes"] = quote_rerank(nla, rows.prefixes, v,
                                    [int(x) for x in args.quote_lengths.split(",")],
                                    rawvar, rows.doc_ids)
    result["seconds"] = round(time.time() - t0, 1)
    for name, value in {**result.get("curve", {}), **result["quotes"]}.items():
        if isinstance(value, dict):
            print(f"{name:24s} {value['mean']:+.3f} [{value['ci'][0]:+.3f}, {value['ci'][1]:+.3f}]")
    if "chosen_by_earlier_ar" in result:
        print("chosen_by_earlier_ar", result["chosen_by_earlier_ar"])
    print(f"{result['seconds']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
