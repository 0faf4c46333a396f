"""Small NLAs and run results for the viewer's tests, its screenshot script and demos.

A tiny random Llama with tied embeddings copies its last input token, so its untrained AV
writes only newlines (an empty explanation). `tiny_viewer_nla` unties the AV's output head
with a seeded random matrix so the untrained AV writes non-empty (meaningless) text: enough to
see every part of the viewer work. `with_explanations` makes an NLA whose AV returns given
text (e.g. hostile HTML) while the AR, scoring and everything else stay real.
"""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_TEXT = ("The Python language reference says that an assignment statement evaluates "
               "the expression list and")


def untie_av_head(nla, seed: int = 0) -> None:
    """Give the AV its own seeded random output head (AV only; the target is untouched)."""
    model = nla.av.model
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(head.weight.shape, generator=g, dtype=torch.float32)
    head.weight = torch.nn.Parameter(w.to(head.weight.dtype).to(head.weight.device),
                                     requires_grad=False)


def tiny_viewer_nla(target, layer: int = 2, *, rawvar: float | None = None, seed: int = 0):
    """An untrained NLA of a loaded tiny target whose AV writes non-empty text."""
    from nlakit.nla.facade import NLA

    nla = NLA.from_target(target, layer, injection_scale=10.0,
                          dataset_stats={"rawvar": rawvar} if rawvar is not None else None)
    untie_av_head(nla, seed)
    return nla


def with_explanations(nla, text: str):
    """Make `nla.explain` return `text` for every vector and sample (all else real)."""
    from nlakit.nla.prompt import Explanation

    def explain(vectors, *, n: int = 1, **_kw):
        m = int(torch.as_tensor(vectors).shape[0]) * int(n)
        return [Explanation(text, True, f"<explanation>{text}</explanation>", 5)
                for _ in range(m)]

    nla.explain = explain
    return nla


def write_run(nla, store, out: str | Path, *, max_rows: int = 12, max_new_tokens: int = 6,
              n_boot: int = 50) -> Path:
    """Evaluate and audit `nla` on `store` (small settings) into OUT/eval/eval.json and
    OUT/audit/audit.json, the layout of a pipeline run directory."""
    from nlakit.eval.audit import AuditConfig, RulesParaphraser, audit
    from nlakit.eval.evaluate import EvalConfig, evaluate, write_eval_json
    from nlakit.fileio import write_json

    out = Path(out)
    ev = evaluate(nla, store, EvalConfig(split="all", max_rows=max_rows,
                                         max_new_tokens=max_new_tokens, quote_tokens=(4,),
                                         n_boot=n_boot), progress=False)
    write_eval_json(ev, out / "eval" / "eval.json")
    explanations = {int(r["row_id"]): r["explanation"] for r in ev.data["rows"]}
    au = audit(nla, store, AuditConfig(split="all", max_rows=max_rows,
                                       max_new_tokens=max_new_tokens, n_boot=n_boot),
               paraphraser=RulesParaphraser(), explanations=explanations)
    write_json(out / "audit" / "audit.json", au)
    return out
