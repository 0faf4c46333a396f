"""The scoring core: which rows are scored, the denominators, per-row metrics and their
document-level bootstrap CIs. eval, audit, sae, diff and the fitted baselines all score here,
so a number called fve_nrm means the same thing in every table.

Denominators: fve_nrm = 1 - mse_nrm / rawvar with rawvar of the store's statistics for the
evaluated split ("all" for all splits); fve_meannorm = 1 - mse_nrm / meannorm with meannorm =
2(1 - ||E g_hat||) of the evaluated rows (the mse_nrm of the mean_direction method). CIs are
percentile bootstraps over documents (`nlakit.metrics.bootstrap_ci`), rows of one document
being far from independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nlakit import metrics
from nlakit.errors import NLAError
from nlakit.extract.store import HELDOUT, vectors_from_arrow
from nlakit.fileio import stable_seed

METRIC_NAMES = ("fve_nrm", "mse_nrm", "cos", "fve_meannorm")


@dataclass
class EvalRows:
    """The rows under evaluation (document-complete), with their true vectors [n, d]."""

    split: str
    row_ids: np.ndarray
    doc_ids: np.ndarray  # str labels, one per row
    positions: np.ndarray
    prefixes: list[str]
    vectors: torch.Tensor

    def __len__(self) -> int:
        return int(self.row_ids.size)

    @property
    def n_docs(self) -> int:
        return int(np.unique(self.doc_ids).size)


def select_rows(store, split: str = HELDOUT, max_rows: int | None = None,
                seed: int = 0) -> EvalRows:
    """Rows of `split` ("all" for every split). With max_rows, whole documents are chosen in a
    seeded (deterministic) order until the next document would exceed max_rows (at least one
    document is always taken), so the document-level bootstrap stays valid."""
    table = store.table(split, columns=["row_id", "doc_id", "position", "prefix", "vector"])
    if table.num_rows == 0:
        raise NLAError(f"split {split!r} of {store.path} has no rows")
    doc_ids = np.asarray(table.column("doc_id").to_pylist(), dtype=object)
    keep = np.arange(table.num_rows)
    if max_rows is not None:
        if max_rows < 1:
            raise NLAError(f"--max-rows must be >= 1, got {max_rows}")
        docs = sorted(set(doc_ids.tolist()), key=lambda d: stable_seed(seed, "eval-docs", d))
        sizes = {d: int(n) for d, n in zip(*np.unique(doc_ids, return_counts=True))}
        chosen, total = set(), 0
        for d in docs:
            if chosen and total + sizes[d] > max_rows:
                continue
            chosen.add(d)
            total += sizes[d]
            if total >= max_rows:
                break
        keep = np.asarray([i for i, d in enumerate(doc_ids) if d in chosen])
    table = table.take(keep)
    return EvalRows(
        split=split,
        row_ids=np.asarray(table.column("row_id").to_pylist(), dtype=np.int64),
        doc_ids=np.asarray(table.column("doc_id").to_pylist(), dtype=object),
        positions=np.asarray(table.column("position").to_pylist(), dtype=np.int64),
        prefixes=table.column("prefix").to_pylist(),
        vectors=torch.from_numpy(vectors_from_arrow(table.column("vector"),
                                                    store.d_model).copy()),
    )


@dataclass
class Denominators:
    rawvar: float  # fve_nrm denominator
    meannorm: float  # fve_meannorm denominator
    rawvar_source: str
    meannorm_source: str


def denominators(store, rows: EvalRows) -> Denominators:
    """rawvar of the store's statistics for the split; meannorm of the evaluated rows."""
    try:
        rawvar = float(store.stats(rows.split)["rawvar"])
        src = f"store statistics of split {rows.split!r} ({store.stats(rows.split)['n']} rows)"
    except NLAError:
        rawvar = metrics.rawvar(rows.vectors)
        src = f"the {len(rows)} evaluated rows (the store has no statistics for {rows.split!r})"
    meannorm = metrics.meannorm(rows.vectors)
    return Denominators(rawvar, meannorm, src,
                        f"the {len(rows)} evaluated rows: 2(1 - ||E g_hat||), the mse_nrm of "
                        "their mean direction")


def row_metrics(pred: torch.Tensor, target: torch.Tensor, den: Denominators) -> dict:
    """Per-row float64 numpy arrays of the four metrics."""
    mse = metrics.mse_nrm(pred, target).double()
    return {"mse_nrm": mse.numpy(), "cos": (1 - mse / 2).numpy(),
            "fve_nrm": (1 - mse / den.rawvar).numpy(),
            "fve_meannorm": (1 - mse / den.meannorm).numpy()}


def bootstrap_summary(per_row: dict, groups, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """{metric: {"mean", "ci", "n", "n_groups"}} with document-level bootstrap CIs."""
    return {k: metrics.bootstrap_ci(per_row[k], groups=groups, n_boot=n_boot, seed=seed)
            for k in METRIC_NAMES if k in per_row}


def doc_ci(values, groups, settings) -> dict:
    """Mean and document-level bootstrap CI of one per-row quantity (a paired difference, a
    drop): `groups` are the rows' document ids, `settings` any config with n_boot and seed."""
    return metrics.bootstrap_ci(values, groups=groups, n_boot=settings.n_boot,
                                seed=settings.seed)


def score_reconstructions(pred: torch.Tensor, rows: EvalRows, den: Denominators, *,
                          n_boot: int = 1000, seed: int = 0) -> tuple[dict, dict]:
    """(per-row metrics, their summaries with document-level CIs) of predictions [n, d] of the
    rows' vectors: what every scored method of every table is."""
    per_row = row_metrics(pred, rows.vectors, den)
    return per_row, bootstrap_summary(per_row, rows.doc_ids, n_boot=n_boot, seed=seed)
