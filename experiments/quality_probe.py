"""How local is a layer, and how much can a label format carry? (issue 11's cheap probes)

    python experiments/quality_probe.py --acts STORE --split val --max-rows 300 [--labels LABELS]

prints, on whole documents of one split (choose settings on a validation split, never on
heldout):
- reread_N for N = 1, 2, 4, 8, 16, 32: the frozen target re-reading the raw last N tokens;
- with --labels: the label ceiling of that label set under the raw AR template, read by the
  frozen truncated target with an identity head (no training), and of its last line alone.
"""

from __future__ import annotations

import argparse
import time

import torch

from nlakit.eval.baselines import reread_predictions
from nlakit.eval.evaluate import training_mean_direction
from nlakit.eval.scoring import denominators, row_metrics, select_rows
from nlakit.extract.store import ActivationStore
from nlakit.model.load import load_model
from nlakit.nla.reconstructor import Reconstructor


def fve(pred, rows, den) -> float:
    return float(row_metrics(pred, rows.vectors, den)["fve_nrm"].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acts", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-rows", type=int, default=300)
    ap.add_argument("--labels", default=None, help="a label set with rows of --split")
    ap.add_argument("--template", default="{explanation}", help="AR template for --labels")
    args = ap.parse_args()
    store = ActivationStore(args.acts)
    rows = select_rows(store, args.split, args.max_rows)
    den = denominators(store, rows)
    mu, _ = training_mean_direction(store, args.split)
    const = (mu / mu.norm()).expand(len(rows), -1)
    print(f"layer {store.layer}, split {args.split}: {len(rows)} rows, {rows.n_docs} documents,"
          f" rawvar {den.rawvar:.4f}; mean_direction_train {fve(const, rows, den):+.3f}")
    model, tok = load_model(store.meta["model"]["spec"])
    for n in (1, 2, 4, 8, 16, 32):
        t = time.perf_counter()
        pred = reread_predictions(model, tok, store.layer, rows.prefixes, n)
        print(f"reread_{n:<3} {fve(pred, rows, den):+.3f}  ({time.perf_counter() - t:.0f} s)")
    if args.labels:
        from nlakit.labels import LabelSet

        table = LabelSet(args.labels).table(args.split)
        by_row = dict(zip(table.column("row_id").to_pylist(), table.column("label").to_pylist()))
        keep = [i for i, r in enumerate(rows.row_ids.tolist()) if r in by_row]
        texts = [by_row[int(rows.row_ids[i])] for i in keep]
        sub = select_rows(store, args.split, args.max_rows)
        sub.vectors = rows.vectors[keep]
        ar = Reconstructor.from_target(model, tok, store.layer, template=args.template)
        with torch.no_grad():
            print(f"label ceiling, frozen AR ({len(keep)} rows): "
                  f"{fve(ar.reconstruct(texts), sub, den):+.3f}; its last line alone "
                  f"{fve(ar.reconstruct([t.splitlines()[-1] for t in texts]), sub, den):+.3f}")


if __name__ == "__main__":
    main()
