"""`nlakit steer`: load the NLA (and the store), measure, and write steer.json / steer.md."""

from __future__ import annotations

from pathlib import Path

import torch

from nlakit.apps.steering.bench import _NO_NORM, SteerReport, _layer_message, measure_steering
from nlakit.apps.steering.config import SteerConfig, SteerInputs
from nlakit.errors import NLAError


def format_steer(report: SteerReport | dict) -> str:
    """The report as Markdown: setup, the table, the verdicts."""
    r = report.to_dict() if isinstance(report, SteerReport) else report
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


def write_report(report: SteerReport, out: str | Path) -> tuple[Path, Path]:
    """OUT/steer.json and OUT/steer.md, each written atomically."""
    from nlakit.fileio import write_json, write_text_atomic

    out = Path(out)
    write_json(out / "steer.json", report.to_dict())
    write_text_atomic(out / "steer.md", format_steer(report) + "\n")
    return out / "steer.json", out / "steer.md"


def _store_facts(acts: str) -> tuple[float, torch.Tensor, int]:
    from nlakit.extract.store import ActivationStore

    store = ActivationStore(acts)
    return float(store.stats("all")["mean_norm"]), store.mean_unit_direction("all"), store.layer


def _check_before_loading(config: SteerConfig, inputs: SteerInputs, has_norm: bool) -> None:
    """The layer and the norm, read from the AR's nla_meta.yaml before any model is loaded
    (a malformed directory is left to NLA.load, which says what is wrong)."""
    from nlakit.nla.checkpoint import read_meta
    from nlakit.nla.pretrained import resolve

    try:
        meta = read_meta((resolve(inputs.nla) or Path(inputs.nla)) / "ar", "ar")
    except NLAError:
        return
    layer = meta.get("extraction", {}).get("layer")
    if config.layer is not None and layer is not None and int(layer) != config.layer:
        raise NLAError(_layer_message(config.layer, int(layer)))
    stats = meta.get("nlakit", {}).get("dataset_stats", {}) or {}
    if not has_norm and not stats.get("mean_norm"):
        raise NLAError(_NO_NORM)


def run_steer(config: SteerConfig, inputs: SteerInputs) -> SteerReport:
    """``nlakit steer``: load the NLA (and the store), measure, write OUT/steer.json and .md."""
    from nlakit.nla.facade import NLA

    config.prompt_list(), config.held_out_text()  # a missing file fails before any loading
    norm, mean_direction, store_layer = config.norm, None, None
    if inputs.acts:
        store_norm, mean_direction, store_layer = _store_facts(inputs.acts)
        norm = norm or store_norm
    _check_before_loading(config, inputs, norm is not None)
    nla = NLA.load(inputs.nla, device=inputs.device)
    if store_layer is not None and store_layer != nla.layer:
        raise NLAError(f"--acts {inputs.acts} holds block {store_layer}, the NLA reads block "
                       f"{nla.layer}; pass the store of the NLA's layer")
    report = measure_steering(nla, config, norm=norm, mean_direction=mean_direction,
                              progress=inputs.progress)
    if inputs.out:
        write_report(report, inputs.out)
    return report
