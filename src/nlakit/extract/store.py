"""The on-disk activation store: parquet parts with a fixed-size float32 vector column.

Layout of a store directory::

    meta.yaml              provenance, config, counts and dataset statistics (written last:
                           its presence means the store is complete)
    stats.safetensors      mean unit direction E[g/||g||] for all rows and per split
    parts/part-00000.parquet ...   one file per shard of documents, in corpus order
    progress.yaml          only while an extraction is running or was interrupted

Row columns: row_id (int64, global, in corpus order), doc_id, doc_index, doc_kind, split,
position (token index), token_id, token_text, prefix (decoded text up to and including the
token), vector (fixed_size_list<float32>[d_model], the raw block-K output).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from safetensors.torch import load_file, save_file

from nlakit.errors import NLAError
from nlakit.fileio import atomic_path, read_yaml

STORE_VERSION = 1
# the split names (document-level: every row of a document is in the same split)
AV_SFT, AR_SFT, RL, HELDOUT = "av_sft", "ar_sft", "rl", "heldout"
SPLITS = (AV_SFT, AR_SFT, RL, HELDOUT)
TRAINING_SPLITS = (AV_SFT, AR_SFT, RL)
VAL = "val"  # the validation split a config may carve: choices are made on it, never trained on
STORE_META_FILE = "meta.yaml"
STATS_FILE = "stats.safetensors"
PARTS_DIR = "parts"
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def store_schema(d_model: int) -> pa.Schema:
    return pa.schema([
        ("row_id", pa.int64()),
        ("doc_id", pa.string()),
        ("doc_index", pa.int64()),
        ("doc_kind", pa.string()),
        ("split", pa.string()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
        ("prefix", pa.string()),
        # fixed-size lists: variable-length list columns corrupt large files (REFERENCE pitfalls)
        ("vector", pa.list_(pa.float32(), d_model)),
    ])


def vectors_from_arrow(column: pa.ChunkedArray | pa.Array, d_model: int) -> np.ndarray:
    """A fixed-size-list column as a float32 array [n, d] (zero-copy where possible)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, d_model).astype(np.float32, copy=False)


class StatsAccumulator:
    """Streaming dataset statistics of raw vectors g: norms and the mean unit direction."""

    def __init__(self, d_model: int):
        self.sum_unit = np.zeros(d_model, dtype=np.float64)
        self.norms: list[np.ndarray] = []

    def add(self, vectors: np.ndarray) -> None:
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        if np.any(norms == 0):
            raise NLAError("activation store holds a zero vector; cannot normalise it")
        self.sum_unit += (vectors / norms[:, None]).sum(axis=0)
        self.norms.append(norms)

    def result(self) -> tuple[dict, np.ndarray]:
        norms = np.concatenate(self.norms) if self.norms else np.zeros(0)
        n = int(norms.size)
        if n == 0:
            return {"n": 0}, np.zeros_like(self.sum_unit, dtype=np.float32)
        mean_unit = self.sum_unit / n
        m = float(np.linalg.norm(mean_unit))
        rawvar = 1.0 - m * m
        meannorm = 2.0 * (1.0 - m)
        stats = {
            "n": n,
            "mean_norm": float(norms.mean()),
            "norm_percentiles": {f"p{p}": float(np.percentile(norms, p)) for p in PERCENTILES},
            "max_norm": float(norms.max()),
            "mean_unit_direction_norm": m,  # ||E g_hat||
            "rawvar": rawvar,  # 1 - ||E g_hat||^2: error of predicting the mean vector
            "meannorm": meannorm,  # 2(1 - ||E g_hat||): mse_nrm of the mean direction
            "mean_direction_fve_nrm": 1.0 - meannorm / rawvar if rawvar > 0 else float("nan"),
        }
        return stats, mean_unit.astype(np.float32)


class ActivationStore:
    """Read access to a complete activation store directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / STORE_META_FILE
        if not meta_path.is_file():
            if (self.path / "progress.yaml").is_file():
                raise NLAError(f"{self.path} holds an unfinished extraction; re-run the same "
                               "`nlakit extract` command to finish it")
            raise NLAError(f"{self.path} is not an activation store (no {STORE_META_FILE}); create "
                           "one with `nlakit extract`")
        self.meta = read_yaml(meta_path)
        if self.meta.get("kind") != "nlakit_activations":
            raise NLAError(f"{meta_path} is not an nlakit activation store")
        self.d_model = int(self.meta["d_model"])
        self.layer = int(self.meta["layer"])
        self._dataset = pads.dataset(str(self.path / PARTS_DIR), format="parquet")

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.meta['model']['spec']!r}, "
                f"layer={self.layer}, rows={self.meta['counts']['rows']})")

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"]["fractions"])

    def _filter(self, split: str | None):
        if split in (None, "all"):
            return None
        names = set(self.splits) | set(self.meta["counts"].get("rows_per_split", {}))
        if split not in names:
            raise NLAError(f"unknown split {split!r}; this store has {sorted(names)} (or 'all')")
        return pads.field("split") == split

    def table(self, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Rows of one split (or all), in corpus order."""
        table = self._dataset.to_table(columns=columns, filter=self._filter(split))
        if columns is None or "row_id" in columns:
            table = table.sort_by("row_id")
        return table

    def rows(self, row_ids: Iterable[int], columns: list[str] | None = None) -> pa.Table:
        """The rows with these row ids (any split), in row_id order; an id the store does not
        hold is simply absent (compare the table's num_rows with the ids asked for). Reads only
        the matching rows, not the whole store."""
        ids = sorted({int(r) for r in row_ids})
        table = self._dataset.to_table(columns=columns, filter=pads.field("row_id").isin(ids))
        if columns is None or "row_id" in columns:
            table = table.sort_by("row_id")
        return table

    def num_rows(self, split: str | None = None) -> int:
        return self._dataset.count_rows(filter=self._filter(split))

    def vectors(self, split: str | None = None) -> torch.Tensor:
        """Raw vectors of a split as float32 [n, d], in row_id order."""
        table = self.table(split, columns=["row_id", "vector"])
        return torch.from_numpy(vectors_from_arrow(table.column("vector"), self.d_model).copy())

    def iter_batches(
        self, split: str | None = None, batch_size: int = 1024, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream rows (memory bounded); order follows the part files."""
        scanner = self._dataset.scanner(columns=columns, filter=self._filter(split),
                                        batch_size=batch_size)
        yield from scanner.to_batches()

    def stats(self, split: str = "all") -> dict:
        """Dataset statistics (rawvar, meannorm, norms) for a split or 'all'."""
        stats = self.meta["stats"]
        if split not in stats:
            raise NLAError(f"no statistics for split {split!r}; have {sorted(stats)}")
        return stats[split]

    def mean_unit_direction(self, split: str = "all") -> torch.Tensor:
        """E[g/||g||] (not normalised) over a split, float32 [d]."""
        tensors = load_file(str(self.path / STATS_FILE))
        key = f"mean_unit_direction.{split}"
        if key not in tensors:
            raise NLAError(f"no mean direction for split {split!r} in {self.path / STATS_FILE}")
        return tensors[key]


def write_stats(path: Path, directions: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        save_file({f"mean_unit_direction.{k}": torch.from_numpy(v) for k, v in
                   directions.items()}, str(tmp))


def compute_store_stats(parts: Iterable[Path], d_model: int, splits: Iterable[str]):
    """Stream every part once; return ({split: stats}, {split: mean unit direction})."""
    import pyarrow.parquet as pq

    acc = {name: StatsAccumulator(d_model) for name in ["all", *splits]}
    for part in parts:
        pf = pq.ParquetFile(part)
        for batch in pf.iter_batches(columns=["split", "vector"], batch_size=4096):
            vecs = vectors_from_arrow(batch.column("vector"), d_model)
            acc["all"].add(vecs)
            split_col = np.asarray(batch.column("split").to_pylist())
            for name in splits:
                mask = split_col == name
                if mask.any():
                    acc[name].add(vecs[mask])
    stats, directions = {}, {}
    for name, a in acc.items():
        stats[name], directions[name] = a.result()
    return stats, directions


def load_target(store, *, device=None, dtype=None):
    """The store's full target model (not the AR's truncated copy), checked against the
    store's weights hash. Returns (model, tokenizer)."""
    from nlakit.model.load import load_model

    spec = store.meta.get("model", {}).get("spec")
    if not spec:
        raise NLAError(f"{store.path} does not record its target model")
    model, tok = load_model(spec, device=device, dtype=dtype)
    want = store.meta.get("model", {}).get("weights_hash")
    got = getattr(model, "nlakit_source", {}).get("weights_hash")
    if want and got and want != got:
        raise NLAError(f"the store was extracted from weights {want}, but {spec!r} now loads "
                       f"{got}; use the model the store came from")
    return model, tok
