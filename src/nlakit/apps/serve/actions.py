"""The model work behind the viewer's pages, as plain library functions (no web code here).

Each function takes a loaded `NLA` and returns JSON-ready dicts. They are what the server's
worker runs; they call the NLA's own API (`activations`, `explain`, `score`, `reconstruct`)
and add what the facade does not offer yet:

  top_next_tokens   the target's top-k next tokens (softmax probabilities) at every position
  explain_positions `NLA.explain_text` over precomputed activations, in chunks with a progress
                    callback, and with an explicit fve_nrm denominator
  row_edits         the audit's edits of one explanation (shuffle, quote deletion, rule-based
                    paraphrase, per-unit ablation) scored against one true activation
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nlakit.errors import NLAError
from nlakit.model import lm_head


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The text of a chat (``[{"role", "content"}]``) under the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise NLAError("the target's tokenizer has no chat template; send plain text instead")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def token_ids(tokenizer, text: str) -> list[int]:
    """The token ids `NLA.activations` reads for `text` under the target's tokenizer (special
    tokens added as it does)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own (what the page shows as one token)."""
    return [tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def top_next_tokens(model, tokenizer, ids: list[int], k: int = 5) -> list[list[dict]]:
    """For each position t of `ids`, the target's k most likely next tokens after ids[:t+1]:
    ``[[{"token", "id", "prob"}] * k] * len(ids)`` (one forward pass, `nlakit.model.lm_head`)."""
    if not ids:
        return []
    k = min(int(k), model.get_output_embeddings().weight.shape[0])
    values, indices = lm_head.top_next_tokens(model, [ids], k, read_at=[range(len(ids))])
    out = []
    for p_row, i_row in zip(values.tolist(), indices.tolist()):
        out.append([{"token": tokenizer.decode([i]), "id": int(i), "prob": float(p)}
                    for p, i in zip(p_row, i_row)])
    return out


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def score_texts(nla, texts: list[str], vectors: torch.Tensor,
                rawvar: float | None) -> list[dict]:
    """Per text: mse_nrm, cos and fve_nrm of the AR's reading against the matching vector
    [n, d]. fve_nrm is None when no denominator (rawvar) is known."""
    return _score_rows(nla.score(texts, vectors, rawvar=rawvar if rawvar is not None else 1.0),
                       rawvar)


def _score_rows(s: dict, rawvar: float | None) -> list[dict]:
    """`NLA.score`'s tensors as JSON rows (fve_nrm None without a known rawvar)."""
    return [{"mse_nrm": _finite(s["mse_nrm"][i]), "cos": _finite(s["cos"][i]),
             "fve_nrm": _finite(s["fve_nrm"][i]) if rawvar is not None else None}
            for i in range(len(s["mse_nrm"]))]


def explain_positions(nla, ids: list[int], acts: torch.Tensor, positions: list[int], *,
                      best_of: int = 1, max_new_tokens: int = 96, seed: int = 0,
                      rawvar: float | None = None, chunk: int = 16,
                      on_chunk: Callable[[int, list[dict]], None] | None = None) -> list[dict]:
    """Explain the block-K activations `acts` [t, d] of a tokenized text at `positions`.

    Greedy for best_of=1; otherwise the greedy explanation and best_of - 1 samples at
    temperature 1 per token, keeping the one the AR reconstructs best (as `NLA.explain_text`).
    Each kept explanation's claims are checked (``claims``, ``verification``:
    `NLA.verify_claims`). Positions are processed `chunk` at a time (each chunk one batched
    generation) and
    `on_chunk(done, results)` is called after each, so a caller can show results as they
    arrive."""
    _, tok = nla.target()
    n = max(1, int(best_of))
    out: list[dict] = []
    for c, start in enumerate(range(0, len(positions), chunk)):
        chosen = positions[start : start + chunk]
        vecs = acts[chosen]
        best = nla.best_of(vecs, n, max_new_tokens=max_new_tokens,
                           batch_size=max(1, len(chosen) * n), seed=seed + c,
                           rawvar=rawvar if rawvar is not None else 1.0)
        exps, scores = best.candidates, _score_rows(best.scores, rawvar)
        new = []
        for i, (pos, j) in enumerate(zip(chosen, best.kept.tolist())):
            block = range(i * n, (i + 1) * n)
            new.append({"position": int(pos), "token": tok.decode([ids[pos]]),
                        "explanation": exps[j].text, "complete": bool(exps[j].complete),
                        "n_tokens": int(exps[j].n_tokens), "best_of": n, **scores[j],
                        "samples": ([{"explanation": exps[b].text, **scores[b]} for b in block]
                                    if n > 1 else None)})
        checked = nla.verify_claims(ids, chosen, [r["explanation"] for r in new])  # kept ones
        for r, (verdicts, lines) in zip(new, checked):
            r["claims"] = {k: _finite(v) for k, v in verdicts.items()}
            r["verification"] = lines
        out.extend(new)
        if on_chunk is not None:
            on_chunk(len(out), new)
    return out


def row_edits(nla, explanation: str, vector: torch.Tensor, rawvar: float | None,
              seed: int = 0, max_units: int = 5) -> dict:
    """The audit's meaning-preserving edits of one explanation, each scored against the row's
    true activation `vector` [d]: ``{"original": {...}, "edits": [{"edit", "text", "fve_nrm",
    "cos", "mse_nrm", "drop"}]}`` with drop = fve_nrm(original) − fve_nrm(edited) (cos drop
    when no rawvar is known)."""
    from nlakit.eval.audit import (
        RulesParaphraser,
        ablate_unit,
        delete_quotes,
        shuffle_units,
        split_units,
    )

    edits = [("paraphrase (rules)", RulesParaphraser().paraphrase([explanation])[0]),
             ("shuffle_units", shuffle_units(explanation, seed)),
             ("delete_quotes", delete_quotes(explanation))]
    units, _ = split_units(explanation)
    for k in range(min(len(units), max_units)):
        edited = ablate_unit(explanation, k)
        if edited is not None:
            edits.append((f"ablate_unit_{k + 1}", edited))
    texts = [explanation] + [t for _, t in edits]
    scores = score_texts(nla, texts, vector.reshape(1, -1).expand(len(texts), -1), rawvar)
    key = "fve_nrm" if rawvar is not None else "cos"
    base = scores[0]
    rows = []
    for (name, text), s in zip(edits, scores[1:]):
        drop = (base[key] - s[key]) if base[key] is not None and s[key] is not None else None
        rows.append({"edit": name, "text": text, "changed": text != explanation, **s,
                     "drop": drop})
    return {"original": {"text": explanation, **base}, "edits": rows, "drop_of": key}
