"""Readable reports of `nlakit eval` and `nlakit audit` results: self-contained HTML (tables and
matplotlib plots embedded as base64 PNG) and a Markdown summary.

Both render from the JSON documents the two commands write, so a report can be rebuilt later.
Every table caption states the split, the row and document counts and the fve_nrm denominator.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nlakit.config import hint
from nlakit.errors import NLAError
from nlakit.fileio import write_text_atomic
from nlakit.report.tables import format_ladder

SECTIONS_EVAL = ("Baselines", "Per-row FVE", "FVE by token position", "Examples")
SECTIONS_AUDIT = ("Robustness", "Sentence ablation", "Edited examples")
SECTIONS_LADDER = ("NLA vs SAE on the same activations",)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a PNG data URI (the report embeds its plots)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return _data_uri(buf.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(s: dict | None, fmt: str = "+.3f") -> str:
    if s is None:
        return "n/a"
    return f"{s['mean']:{fmt}} [{s['ci'][0]:{fmt}}, {s['ci'][1]:{fmt}}]"


SPLICED_COLUMNS = (("kl", "kl (nats) [95% CI]", ".3f"),
                   ("ce_recovered", "ce_recovered [95% CI]", "+.3f"))


def _has_spliced(ev: dict) -> bool:
    return any("kl" in m for m in ev["methods"].values())


def _spliced_caption(ev: dict) -> str:
    """What the spliced columns are, with the ablation and the noise floor (true vector)."""
    spl = ev.get("spliced") or {}
    if not _has_spliced(ev):
        return f"Spliced metrics skipped: {spl['skipped']}." if spl.get("skipped") else ""
    floor = ((spl.get("reference") or {}).get("true_vector") or {}).get("kl")
    return ("Spliced: each prediction, rescaled to the true vector's norm, replaces the block-"
            f"{ev['layer']} output at the row's position; kl = KL(original ‖ spliced) of the "
            "next-token distribution (nats); ce_recovered = (CE_ablated − CE_spliced) / "
            f"(CE_ablated − CE_original), ablation: {spl.get('ablation')}"
            + (f"; the true vector spliced back gives kl {floor['mean']:.1e} (noise floor)"
               if floor else "") + ".")


def _scope_md(d: dict) -> str:
    return (f"split **{d['split']}**, {d['n_rows']} rows from {d['n_docs']} documents, layer "
            f"{d['layer']}; fve_nrm denominator: {d['denominator']['fve_nrm']}; {d['ci']}.")


# ---- plots ---------------------------------------------------------------------------------


def plot_baselines(ev: dict) -> str:
    plt = _plt()
    names = list(ev["methods"])
    means = np.array([ev["methods"][n]["fve_nrm"]["mean"] for n in names])
    lo = np.array([ev["methods"][n]["fve_nrm"]["ci"][0] for n in names])
    hi = np.array([ev["methods"][n]["fve_nrm"]["ci"][1] for n in names])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    colors = ["#2b6cb0" if n.startswith("nla") else "#a0aec0" for n in names]
    ax.barh(names, means, xerr=[means - lo, hi - means], color=colors, capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"fve_nrm (rawvar {ev['rawvar']:.4f}); 95% CI over documents")
    ax.set_title(f"{ev['split']}: {ev['n_rows']} rows, {ev['n_docs']} docs")
    return _png(fig)


def plot_histogram(ev: dict) -> str:
    plt = _plt()
    vals = np.array([r["fve_nrm"]["nla"] for r in ev["rows"]], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(vals, bins=min(40, max(5, vals.size // 3)), color="#2b6cb0")
    ax.axvline(float(np.mean(vals)), color="k", ls="--", lw=1, label="mean")
    md = [r["fve_nrm"].get("mean_direction") for r in ev["rows"]]
    if md and md[0] is not None:
        ax.axvline(float(np.mean(md)), color="#e53e3e", ls=":", lw=1, label="mean direction")
    ax.set_xlabel(f"per-row fve_nrm of the NLA (rawvar {ev['rawvar']:.4f})")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    ax.set_title(f"{ev['split']}: {vals.size} rows")
    return _png(fig)


def plot_by_position(ev: dict) -> str:
    plt = _plt()
    pos = np.array([r["position"] for r in ev["rows"]], dtype=float)
    vals = np.array([r["fve_nrm"]["nla"] for r in ev["rows"]], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.scatter(pos, vals, s=8, alpha=0.5, color="#2b6cb0", label="rows")
    if pos.size >= 4:
        edges = np.unique(np.quantile(pos, np.linspace(0, 1, min(8, pos.size // 2) + 1)))
        if edges.size >= 2:
            which = np.clip(np.searchsorted(edges, pos, side="right") - 1, 0, edges.size - 2)
            centers = [(edges[k] + edges[k + 1]) / 2 for k in range(edges.size - 1)]
            means = [vals[which == k].mean() if (which == k).any() else np.nan
                     for k in range(edges.size - 1)]
            ax.plot(centers, means, "k-o", ms=3, label="binned mean")
    ax.set_xlabel("token position in the document")
    ax.set_ylabel("fve_nrm")
    ax.legend(fontsize=8)
    ax.set_title(f"{ev['split']}: {vals.size} rows")
    return _png(fig)


def plot_drops(au: dict) -> str:
    plt = _plt()
    items = [(n, r["drop"]) for n, r in au["tests"].items() if "drop" in r]
    ab = au.get("ablation") or {}
    items += [(f"ablate {k}", s) for k, s in (ab.get("by_unit") or {}).items()]
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(1, len(items)) + 1.2))
    if items:
        names = [n for n, _ in items]
        m = np.array([s["mean"] for _, s in items])
        lo = np.array([s["ci"][0] for _, s in items])
        hi = np.array([s["ci"][1] for _, s in items])
        ax.barh(names, m, xerr=[m - lo, hi - m], color="#dd6b20", capsize=3)
        ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("drop in fve_nrm (original − edited), 95% CI over documents")
    ax.set_title(f"{au['split']}: {au['n_rows']} rows, {au['n_docs']} docs")
    return _png(fig)


# ---- HTML ------------------------------------------------------------------------------------

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "color:#1a202c}table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid "
        "#cbd5e0;padding:.25em .5em;vertical-align:top;font-size:.9em}th{background:#edf2f7}"
        "td.num{text-align:right;font-family:monospace;white-space:nowrap}.cap{color:#4a5568;"
        "font-size:.85em}pre{white-space:pre-wrap;margin:0;font-size:.85em}")


def _claim_cell(c: dict) -> str:
    return f"{c['mean']:.1%} [{c['ci'][0]:.1%}, {c['ci'][1]:.1%}]"


def _examples(ev: dict) -> list[dict]:
    """Best, median and worst rows by NLA fve_nrm (all rows when there are few)."""
    rows = sorted(ev["rows"], key=lambda r: -r["fve_nrm"]["nla"])
    if len(rows) <= 8:
        return rows
    return rows[:3] + rows[len(rows) // 2: len(rows) // 2 + 2] + rows[-3:]


def _template():
    """The report's Jinja template (autoescaped: every value from a JSON file is text)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=False)
    env.filters["ci"] = lambda s, fmt="+.3f": _fmt(s, fmt)
    env.filters["ci_percent"] = _claim_cell
    return env.get_template("report.html")


def render_html(eval_data: dict | None = None, audit_data: dict | None = None,
                title: str = "nlakit report", ladder_data: dict | None = None,
                ladder_png: bytes | None = None) -> str:
    if eval_data is None and audit_data is None and ladder_data is None:
        raise NLAError("a report needs an eval result, an audit result or an SAE ladder")
    ev, au, ld = eval_data, audit_data, ladder_data
    plots, context = {}, {}
    if ev is not None:
        san = ev.get("sanity", {})
        plots["baselines"] = plot_baselines(ev)
        if "nla" in ev["methods"]:
            plots["histogram"], plots["by_position"] = plot_histogram(ev), plot_by_position(ev)
            context["examples"] = _examples(ev)
        context.update(
            spliced_columns=SPLICED_COLUMNS if _has_spliced(ev) else (),
            spliced_caption=_spliced_caption(ev), later_sections=SECTIONS_EVAL[1:],
            sanity={"measured": san.get("measured_mean_direction_fve_nrm_rows", float("nan")),
                    "expected": san.get("expected_mean_direction_fve_nrm_rows", float("nan")),
                    "ok": san.get("ok")})
    if au is not None:
        plots["drops"] = plot_drops(au)
    if ld is not None:
        context.update(ladder_text=format_ladder(ld),
                       ladder_png=_data_uri(ladder_png) if ladder_png else None)
    return _template().render(title=title, css=_CSS, ev=ev, au=au, ld=ld, plots=plots,
                              **context)


# ---- Markdown --------------------------------------------------------------------------------


def render_markdown(eval_data: dict | None = None, audit_data: dict | None = None,
                    title: str = "nlakit report", ladder_data: dict | None = None) -> str:
    out = [f"# {title}", ""]
    if eval_data is not None:
        ev = eval_data
        spliced = SPLICED_COLUMNS if _has_spliced(ev) else ()
        out += ["## Evaluation", "", _scope_md(ev), "",
                ("| method | rows | fve_nrm [95% CI] | mse_nrm [95% CI] | cos [95% CI] | "
                 "fve_meannorm |" + "".join(f" {h} |" for _, h, _ in spliced)),
                "|---|---:|---:|---:|---:|---:|" + "---:|" * len(spliced)]
        for name, m in ev["methods"].items():
            out.append(f"| {name} | {m['n_rows']} | {_fmt(m['fve_nrm'])} | "
                       f"{_fmt(m['mse_nrm'])} | {_fmt(m['cos'])} | "
                       f"{m['fve_meannorm']['mean']:+.3f} |"
                       + "".join(f" {_fmt(m.get(k), f)} |" for k, _, f in spliced))
        out += [""] + ([_spliced_caption(ev), ""] if _spliced_caption(ev) else [])
        out += [f"- {n}: {w}" for n, w in ev.get("skipped", {}).items()] + [""]
        if ev.get("claims"):
            out += ["| claim check | true [95% CI] | claims | unparsed |", "|---|---:|---:|---:|"]
            out += [f"| {n} | {_claim_cell(c)} | {c['n_claims']} | {c.get('n_unparsed', 0)} |"
                    for n, c in ev["claims"].items()] + [""]
    if audit_data is not None:
        au = audit_data
        out += ["## Faithfulness audit", "", _scope_md(au),
                f"Original fve_nrm {_fmt(au['fve_original'])}.", "",
                "| edit | rows | changed | fve edited [95% CI] | drop [95% CI] | kept |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, r in au["tests"].items():
            if "skipped" in r:
                out.append(f"| {name} | skipped: {r['skipped']} | | | | |")
                continue
            kept = "n/a" if r["kept_fraction"] is None else f"{r['kept_fraction']:.0%}"
            out.append(f"| {name} | {r['n_rows']} | {r['n_changed']} | "
                       f"{_fmt(r['fve_edited'])} | {_fmt(r['drop'])} | {kept} |")
        ab = au.get("ablation") or {}
        for k, s in (ab.get("by_unit") or {}).items():
            out.append(f"| ablate {k} | {s['n']} | {s['n']} | | {_fmt(s)} | |")
        out += ["", "Verdicts:", ""]
        out += [f"- {r['verdict']}" for r in au["tests"].values() if "verdict" in r]
        if ab.get("verdict"):
            out.append(f"- {ab['verdict']}")
        out.append("")
    if ladder_data is not None:
        out += ["## NLA vs SAE on the same activations", "", format_ladder(ladder_data), ""]
    return "\n".join(out)


@dataclass
class ReportConfig:
    """The ``report`` stage."""

    title: str | None = field(default=None, metadata=hint(
        "page title (None: 'nlakit run NAME' in a pipeline, else 'nlakit report')"))


def write_report(path: str | Path, eval_data: dict | None = None,
                 audit_data: dict | None = None, title: str = "nlakit report", *,
                 ladder_data: dict | None = None,
                 ladder_png: str | Path | None = None) -> tuple[Path, Path]:
    """Write PATH (HTML) and PATH with suffix .md (Markdown summary); returns both paths.
    ladder_data: a `nlakit sae` ladder.json (its plot `ladder_png` is embedded)."""
    path = Path(path)
    png = Path(ladder_png).read_bytes() if ladder_png and Path(ladder_png).is_file() else None
    write_text_atomic(path, render_html(eval_data, audit_data, title, ladder_data, png))
    md = path.with_suffix(".md")
    write_text_atomic(md, render_markdown(eval_data, audit_data, title, ladder_data))
    return path, md
