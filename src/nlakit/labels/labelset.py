"""The labelled set: `label_store` labels rows of an activation store and writes a directory
that `LabelSet` reads.

Every raw label is cached by stable_hash(prefix, labeller identity, prompt version) in a sqlite
database under ``cache_dir()/labels`` as soon as it exists, so an interrupted run resumes and
other runs reuse it. The output directory holds ``labels.parquet`` (kept rows),
``dropped.parquet`` (dropped rows and why) and ``meta.yaml`` (provenance), written last.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nlakit.errors import ConfigMismatchError, NLAError
from nlakit.fileio import atomic_path, read_yaml, write_yaml
from nlakit.labels.cache import LabelCache, LabelFailure, LabelRow
from nlakit.labels.core import DEFAULT_SPLITS, Labeller, make_labeller

LABELS_KIND = "nlakit_labels"
LABELS_FILE = "labels.parquet"
DROPPED_FILE = "dropped.parquet"
LABELS_META_FILE = "meta.yaml"


# ---- the labelled set ----------------------------------------------------------------------


def _labels_schema() -> pa.Schema:
    return pa.schema([("row_id", pa.int64()), ("doc_id", pa.string()), ("split", pa.string()),
                      ("label", pa.string()), ("features", pa.list_(pa.string())),
                      ("raw", pa.string())])


def _dropped_schema() -> pa.Schema:
    return pa.schema([("row_id", pa.int64()), ("split", pa.string()), ("reason", pa.string()),
                      ("raw", pa.string())])


class LabelSet:
    """A complete labelled-set directory (refuses one without meta.yaml: partial or foreign)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / LABELS_META_FILE
        if not meta_path.is_file():
            raise NLAError(f"{self.path} is not a complete label set (no {LABELS_META_FILE}); "
                           "it may be from an interrupted run: re-run `nlakit label` (cached "
                           "labels are reused)")
        self.meta = read_yaml(meta_path)
        if not isinstance(self.meta, dict) or self.meta.get("kind") != LABELS_KIND:
            raise NLAError(f"{meta_path} is not an nlakit label set")
        for name in (LABELS_FILE, DROPPED_FILE):
            if not (self.path / name).is_file():
                raise NLAError(f"label set {self.path} lacks {name}; re-run `nlakit label`")

    def __repr__(self) -> str:
        c = self.meta["counts"]
        return (f"LabelSet({str(self.path)!r}, labeller={self.meta['labeller']['kind']!r}, "
                f"kept={c['kept']}, dropped={c['dropped']})")

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def table(self, split: str | None = None) -> pa.Table:
        """Kept rows (row_id, doc_id, split, label, features, raw), in row_id order."""
        table = pq.read_table(self.path / LABELS_FILE)
        if split not in (None, "all"):
            if split not in self.splits:
                raise NLAError(f"split {split!r} was not labelled; this set has {self.splits}")
            table = table.filter(pc.equal(table["split"], split))
        return table.sort_by("row_id")

    def dropped(self) -> pa.Table:
        return pq.read_table(self.path / DROPPED_FILE)

    def check_store(self, store) -> None:
        """Refuse a store from another model or layer than the one these labels came from."""
        acts = self.meta["acts"]
        mine = (acts["model"].get("weights_hash"), acts["layer"])
        theirs = (store.meta["model"].get("weights_hash"), store.layer)
        if mine != theirs:
            raise ConfigMismatchError(
                f"label set {self.path} was made from {acts['path']} (model {mine[0]}, layer "
                f"{mine[1]}) but the store {store.path} has model {theirs[0]}, layer "
                f"{theirs[1]}; label that store with `nlakit label --acts {store.path}`")

    def joined(self, store, split: str) -> pa.Table:
        """The store's rows of ``split`` that have a label, with ``label`` and ``features``
        columns added (all store columns, vector and prefix included), in row_id order."""
        from nlakit.extract.store import ActivationStore

        if not isinstance(store, ActivationStore):
            store = ActivationStore(store)
        self.check_store(store)
        rows = store.table(split)
        labels = self.table(split)
        idx = pc.index_in(rows["row_id"], value_set=labels["row_id"])
        keep = pc.is_valid(idx)
        rows, idx = rows.filter(keep), idx.filter(keep)
        picked = labels.take(idx)
        return (rows.append_column("label", picked["label"])
                .append_column("features", picked["features"]))


def spread_rows(n: int, max_rows: int | None) -> list[int] | None:
    """Indices of at most `max_rows` of `n` rows spread evenly over them (None: all rows). A
    store keeps a split's rows document by document and corpus part by part, so the first rows
    would be the first documents only (`builtin:wide`'s added parts would never be labelled)."""
    if max_rows is None or max_rows >= n:
        return None
    return sorted({int(round(i * (n - 1) / max(max_rows - 1, 1))) for i in range(max_rows)})


def _store_rows(store, splits: Sequence[str], max_rows: int | None) -> list[LabelRow]:
    rows: list[LabelRow] = []
    cols = ["row_id", "split", "doc_id", "prefix", "position", "token_id"]
    for split in splits:
        table = store.table(split, columns=cols)
        picked = spread_rows(table.num_rows, max_rows)
        if picked is not None:
            table = table.take(picked)
        for r in table.to_pylist():
            rows.append(LabelRow(int(r["row_id"]), r["split"], r["doc_id"], r["prefix"],
                                 int(r["position"]), int(r["token_id"])))
    return rows


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled, dynamic_ncols=True)


def _check_request(store, out: Path, splits: list[str], max_rows: int | None) -> None:
    if out.resolve() == store.path.resolve():
        raise NLAError("--out must be a new directory, not the activation store itself")
    if not splits:
        raise NLAError("no splits to label")
    known = set(store.splits) | set(store.meta["counts"].get("rows_per_split", {}))
    unknown = [s for s in splits if s not in known]
    if unknown:
        raise NLAError(f"unknown split(s) {unknown}; the store has {sorted(known)}")
    if max_rows is not None and max_rows < 1:
        raise NLAError(f"--max-rows must be >= 1, got {max_rows}")


def _label_missing(labeller: Labeller, rows: list[LabelRow], keys: list[str],
                   raws: dict[str, str], cache: LabelCache,
                   progress: bool) -> tuple[dict[int, LabelFailure], int, float]:
    """Label the rows whose key is not cached (each distinct prefix once), caching every raw
    label as it completes. Returns (failures by row index, rows labelled now, seconds)."""
    identity = labeller.identity()
    todo = sorted({k: i for i, k in enumerate(keys) if k not in raws}.values(),
                  key=lambda i: labeller.batch_order(rows[i]))
    duplicates = {i for i, k in enumerate(keys) if k not in raws} - set(todo)
    name = json.dumps(identity, sort_keys=True)
    failures: dict[int, LabelFailure] = {}
    if todo:
        labeller.prepare()
    bar = _progress(len(todo), f"labelling ({labeller.kind})", progress)
    label_start = time.time()
    try:
        for start in range(0, len(todo), max(1, labeller.batch_size)):
            batch = todo[start:start + labeller.batch_size]
            for j, raw in labeller.iter_labels([rows[i] for i in batch]):
                i = batch[j]
                if isinstance(raw, LabelFailure):
                    failures[i] = raw
                else:
                    raw = "" if raw is None else str(raw)
                    cache.put(keys[i], name, raw, labeller.parse(raw))
                    raws[keys[i]] = raw
                bar.update(1)
    finally:
        bar.close()
    for i in duplicates:  # identical prefixes were labelled once
        if keys[i] not in raws and i not in failures:
            failures[i] = LabelFailure("request_failed", "an identical prefix failed")
    return failures, len(todo), time.time() - label_start


def _keep_or_drop(labeller: Labeller, rows, keys, raws, failures):
    """(kept [(row, parsed, raw)], dropped [(row, reason, raw or detail)], count by reason)."""
    kept, dropped = [], []
    for i, (row, key) in enumerate(zip(rows, keys)):
        if i in failures:
            f = failures[i]
            dropped.append((row, f.reason, f.detail))
            continue
        raw = raws[key]
        parsed = labeller.parse(raw)
        if parsed.kept:
            kept.append((row, parsed, raw))
        else:
            dropped.append((row, parsed.reason, raw))
    by_reason: dict[str, int] = {}
    for _, reason, _ in dropped:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return kept, dropped, by_reason


def _write_tables(out: Path, kept, dropped) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # the set is incomplete until meta is rewritten
    (out / LABELS_META_FILE).unlink(missing_ok=True)
    labels = pa.Table.from_pylist(
        [{"row_id": r.row_id, "doc_id": r.doc_id, "split": r.split, "label": p.text,
          "features": p.features, "raw": raw} for r, p, raw in kept], schema=_labels_schema())
    drops = pa.Table.from_pylist(
        [{"row_id": r.row_id, "split": r.split, "reason": reason, "raw": raw}
         for r, reason, raw in dropped], schema=_dropped_schema())
    with atomic_path(out / LABELS_FILE) as tmp:
        pq.write_table(labels, tmp)
    with atomic_path(out / DROPPED_FILE) as tmp:
        pq.write_table(drops, tmp)


def label_store(acts, labeller: Labeller | str, out: str | Path, *,
                splits: Sequence[str] = DEFAULT_SPLITS, max_rows: int | None = None,
                cache: LabelCache | str | Path | None = None, progress: bool = True,
                **options) -> LabelSet:
    """Label rows of an activation store and write a label set directory ``out``.

    acts: an ActivationStore or its directory. labeller: a Labeller or a registry name (then
    ``options`` configure it). splits: which splits to label. max_rows: at most this many rows
    per split (in row order). Raw labels are cached as they complete; rows already cached are
    not sent to the labeller again. Raises NLAError when no row survives parsing; meta.yaml is
    written last, so an interrupted or failed run never looks complete.
    """
    from nlakit import __version__
    from nlakit.extract.store import ActivationStore

    store = acts if isinstance(acts, ActivationStore) else ActivationStore(acts)
    out, splits = Path(out), list(dict.fromkeys(splits))
    if isinstance(labeller, str):
        labeller = make_labeller(labeller, store, **options)
    _check_request(store, out, splits, max_rows)
    own_cache = not isinstance(cache, LabelCache)
    cache = cache if isinstance(cache, LabelCache) else LabelCache(cache)

    started = time.time()
    rows = _store_rows(store, splits, max_rows)
    if not rows:
        raise NLAError(f"the splits {splits} of {store.path} hold no rows")
    identity = labeller.identity()
    version = identity.get("prompt_version", labeller.prompt_version)
    keys = [LabelCache.key(r.prefix, identity, version) for r in rows]
    raws: dict[str, str] = cache.get_many(keys)
    cached = sum(k in raws for k in keys)
    try:
        failures, new, labelling_s = _label_missing(labeller, rows, keys, raws, cache, progress)
    finally:
        if own_cache:
            cache.close()
    kept, dropped, by_reason = _keep_or_drop(labeller, rows, keys, raws, failures)
    if not kept:
        examples = "; ".join(repr(raw[:120]) for _, _, raw in dropped[:3])
        raise NLAError(
            f"labeller {labeller.kind!r} produced no usable label for any of {len(rows)} rows "
            f"(dropped by reason: {by_reason}); examples of its output: {examples}. Nothing was "
            f"written to {out}")
    _write_tables(out, kept, dropped)
    elapsed = time.time() - started
    per_split = {s: {"rows": sum(r.split == s for r in rows),
                     "kept": sum(r.split == s for r, _, _ in kept)} for s in splits}
    meta = {
        "kind": LABELS_KIND,
        "nlakit_version": __version__,
        "acts": {"path": str(store.path.resolve()),
                 "model": {k: store.meta["model"].get(k) for k in ("spec", "weights_hash")},
                 "layer": store.layer, "d_model": store.d_model},
        "labeller": labeller.provenance(),
        "splits": splits,
        "max_rows_per_split": max_rows,
        "counts": {"rows": len(rows), "kept": len(kept), "dropped": len(dropped),
                   "dropped_by_reason": dict(sorted(by_reason.items())),
                   "from_cache": cached, "labelled_now": new, "per_split": per_split},
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(len(rows) / elapsed, 3) if elapsed > 0 else None,
        "labelling_rows_per_s": round(new / labelling_s, 3) if new and labelling_s > 0 else None,
        "cache": str(cache.path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_yaml(out / LABELS_META_FILE, meta)
    labeller.close()
    return LabelSet(out)


__all__ = ["DROPPED_FILE", "LABELS_FILE", "LABELS_KIND", "LABELS_META_FILE", "LabelSet",
           "label_store"]
