"""Which context tokens can be read from one activation at all? A linear probe (issue 11)

    python experiments/token_probe.py STORE [--offsets 5] [--classes 500] [--epochs 300]

For offset k = 0 (the current token), 1 (the previous one), ...: a softmax probe from the unit
activation to the `--classes` commonest tokens at that offset in the training splits (+ one
"other" class), trained on av_sft + ar_sft + rl, scored on val. Prints the accuracy on the val
rows whose token is one of those classes: a lower bound on what the vector holds (the probe is
linear). If the probe reads a token the AV never states, the label or the training is what is
missing, not the information.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from nlakit.extract.store import ActivationStore
from nlakit.model.load import load_model

TRAIN = ("av_sft", "ar_sft", "rl")


def rows_with_tokens(store, splits, tok, offsets: int):
    """(unit vectors [n, d], token ids [n, offsets] from the current token backwards)."""
    vecs, ids = [], []
    for split in splits:
        for r in store.table(split, columns=["prefix", "token_id", "vector"]).to_pylist():
            t = tok(r["prefix"], add_special_tokens=False)["input_ids"]
            if len(t) >= offsets and t[-1] == int(r["token_id"]):  # re-tokenised the same way
                vecs.append(r["vector"])
                ids.append(t[-offsets:][::-1])
    x = torch.tensor(np.array(vecs), dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True), np.array(ids)


def probe_accuracy(xtr, ytr, xva, yva, classes: int, epochs: int) -> tuple[float, float]:
    """(accuracy on val rows whose token is a class, the share of such rows)."""
    common = [t for t, _ in collections.Counter(ytr).most_common(classes)]
    index = {t: i for i, t in enumerate(common)}
    ctr = torch.tensor([index.get(t, len(common)) for t in ytr])
    cva = torch.tensor([index.get(t, len(common)) for t in yva])
    probe = torch.nn.Linear(xtr.shape[1], len(common) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-5)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(xtr * 10), ctr).backward()
        opt.step()
    known = cva < len(common)
    with torch.no_grad():
        right = probe(xva * 10).argmax(1) == cva
    return right[known].float().mean().item(), known.float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--offsets", type=int, default=5)
    ap.add_argument("--classes", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    store = ActivationStore(args.store)
    _, tok = load_model(store.meta["model"]["spec"])
    xtr, ttr = rows_with_tokens(store, TRAIN, tok, args.offsets)
    xva, tva = rows_with_tokens(store, ("val",), tok, args.offsets)
    mean = xtr.mean(0)  # centred: the mean direction carries no token
    print(f"{len(xtr)} training rows, {len(xva)} val rows")
    for k in range(args.offsets):
        acc, share = probe_accuracy(xtr - mean, ttr[:, k], xva - mean, tva[:, k], args.classes,
                                    args.epochs)
        print(f"offset {k}: {acc:.0%} of the val rows whose token is among the "
              f"{args.classes} commonest ({share:.0%} of rows)")


if __name__ == "__main__":
    main()
