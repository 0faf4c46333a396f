"""The ``context`` labeller: deterministic warm-start labels grounded in the target model.

No language model writes these labels. Each one states three features: the kind of text (simple
rules, `text_kind`), the last few words of the context (quoted), and the target model's own
top-k next-token predictions with probabilities from its real output logits at the sampled
position (`top_next_tokens`). They are an honest, learnable warm start for a small model on a
CPU and later a baseline.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nlakit.errors import NLAError
from nlakit.extract.extraction import tokenize_text
from nlakit.labels.cache import LabelRow
from nlakit.labels.core import ModelLabeller, weights_id
from nlakit.labels.format import ParsedLabel, parse_label
from nlakit.model.lm_head import top_next_tokens

_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|if .*:$|elif |else:|for .*:$|while "
    r".*:$|try:|except\b|with .*:$|>>> |\.\.\. |#include|function\b|var |let |const |public |"
    r"private |[{}]\s*$)|[;{]\s*$|\w+\(.*\)\s*$|^\s*\w+(\.\w+)*\s*=[^=]", re.MULTILINE)
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022+]|\d+[.)])\s+\S")
_DIALOGUE = re.compile(r"<\|im_start\|>|<start_of_turn>|^\s*(user|assistant|system|human|ai|"
                       r"q|a|speaker \w+)\s*:", re.IGNORECASE | re.MULTILINE)
_TAG = re.compile(r"</?[a-zA-Z][\w-]*(\s[^<>]*)?>")


def text_kind(text: str) -> str:
    """Kind of text at the end of a prefix by simple rules: dialogue, code, list, table, markup
    or prose (checked in that order on the last ~600 characters)."""
    tail = text[-600:]
    if _DIALOGUE.search(tail):
        return "dialogue"
    if tail.count("```") % 2 == 1:
        return "code"
    lines = [ln for ln in tail.splitlines() if ln.strip()][-8:]
    if not lines:
        return "prose"
    code = sum(bool(_CODE_LINE.search(ln)) for ln in lines)
    if code / len(lines) >= 0.4 or lines[-1].lstrip().startswith((">>>", "...")):
        return "code"
    if sum(bool(_LIST_LINE.match(ln)) for ln in lines[-4:]) >= 2:
        return "list"
    if sum(ln.count("|") >= 2 for ln in lines[-4:]) >= 2:
        return "table"
    if len(_TAG.findall(tail)) >= 3:
        return "markup"
    return "prose"


# every character str.splitlines() breaks a line at, besides \n: a label is one feature per line
_LINE_BREAKS = {c: f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                for c in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def _visible(text: str) -> str:
    """A token or quote on one line: newlines and tabs shown as \\n and \\t, the other
    characters that break a line as \\xNN / \\uNNNN."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return text.translate(str.maketrans(_LINE_BREAKS))


def last_words(text: str, n: int = 6, max_chars: int = 60) -> str:
    """The last ``n`` whitespace-separated words of ``text`` (at most ``max_chars``)."""
    words = re.findall(r"\S+\s*", text)
    tail = "".join(words[-n:]) if words else text
    tail = tail.strip() or text[-max_chars:]
    return tail[-max_chars:]


BACK_TOKENS = 3  # tokens before the current one that style tail_back names


class ContextLabeller(ModelLabeller):
    """Deterministic labels grounded in the target model (no language model writes them).

    Three features: the kind of text (rules of `text_kind`), the end of the context, and the
    target model's own top-k next-token predictions with probabilities from its real output
    logits at the sampled position. Two formats (``style``):

    - ``v1``: kind, the last few words quoted, predictions.
    - ``tail``: the current token first (what the AV can read most surely from one vector),
      kind + predictions, then the last ``tail_tokens`` tokens verbatim *last*, so that an AR
      reading raw text (template ``{explanation}``) ends on the current token, where the target
      itself was. Newlines and tabs are written as \\n and \\t (one feature per line).
    - ``tail_only``: ``tail`` without its kind-and-predictions line: only what one vector
      carries best (the stated predictions of a tail AV are in the target's real top 5 a
      sixth of the time, the current token nine times in ten: `nlakit.nla.claims`, results).
    - ``tail_back``: ``tail`` with a second line naming the `BACK_TOKENS` tokens before the
      current one, newest first (``Before it: ' the', ' of', ' end'.``): the previous token is
      linearly readable from the vector about half the time at layer 10, where a ``tail`` AV
      states it about a tenth of the time (docs/results.md), so the label asks for it first.

    The store keeps the decoded prefix, not token ids; the prefix is re-tokenised the way
    extraction tokenises documents (BOS unless the text starts with it). Re-tokenisation can
    differ from the original ids in rare cases; how often it matched the stored position and
    token id is counted in ``stats`` and recorded in meta.yaml.
    """

    kind = "context"
    OPTIONS = ("model", "dtype", "device", "batch_size", "top_k", "n_words", "style",
               "tail_tokens")
    STYLES = ("v1", "tail", "tail_only", "tail_back")

    def __init__(self, model: str, *, dtype: str | None = None, device: str | None = None,
                 batch_size: int = 32, top_k: int = 3, n_words: int = 6, style: str = "v1",
                 tail_tokens: int = 8, loaded: tuple | None = None):
        self.model_spec = model
        self.dtype, self.device = dtype, device
        self.batch_size, self.top_k, self.n_words = int(batch_size), int(top_k), int(n_words)
        if self.top_k < 1:
            raise NLAError(f"top_k must be >= 1, got {top_k}")
        if style not in self.STYLES:
            raise NLAError(f"context labeller style must be one of {', '.join(self.STYLES)}, "
                           f"got {style!r}")
        if int(tail_tokens) < 1:
            raise NLAError(f"tail_tokens must be >= 1, got {tail_tokens}")
        self.style, self.tail_tokens = style, int(tail_tokens)
        # v1 keeps its historical version (and cache keys); the tail styles name their length
        self.prompt_version = ("context-v1" if style == "v1" else
                               f"context-{style.replace('_', '-')}-{tail_tokens}")
        self._weights = weights_id(model)
        self._loaded = loaded  # an already loaded (model, tokenizer) of this spec
        self.stats = {"retokenized": 0, "retokenized_exact": 0}

    def identity(self) -> dict:
        return {"kind": self.kind, "model": self.model_spec, "weights_hash": self._weights,
                "prompt_version": self.prompt_version,
                "settings": self._settings()}

    def _settings(self) -> dict:
        if self.style == "v1":  # unchanged identity: cached v1 labels stay valid
            return {"top_k": self.top_k, "n_words": self.n_words}
        return {"top_k": self.top_k, "n_words": self.n_words, "style": self.style,
                "tail_tokens": self.tail_tokens}

    def provenance(self) -> dict:
        return {**self.identity(), "batch_size": self.batch_size,
                "retokenization": dict(self.stats)}

    def _load(self):
        if self._loaded is None:
            from nlakit.model.load import load_model

            self._loaded = load_model(self.model_spec, dtype=self.dtype, device=self.device)
        return self._loaded

    def prepare(self) -> None:
        self._load()

    def token_ids(self, prefix: str) -> list[int]:
        """Token ids for a store prefix, tokenised as extraction tokenises documents."""
        return tokenize_text(self._load()[1], prefix)

    def explain(self, prefix: str, probs: Sequence[float], tokens: Sequence[str]) -> str:
        preds = ", ".join(f"'{_visible(t)}' ({p:.0%})" for t, p in zip(tokens, probs))
        if self.style in ("tail", "tail_only", "tail_back"):
            ids = self.token_ids(prefix)
            bos = self._load()[1].bos_token_id
            ids = ids[1:] if ids[:1] == [bos] and bos is not None else ids
            decode = self._load()[1].decode
            back = ", ".join(f"'{_visible(decode([i]))}'" for i in ids[-2::-1][:BACK_TOKENS])
            return ("<explanation>\n"
                    f"Current token: '{_visible(decode(ids[-1:]))}'.\n"
                    + (f"Before it: {back}.\n" if self.style == "tail_back" and back else "")
                    + ("" if self.style == "tail_only" else
                       f"Kind of text: {text_kind(prefix)}. The model expects next: {preds}.\n")
                    + f"Ending: {_visible(decode(ids[-self.tail_tokens:]))}\n"
                    "</explanation>")
        return ("<explanation>\n"
                f"Kind of text: {text_kind(prefix)}.\n"
                f"The text ends with \"{_visible(last_words(prefix, self.n_words))}\".\n"
                f"The model expects next: {preds}.\n"
                "</explanation>")

    def parse(self, raw: str) -> ParsedLabel:
        # tail_back writes four lines; the generic parser's cap of three would drop every label
        return parse_label(raw, max_features=4 if self.style == "tail_back" else 3)

    def batch_order(self, row: LabelRow):
        return (row.doc_id, row.position)  # a document's rows together: one forward serves all

    def label_batch(self, rows: list[LabelRow]) -> list[str]:
        """One forward per document: the longest prefix of a document in the batch serves
        every row of that document whose stored position and token id it reproduces; a row it
        does not reproduce gets a sequence of its own."""
        model, tok = self._load()
        seqs: list[list[int]] = []
        reads: list[list[int]] = []
        slot: dict[int, tuple[int, int]] = {}  # row index -> (sequence, read index)
        by_doc: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_doc.setdefault(r.doc_id, []).append(i)
        for members in by_doc.values():
            longest = max(members, key=lambda i: rows[i].position)
            ids = self.token_ids(rows[longest].prefix)
            shared = len(seqs)
            seqs.append(ids)
            reads.append([])
            for i in members:
                r = rows[i]
                self.stats["retokenized"] += int(r.position >= 0)
                fits = 0 <= r.position < len(ids) and ids[r.position] == r.token_id
                own = None if fits else self.token_ids(r.prefix)
                if fits or (r.position >= 0 and own[-1:] == [r.token_id]
                            and len(own) == r.position + 1):
                    self.stats["retokenized_exact"] += int(r.position >= 0)
                if fits:
                    slot[i] = (shared, len(reads[shared]))
                    reads[shared].append(r.position)
                else:
                    slot[i] = (len(seqs), 0)
                    seqs.append(own)
                    reads.append([len(own) - 1])
        probs, top_ids = top_next_tokens(model, seqs, self.top_k, pad_id=tok.pad_token_id or 0,
                                         read_at=reads)
        offsets = [0]
        for rd in reads:
            offsets.append(offsets[-1] + len(rd))
        out = []
        for i, r in enumerate(rows):
            s_i, j = slot[i]
            flat = offsets[s_i] + j
            out.append(self.explain(r.prefix, probs[flat].tolist(),
                                    [tok.decode([int(t)]) for t in top_ids[flat]]))
        return out

    def close(self) -> None:
        self._loaded = None
