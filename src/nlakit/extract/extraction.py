"""Extraction: run the target model over a corpus and store block-K activations.

Only blocks 0..K are computed (`models.forward_to_layer`). Documents are processed in shards
of `shard_docs` documents; each shard is written atomically as one parquet part, so an
interrupted run resumes at the first missing part and ends with the same store as an
uninterrupted run. Positions and splits depend only on (seed, doc_id), never on batching.
"""

from __future__ import annotations

import logging
import platform
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from nlakit import __version__
from nlakit.config import hint
from nlakit.corpus.documents import Corpus, Document
from nlakit.corpus.load import load_corpus
from nlakit.errors import ConfigMismatchError, NLAError
from nlakit.extract.store import (
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
from nlakit.fileio import atomic_path, read_yaml, stable_seed, write_yaml
from nlakit.model.arch import check_layer, d_model, num_layers, special_token_ids
from nlakit.model.batching import right_pad
from nlakit.model.hooks import forward_to_layer
from nlakit.model.load import load_model

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
class ExtractConfig:
    """The ``extract`` stage: which documents to read and which token positions to keep.

    The target model and layer are inputs of the stage (`extract(model, ..., layer=)`, the
    pipeline's top-level ``model``/``layer``), not part of this section."""

    corpus: str = field(default="builtin", metadata=hint(
        "builtin[:docs|chats|writing|code|wide], a text file/folder, .jsonl, .parquet, or a "
        "saved datasets folder"))
    text_field: str = field(default="text", metadata=hint("text field/column of jsonl/parquet"))
    blocks: bool = field(default=False, metadata=hint(
        "text files: one document per blank-line separated block"))
    max_docs: int | None = field(default=None, metadata=hint("stop after this many documents"))
    max_tokens_per_doc: int = field(default=1024, metadata=hint(
        "truncate documents to this many tokens"))
    positions_per_doc: int = field(default=10, metadata=hint(
        "token positions sampled per document"))
    min_position: int = field(default=50, metadata=hint(
        "sample only tokens at index >= this (early positions have outlier norms)"))
    seed: int = field(default=0, metadata=hint("seed of positions and splits"))
    splits: dict[str, float] | str | None = field(default=None, metadata=hint(
        "document-level split fractions, e.g. av_sft=0.25,ar_sft=0.25,rl=0.4,heldout=0.1 "
        "(None: those)"))
    batch_size: int = field(default=8, metadata=hint("documents per forward pass"))
    shard_docs: int = field(default=64, metadata=hint(
        "documents per parquet part (the unit of resumption)"))

    def __post_init__(self):
        if self.positions_per_doc < 1:
            raise NLAError(f"positions_per_doc must be >= 1, got {self.positions_per_doc}")
        if self.min_position < 0:
            raise NLAError(f"min_position must be >= 0, got {self.min_position}")
        if self.max_tokens_per_doc <= self.min_position:
            raise NLAError(f"max_tokens_per_doc ({self.max_tokens_per_doc}) must exceed "
                           f"min_position ({self.min_position}), or no token can be sampled")
        if self.batch_size < 1 or self.shard_docs < 1:
            raise NLAError(f"batch_size and shard_docs must be >= 1, got {self.batch_size} "
                           f"and {self.shard_docs}")
        if self.max_docs is not None and self.max_docs < 1:
            raise NLAError(f"max_docs must be >= 1, got {self.max_docs}")
        if isinstance(self.splits, str):
            self.splits = parse_fractions(self.splits)
        elif self.splits is not None:
            self.splits = check_fractions(dict(self.splits))

    @property
    def fractions(self) -> dict[str, float]:
        return dict(self.splits or DEFAULT_SPLIT_FRACTIONS)


@dataclass
class _Tokenized:
    index: int  # document index in corpus order
    doc: Document
    ids: list[int]
    positions: list[int]
    split: str


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """The token ids extraction feeds the target for `text` (or a stored prefix of it),
    truncated to max_tokens; a chat template may already start with BOS, which is then not
    added again."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special, truncation=max_tokens is not None,
                     max_length=max_tokens)["input_ids"]


def tokenize_document(tokenizer, doc: Document, max_tokens: int) -> list[int]:
    """`tokenize_text` of a document."""
    return tokenize_text(tokenizer, doc.text, max_tokens)


def prefix_text(tokenizer, ids: list[int], text: str = "") -> str:
    """The stored prefix text of ids[0..p] of a document `text`: a BOS the tokenizer added is
    dropped, one the document itself starts with (a chat transcript's first turn marker, e.g.
    SmolLM2's <|im_start|>) is kept, so the prefix is document text."""
    bos = tokenizer.bos_token
    if (ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
            and not (bos and text.startswith(bos))):
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


_tokenize, _prefix_text = tokenize_document, prefix_text  # the earlier private names


def _shard_rows(model, tokenizer, docs: list[_Tokenized], layer: int, batch_size: int,
                pad_id: int) -> dict[int, np.ndarray]:
    """Vectors [n_positions, d] per document index; batches sorted by length to save padding."""
    out: dict[int, np.ndarray] = {}
    todo = sorted((t for t in docs if t.positions), key=lambda t: -len(t.ids))
    device = next(model.parameters()).device
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        width = max(t.positions[-1] + 1 for t in batch)  # later tokens cannot affect earlier ones
        ids, mask = right_pad([t.ids for t in batch], pad_id, width=width)
        hidden = forward_to_layer(model, ids.to(device), mask.to(device), layer)
        for i, t in enumerate(batch):
            out[t.index] = hidden[i, t.positions].float().cpu().numpy()
    return out


def _shards(corpus: Corpus, shard_docs: int) -> Iterator[list[tuple[int, Document]]]:
    it = enumerate(corpus)
    while chunk := list(islice(it, shard_docs)):
        yield chunk


def _store_config(model, corpus: Corpus, layer: int, cfg: ExtractConfig) -> dict:
    """What the store's meta.yaml records as its configuration (a resume must match it)."""
    stdlib = {}
    if corpus.description.get("format") == "builtin":  # this Python's stdlib: a resume on
        stdlib = {"stdlib_python": platform.python_version()}  # another would mix documents
    return {
        **stdlib,
        "model": dict(getattr(model, "nlakit_source", {"spec": type(model).__name__})),
        "layer": layer,
        "corpus": corpus.description,
        "positions_per_doc": cfg.positions_per_doc,
        "min_position": cfg.min_position,
        "seed": cfg.seed,
        "split_fractions": cfg.fractions,
        "max_tokens_per_doc": cfg.max_tokens_per_doc,
        "shard_docs": cfg.shard_docs,
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
    if existing is not None and "stdlib_python" not in existing:  # a store made before it was
        config = {k: v for k, v in config.items() if k != "stdlib_python"}  # recorded
    if existing is not None and existing != config:
        if not overwrite:
            diff = sorted(k for k in set(existing) | set(config)
                          if existing.get(k) != config.get(k))
            python = (f" (the builtin corpus is this Python's stdlib text: the store's is "
                      f"Python {existing.get('stdlib_python')}, this one "
                      f"{config.get('stdlib_python')}, so its documents differ; run that "
                      "Python to resume)" if "stdlib_python" in diff else "")
            raise ConfigMismatchError(
                f"{out} holds a store made with a different configuration (differs in: "
                f"{', '.join(diff)}){python}; pass --overwrite to replace it or choose "
                "another --out")
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


def extract(model, corpus: Corpus | str, out: str | Path, config: ExtractConfig | None = None,
            *, layer: int | None = None, overwrite: bool = False,
            progress: bool = True) -> ActivationStore:
    """Extract block-`layer` activations of `model` over `corpus` into the store at `out`.

    model: a spec string (see `load_model`) or a loaded ``(model, tokenizer)`` pair. corpus: a
    `Corpus`, or a spec read with the config's text_field/blocks/max_docs. Returns the
    complete `ActivationStore`. Re-running with the same arguments resumes an interrupted
    run, or returns the finished store untouched.
    """
    cfg = config or ExtractConfig()
    model, tokenizer = load_model(model) if isinstance(model, str) else model
    if isinstance(corpus, str):
        corpus = load_corpus(corpus, tokenizer=tokenizer, text_field=cfg.text_field,
                             blocks=cfg.blocks, max_docs=cfg.max_docs,
                             chat_model=(model, tokenizer))
    layer = check_layer(model, layer)
    out = Path(out)
    store_config = _store_config(model, corpus, layer, cfg)
    if _prepare_out_dir(out, store_config, overwrite):
        log.info("%s already holds the complete store for this configuration", out)
        return ActivationStore(out)
    ctx = _ShardContext(model, tokenizer, layer, cfg)
    parts: list[Path] = []
    bar = tqdm(desc=f"extracting layer {layer}", unit="doc", disable=not progress,
               total=corpus.max_docs)
    for shard_index, chunk in enumerate(_shards(corpus, cfg.shard_docs)):
        part = out / PARTS_DIR / f"part-{shard_index:05d}.parquet"
        parts.append(part)
        if not part.is_file():
            _write_shard(part, chunk, ctx)
        bar.update(len(chunk))
    bar.close()
    if not parts:
        raise NLAError(f"corpus {corpus.description.get('source')} is empty: no documents "
                       "with text")
    return _finalize(out, parts, store_config, ctx.d, layer, model, cfg.fractions)


@dataclass
class _ShardContext:
    """What every shard of one extraction shares."""
    model: torch.nn.Module
    tokenizer: object
    layer: int
    cfg: ExtractConfig

    def __post_init__(self):
        self.special = special_token_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.d = d_model(self.model)
        self.schema = store_schema(self.d)


def _tokenize_shard(chunk, ctx: _ShardContext) -> list[_Tokenized]:
    cfg = ctx.cfg
    docs = []
    for index, doc in chunk:
        ids = tokenize_document(ctx.tokenizer, doc, cfg.max_tokens_per_doc)
        positions = sample_positions(ids, doc.doc_id, cfg.seed, cfg.positions_per_doc,
                                     cfg.min_position, ctx.special)
        docs.append(_Tokenized(index, doc, ids, positions,
                               assign_split(doc.doc_id, cfg.seed, cfg.fractions)))
    return docs


def _write_shard(part: Path, chunk: list[tuple[int, Document]], ctx: _ShardContext) -> None:
    """Tokenize, sample and run one shard of documents; write its rows as one parquet part."""
    tokenizer, schema = ctx.tokenizer, ctx.schema
    docs = _tokenize_shard(chunk, ctx)
    vectors = _shard_rows(ctx.model, tokenizer, docs, ctx.layer, ctx.cfg.batch_size, ctx.pad_id)
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
            rows["prefix"].append(prefix_text(tokenizer, t.ids[: pos + 1], t.doc.text))
            rows["vector"].append(vectors[t.index][j])
    # row_id is global and stable: document index * positions_per_doc + rank within document
    rows["row_id"] = [i * ctx.cfg.positions_per_doc + r for i, r in _ranks(rows["doc_index"])]
    flat = (np.stack(rows["vector"]).reshape(-1) if rows["vector"]
            else np.zeros(0, dtype=np.float32))
    arrays = [pa.array(rows[name], type=schema.field(name).type) for name in schema.names[:-1]]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), ctx.d))
    table = pa.Table.from_arrays(arrays, schema=schema)
    counts = {
        "docs": len(docs),
        "docs_short": sum(not t.positions for t in docs),
        "tokens": sum(len(t.ids) for t in docs),
        "docs_per_split": {s: sum(1 for t in docs if t.split == s and t.positions)
                           for s in ctx.cfg.fractions},
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
        # `builtin` documents are read from this Python's stdlib: another version, other text
        "python_version": platform.python_version(),
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


__all__ = ["DEFAULT_SPLIT_FRACTIONS", "SPLITS", "ExtractConfig", "assign_split", "extract",
           "prefix_text", "sample_positions", "tokenize_document"]
