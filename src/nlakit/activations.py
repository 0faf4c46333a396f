"""Extraction: run the target model over a corpus and store block-K activations.

Only blocks 0..K are computed (`models.forward_to_layer`). Documents are processed in shards
of `shard_docs` documents; each shard is written atomically as one parquet part, so an
interrupted run resumes at the first missing part and ends with the same store as an
uninterrupted run. Positions and splits depend only on (seed, doc_id), never on batching.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from . import __version__
from .corpus import Corpus, Document, load_corpus
from .errors import ConfigMismatchError, NLAError
from .fileio import atomic_path, read_yaml, stable_seed, write_yaml
from .models import (
    check_layer,
    d_model,
    forward_to_layer,
    load_model,
    num_layers,
    special_token_ids,
)
from .store import (
    AR_SFT,
    AV_SFT,
    HELDOUT,
    PARTS_DIR,
    RL,
    SPLITS,
    STATS_FILE,
    STORE_META_FILE,
    STORE_VERSION,
    ActivationStore,
    compute_store_stats,
    store_schema,
    write_stats,
)

log = logging.getLogger(__name__)

DEFAULT_SPLIT_FRACTIONS = {AV_SFT: 0.25, AR_SFT: 0.25, RL: 0.40, HELDOUT: 0.10}
PROGRESS_FILE = "progress.yaml"


def assign_split(doc_id: str, seed: int, fractions: dict[str, float]) -> str:
    """Document-level split: a uniform draw from hash(seed, doc_id) into cumulative fractions."""
    u = stable_seed("split", seed, doc_id) / float(1 << 60)
    total = 0.0
    for name, frac in fractions.items():
        total += frac
        if u < total:
            return name
    return list(fractions)[-1]


def sample_positions(
    token_ids: list[int], doc_id: str, seed: int, k: int, min_position: int, special: set[int]
) -> list[int]:
    """Up to k distinct token indices >= min_position, uniform among non-special tokens."""
    eligible = [i for i in range(min_position, len(token_ids)) if token_ids[i] not in special]
    if not eligible:
        return []
    rng = np.random.default_rng(stable_seed("positions", seed, doc_id))
    chosen = rng.choice(len(eligible), size=min(k, len(eligible)), replace=False)
    return sorted(eligible[i] for i in chosen)


def check_fractions(fractions: dict[str, float]) -> dict[str, float]:
    if not fractions or any(f < 0 for f in fractions.values()):
        raise NLAError(f"split fractions must be non-negative, got {fractions}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise NLAError(f"split fractions must add up to 1, got {total:.4f} ({fractions})")
    return dict(fractions)


def parse_fractions(text: str) -> dict[str, float]:
    """'av_sft=0.25,ar_sft=0.25,rl=0.4,heldout=0.1' -> dict (CLI helper)."""
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise NLAError(f"bad split spec {item!r}: use NAME=FRACTION,NAME=FRACTION,...")
    return check_fractions(out)


@dataclass
class _Tokenized:
    index: int  # document index in corpus order
    doc: Document
    ids: list[int]
    positions: list[int]
    split: str


def _tokenize(tokenizer, doc: Document, max_tokens: int) -> list[int]:
    # A chat template may already start with BOS: adding special tokens again would double it.
    bos = tokenizer.bos_token
    add_special = not (bos and doc.text.startswith(bos))
    return tokenizer(doc.text, add_special_tokens=add_special, truncation=True,
                     max_length=max_tokens)["input_ids"]


def _prefix_text(tokenizer, ids: list[int], text: str = "") -> str:
    # Drop a BOS the tokenizer added, but keep one the document itself starts with (a chat
    # transcript's first turn marker, e.g. SmolLM2's <|im_start|>): the prefix is document text.
    bos = tokenizer.bos_token
    if (ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
            and not (bos and text.startswith(bos))):
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _shard_rows(model, tokenizer, docs: list[_Tokenized], layer: int, batch_size: int,
                pad_id: int) -> dict[int, np.ndarray]:
    """Vectors [n_positions, d] per document index; batches sorted by length to save padding."""
    out: dict[int, np.ndarray] = {}
    todo = sorted((t for t in docs if t.positions), key=lambda t: -len(t.ids))
    device = next(model.parameters()).device
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        width = max(t.positions[-1] + 1 for t in batch)  # later tokens cannot affect earlier ones
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, t in enumerate(batch):  # right padding: positions index real tokens directly
            n = min(len(t.ids), width)
            ids[i, :n] = torch.tensor(t.ids[:n])
            mask[i, :n] = 1
        hidden = forward_to_layer(model, ids.to(device), mask.to(device), layer)
        for i, t in enumerate(batch):
            out[t.index] = hidden[i, t.positions].float().cpu().numpy()
    return out


def _shards(corpus: Corpus, shard_docs: int) -> Iterator[list[tuple[int, Document]]]:
    it = enumerate(corpus)
    while chunk := list(islice(it, shard_docs)):
        yield chunk


def _config(model, corpus: Corpus, layer, positions_per_doc, min_position, seed, fractions,
            max_tokens_per_doc, shard_docs) -> dict:
    return {
        "model": dict(getattr(model, "nlakit_source", {"spec": type(model).__name__})),
        "layer": layer,
        "corpus": corpus.description,
        "positions_per_doc": positions_per_doc,
        "min_position": min_position,
        "seed": seed,
        "split_fractions": fractions,
        "max_tokens_per_doc": max_tokens_per_doc,
        "shard_docs": shard_docs,
        "store_version": STORE_VERSION,
    }


def _prepare_out_dir(out: Path, config: dict, overwrite: bool) -> bool:
    """Return True when `out` already holds the complete store for `config`."""
    meta_path, progress_path = out / STORE_META_FILE, out / PROGRESS_FILE
    existing = None
    if meta_path.is_file():
        existing = read_yaml(meta_path).get("config")
    elif progress_path.is_file():
        existing = read_yaml(progress_path).get("config")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigMismatchError(f"output directory {out} is not empty and holds no nlakit "
                                  "store; choose another --out or pass --overwrite")
    if existing is not None and existing != config:
        if not overwrite:
            diff = sorted(k for k in set(existing) | set(config)
                          if existing.get(k) != config.get(k))
            raise ConfigMismatchError(
                f"{out} holds a store made with a different configuration (differs in: "
                f"{', '.join(diff)}); pass --overwrite to replace it or choose another --out")
        existing = None
    if overwrite and existing is None and out.exists():
        names = (STORE_META_FILE, PROGRESS_FILE, PARTS_DIR)
        looks_like_store = any((out / n).exists() for n in names)
        if any(out.iterdir()) and not looks_like_store:
            raise ConfigMismatchError(f"refusing to delete {out}: --overwrite replaces an nlakit "
                                      "store, and this directory holds something else")
        shutil.rmtree(out)
    if existing is not None and meta_path.is_file():
        return True
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    write_yaml(progress_path, {"config": config})
    return False


def extract(
    model,
    corpus: Corpus | str,
    out: str | Path,
    *,
    layer: int | None = None,
    positions_per_doc: int = 10,
    min_position: int = 50,
    seed: int = 0,
    split_fractions: dict[str, float] | None = None,
    batch_size: int = 8,
    max_tokens_per_doc: int = 1024,
    shard_docs: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Extract block-`layer` activations of `model` over `corpus` into the store at `out`.

    model: a spec string (see `load_model`) or a loaded ``(model, tokenizer)`` pair.
    Returns the complete `ActivationStore`. Re-running with the same arguments resumes an
    interrupted run, or returns the finished store untouched.
    """
    if isinstance(model, str):
        model, tokenizer = load_model(model)
    else:
        model, tokenizer = model
    if isinstance(corpus, str):
        corpus = load_corpus(corpus, tokenizer=tokenizer, chat_model=(model, tokenizer))
    layer = check_layer(model, layer)
    if positions_per_doc < 1:
        raise NLAError(f"positions_per_doc must be >= 1, got {positions_per_doc}")
    if min_position < 0:
        raise NLAError(f"min_position must be >= 0, got {min_position}")
    if max_tokens_per_doc <= min_position:
        raise NLAError(f"max_tokens_per_doc ({max_tokens_per_doc}) must exceed min_position "
                       f"({min_position}), or no token can be sampled")
    fractions = check_fractions(split_fractions or DEFAULT_SPLIT_FRACTIONS)
    out = Path(out)
    config = _config(model, corpus, layer, positions_per_doc, min_position, seed, fractions,
                     max_tokens_per_doc, shard_docs)
    if _prepare_out_dir(out, config, overwrite):
        log.info("%s already holds the complete store for this configuration", out)
        return ActivationStore(out)

    special = special_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    d = d_model(model)
    schema = store_schema(d)
    parts: list[Path] = []
    bar = tqdm(desc=f"extracting layer {layer}", unit="doc", disable=not progress,
               total=corpus.max_docs)
    for shard_index, chunk in enumerate(_shards(corpus, shard_docs)):
        part = out / PARTS_DIR / f"part-{shard_index:05d}.parquet"
        parts.append(part)
        if not part.is_file():
            _write_shard(part, chunk, model, tokenizer, layer, schema, special, pad_id,
                         positions_per_doc, min_position, seed, fractions, max_tokens_per_doc,
                         batch_size)
        bar.update(len(chunk))
    bar.close()
    if not parts:
        raise NLAError(f"corpus {corpus.description.get('source')} is empty: no documents "
                       "with text")
    return _finalize(out, parts, config, d, layer, model, fractions)


def _write_shard(part, chunk, model, tokenizer, layer, schema, special, pad_id,
                 positions_per_doc, min_position, seed, fractions, max_tokens, batch_size):
    docs = []
    short = 0
    for index, doc in chunk:
        ids = _tokenize(tokenizer, doc, max_tokens)
        positions = sample_positions(ids, doc.doc_id, seed, positions_per_doc, min_position,
                                     special)
        short += not positions
        docs.append(_Tokenized(index, doc, ids, positions, assign_split(doc.doc_id, seed,
                                                                        fractions)))
    vectors = _shard_rows(model, tokenizer, docs, layer, batch_size, pad_id)
    rows: dict[str, list] = {name: [] for name in schema.names}
    for t in docs:
        for j, pos in enumerate(t.positions):
            rows["doc_id"].append(t.doc.doc_id)
            rows["doc_index"].append(t.index)
            rows["doc_kind"].append(t.doc.kind)
            rows["split"].append(t.split)
            rows["position"].append(pos)
            rows["token_id"].append(t.ids[pos])
            rows["token_text"].append(tokenizer.decode([t.ids[pos]]))
            rows["prefix"].append(_prefix_text(tokenizer, t.ids[: pos + 1], t.doc.text))
            rows["vector"].append(vectors[t.index][j])
    # row_id is global and stable: document index * positions_per_doc + rank within document
    rows["row_id"] = [i * positions_per_doc + r for i, r in _ranks(rows["doc_index"])]
    d = schema.field("vector").type.list_size
    flat = (np.stack(rows["vector"]).reshape(-1) if rows["vector"]
            else np.zeros(0, dtype=np.float32))
    arrays = [pa.array(rows[name], type=schema.field(name).type) for name in schema.names[:-1]]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), d))
    table = pa.Table.from_arrays(arrays, schema=schema)
    counts = {
        "docs": len(docs),
        "docs_short": short,
        "tokens": sum(len(t.ids) for t in docs),
        "docs_per_split": {s: sum(1 for t in docs if t.split == s and t.positions)
                           for s in fractions},
    }
    table = table.replace_schema_metadata({"nlakit_counts": repr(counts)})
    with atomic_path(part) as tmp:
        pq.write_table(table, tmp)


def _ranks(doc_indices: list[int]):
    last, rank = None, 0
    for i in doc_indices:
        rank = rank + 1 if i == last else 0
        last = i
        yield i, rank


def _finalize(out, parts, config, d, layer, model, fractions) -> ActivationStore:
    import ast

    totals = {"docs": 0, "docs_short": 0, "tokens": 0,
              "docs_per_split": dict.fromkeys(fractions, 0)}
    rows_per_split = dict.fromkeys(fractions, 0)
    rows = 0
    for part in parts:
        pf = pq.ParquetFile(part)
        counts = ast.literal_eval(pf.schema_arrow.metadata[b"nlakit_counts"].decode())
        for key in ("docs", "docs_short", "tokens"):
            totals[key] += counts[key]
        for s, n in counts["docs_per_split"].items():
            totals["docs_per_split"][s] += n
        split_col = pf.read(columns=["split"]).column("split").to_pylist()
        rows += len(split_col)
        for s in split_col:
            rows_per_split[s] += 1
    if rows == 0:
        raise NLAError(
            f"no activations extracted: all {totals['docs']} documents are shorter than "
            f"min_position={config['min_position']} tokens (+1). Lower --min-position (early "
            "positions have outlier norms; the choice is yours) or use longer documents")
    if totals["docs_short"]:
        log.warning("%d of %d documents had no token at index >= %d and were skipped",
                    totals["docs_short"], totals["docs"], config["min_position"])
    stats, directions = compute_store_stats(parts, d, list(fractions))
    write_stats(out / STATS_FILE, directions)
    meta = {
        "kind": "nlakit_activations",
        "nlakit_version": __version__,
        "model": config["model"],
        "layer": layer,
        "num_layers": num_layers(model),
        "d_model": d,
        "hook": f"output of decoder block {layer} (= hidden_states[{layer + 1}])",
        "seed": config["seed"],
        "corpus": config["corpus"],
        "splits": {"fractions": fractions, "unit": "document"},
        "counts": {**totals, "rows": rows, "rows_per_split": rows_per_split},
        "stats": stats,
        "parts": [p.name for p in parts],
        "config": config,
    }
    write_yaml(out / STORE_META_FILE, meta)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return ActivationStore(out)


__all__ = ["DEFAULT_SPLIT_FRACTIONS", "SPLITS", "assign_split", "extract", "sample_positions"]
