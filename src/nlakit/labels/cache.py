"""Rows to label, labelling failures, and the persistent cache of raw labels."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nlakit.errors import NLAError
from nlakit.fileio import stable_hash
from nlakit.labels.format import ParsedLabel
from nlakit.model.load import cache_dir

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


__all__ = ["LabelCache", "LabelFailure", "LabelRow"]
