"""Does the AV know when its claims are false? Confidence against truth, and what hedging costs.

    python experiments/hedge_probe.py --nla DIR|NAME --acts STORE --split all --max-rows 120 \
        --thresholds 0,0.1,0.2,0.3,0.5 --out hedge.json

For the greedy explanation of each row: the AV's confidence in each claim (`nlakit.nla.hedge`)
against the claim's verdict (`nlakit.nla.claims`), as a ranking AUC per field (0.5: the
confidence says nothing about truth); then, per threshold, the claim precision and coverage
(share of rows stating the field) of the hedged explanations, and the fve_nrm of the NLA's AR
reading them (document-bootstrap CI).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from nlakit import NLA, metrics
from nlakit.eval.scoring import denominators, select_rows
from nlakit.extract.store import ActivationStore, load_target
from nlakit.nla.claims import (
    VERDICTS,
    ending_words_found,
    parse_claims,
    truths_for_prefixes,
    verify,
)
from nlakit.nla.hedge import claim_spans, hedge_text, token_probs

FIELDS = ("current_token_right", "top_prediction_in_top5", "top_prediction_is_top1",
          "ending_words_found")


def auc(scores: list[float], truth: list[float]) -> float | None:
    """P(confidence of a true claim > that of a false one), ties half (Mann-Whitney)."""
    s, t = np.asarray(scores, float), np.asarray(truth, float) >= 0.5
    pos, neg = s[t], s[~t]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return round(float(greater), 4)


def calibration(tok, exps, spans, truths) -> dict:
    """Per field: the AUC of confidence for truth, over every stated claim."""
    pairs = {"current_token": ([], []), "prediction_in_top5": ([], []), "ending": ([], [])}
    for exp, sp, truth in zip(exps, spans, truths):
        real5 = [t for t, _ in truth.top or []]
        for s in sp:
            value = exp.text[s.start:s.end]
            if s.field == "current_token":
                verdict = float(value == truth.tokens[-1])
                key = "current_token"
            elif s.field == "prediction":
                verdict, key = float(value in real5), "prediction_in_top5"
            else:
                verdict, key = ending_words_found(value, truth.prefix), "ending"
            if not np.isnan(s.confidence) and not np.isnan(verdict):
                pairs[key][0].append(s.confidence)
                pairs[key][1].append(verdict)
    return {k: {"n": len(c), "auc": auc(c, v), "true_rate": round(float(np.mean(v)), 4)
                if v else None} for k, (c, v) in pairs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", required=True)
    ap.add_argument("--acts", required=True)
    ap.add_argument("--split", default="all")
    ap.add_argument("--max-rows", type=int, default=120)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--thresholds", default="0,0.1,0.2,0.3,0.5")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    store = ActivationStore(args.acts)
    nla = NLA.load(args.nla)
    rows = select_rows(store, args.split, args.max_rows)
    den = denominators(store, rows)
    exps = nla.explain(rows.vectors, max_new_tokens=args.max_new_tokens)
    probs = token_probs(nla.av, rows.vectors, exps)
    spans = [claim_spans(nla.av.tokenizer, e, p) for e, p in zip(exps, probs)]
    model, tok = load_target(store)
    claims = [parse_claims(e.text) for e in exps]
    truths = truths_for_prefixes(model, tok, rows.prefixes, claims)
    out = {"nla": args.nla, "store": str(store.path), "rows": len(rows), "docs": rows.n_docs,
           "calibration": calibration(tok, exps, spans, truths), "thresholds": []}
    for t in [float(x) for x in args.thresholds.split(",")]:
        texts = [hedge_text(e.text, s, t) for e, s in zip(exps, spans)]
        # hedged claims are a subset of the unhedged ones: the truths above (the target's
        # probability of every stated token included) serve every threshold
        checked = [verify(parse_claims(x), truth) for x, truth in zip(texts, truths)]
        verdicts = {k: np.asarray([c[k] for c in checked], dtype=float) for k in VERDICTS}
        pred = nla.reconstruct(texts)
        fve = metrics.fve_nrm(pred, rows.vectors, den.rawvar).numpy()
        ci = metrics.bootstrap_ci(fve, groups=rows.doc_ids, n_boot=1000, seed=0)
        entry = {"threshold": t, "fve_nrm": round(ci["mean"], 4),
                 "fve_ci": [round(c, 4) for c in ci["ci"]], "example": texts[0]}
        for f in FIELDS:
            v = verdicts[f]
            stated = ~np.isnan(v)
            entry[f] = {"coverage": round(float(stated.mean()), 4),
                        "precision": round(float(v[stated].mean()), 4) if stated.any() else None}
        out["thresholds"].append(entry)
        print(json.dumps({k: entry[k] for k in ("threshold", "fve_nrm", "fve_ci", *FIELDS)}))
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out["calibration"]))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
