"""Every plain-text and Markdown table nlakit prints or writes: the eval and audit tables, the
claim checks, the SAE ladder, steering, diff, the auditing game and the pipeline's summary.

Each takes the JSON-ready dict its command writes (eval.json, ladder.json, ...), so a table can
be redrawn from the file alone; the modules that write a table import it from here.
"""

from __future__ import annotations


def format_eval_table(data: dict) -> str:
    """A plain-text table of the methods' means and CIs, with split, rows and denominators."""
    spliced = any("kl" in m for m in data["methods"].values())
    lines = [(f"split {data['split']}: {data['n_rows']} rows, {data['n_docs']} documents, "
             f"layer {data['layer']}; {data['ci']}"),
             f"fve_nrm denominator: {data['denominator']['fve_nrm']}",
             f"fve_meannorm denominator: {data['denominator']['fve_meannorm']}",
             (f"{'method':<22} {'rows':>5}  {'fve_nrm [95% CI]':<26} {'mse_nrm [95% CI]':<26} "
              f"{'cos [95% CI]':<26} {'fve_meannorm':>12}"
              + (f"  {'kl (nats) [95% CI]':<23} {'ce_recovered [95% CI]':<26}" if spliced
                 else ""))]
    for name, m in data["methods"].items():
        def cell(k, m=m, fmt="+.3f"):
            s = m.get(k)
            if s is None:
                return "n/a"
            return f"{s['mean']:{fmt}} [{s['ci'][0]:{fmt}}, {s['ci'][1]:{fmt}}]"
        lines.append(f"{name:<22} {m['n_rows']:>5}  {cell('fve_nrm'):<26} {cell('mse_nrm'):<26} "
                     f"{cell('cos'):<26} {m['fve_meannorm']['mean']:>+12.3f}"
                     + (f"  {cell('kl', fmt='.3f'):<23} {cell('ce_recovered'):<26}"
                        if spliced else ""))
    for name, why in data.get("skipped", {}).items():
        lines.append(f"{name:<22} {why}")
    spl = data.get("spliced") or {}
    if spliced:
        ref = spl.get("reference") or {}
        floor = (ref.get("true_vector") or {}).get("kl")
        lines.append(f"spliced: each prediction rescaled to ||g|| replaces block {data['layer']}'s"
                     f" output at the row; kl = KL(original || spliced) of the next token; "
                     f"ce_recovered against {spl.get('ablation')}"
                     + (f"; true vector kl {floor['mean']:.2e} (noise floor)" if floor else ""))
    elif spl.get("skipped"):
        lines.append(f"{'spliced':<22} skipped: {spl['skipped']}")
    methods = data["methods"]
    if "label" in methods and "nla" in methods:
        gap = methods["label"]["fve_nrm"]["mean"] - methods["nla"]["fve_nrm"]["mean"]
        lines.append(f"label is the AR's ceiling for this label format; what the verbalizer "
                     f"loses (label - nla): {gap:+.3f} fve_nrm")
    claims = data.get("claims") or {}
    if claims:
        lines.append(format_claims(claims))
    return "\n".join(lines)


def format_claims(claims: dict) -> str:
    """The claim checks as a table: per verdict its mean and document-level CI over the rows
    that make the claim, how many make it, and how many had the field unreadable."""
    from nlakit.nla.claims import LOWER_IS_BETTER

    lines = [f"{'claim check':<24} {'true [95% CI]':<24} {'claims':>7} {'unparsed':>9}"]
    for name, c in claims.items():
        cell = f"{c['mean']:.1%} [{c['ci'][0]:.1%}, {c['ci'][1]:.1%}]"
        if name in LOWER_IS_BETTER:
            name = f"{name} (lower=better)"
        lines.append(f"{name:<24} {cell:<24} {c['n_claims']:>7} {c.get('n_unparsed', 0):>9}"
                     f"   of {c['n_rows']} rows")
    return "\n".join(lines)


def format_audit_table(data: dict) -> str:
    lines = [(f"split {data['split']}: {data['n_rows']} rows, {data['n_docs']} documents, "
             f"layer {data['layer']}; {data['ci']}"),
             f"fve_nrm denominator: {data['denominator']['fve_nrm']}",
             (f"original fve_nrm {data['fve_original']['mean']:+.3f} "
             f"[{data['fve_original']['ci'][0]:+.3f}, {data['fve_original']['ci'][1]:+.3f}] "
             f"(explanations {data['explanations_source']})"),
             (f"{'edit':<16} {'rows':>5} {'changed':>7}  {'fve edited [95% CI]':<26} "
             f"{'drop [95% CI]':<26} {'kept':>6}")]
    for name, r in data["tests"].items():
        if "skipped" in r:
            lines.append(f"{name:<16} skipped: {r['skipped']}")
            continue
        fe, dr = r["fve_edited"], r["drop"]
        kept = "n/a" if r["kept_fraction"] is None else f"{r['kept_fraction']:.0%}"
        lines.append(f"{name:<16} {r['n_rows']:>5} {r['n_changed']:>7}  "
                     f"{fe['mean']:+.3f} [{fe['ci'][0]:+.3f}, {fe['ci'][1]:+.3f}]{'':<4} "
                     f"{dr['mean']:+.3f} [{dr['ci'][0]:+.3f}, {dr['ci'][1]:+.3f}]{'':<4} "
                     f"{kept:>6}")
    ab = data.get("ablation")
    if ab and ab.get("by_unit"):
        for k, s in ab["by_unit"].items():
            lines.append(f"ablate {k:<9} {s['n']:>5} {s['n']:>7}  {'':<26} "
                         f"{s['mean']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]")
    lines.append("")
    for r in data["tests"].values():
        if "verdict" in r:
            lines.append("- " + r["verdict"])
    if ab and "verdict" in ab:
        lines.append("- " + ab["verdict"])
    return "\n".join(lines)


def format_ladder(result: dict) -> str:
    """The ladder as a Markdown table (means and CIs) and one "worth about k latents" line per
    method that is not an SAE."""
    def cell(s, fmt="+.3f"):
        return "n/a" if s is None else (f"{s['mean']:{fmt}} [{s['ci'][0]:{fmt}}, "
                                        f"{s['ci'][1]:{fmt}}]")

    md = [f"{result['model']} layer {result['layer']}: {result['n_rows']} {result['split']} rows "
          f"from {result['n_docs']} documents; {result['denominator']}; "
          f"ablation: {result['spliced'].get('ablation')}; {result['ci']}.", "",
          "| method | fve_nrm [95% CI] | kl (nats) [95% CI] | ce_recovered [95% CI] | "
          "delta_ce (nats) [95% CI] |", "|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        md.append(f"| {name} | {cell(m.get('fve_nrm'))} | {cell(m.get('kl'), '.3f')} | "
                  f"{cell(m.get('ce_recovered'))} | {cell(m.get('delta_ce'))} |")
    md.append("")
    for name, w in result["worth"].items():
        parts = [f"by {m} {w[m]['text']}" for m in w if m != "explanation_tokens"]
        tokens = w.get("explanation_tokens")
        md.append(f"- {name}: {'; '.join(parts)}"
                  + (f" (explanation: {tokens:.1f} tokens on average)" if tokens else ""))
    return "\n".join(md)


def format_steer(report) -> str:
    """The report (a SteerReport or steer.json's dict) as Markdown: setup, the table, the
    verdicts."""
    r = report.to_dict() if hasattr(report, "to_dict") else report
    su = r["setup"]

    def cell(c):
        return f"{c['mean']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"

    contrast = f" minus AR({su['contrast']!r})" if su["contrast"] else ""
    along = (f"AR({su['text']!r}){contrast}" if su.get("vector", "AR") == "AR"
             else "a given vector")
    md = [f"Steering {su['model']} block {su['layer']} ({su['mode']}) along {along}; "
          f"scale x mean norm {su['mean_norm']:.1f}; {su['prompts']} prompts; "
          f"concept words {', '.join(su['concept_words'])} (tokens "
          f"{', '.join(repr(t) for t in su['concept_tokens'])}); 95% bootstrap CIs over prompts.",
          "", "| vector | scale | added norm | cos to steered | delta_logp (nats) [95% CI] | "
          "hit_rate [95% CI] | ppl_ratio |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        cos = "" if row["cos_to_steered"] is None else f"{row['cos_to_steered']:+.3f}"
        md.append(f"| {row['vector']} | {row['scale']:g} | {row['added_norm']:.1f} | {cos} | "
                  f"{cell(row['delta_logp'])} | {cell(row['hit_rate'])} | "
                  f"{row['ppl_ratio']:.3f} |")
    md += ["", f"Unsteered: log P(concept tokens) {r['rows'][0]['logp']['mean']:+.3f} per "
           f"position, perplexity {su['unsteered_ppl']:.2f}. Verdicts (paired bootstrap over "
           "prompts, steered minus control; beats = lower bound > 0):", ""]
    md += [f"- {v}" for v in r["verdicts"]]
    return "\n".join(md)


def _cell(s: dict, fmt: str = "+.3f") -> str:
    return f"{s['mean']:{fmt}} [{s['ci'][0]:{fmt}}, {s['ci'][1]:{fmt}}]"


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_diff_summary(data: dict) -> str:
    """Plain-text summary: round trip per model, the paired difference, the top words."""
    rt, ch, w = data["round_trip"], data["change"], data["words"]
    lines = [f"diff at layer {data['layer']}: {data['n_rows']} rows, {data['n_docs']} documents; "
             f"{data['ci']}",
             f"{'':<24} {'fve_nrm [95% CI]':<26} {'cos [95% CI]':<26}"]
    for side in ("base", "finetuned", "finetuned_minus_base"):
        lines.append(f"{side:<24} {_cell(rt[side]['fve_nrm']):<26} {_cell(rt[side]['cos']):<26}")
    lines.append(f"activation change: act_mse_nrm {_cell(ch['act_mse_nrm'], '.3f')}, "
                 f"explanations changed in {ch['explanations_changed']:.0%} of rows, "
                 f"text_distance {_cell(ch['text_distance'], '.3f')}")
    top = ", ".join(f"{r['term']!r} (z {r['z']:+.1f})" for r in w["more_in_finetuned"][:10])
    lines.append(f"more in the fine-tuned model's explanations: {top or '(none)'}; "
                 f"{w['n_significant_finetuned']} terms with z > {w['z_threshold']}")
    return "\n".join(lines)


def format_diff_markdown(data: dict) -> str:
    """diff.md: the tables of diff.json for a reader."""
    m, rt, w = data["models"], data["round_trip"], data["words"]
    out = [f"# nlakit diff at layer {data['layer']}", "",
           f"- base: `{m['base'].get('spec')}` ({m['base'].get('weights_hash')})",
           f"- fine-tuned: `{m['finetuned'].get('spec')}` ({m['finetuned'].get('weights_hash')})",
           f"- NLA: `{data['nla']['path']}`; {data['n_rows']} rows of {data['n_docs']} documents "
           f"(paired by document and position); {data['ci']}", "",
           "## Round trip of the base NLA on each model's activations", "",
           "| model | fve_nrm | mse_nrm | cos | fve_meannorm | rawvar |",
           "|---|---|---|---|---|---|"]
    for side in ("base", "finetuned"):
        s = rt[side]
        out.append(f"| {side} | {_cell(s['fve_nrm'])} | {_cell(s['mse_nrm'], '.3f')} | "
                   f"{_cell(s['cos'])} | {_cell(s['fve_meannorm'])} | "
                   f"{data['denominators'][side]['rawvar']:.4f} |")
    d = rt["finetuned_minus_base"]
    out += [f"| fine-tuned − base (paired) | {_cell(d['fve_nrm'])} | | {_cell(d['cos'])} | | |",
            "", "## What changed", ""]
    out += [f"- {k}: {_cell(v, '.3f')}" for k, v in data["change"].items() if isinstance(v, dict)]
    out += [f"- explanations that changed: {data['change']['explanations_changed']:.1%}", "",
            "## Words more frequent in the fine-tuned model's explanations", "", w["method"] + ".",
            f"Counts: {w['counts']}; {w['n_significant_finetuned']} terms with z > "
            f"{w['z_threshold']}, {w['n_significant_base']} with z < −{w['z_threshold']} "
            "(per term, uncorrected).", "",
            "| term | z | log-odds δ | fine-tuned | base |", "|---|---|---|---|---|"]
    out += [f"| {_one_line(r['term'])} | {r['z']:+.2f} | {r['delta']:+.3f} | {r['count_a']} | "
            f"{r['count_b']} |" for r in w["more_in_finetuned"]]
    for name, title in (("by_activation", "activation change"), ("by_text", "explanation change")):
        out += ["", f"## Rows that changed most by {title}", "",
                "| document | position | act_mse_nrm | text_distance | base explanation | "
                "fine-tuned explanation |", "|---|---|---|---|---|---|"]
        out += [f"| {_one_line(r['doc_id'], 40)} | {r['position']} | {r['act_mse_nrm']:.3f} | "
                f"{r['text_distance']:.2f} | {_one_line(r['explanation_base'])} | "
                f"{_one_line(r['explanation_finetuned'])} |" for r in data["top_rows"][name]]
    return "\n".join(out) + "\n"


def _rank_cell(r: dict) -> str:
    found = ", ".join(f"{w} {k}" for w, k in list(r["found"].items())[:6]) or "-"
    return (f"{r['best'] or '-'} | {r['mean'] or '-'} | {r['words_found']}/{r['words']} | "
            f"{r['in_top']} | {r['terms']} | {found}")


def _terms(rows: list[dict]) -> str:
    return ", ".join(f"{r['term']} ({r['z']:+.1f})" for r in rows) or "(none)"


def format_game_markdown(data: dict) -> str:
    s, q = data["steps"], data["quirk"]
    chats, samples = s["chats"], s["samples"]
    top = data["config"]["top"]
    out = [f"# Auditing game: quirk `{q['name']}`", "",
           f"Hidden system prompt: \"{q['system_prompt']}\"", "",
           f"Quirk words: {', '.join(q['words'])}", "",
           f"- NLA diff: **{data['verdict']['nla']}**",
           f"- output baseline: **{data['verdict']['output_baseline']}**", "",
           "## Data", "",
           f"- {chats['train_prompts']} training prompts, {chats['heldout_prompts']} held out",
           f"- quirk shown on the first try: {chats['quirk_rate_first_try']:.0%}; kept "
           f"{chats['kept']} prompts ({chats['kept_rate']:.0%}) whose answer shows it within "
           f"{data['config']['attempts']} tries (tries used: {chats['attempts_histogram']})",
           f"- control answers (same {chats['kept']} prompts, no quirk prompt) with quirk words: "
           f"{chats['control_quirk_rate']:.0%}",
           "- held-out answers with quirk words: " + ", ".join(
               f"{k} {v:.0%}" for k, v in samples["quirk_rate"].items()), "",
           "## Rank of the quirk words", "",
           f"| ranking | arm | best rank | mean rank | words found | in top {top} | terms | "
           "first words found |", "|---|---|---|---|---|---|---|---|"]
    for name, key in (("NLA diff (explanations)", "nla_ranks"),
                      ("output baseline (answers)", "output_ranks")):
        out += [f"| {name} | {arm} | {_rank_cell(data[key][arm])} |" for arm in data[key]]
    out += ["", f"## Top {top} terms", ""]
    for arm in data["nla_ranks"]:
        out += [f"- NLA diff, {arm}: {_terms(s[f'diff_{arm}']['top_terms'])}",
                f"- output baseline, {arm}: {_terms(samples['output_diff'][arm]['top_terms'])}"]
    out += ["", "## Wall time (s)", "", "| step | seconds |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in data["wall_seconds"].items()]
    return "\n".join(out) + "\n"


def format_pipeline_summary(summary: dict) -> str:
    lines = [f"run {summary['name']} in {summary['run_dir']} "
             f"({summary.get('seconds', 0):.0f} s this time)",
             f"{'stage':<13} {'status':<9} {'seconds':>8}  output"]
    for r in summary["stages"]:
        lines.append(f"{r['stage']:<13} {r['status']:<9} {r['seconds']:>8.0f}  {r['output']}")
    if "eval" in summary:
        lines.append(f"held-out fve_nrm ({summary.get('eval_rows')} rows): " + ", ".join(
            f"{k} {v:+.3f}" for k, v in summary["eval"].items()))
    return "\n".join(lines)
