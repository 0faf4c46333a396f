"""Labelled rows for supervised training: vectors joined with warm-start labels, split into
training rows and document-disjoint evaluation rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nlakit.errors import NLAError
from nlakit.extract.store import ActivationStore, vectors_from_arrow
from nlakit.fileio import stable_seed


@dataclass
class Rows:
    vectors: np.ndarray  # [n, d] float32
    texts: list[str]  # the labels
    doc_ids: list[str]
    row_ids: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def concat(self, other: Rows) -> Rows:
        return Rows(np.concatenate([self.vectors, other.vectors]), self.texts + other.texts,
                    self.doc_ids + other.doc_ids, self.row_ids + other.row_ids)

    def subset(self, idx) -> Rows:
        idx = list(idx)
        return Rows(self.vectors[idx], [self.texts[i] for i in idx],
                    [self.doc_ids[i] for i in idx], [self.row_ids[i] for i in idx])


def load_labelled(labels_dir: str | Path, split: str, acts: str | Path | None = None):
    """(store, Rows) of one split of a labelled set, joined with the store by row_id."""
    from nlakit.labels import LabelSet

    labels = LabelSet(labels_dir)
    store = ActivationStore(acts or labels.meta["acts"]["path"])
    table = labels.joined(store, split)
    if table.num_rows == 0:
        raise NLAError(f"{labels_dir} has no labelled rows in split {split!r}; label it with "
                       f"`nlakit label --splits {split}`")
    rows = Rows(vectors_from_arrow(table.column("vector"), store.d_model),
                table.column("label").to_pylist(), table.column("doc_id").to_pylist(),
                table.column("row_id").to_pylist())
    return store, rows


def has_split(labels_dir: str | Path, split: str) -> bool:
    from nlakit.labels import LabelSet

    return split in (LabelSet(labels_dir).meta.get("splits") or [])


def split_by_document(rows: Rows, eval_fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Document-disjoint (train, eval) partition: a document's rows never straddle the two."""
    if not 0 < eval_fraction < 1:
        raise NLAError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    is_eval = [stable_seed("sft-eval", seed, d) / float(1 << 60) < eval_fraction
               for d in rows.doc_ids]
    train = [i for i, e in enumerate(is_eval) if not e]
    held = [i for i, e in enumerate(is_eval) if e]
    if not train or not held:
        raise NLAError(f"{len(rows)} labelled rows from {len(set(rows.doc_ids))} documents are "
                       "too few to hold out evaluation documents; label more rows")
    return rows.subset(train), rows.subset(held)


def epoch_order(n: int, epochs: float, seed: int) -> list[int]:
    """Row indices for all epochs: a fresh seeded permutation per epoch, truncated to
    round(epochs * n). Fixed up front so a resumed run sees exactly the same sequence."""
    total = max(1, round(epochs * n))
    order: list[int] = []
    e = 0
    while len(order) < total:
        order.extend(np.random.default_rng(stable_seed("epoch", seed, e)).permutation(n).tolist())
        e += 1
    return order[:total]
