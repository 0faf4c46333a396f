"""Readable reports of `nlakit eval` and `nlakit audit` results: self-contained HTML (tables and
matplotlib plots embedded as base64 PNG) and a Markdown summary.

Both render from the JSON documents the two commands write, so a report can be rebuilt later.
Every table caption states the split, the row and document counts and the fve_nrm denominator.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nlakit.errors import NLAError
from nlakit.fileio import write_text_atomic

SECTIONS_EVAL = ("Baselines", "Per-row FVE", "FVE by token position", "Examples")
SECTIONS_AUDIT = ("Robustness", "Sentence ablation", "Edited examples")
SECTIONS_LADDER = ("NLA vs SAE on the same activations",)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return ("<img alt='plot' src='data:image/png;base64,"
            + base64.b64encode(buf.getvalue()).decode("ascii") + "'>")


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


def _esc(x) -> str:
    return html.escape(str(x))


def _scope(d: dict) -> str:
    return (f"split <b>{_esc(d['split'])}</b>, {d['n_rows']} rows from {d['n_docs']} documents, "
            f"layer {d['layer']}; fve_nrm denominator: {_esc(d['denominator']['fve_nrm'])}; "
            f"{_esc(d['ci'])}.")


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


def _claims_html(ev: dict) -> list[str]:
    claims = ev.get("claims") or {}
    if not claims:
        return []
    out = ["<h3>Claim checks</h3><p class='cap'>Each checkable field of the explanations "
           "against the row's context and the target's real next-token distribution; 95% CI "
           "over documents, among the rows that make the claim (prediction_prob_error: lower "
           "is better).</p><table><tr><th>claim</th><th>true [95% CI]</th><th>claims</th>"
           "<th>unparsed</th><th>rows</th></tr>"]
    for name, c in claims.items():
        out.append(f"<tr><td>{_esc(name)}</td><td class=num>{_claim_cell(c)}</td>"
                   f"<td class=num>{c['n_claims']}</td><td class=num>{c.get('n_unparsed', 0)}"
                   f"</td><td class=num>{c['n_rows']}</td></tr>")
    return out + ["</table>"]


def _eval_html(ev: dict) -> list[str]:
    spliced = SPLICED_COLUMNS if _has_spliced(ev) else ()
    out = [(f"<h2>Evaluation</h2><p class='cap'>{_scope(ev)} fve_meannorm denominator: "
           f"{_esc(ev['denominator']['fve_meannorm'])}.</p>"),
           "<h3>Baselines</h3>",
           ("<table><tr><th>method</th><th>rows</th><th>docs</th><th>fve_nrm [95% CI]</th>"
           "<th>mse_nrm [95% CI]</th><th>cos [95% CI]</th><th>fve_meannorm [95% CI]</th>"
           + "".join(f"<th>{h}</th>" for _, h, _ in spliced)
           + "<th>what it is</th></tr>")]
    for name, m in ev["methods"].items():
        out.append(f"<tr><td>{_esc(name)}</td><td class=num>{m['n_rows']}</td>"
                   f"<td class=num>{m['n_docs']}</td>"
                   + "".join(f"<td class=num>{_fmt(m[k])}</td>"
                             for k in ("fve_nrm", "mse_nrm", "cos", "fve_meannorm"))
                   + "".join(f"<td class=num>{_fmt(m.get(k), f)}</td>" for k, _, f in spliced)
                   + f"<td>{_esc(m.get('note', ''))}</td></tr>")
    out.append("</table>")
    if _spliced_caption(ev):
        out.append(f"<p class='cap'>{_esc(_spliced_caption(ev))}</p>")
    for name, why in ev.get("skipped", {}).items():
        out.append(f"<p class='cap'>{_esc(name)}: {_esc(why)}</p>")
    san = ev.get("sanity", {})
    out.append(f"<p class='cap'>Pipeline check: mean direction fve_nrm with the rows' own rawvar "
               f"{san.get('measured_mean_direction_fve_nrm_rows', float('nan')):+.5f}, expected "
               f"1 − 2/(1 + ||E ĝ||) = "
               f"{san.get('expected_mean_direction_fve_nrm_rows', float('nan')):+.5f}"
               f" — {'OK' if san.get('ok') else 'MISMATCH'}.</p>")
    out.append(plot_baselines(ev))
    out += _claims_html(ev)
    if "nla" not in ev["methods"]:
        for sec in SECTIONS_EVAL[1:]:
            out.append(f"<h3>{sec}</h3><p class='cap'>{_scope(ev)} Not available: this run has "
                       "no NLA explanations (baselines only).</p>")
        return out
    out.append(f"<h3>Per-row FVE</h3><p class='cap'>{_scope(ev)}</p>" + plot_histogram(ev))
    out.append(f"<h3>FVE by token position</h3><p class='cap'>{_scope(ev)}</p>"
               + plot_by_position(ev))
    rows = sorted(ev["rows"], key=lambda r: -r["fve_nrm"]["nla"])
    pick = rows[:3] + rows[len(rows) // 2: len(rows) // 2 + 2] + rows[-3:] if len(rows) > 8 \
        else rows
    out.append(f"<h3>Examples</h3><p class='cap'>{_scope(ev)} Best, median and worst rows by "
               "NLA fve_nrm.</p><table><tr><th>row</th><th>doc / pos</th><th>source text (end "
               "of context)</th><th>explanation</th><th>fve_nrm</th><th>cos</th></tr>")
    for r in pick:
        out.append(f"<tr><td class=num>{r['row_id']}</td><td>{_esc(r['doc_id'])} / "
                   f"{r['position']}</td><td><pre>…{_esc(r['prefix_tail'][-240:])}</pre></td>"
                   f"<td><pre>{_esc(r['explanation'])}</pre>"
                   f"{'' if r['complete'] else '<i>(unfinished)</i>'}</td>"
                   f"<td class=num>{r['fve_nrm']['nla']:+.3f}</td>"
                   f"<td class=num>{r['cos']:+.3f}</td></tr>")
    out.append("</table>")
    return out


def _audit_html(au: dict) -> list[str]:
    out = [(f"<h2>Faithfulness audit</h2><p class='cap'>{_scope(au)} Explanations: "
           f"{_esc(au['explanations_source'])}; original fve_nrm {_fmt(au['fve_original'])}.</p>"),
           ("<h3>Robustness</h3><table><tr><th>edit</th><th>rows</th><th>changed</th>"
           "<th>fve original</th><th>fve edited</th><th>drop [95% CI]</th><th>kept</th>"
           "<th>verdict</th></tr>")]
    for name, r in au["tests"].items():
        if "skipped" in r:
            out.append(f"<tr><td>{_esc(name)}</td><td colspan=7>skipped: "
                       f"{_esc(r['skipped'])}</td></tr>")
            continue
        kept = "n/a" if r["kept_fraction"] is None else f"{r['kept_fraction']:.0%}"
        out.append(f"<tr><td>{_esc(name)}<div class=cap>{_esc(r['note'])}</div></td>"
                   f"<td class=num>{r['n_rows']}</td><td class=num>{r['n_changed']}</td>"
                   f"<td class=num>{_fmt(r['fve_original'])}</td>"
                   f"<td class=num>{_fmt(r['fve_edited'])}</td>"
                   f"<td class=num>{_fmt(r['drop'])}</td><td class=num>{kept}</td>"
                   f"<td>{_esc(r['verdict'])}</td></tr>")
    out.append("</table>" + plot_drops(au))
    ab = au.get("ablation") or {}
    out.append(f"<h3>Sentence ablation</h3><p class='cap'>{_scope(au)} "
               f"{ab.get('n_rows_ablatable', 0)} of {ab.get('n_rows', 0)} rows have two or more "
               f"lines/sentences (mean {ab.get('units_per_row', {}).get('mean', 0):.2f} per "
               "row).</p>")
    if ab.get("by_unit"):
        out.append("<table><tr><th>unit removed</th><th>rows</th><th>docs</th>"
                   "<th>drop in fve_nrm [95% CI]</th></tr>")
        for k, s in ab["by_unit"].items():
            out.append(f"<tr><td>{_esc(k)}</td><td class=num>{s['n']}</td>"
                       f"<td class=num>{s['n_docs']}</td><td class=num>{_fmt(s)}</td></tr>")
        out.append("</table>")
    out.append(f"<p>{_esc(ab.get('verdict', 'ablation not run'))}</p>")
    out.append(f"<h3>Edited examples</h3><p class='cap'>{_scope(au)} Largest and smallest "
               "drops per edit.</p><table><tr><th>edit</th><th>row</th><th>original</th>"
               "<th>edited</th><th>fve orig → edited</th></tr>")
    for name, exs in au.get("examples", {}).items():
        for e in exs:
            out.append(f"<tr><td>{_esc(name)}</td><td class=num>{e['row_id']}</td>"
                       f"<td><pre>{_esc(e['original'])}</pre></td>"
                       f"<td><pre>{_esc(e['edited'])}</pre></td>"
                       f"<td class=num>{e['fve_original']:+.3f} → {e['fve_edited']:+.3f}</td>"
                       "</tr>")
    out.append("</table>")
    return out


def _ladder_html(ld: dict, png: bytes | None) -> list[str]:
    from nlakit.eval.sae import format_ladder

    out = [f"<h2>NLA vs SAE on the same activations</h2><p class='cap'>TopK SAEs (k = "
           f"{', '.join(ld['ladder'].get('fve_nrm', {}))}) trained on {_esc(ld['training']['n'])}"
           f" vectors of {_esc('+'.join(ld['training']['splits']))}; {_esc(ld['denominator'])}."
           "</p>"]
    if png:
        out.append("<img alt='SAE ladder' src='data:image/png;base64,"
                   + base64.b64encode(png).decode("ascii") + "'>")
    out.append(f"<pre>{_esc(format_ladder(ld))}</pre>")
    return out


def render_html(eval_data: dict | None = None, audit_data: dict | None = None,
                title: str = "nlakit report", ladder_data: dict | None = None,
                ladder_png: bytes | None = None) -> str:
    if eval_data is None and audit_data is None and ladder_data is None:
        raise NLAError("a report needs an eval result, an audit result or an SAE ladder")
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>")]
    if eval_data is not None:
        parts += _eval_html(eval_data)
    if audit_data is not None:
        parts += _audit_html(audit_data)
    if ladder_data is not None:
        parts += _ladder_html(ladder_data, ladder_png)
    parts.append("</body></html>")
    return "\n".join(parts)


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
        from nlakit.eval.sae import format_ladder

        out += ["## NLA vs SAE on the same activations", "", format_ladder(ladder_data), ""]
    return "\n".join(out)


@dataclass
class ReportConfig:
    """The ``report`` stage."""

    title: str | None = field(default=None, metadata={
        "help": "page title (None: 'nlakit run NAME' in a pipeline, else 'nlakit report')"})


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
