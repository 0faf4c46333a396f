"""Corpus readers: every source becomes a stream of `Document`s with stable ids.

Supported ``--corpus`` values:
  * ``builtin`` (also ``builtin:docs``, ``:chats``, ``:writing``, ``:code``, ``:wide``): see
    `nlakit.corpus.builtin`;
  * a ``.txt``/``.md`` file or a folder of them: one document per file, or per blank-line
    separated block with ``blocks=True``;
  * ``.jsonl``: one document per line, the text in ``text_field``; lines holding ``messages``
    (a list of ``{role, content}``) are chat transcripts rendered with the target's chat template;
  * ``.parquet``: a text column ``text_field``;
  * a folder written by Hugging Face ``datasets`` ``save_to_disk``.
Readers stream: nothing holds the whole corpus in memory.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nlakit.corpus.documents import Corpus, Document, render_chat
from nlakit.errors import NLAError
from nlakit.fileio import atomic_path, file_sha256

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def _row_to_doc(row: dict, doc_id: str, text_field: str, tokenizer, where: str) -> Document:
    if "messages" in row and text_field not in row:
        return Document(str(row.get("id", doc_id)), render_chat(row["messages"], tokenizer),
                        "chat")
    if text_field not in row:
        raise NLAError(f"{where}: no field {text_field!r} (found {sorted(row)}); pass "
                       "--text-field NAME or give chat rows a 'messages' list")
    text = row[text_field]
    if not isinstance(text, str):
        raise NLAError(f"{where}: field {text_field!r} is {type(text).__name__}, expected text")
    return Document(str(row.get("id", doc_id)), text, str(row.get("kind", "text")))


def _read_jsonl(path: Path, text_field: str, tokenizer) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NLAError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise NLAError(f"{path}:{lineno}: expected a JSON object per line")
            yield _row_to_doc(row, f"{path.stem}:{lineno}", text_field, tokenizer,
                              f"{path}:{lineno}")


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise NLAError(f"cannot read parquet file {path}: {e}") from e
    if text_field not in pf.schema_arrow.names:
        raise NLAError(f"{path}: no column {text_field!r} (found {pf.schema_arrow.names}); "
                       "pass --text-field NAME")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield Document(f"{path.stem}:{row}", text or "", "text")
            row += 1


def _read_text_file(path: Path, blocks: bool, root: Path) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NLAError(f"cannot read {path} as UTF-8 text: {e}") from e
    rel = path.relative_to(root).as_posix() if path != root else path.name
    if not blocks:
        yield Document(rel, text, "text")
        return
    for i, block in enumerate(b for b in text.split("\n\n") if b.strip()):
        yield Document(f"{rel}#{i}", block.strip(), "text")


def _read_hf_dataset(path: Path, text_field: str, tokenizer) -> Iterator[Document]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for split, part in parts:
        for i, row in enumerate(part):
            doc_id = f"{split}:{i}" if split else str(i)
            yield _row_to_doc(row, doc_id, text_field, tokenizer, f"{path} row {doc_id}")


def load_corpus(
    spec: str,
    *,
    tokenizer=None,
    text_field: str = "text",
    blocks: bool = False,
    max_docs: int | None = None,
    chat_model=None,
) -> Corpus:
    """Open a corpus spec (see module doc). `tokenizer` renders chat transcripts.

    `chat_model`: a loaded ``(model, tokenizer)`` to reuse when the built-in corpus must
    generate its chat transcripts (otherwise the embedded model is loaded on first use).
    """
    if max_docs is not None and max_docs <= 0:
        raise NLAError(f"max_docs must be positive, got {max_docs}")
    if spec.startswith("builtin"):
        from nlakit.corpus.builtin import builtin_corpus

        return builtin_corpus(spec, tokenizer=tokenizer, max_docs=max_docs, chat_model=chat_model)
    path = Path(spec).expanduser()
    if not path.exists():
        raise NLAError(f"corpus {spec!r} not found: pass a file, a folder, or 'builtin'")
    desc: dict[str, Any] = {"source": str(path.resolve()), "text_field": text_field}
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            desc["format"] = "hf_datasets"
            factory = lambda: _read_hf_dataset(path, text_field, tokenizer)  # noqa: E731
        else:
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise NLAError(f"corpus folder {path} holds no text files ({TEXT_SUFFIXES})")
            desc.update(format="text_folder", files=len(files), blocks=blocks)
            factory = lambda: (  # noqa: E731
                d for f in files for d in _read_text_file(f, blocks, path)
            )
    elif path.suffix.lower() == ".jsonl":
        desc["format"] = "jsonl"
        factory = lambda: _read_jsonl(path, text_field, tokenizer)  # noqa: E731
    elif path.suffix.lower() == ".parquet":
        desc["format"] = "parquet"
        factory = lambda: _read_parquet(path, text_field)  # noqa: E731
    elif path.suffix.lower() in TEXT_SUFFIXES:
        desc.update(format="text_file", blocks=blocks)
        factory = lambda: _read_text_file(path, blocks, path)  # noqa: E731
    else:
        raise NLAError(f"unknown corpus format {path.suffix!r} for {path}: use .txt/.md, "
                       ".jsonl, .parquet, a folder of text files, or a saved datasets folder")
    desc["max_docs"] = max_docs
    return Corpus(desc, factory, max_docs)


def check_export_path(out: str | Path) -> Path:
    """The export's path, refused unless it names a .jsonl file."""
    out = Path(out)
    if out.suffix.lower() != ".jsonl":
        raise NLAError(f"{out}: the export is JSONL; name the file *.jsonl")
    return out


def export_jsonl(corpus: Corpus, out: str | Path) -> dict:
    """Write `corpus` as JSONL, one {"id", "text", "kind"} object per document, atomically.
    Reading the file back (``--corpus FILE.jsonl``) gives the same documents with the same
    ids, so the same positions and splits: the built-in corpus, which depends on the running
    Python's standard library, frozen into a file. Returns {"path", "docs", "sha256"}."""
    out = check_export_path(out)
    n = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in corpus:
            f.write(json.dumps({"id": doc.doc_id, "text": doc.text, "kind": doc.kind},
                               ensure_ascii=False) + "\n")
            n += 1
    return {"path": str(out), "docs": n, "sha256": file_sha256(out)}
