"""Does decoding stop the AV's repetition loops, and what does it buy? (issue 11)

    python experiments/decoding_probe.py --nla DIR|NAME --acts STORE --split val --max-rows 240 \
        --setting plain --setting ngram3:no_repeat_ngram_size=3 \
        --setting pen1.3:repetition_penalty=1.3 --setting beams4:num_beams=4

For each setting: greedy explanations of the same rows, read by the NLA's AR; prints nla
fve_nrm (mean, document-bootstrap CI), the fraction that closed, mean tokens, current-token
accuracy and true-quote rate. Choose on `val`; never on heldout.

    python experiments/decoding_probe.py --nla OTHER_AR_NLA --acts STORE --split val \
        --texts-from earlier.jsonl --setting other-ar

reads the explanations an earlier run wrote (same rows) with another NLA's AR, without
generating: one AR compared with another on identical text.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from nlakit import NLA
from nlakit.eval.scoring import bootstrap_summary, denominators, row_metrics, select_rows
from nlakit.extract.store import ActivationStore
from nlakit.nla.claims import claim_checks


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        opts[key] = float(value) if "." in value else int(value)
    return name, opts


def earlier_explanations(path: str, nla, n_rows: int) -> list:
    """The explanations of an earlier run's first line, as Explanation-like records."""
    from types import SimpleNamespace

    with open(path) as f:
        earlier = json.loads(f.readline())
    if "complete" not in earlier:
        raise SystemExit(f"{path} was written before the probe recorded which explanations "
                         "closed; generate again")
    if earlier["rows"] != n_rows:
        raise SystemExit(f"{path} explained {earlier['rows']} rows, these are {n_rows}")
    # generated token counts when recorded; else the text's tokens (no closing tag: fewer)
    tok = nla.av.tokenizer
    counts = earlier.get("n_tokens") or [len(tok(t)["input_ids"]) for t in earlier["texts"]]
    return [SimpleNamespace(text=t, complete=c, n_tokens=n)
            for t, c, n in zip(earlier["texts"], earlier["complete"], counts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", required=True)
    ap.add_argument("--acts", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-rows", type=int, default=240)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--setting", action="append", required=True, help="NAME:key=value,...")
    ap.add_argument("--out", default=None, help="JSON lines file for the per-setting results")
    ap.add_argument("--texts-from", default=None, metavar="JSONL",
                    help="score the explanations of this earlier run's first line instead of "
                         "generating (its rows must be these rows)")
    args = ap.parse_args()
    if args.split == "heldout":
        raise SystemExit("choose decoding on val, not heldout")
    store = ActivationStore(args.acts)
    rows = select_rows(store, args.split, args.max_rows)
    den = denominators(store, rows)
    nla = NLA.load(args.nla)
    gen = nla.av.model.generation_config
    for name, opts in map(parse_setting, args.setting):
        t0 = time.time()
        # beams are not an AV decoding setting: set on HF's generation config (its slow path)
        gen.num_beams = opts.get("num_beams", 1)
        gen.early_stopping = gen.num_beams > 1
        av_opts = {k: v for k, v in opts.items() if k != "num_beams"}
        exps = (earlier_explanations(args.texts_from, nla, len(rows)) if args.texts_from
                else nla.explain(rows.vectors, max_new_tokens=args.max_new_tokens, **av_opts))
        texts = [e.text for e in exps]
        pred = nla.reconstruct(texts)
        per_row = row_metrics(pred, rows.vectors, den)
        summary = bootstrap_summary({"fve_nrm": np.asarray(per_row["fve_nrm"])}, rows.doc_ids)
        claims, _, _ = claim_checks(texts, rows.prefixes, nla.av.tokenizer)
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
            "complete": closed.tolist(),
            "n_tokens": [e.n_tokens for e in exps],
        }
        print(json.dumps({k: v for k, v in result.items() if k != "texts"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
