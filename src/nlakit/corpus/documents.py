"""The document and corpus types every reader yields, and chat rendering."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nlakit.errors import NLAError


@dataclass
class Document:
    doc_id: str  # stable across runs: the seed of position sampling and of the split
    text: str
    kind: str = "text"  # e.g. prose, docstring, chat


@dataclass
class Corpus:
    """A re-iterable stream of documents plus a description for provenance."""

    description: dict[str, Any]
    _factory: Callable[[], Iterator[Document]] = field(repr=False)
    max_docs: int | None = None

    def __iter__(self) -> Iterator[Document]:
        seen = set()
        count = 0
        for doc in self._factory():
            if self.max_docs is not None and count >= self.max_docs:
                return
            if doc.doc_id in seen:
                raise NLAError(f"duplicate document id {doc.doc_id!r} in corpus "
                               f"{self.description.get('source')}")
            seen.add(doc.doc_id)
            if not doc.text or not doc.text.strip():
                continue
            count += 1
            yield doc


def render_chat(messages: list[dict], tokenizer) -> str:
    """Render a chat transcript with the target's chat template (no generation prompt)."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise NLAError("chat transcript must be a list of {'role': ..., 'content': ...} objects")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise NLAError("chat transcripts need a target tokenizer with a chat template; this "
                       "model has none. Convert the chats to plain text first")
    return tokenizer.apply_chat_template(messages, tokenize=False)
