"""Does decoding stop the AV's repetition loops, and what does it buy? (issue 11)

    python scripts/decoding_probe.py --nla DIR|NAME --acts STORE --split val --max-rows 240 \
        --setting plain --setting ngram3:no_repeat_ngram_size=3 \
        --setting pen1.3:repetition_penalty=1.3

For each setting: greedy explanations of the same rows, read by the NLA's AR; prints nla
fve_nrm (mean, document-bootstrap CI), the fraction that closed, mean tokens, current-token
accuracy and true-quote rate. Choose on `val`; never on heldout.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from nlakit import NLA
from nlakit.evaluate import bootstrap_summary, denominators, row_metrics, select_rows
from nlakit.ladder import claim_checks
from nlakit.store import ActivationStore


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        opts[key] = float(value) if "." in value else int(value)
    return name, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", required=True)
    ap.add_argument("--acts", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-rows", type=int, default=240)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--setting", action="append", required=True, help="NAME:key=value,...")
    ap.add_argument("--out", default=None, help="JSON lines file for the per-setting results")
    args = ap.parse_args()
    if args.split == "heldout":
        raise SystemExit("choose decoding on val, not heldout")
    store = ActivationStore(args.acts)
    rows = select_rows(store, args.split, args.max_rows)
    den = denominators(store, rows)
    nla = NLA.load(args.nla)
    for name, opts in map(parse_setting, args.setting):
        t0 = time.time()
        exps = nla.explain(rows.vectors, max_new_tokens=args.max_new_tokens, **opts)
        texts = [e.text for e in exps]
        pred = nla.reconstruct(texts)
        per_row = row_metrics(pred, rows.vectors, den)
        summary = bootstrap_summary({"fve_nrm": np.asarray(per_row["fve_nrm"])}, rows.doc_ids)
        claims = claim_checks(texts, rows.prefixes, nla.av.tokenizer)
        closed = np.asarray([e.complete for e in exps])
        fve = np.asarray(per_row["fve_nrm"])
        result = {
            "setting": name, "options": opts, "rows": len(rows),
            "fve_nrm": summary["fve_nrm"],
            "closed": float(closed.mean()),
            "fve_closed": float(fve[closed].mean()) if closed.any() else None,
            "mean_tokens": float(np.mean([e.n_tokens for e in exps])),
            "current_token_right": float(np.nanmean(claims["current_token_right"])),
            "quote_true": float(np.nanmean(claims["quote_true"])),
            "seconds": round(time.time() - t0, 1),
            "examples": texts[:3],
            "texts": texts,
        }
        print(json.dumps({k: v for k, v in result.items() if k != "texts"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
