"""Warm-start labels: pluggable labellers and the labelled-set writer (pipeline step 2).

A labeller sees only the text prefix of a row (never the vector) and writes an explanation of
what a model relies on to predict the next token: 2-3 short features, most important first, the
last one about the final token, inside ``<explanation>...</explanation>``. The text between the
tags, one feature per line, is what the AV is later trained to write.

Built-in labellers:
  * ``local``   any instruct model `load_model` can load (default: the store's target model);
                chat-templated one-shot prompt, left-padded batched ``generate``.
  * ``openai``  any OpenAI-compatible chat-completions endpoint (`nlakit.labels.openai`).
  * ``context`` deterministic and grounded in the target model: kind of text (rules), the last
                words of the context (quoted), and the target's own top-k next-token predictions
                (`nlakit.labels.context`).
Add your own by subclassing `Labeller` and calling `register_labeller`, or by an entry point in
the group ``nlakit.labellers`` that names the class.

Every raw label is cached by stable_hash(prefix, labeller identity, prompt version) in a sqlite
database under ``cache_dir()/labels`` as soon as it exists, so an interrupted run resumes and
other runs reuse it. The output directory holds ``labels.parquet`` (kept rows),
``dropped.parquet`` (dropped rows and why) and ``meta.yaml`` (provenance), written last.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import ConfigMismatchError, NLAError
from ..fileio import atomic_path, read_yaml, stable_hash, write_yaml
from ..models import (
    cache_dir,
    resolve_model,
    weights_hash,
)
from ..store import AR_SFT, AV_SFT, HELDOUT

log = logging.getLogger(__name__)

LABELS_KIND = "nlakit_labels"
LABELS_FILE = "labels.parquet"
DROPPED_FILE = "dropped.parquet"
LABELS_META_FILE = "meta.yaml"
DEFAULT_SPLITS = (AV_SFT, AR_SFT, HELDOUT)  # heldout: the eval's `label` baseline
PROMPT_VERSION = "features-v1"  # bump when the LLM prompt or the parser changes meaning
ENTRY_POINT_GROUP = "nlakit.labellers"

# ---- the explanation format -----------------------------------------------------------------

_EXPLANATION = re.compile(r"<explanation>((?:(?!<explanation>).)*?)</explanation>", re.DOTALL)
_BULLET = re.compile(r"^\s*(?:[-*\u2022+]|\d+[.)]|#+|(?:feature|clue)\s*\d+\s*:)\s*", re.IGNORECASE)
_BOLD = re.compile(r"(\*\*|__)(.+?)\1")
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|i'?m unable|i am unable|"
    r"i won'?t|as an ai|unfortunately,? i)", re.IGNORECASE)


@dataclass
class ParsedLabel:
    """A parsed labeller output: ``features`` when kept, else the drop ``reason``."""

    features: list[str] | None
    reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.features is not None

    @property
    def text(self) -> str:
        return "\n".join(self.features or [])


def parse_label(raw: str, *, min_features: int = 2, max_features: int = 3,
                      max_words: int = 150) -> ParsedLabel:
    """Strictly parse ``<explanation>`` features from a labeller's raw output.

    Drop reasons: ``empty``, ``refusal``, ``no_closed_tag``, ``too_few_features`` (after removing
    bullets, bold and duplicate lines), ``too_many_features``, ``too_long`` (> max_words words).
    """
    if raw is None or not raw.strip():
        return ParsedLabel(None, "empty")
    stripped = raw.strip()
    stripped = stripped.removeprefix("<explanation>")
    if _REFUSAL.match(stripped):
        return ParsedLabel(None, "refusal")
    match = _EXPLANATION.search(raw)
    if match is None:
        return ParsedLabel(None, "no_closed_tag")
    features: list[str] = []
    seen: set[str] = set()
    for line in match.group(1).splitlines():
        line = _BOLD.sub(r"\2", _BULLET.sub("", line)).strip()
        if not line or line.lower() in seen:
            continue
        seen.add(line.lower())
        features.append(line)
    if features and _REFUSAL.match(features[0]):
        return ParsedLabel(None, "refusal")
    if len(features) < min_features:
        return ParsedLabel(None, "too_few_features")
    if len(features) > max_features:
        return ParsedLabel(None, "too_many_features")
    if sum(len(f.split()) for f in features) > max_words:
        return ParsedLabel(None, "too_long")
    return ParsedLabel(features)


INSTRUCTION = (
    "The text below stops in the middle. Name the 2 or 3 clues a language model relies on most "
    "to predict the next word (kind of text, grammar, topic, repetition), most important first; "
    "the last clue is about the final word and what it makes likely next. One short line per "
    "clue, inside <explanation> tags, nothing else.\n\n<text>{text}</text>"
)
ONE_SHOT = [
    ("Preheat the oven to 180C. In a large bowl, mix 2 cups of",
     ("<explanation>\nA recipe giving step-by-step cooking instructions.\nAn ingredient list "
      "with quantities.\nEnds with \"2 cups of\": an ingredient name comes next.\n</explanation>")),
    ("def area(radius):\n    return 3.14 * radius *",
     ("<explanation>\nPython code defining a function.\nA formula for the area of a circle.\n"
      "Ends with \"*\": the variable radius comes next.\n</explanation>")),
]


def prefix_tail(prefix: str, max_chars: int | None) -> str:
    """The last ``max_chars`` characters of a prefix, cut at a word boundary, marked with '...'."""
    if not max_chars or len(prefix) <= max_chars:
        return prefix
    tail = prefix[-max_chars:]
    cut = re.search(r"\s", tail)
    if cut and cut.start() < max_chars // 4:
        tail = tail[cut.start() + 1:]
    return "..." + tail


def label_messages(prefix: str, max_chars: int | None = None,
                   one_shot: bool = True) -> list[dict]:
    """Chat messages asking an LLM labeller for the features of one prefix."""
    messages: list[dict] = []
    if one_shot:
        for text, answer in ONE_SHOT:
            messages.append({"role": "user", "content": INSTRUCTION.format(text=text)})
            messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user",
                     "content": INSTRUCTION.format(text=prefix_tail(prefix, max_chars))})
    return messages


# ---- rows, failures, cache ------------------------------------------------------------------


@dataclass(frozen=True)
class LabelRow:
    """What a labeller may see of a store row (never the vector)."""

    row_id: int
    split: str
    doc_id: str
    prefix: str
    position: int = -1
    token_id: int = -1


@dataclass(frozen=True)
class LabelFailure:
    """A row the labeller could not label this time (not cached: a re-run retries it)."""

    reason: str
    detail: str = ""


class LabelCache:
    """Persistent sqlite cache of raw labels keyed by (prefix, labeller identity, prompt version).

    Each label is committed as soon as it is put, so an interrupted run loses nothing.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else cache_dir() / "labels" / "labels.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS labels (key TEXT PRIMARY KEY, labeller TEXT, "
                "raw TEXT, features TEXT, reason TEXT, created REAL)")
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise NLAError(f"label cache {self.path} is unusable ({e}); delete it to start a "
                           "fresh cache") from e

    @staticmethod
    def key(prefix: str, identity: dict, prompt_version: str) -> str:
        return stable_hash(prefix, identity, prompt_version)

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for key, raw in self._db.execute(
                    f"SELECT key, raw FROM labels WHERE key IN ({marks})", chunk):
                found[key] = raw
        return found

    def put(self, key: str, labeller: str, raw: str, parsed: ParsedLabel) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?)",
            (key, labeller, raw, json.dumps(parsed.features), parsed.reason, time.time()))
        self._db.commit()

    def close(self) -> None:
        self._db.close()


# ---- the stage config --------------------------------------------------------------------


@dataclass
class LabelConfig:
    """The ``label`` stage: which labeller labels which rows of the activation store."""

    labeller: str = field(default="context", metadata={
        "help": "local, openai, context, or a registered/entry-point labeller"})
    splits: list[str] | str = field(default_factory=lambda: list(DEFAULT_SPLITS), metadata={
        "help": "splits to label (comma-separated on the command line)"})
    max_rows: int | None = field(default=None, metadata={
        "help": "at most this many rows per split"})
    options: dict = field(default_factory=dict, metadata={
        "help": "the labeller's options (see LabellerOptions); another option is an error"})

    def __post_init__(self):
        if isinstance(self.splits, str):
            self.splits = [s.strip() for s in self.splits.split(",") if s.strip()]
        self.splits = list(self.splits)
        if not self.splits:
            raise NLAError("label: no splits to label")
        if self.max_rows is not None and self.max_rows < 1:
            raise NLAError(f"label: max_rows must be >= 1, got {self.max_rows}")
        if not isinstance(self.options, dict):
            raise NLAError(f"label: options must be a mapping, got {self.options!r}")
        cls = get_labeller_class(self.labeller)
        check_options(f"the {self.labeller!r} labeller", self.options, cls.OPTIONS)


@dataclass
class LabellerOptions:
    """The options of the built-in labellers (each takes the ones in its ``OPTIONS``); on the
    command line a flag each, in a pipeline config the ``label.options`` mapping."""

    model: str | None = field(default=None, metadata={
        "help": "local/context: model to run (default: the store's target model)"})
    dtype: str | None = field(default=None, metadata={
        "help": "local/context: float32, bfloat16, auto ..."})
    device: str | None = field(default=None, metadata={"help": "local/context: cpu, cuda, auto"})
    batch_size: int | None = field(default=None, metadata={
        "help": "local/context: rows per batch (default 8 local, 32 context)"})
    temperature: float | None = field(default=None, metadata={
        "help": "local/openai: sampling temperature (default 0: greedy)"})
    top_p: float | None = field(default=None, metadata={"help": "local/openai: nucleus sampling"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "local/openai: cap on generated tokens (default 64 local, 200 openai)"})
    seed: int | None = field(default=None, metadata={"help": "local: sampling seed"})
    max_prefix_chars: int | None = field(default=None, metadata={
        "help": "local/openai: show at most the last N characters of the prefix (default 300 "
                "local, 2000 openai)"})
    top_k: int | None = field(default=None, metadata={"help": "context: predictions shown (3)"})
    n_words: int | None = field(default=None, metadata={
        "help": "context: last words of the context quoted (6)"})
    base_url: str | None = field(default=None, metadata={
        "help": "openai: endpoint base, e.g. https://api.openai.com/v1"})
    api_model: str | None = field(default=None, metadata={
        "help": "openai: model name at the endpoint"})
    api_key_env: str | None = field(default=None, metadata={
        "help": "openai: environment variable holding the key (default OPENAI_API_KEY)"})
    no_api_key: bool | None = field(default=None, metadata={
        "help": "openai: send no key (local servers without authentication)"})
    concurrency: int | None = field(default=None, metadata={
        "help": "openai: concurrent requests (default 8)"})
    max_requests: int | None = field(default=None, metadata={
        "help": "openai: hard budget of HTTP requests for this run (retries count)"})
    max_retries: int | None = field(default=None, metadata={
        "help": "openai: retries per request on 429/5xx/timeouts (default 5)"})
    timeout: float | None = field(default=None, metadata={
        "help": "openai: seconds per request (default 60)"})


def check_options(what: str, options: dict, allowed) -> None:
    """Refuse options that `what` does not take (allowed None: it takes any)."""
    unknown = sorted(set(options) - set(allowed)) if allowed is not None else []
    if unknown:
        raise NLAError(f"option(s) {', '.join(unknown)} do not apply to {what}; it takes "
                       f"{', '.join(allowed) or 'no options'}")


# ---- labellers --------------------------------------------------------------------------------


class Labeller:
    """Base class: turn rows into raw labeller outputs (text holding ``<explanation>`` tags).

    Subclasses set ``kind``, implement `identity` (everything that changes the output: it keys
    the cache) and `label_batch`; they may override `iter_labels` to yield results as they
    complete, `parse` for another output format, and `from_options` for CLI construction.
    """

    kind: ClassVar[str] = "base"
    # the option names `from_options` takes; another option is an error (None: take any)
    OPTIONS: ClassVar[tuple[str, ...] | None] = None
    prompt_version: str = PROMPT_VERSION
    batch_size: int = 8

    @classmethod
    def from_options(cls, store, options: dict) -> Labeller:
        """Build from CLI/library options (already checked against `OPTIONS`)."""
        return cls()

    def identity(self) -> dict:
        """JSON-able description of everything that determines the output (keys the cache)."""
        return {"kind": self.kind, "prompt_version": self.prompt_version}

    def provenance(self) -> dict:
        """What meta.yaml records about the labeller (identity plus non-key details)."""
        return dict(self.identity())

    def batch_order(self, row: LabelRow):
        """Sort key of rows to label: rows with close keys share a batch. By default similar
        prefix lengths (less padding in generation)."""
        return len(row.prefix)

    def label_batch(self, rows: list[LabelRow]) -> list[str | LabelFailure]:
        raise NotImplementedError

    def iter_labels(self, rows: list[LabelRow]) -> Iterator[tuple[int, str | LabelFailure]]:
        """Yield (index into rows, raw output) as labels complete."""
        results = self.label_batch(rows)
        if len(results) != len(rows):
            raise NLAError(f"labeller {self.kind!r} returned {len(results)} outputs for "
                           f"{len(rows)} rows")
        yield from enumerate(results)

    def parse(self, raw: str) -> ParsedLabel:
        return parse_label(raw)

    def prepare(self) -> None:
        """Load what labelling needs (called only when some row is not cached)."""

    def close(self) -> None:
        """Release resources (models, thread pools)."""


_REGISTRY: dict[str, type[Labeller] | str] = {
    "local": "nlakit.labels.local:LocalLabeller",
    "context": "nlakit.labels.context:ContextLabeller",
    "openai": "nlakit.labels.openai:OpenAILabeller",
}


def register_labeller(name: str, cls: type[Labeller]) -> None:
    """Make a Labeller subclass available as ``--labeller name``."""
    if not (isinstance(cls, type) and issubclass(cls, Labeller)):
        raise NLAError(f"{cls!r} is not a subclass of nlakit.labels.Labeller")
    _REGISTRY[name] = cls


def _load_ref(ref: str):
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def labeller_names() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_labeller_class(name: str) -> type[Labeller]:
    """A labeller class by registry name or entry point (group ``nlakit.labellers``)."""
    from importlib.metadata import entry_points

    found = _REGISTRY.get(name)
    if found is None:
        eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not eps:
            raise NLAError(f"unknown labeller {name!r}; available: {', '.join(labeller_names())}"
                           " (add one with register_labeller or an entry point in the group "
                           f"{ENTRY_POINT_GROUP!r})")
        found = eps[0].load()
    cls = _load_ref(found) if isinstance(found, str) else found
    if not (isinstance(cls, type) and issubclass(cls, Labeller)):
        raise NLAError(f"labeller {name!r} resolves to {cls!r}, not a Labeller subclass")
    return cls


def make_labeller(name: str, store=None, **options) -> Labeller:
    """Build a labeller by name; ``options`` are its settings (None values mean default)."""
    options = {k: v for k, v in options.items() if v is not None}
    cls = get_labeller_class(name)
    check_options(f"the {name!r} labeller", options, cls.OPTIONS)
    return cls.from_options(store, options)


def _store_model_spec(store, options: dict) -> str:
    spec = options.get("model") or (store.meta["model"].get("spec") if store else None)
    if not spec:
        raise NLAError("no model given and the activation store records none; pass --model")
    return str(spec)


def _weights_id(spec: str) -> str:
    return weights_hash(resolve_model(spec))


class ModelLabeller(Labeller):
    """A labeller that runs a model given by the ``model`` option (default: the store's
    target); its other options are its constructor's keyword arguments."""

    @classmethod
    def from_options(cls, store, options):
        return cls(_store_model_spec(store, options),
                   **{k: v for k, v in options.items() if k != "model"})


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
        from ..store import ActivationStore

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


def _store_rows(store, splits: Sequence[str], max_rows: int | None) -> list[LabelRow]:
    rows: list[LabelRow] = []
    cols = ["row_id", "split", "doc_id", "prefix", "position", "token_id"]
    for split in splits:
        table = store.table(split, columns=cols)
        if max_rows is not None:
            table = table.slice(0, max_rows)
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
    from .. import __version__
    from ..store import ActivationStore

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


__all__ = ["PROMPT_VERSION", "LabelCache", "LabelConfig", "LabelFailure", "LabelRow", "LabelSet",
           "Labeller", "LabellerOptions", "ModelLabeller", "ParsedLabel", "check_options",
           "get_labeller_class", "label_messages", "label_store", "make_labeller", "parse_label",
           "register_labeller"]
