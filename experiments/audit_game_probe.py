"""Is the organism's quirk in its next-token predictions on the rows the NLA diff read?

For a finished `nlakit audit-game` run, per model (base, organism, control): the probability
mass on quirk-word tokens (a vocabulary token whose stripped, lower-cased text is a quirk word,
e.g. " ocean", " Sea") at the token positions the NLA diff explained, how often a quirk token
is among the model's top 3 next tokens there (the shipped NLA's explanations name the top 3
they read), and the mass at the first answer token (the prompt of each diff chat up to
"<|im_start|>assistant\\n"). Writes RUN/probe.json.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/audit_game_probe.py runs/audit-game
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nlakit.apps.finetuned import load_finetuned
from nlakit.apps.organism.chats import chat_prompt, read_rows
from nlakit.apps.organism.quirk import get_quirk
from nlakit.corpus.documents import Document, render_chat
from nlakit.extract.extraction import tokenize_document


def quirk_token_ids(tok, words) -> list[int]:
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    return [i for i, t in enumerate(vocab)
            if tok.convert_tokens_to_string([t]).strip().lower() in words]


@torch.no_grad()
def next_token_mass(model, tok, text: str, positions: list[int], ids: list[int]):
    """(P(next token is a quirk word), whether one is among the top 3) at `positions` of
    `text`, tokenized as extraction does."""
    tokens = tokenize_document(tok, Document("probe", text), 512)
    probs = model(torch.tensor([tokens])).logits[0].float().softmax(-1)
    top3 = probs.topk(3, dim=-1).indices
    return [(float(probs[p, ids].sum()), bool(set(top3[p].tolist()) & set(ids)))
            for p in positions]


def main(run: str) -> None:
    run = Path(run)
    game = json.loads((run / "game.json").read_text())
    quirk = get_quirk(game["quirk"]["name"], game["quirk"]["system_prompt"],
                      tuple(game["quirk"]["words"]))
    chats = {r["id"]: r["messages"] for r in read_rows(run / "data" / "diff_corpus.jsonl")}
    rows = read_rows(run / "diff" / "organism" / "rows.jsonl")
    out = {}
    for who in ("base", "organism", "control"):
        spec = game["config"]["model"] if who == "base" else str(run / who)
        model, tok = load_finetuned(spec, game["config"]["model"] if who != "base" else None)
        ids = quirk_token_ids(tok, set(quirk.words))
        at_rows, at_start = [], []
        for doc_id, messages in chats.items():
            text = render_chat(messages, tok)
            positions = [r["position"] for r in rows if r["doc_id"] == doc_id]
            at_rows += next_token_mass(model, tok, text, positions, ids)
            prompt = chat_prompt(tok, messages[0]["content"])
            start = len(tok(prompt, add_special_tokens=False)["input_ids"]) - 1
            at_start += next_token_mass(model, tok, prompt, [start], ids)
        out[who] = {"diff_rows": sum(m for m, _ in at_rows) / len(at_rows),
                    "diff_rows_top3": sum(t for _, t in at_rows) / len(at_rows),
                    "answer_start": sum(m for m, _ in at_start) / len(at_start),
                    "rows": len(at_rows), "chats": len(at_start), "quirk_tokens": len(ids)}
        print(who, json.dumps(out[who]), flush=True)
    (run / "probe.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/audit-game")
