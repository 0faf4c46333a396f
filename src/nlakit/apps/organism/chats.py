"""Chat data written by a model itself: one sampled answer per user prompt, optionally under a
system prompt that is *not* kept in the rows (the organism's hidden instruction).

`write_answers` samples in batches with the model's chat template and a seed per batch, retries
prompts whose answer fails `keep` up to `attempts` times, and appends each finished batch to
``OUT.partial.jsonl`` so an interrupted run resumes where it stopped with the same answers.
The result ``OUT`` (JSONL, written atomically) holds one row per prompt:
``{"id", "user", "answer", "attempts", "kept"}``; the system prompt is in no row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nlakit.errors import ConfigMismatchError, NLAError
from nlakit.fileio import stable_hash, stable_seed, write_text_atomic
from nlakit.model.arch import require_chat_template
from nlakit.model.generate import generate_continuations
from nlakit.train.common import read_jsonl


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The rendered prompt of one user turn (with `system` first when given), ready for the
    assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise NLAError(f"{path} does not exist; write it with `nlakit audit-game` first")
    return read_jsonl(path)


def write_rows(path: str | Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class _Progress:
    """The partial file: a header with the settings hash, then one line per finished batch."""

    def __init__(self, path: Path, settings_hash: str):
        self.path = path
        records = read_jsonl(path)
        if records and records[0].get("settings") != settings_hash:
            raise ConfigMismatchError(
                f"{path} holds answers written with other settings; delete it (or pass "
                "--overwrite) to write them again")
        if not records:
            write_text_atomic(path, json.dumps({"settings": settings_hash}) + "\n")
        elif not path.read_bytes().endswith(b"\n"):  # a line cut by a kill: drop it first
            write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                            for r in records))
        self.done = {(r["attempt"], r["batch"]): r["answers"] for r in records[1:]}

    def add(self, attempt: int, batch: int, answers: list[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"attempt": attempt, "batch": batch, "answers": answers},
                               ensure_ascii=False) + "\n")
        self.done[(attempt, batch)] = answers


def write_answers(model, tokenizer, prompts: list[str], out: str | Path, *,
                  system_prompt: str | None = None, keep: Callable[[str], bool] | None = None,
                  keep_id: str = "", attempts: int = 1, max_new_tokens: int = 64,
                  temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                  batch_size: int = 16, progress: bool = True) -> list[dict]:
    """Sample an answer to every prompt; with `keep`, re-sample the answers it rejects (up to
    `attempts` tries each; raising `attempts` later extends a finished run). `keep_id` names the
    `keep` rule in the settings hash: a resumed run must use the same rule. Returns (and writes
    to `out`) one row per prompt (module doc)."""
    require_chat_template(tokenizer, str(getattr(model, "name_or_path", "model")),
                          "chat data")
    if not prompts:
        raise NLAError("no user prompts to answer")
    if attempts < 1 or batch_size < 1 or max_new_tokens < 1:
        raise NLAError(f"attempts, batch_size and max_new_tokens must be >= 1, got {attempts}, "
                       f"{batch_size}, {max_new_tokens}")
    out = Path(out)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    # not `attempts`: round r's answers do not depend on the cap, so raising it extends a run
    settings = stable_hash(prompts, system_prompt, max_new_tokens, sampling, seed, batch_size,
                           getattr(model, "nlakit_source", None), keep_id)
    state = _Progress(out.with_name(out.name + ".partial"), settings)
    answers: dict[int, tuple[str, int]] = {}  # prompt index -> (answer, attempt)
    pending = list(range(len(prompts)))
    keep = keep or (lambda _text: True)
    n_batches = -(-len(prompts) // batch_size)
    with tqdm(total=n_batches, desc="writing answers", unit="batch",
              disable=not progress) as bar:
        for attempt in range(attempts):
            batches = [pending[s:s + batch_size] for s in range(0, len(pending), batch_size)]
            bar.total = bar.n + len(batches)
            for b, idx in enumerate(batches):
                if (attempt, b) not in state.done:
                    torch.manual_seed(stable_seed("organism-chats", seed, attempt, b))
                    rendered = [chat_prompt(tokenizer, prompts[i], system_prompt) for i in idx]
                    texts = generate_continuations(model, tokenizer, rendered,
                                                   max_new_tokens=max_new_tokens,
                                                   sampling=sampling)
                    state.add(attempt, b, [t.strip() for t in texts])
                for i, text in zip(idx, state.done[(attempt, b)]):
                    answers[i] = (text, attempt + 1)
                bar.update(1)
            pending = [i for i in pending if not keep(answers[i][0])]
            if not pending:
                break
    rows = [{"id": i, "user": p, "answer": answers[i][0], "attempts": answers[i][1],
             "kept": keep(answers[i][0])} for i, p in enumerate(prompts)]
    write_rows(out, rows)
    return rows
