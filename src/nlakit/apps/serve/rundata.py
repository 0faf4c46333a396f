"""A finished run as the viewer reads it: eval.json, audit.json and the activation store.

Paths come only from the command line (never from a request). Rows are looked up by row_id
with a parquet filter, so the store is never read whole.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from nlakit.apps.serve.limits import RequestError
from nlakit.errors import NLAError

log = logging.getLogger(__name__)

SORT_KEYS = ("row_id", "score", "doc_id", "position", "kind")


def find_results(path: str | Path) -> tuple[Path | None, Path | None]:
    """(eval.json, audit.json) under `path`: a file, a directory holding them, an eval/
    directory with a sibling audit/, or a pipeline run directory (eval/, audit/)."""
    p = Path(path)
    if p.is_file():
        return (p, None) if p.name != "audit.json" else (None, p)
    if not p.is_dir():
        raise NLAError(f"{p} does not exist: pass an eval directory (holding eval.json) or a "
                       "pipeline run directory (holding eval/ and audit/)")
    cands_eval = [p / "eval.json", p / "eval" / "eval.json"]
    cands_audit = [p / "audit.json", p / "audit" / "audit.json", p.parent / "audit" / "audit.json"]
    ev = next((c for c in cands_eval if c.is_file()), None)
    au = next((c for c in cands_audit if c.is_file()), None)
    if ev is None and au is None:
        raise NLAError(f"{p} holds no eval.json or audit.json (looked in {p}, {p}/eval, "
                       f"{p}/audit); run `nlakit eval` first")
    return ev, au


def _read_json(path: Path, kind: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NLAError(f"{path} is not readable JSON ({e}); re-run the stage that wrote it") \
            from None
    if data.get("kind") != kind:
        raise NLAError(f"{path} is not an {kind} file (kind {data.get('kind')!r})")
    return data


class RunData:
    """eval rows (with each baseline's score), audit results and, with a store, true
    activations and document kinds."""

    def __init__(self, nla, *, eval_path: Path | None = None, audit_path: Path | None = None,
                 acts=None):
        self.eval = _read_json(eval_path, "nlakit_eval") if eval_path else None
        self.audit = _read_json(audit_path, "nlakit_audit") if audit_path else None
        self.eval_path, self.audit_path = eval_path, audit_path
        for name, d in (("eval", self.eval), ("audit", self.audit)):
            if d is not None and int(d.get("layer", nla.layer)) != nla.layer:
                raise NLAError(f"the {name} results are for layer {d['layer']} but the NLA "
                               f"rebuilds layer {nla.layer}; serve them with their own NLA")
            if d is not None and int(d.get("d_model", nla.d_model)) != nla.d_model:
                raise NLAError(f"the {name} results have d_model {d['d_model']}, the NLA "
                               f"{nla.d_model}")
        if acts is None and self.eval is not None and self.eval.get("store"):
            guess = Path(self.eval["store"])
            if (guess / "meta.yaml").is_file():
                log.info("using the activation store named in eval.json: %s", guess)
                acts = guess
        self.store = None
        if acts is not None:
            from nlakit.extract.store import ActivationStore

            self.store = acts if isinstance(acts, ActivationStore) else ActivationStore(acts)
            if self.store.layer != nla.layer or self.store.d_model != nla.d_model:
                raise NLAError(f"the store {self.store.path} holds layer {self.store.layer} "
                               f"(d {self.store.d_model}); the NLA rebuilds layer {nla.layer} "
                               f"(d {nla.d_model}); pass the store of the NLA's layer")
        self.rows: list[dict] = []
        self._by_id: dict[int, dict] = {}
        if self.eval is not None:
            kinds = self._kinds([int(r["row_id"]) for r in self.eval["rows"]])
            for r in self.eval["rows"]:
                rid = int(r["row_id"])
                fve = r.get("fve_nrm") or {}
                row = {"row_id": rid, "doc_id": r.get("doc_id"), "position": r.get("position"),
                       "kind": kinds.get(rid), "prefix_tail": r.get("prefix_tail", ""),
                       "explanation": r.get("explanation"), "complete": r.get("complete"),
                       "score": fve.get("nla"), "cos": r.get("cos"), "baselines": fve}
                self.rows.append(row)
                self._by_id[rid] = row
        self.examples = self._audit_examples()

    # ---- facts -------------------------------------------------------------------------

    @property
    def rawvar(self) -> float | None:
        for d in (self.eval, self.audit):
            if d is not None and d.get("rawvar") is not None:
                return float(d["rawvar"])
        return None

    @property
    def methods(self) -> list[str]:
        return list(self.eval["methods"]) if self.eval else []

    def summary(self) -> dict:
        out = {"eval": None, "audit": None, "acts": str(self.store.path) if self.store else None}
        if self.eval is not None:
            out["eval"] = {k: self.eval.get(k) for k in ("split", "n_rows", "n_docs", "layer",
                                                          "rawvar", "denominator", "ci",
                                                          "skipped")}
            out["eval"]["methods"] = {
                name: {"fve_nrm": m["fve_nrm"]["mean"], "ci": m["fve_nrm"]["ci"],
                       "n_rows": m.get("n_rows"), "note": m.get("note", "")}
                for name, m in self.eval["methods"].items()}
        if self.audit is not None:
            out["audit"] = {
                "n_rows": self.audit.get("n_rows"), "fve_original": self.audit["fve_original"],
                "tests": {name: ({"skipped": t["skipped"]} if "skipped" in t else
                                 {"drop": t["drop"]["mean"], "ci": t["drop"]["ci"],
                                  "kept_fraction": t.get("kept_fraction"),
                                  "n_changed": t["n_changed"], "verdict": t["verdict"]})
                          for name, t in self.audit.get("tests", {}).items()},
                "ablation_verdict": (self.audit.get("ablation") or {}).get("verdict")}
        return out

    # ---- rows --------------------------------------------------------------------------

    def _kinds(self, row_ids: list[int]) -> dict[int, str]:
        if self.store is None or not row_ids:
            return {}
        t = self.store.rows(row_ids, ["row_id", "doc_kind"])
        return dict(zip(t.column("row_id").to_pylist(), t.column("doc_kind").to_pylist()))

    def query(self, *, sort: str = "row_id", order: str = "asc", min_score: float | None = None,
              max_score: float | None = None, doc: str | None = None, kind: str | None = None,
              q: str | None = None, offset: int = 0, limit: int = 100) -> dict:
        """Rows filtered (score range, document, kind, substring of context/explanation),
        sorted, and paged. Rows with no score sort last."""
        if self.eval is None:
            raise RequestError("no eval results loaded: start the server with --eval DIR",
                               status=409)
        if sort not in SORT_KEYS:
            raise RequestError(f"unknown sort key {sort!r}; use one of {list(SORT_KEYS)}")
        if order not in ("asc", "desc"):
            raise RequestError(f"order must be asc or desc, got {order!r}")
        rows = self.rows
        if min_score is not None:
            rows = [r for r in rows if r["score"] is not None and r["score"] >= min_score]
        if max_score is not None:
            rows = [r for r in rows if r["score"] is not None and r["score"] <= max_score]
        if doc:
            rows = [r for r in rows if r["doc_id"] == doc]
        if kind:
            rows = [r for r in rows if r["kind"] == kind]
        if q:
            ql = q.lower()
            rows = [r for r in rows if ql in (r["prefix_tail"] or "").lower()
                    or ql in (r["explanation"] or "").lower()]
        rev = order == "desc"
        present = [r for r in rows if r[sort] is not None]
        missing = [r for r in rows if r[sort] is None]
        present.sort(key=lambda r: r[sort], reverse=rev)
        rows = present + missing
        return {"total": len(rows), "offset": offset, "limit": limit,
                "rows": rows[offset : offset + limit], "methods": self.methods,
                "docs": sorted({r["doc_id"] for r in self.rows if r["doc_id"] is not None}),
                "kinds": sorted({r["kind"] for r in self.rows if r["kind"] is not None})}

    def row(self, row_id: int) -> dict:
        """One eval row with its full context (from the store) and the audit's examples."""
        base = self._by_id.get(int(row_id))
        if base is None and self.store is None:
            raise RequestError(f"unknown row id {row_id}: it is not among the eval rows",
                               status=404)
        out = dict(base) if base else {"row_id": int(row_id), "explanation": None,
                                       "score": None, "baselines": {}}
        if self.store is not None:
            t = self.store.rows([row_id], ["row_id", "doc_id", "doc_kind", "position",
                                            "token_text", "prefix", "split"])
            if t.num_rows == 0:
                raise RequestError(f"unknown row id {row_id}: not in the eval rows or the store",
                                   status=404)
            rec = t.to_pylist()[0]
            out.update(doc_id=rec["doc_id"], kind=rec["doc_kind"], position=rec["position"],
                       token=rec["token_text"], prefix=rec["prefix"], split=rec["split"])
        out["audit_examples"] = self.examples.get(int(row_id), [])
        return out

    def vector(self, row_id: int) -> torch.Tensor:
        """The true activation [d] of a row (needs the store)."""
        if self.store is None:
            raise RequestError("true activations need the activation store: start the server "
                               "with --acts DIR", status=409)
        from nlakit.extract.store import vectors_from_arrow

        t = self.store.rows([row_id], ["row_id", "vector"])
        if t.num_rows == 0:
            raise RequestError(f"unknown row id {row_id}: not in the store", status=404)
        v = vectors_from_arrow(t.column("vector"), self.store.d_model)
        return torch.from_numpy(np.array(v[0], dtype=np.float32))

    def _audit_examples(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        if self.audit is None:
            return out
        for edit, exs in self.audit.get("examples", {}).items():
            for e in exs:
                fo, fe = e.get("fve_original"), e.get("fve_edited")
                drop = fo - fe if fo is not None and fe is not None else None
                out.setdefault(int(e["row_id"]), []).append(
                    {"edit": edit, "original": e["original"], "edited": e["edited"],
                     "fve_original": fo, "fve_edited": fe,
                     "drop": drop if drop is None or math.isfinite(drop) else None})
        return out

    def audit_examples(self) -> list[dict]:
        return [{"row_id": rid, **e} for rid, exs in sorted(self.examples.items()) for e in exs]
