"""The whole measurement: the steered direction and every control at every scale, next to
the unsteered model, with bootstrap CIs and a verdict per scale."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import torch

from nlakit.apps.steering.concepts import concept_pattern, concept_token_ids, default_concept_words
from nlakit.apps.steering.config import SteerConfig
from nlakit.apps.steering.probes import (
    _Batch,
    _prepare,
    concept_hits,
    concept_logp,
    perplexity,
    prompt_mean_direction,
)
from nlakit.apps.steering.vectors import control_directions, text_vector, unit
from nlakit.errors import NLAError


@dataclass
class SteerReport:
    """The measured table: `rows` (one per vector and scale, plus the unsteered model), the
    paired comparisons of the steered vector with each control, a verdict per scale."""

    setup: dict
    rows: list[dict]
    comparisons: list[dict]
    verdicts: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Bench:
    """What every condition is measured on: the prompts' batches, the concept's tokens and
    pattern, the held-out text."""

    model: object
    tok: object
    layer: int
    batches: list[_Batch]
    token_ids: dict[int, str]
    pattern: re.Pattern
    ppl_ids: torch.Tensor
    config: SteerConfig

    @classmethod
    def build(cls, model, tok, layer, prompts, ppl_text, words, config) -> _Bench:
        ppl_ids = tok(ppl_text, return_tensors="pt")["input_ids"]
        return cls(model, tok, layer, _prepare(model, tok, prompts, config),
                   concept_token_ids(tok, words), concept_pattern(words),
                   ppl_ids.to(next(model.parameters()).device), config)

    @property
    def ppl_start(self) -> int:
        # prompt_end never steers a prompt's first token (the attention sink of many models),
        # so neither does its ppl: every token but the first; "all" steers every token
        return 1 if self.config.mode == "prompt_end" else 0

    def measure(self, delta: torch.Tensor | None, base: dict | None = None) -> dict:
        """Per-prompt logp and hit_rate [n], the paragraph's ppl, with `delta` [d] added
        (None: unsteered); delta_logp against `base` (the unsteered measurement)."""
        cfg = self.config
        starts = [b.width - 1 if cfg.mode == "prompt_end" else 0 for b in self.batches]
        logp = torch.cat([concept_logp(self.model, self.layer, b, self.token_ids, delta, t)
                          for b, t in zip(self.batches, starts)])
        hits = torch.cat([concept_hits(self.model, self.tok, self.layer, b, self.pattern, delta,
                                       t, cfg, cfg.seed + i)
                          for i, (b, t) in enumerate(zip(self.batches, starts))])
        return {"logp": logp, "delta_logp": logp - (logp if base is None else base["logp"]),
                "hit_rate": hits, "ppl": perplexity(self.model, self.layer, self.ppl_ids, delta,
                                                    self.ppl_start),
                "added_norm": 0.0 if delta is None else float(delta.norm())}


def _ci(values, config) -> dict:
    from nlakit.metrics import bootstrap_ci

    return bootstrap_ci(values, n_boot=config.n_boot, seed=config.seed)


def _verdict(metric: str, diffs: list[dict]) -> str:
    if not diffs:
        return f"{metric}: no controls"
    worst = min(diffs, key=lambda d: d["ci"][0])
    gap = f"{worst['mean']:+.3f} [{worst['ci'][0]:+.3f}, {worst['ci'][1]:+.3f}]"
    lost = [d["control"] for d in diffs if not d["ci"][0] > 0]
    if lost:
        return f"{metric}: does NOT beat {', '.join(lost)} (vs {worst['control']}: {gap})"
    return f"{metric}: beats every control (closest {worst['control']}: {gap})"


def _compare(per: dict, scales, controls, config) -> tuple[list[dict], list[str]]:
    """Paired bootstrap over prompts of steered minus each control, per scale and metric."""
    comparisons, verdicts = [], []
    for s in scales:
        line = []
        for metric in ("delta_logp", "hit_rate"):
            diffs = [{"scale": s, "metric": metric, "control": c,
                      **_ci(per[("steered", s)][metric] - per[(c, s)][metric], config)}
                     for c in controls]
            comparisons += diffs
            line.append(_verdict(metric, diffs))
        verdicts.append(f"scale {s:g}: " + "; ".join(line))
    return comparisons, verdicts


# The text the ar_empty control reads. On a bare ``{explanation}`` template with no BOS the AR
# reads it as one special token (`Reconstructor.encode`).
EMPTY_EXPLANATION = ""


def _directions(nla, config, steered, mean_direction) -> dict[str, torch.Tensor]:
    empty = nla.reconstruct([EMPTY_EXPLANATION])[0]
    return {"steered": unit(steered), **control_directions(
        nla.d_model, mean_direction, empty, config.random_controls, config.seed)}


def _norm_for(nla, config: SteerConfig, norm: float | None) -> float:
    if config.layer is not None and config.layer != nla.layer:
        raise NLAError(layer_message(config.layer, nla.layer))
    norm = norm or config.norm or nla.dataset_stats.get("mean_norm")
    if not norm:
        raise NLAError(NO_NORM_MESSAGE)
    return float(norm)


def _given_vector(vector, d: int) -> torch.Tensor:
    v = torch.as_tensor(vector).detach().float().cpu()
    if v.shape != (d,) or not torch.isfinite(v).all() or not float(v.norm()) > 0:
        raise NLAError(f"vector= must be one finite, non-zero vector of d_model {d} numbers, "
                       f"got shape {tuple(v.shape)}")
    return v


def measure_steering(nla, config: SteerConfig, *, norm: float | None = None,
                     mean_direction: torch.Tensor | None = None, vector=None,
                     progress: bool = False) -> SteerReport:
    """Steer the NLA's target with AR(text) [- AR(contrast)] and every control at every scale
    and measure delta_logp, hit_rate and ppl_ratio (module doc) against the unsteered model.

    norm: the mean activation norm (None: config.norm, else the NLA's dataset_stats);
    mean_direction: [d] (None: the mean block-K activation over the prompts and paragraph);
    vector: [d] steer along this instead of the AR's reading (a reference to compare the AR's
    vector with, e.g. a difference of the target's own activations); the text then only
    names the concept words."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    norm = _norm_for(nla, config, norm)
    prompts, ppl_text = config.prompt_list(), config.held_out_text()
    words = config.concept_words or default_concept_words(config.text, config.contrast)
    model, tok = nla.target()
    steered = (text_vector(nla, config.text, config.contrast) if vector is None
               else _given_vector(vector, nla.d_model))
    given_mean = mean_direction is not None
    if not given_mean:
        mean_direction = prompt_mean_direction(model, tok, nla.layer, [*prompts, ppl_text])
    dirs = _directions(nla, config, steered, mean_direction)
    bench = _Bench.build(model, tok, nla.layer, prompts, ppl_text, words, config)

    per = {("unsteered", 0.0): bench.measure(None)}
    for name, s in tqdm([(k, s) for s in config.scale for k in dirs], desc="steer",
                        disable=not progress):
        per[(name, s)] = bench.measure(dirs[name] * (s * norm), per[("unsteered", 0.0)])
    base_ppl = per[("unsteered", 0.0)]["ppl"]
    rows = [_row(name, s, v, dirs, base_ppl, config) for (name, s), v in per.items()]
    comparisons, verdicts = _compare(per, config.scale, [k for k in dirs if k != "steered"],
                                     config)
    setup = {"model": nla.target_info.get("spec"), "layer": nla.layer, "text": config.text,
             "contrast": config.contrast, "vector": "AR" if vector is None else "given",
             "mode": config.mode, "mean_norm": norm,
             "concept_words": list(words), "concept_tokens": sorted(bench.token_ids.values()),
             "prompts": len(prompts), "unsteered_ppl": base_ppl,
             "ar_empty_reads": EMPTY_EXPLANATION,
             "mean_direction_from": "store" if given_mean else "prompts and paragraph",
             "steered_vector_norm_before_rescaling": float(steered.norm()),
             "config": asdict(config), "seconds": round(time.perf_counter() - t0, 1)}
    return SteerReport(setup, rows, comparisons, verdicts)


def _row(name, s, values, dirs, base_ppl, config) -> dict:
    cos = float(dirs[name] @ dirs["steered"]) if name in dirs else None
    return {"vector": name, "scale": s, "added_norm": values["added_norm"],
            "cos_to_steered": cos, "logp": _ci(values["logp"], config),
            "delta_logp": _ci(values["delta_logp"], config),
            "hit_rate": _ci(values["hit_rate"], config), "ppl": values["ppl"],
            "ppl_ratio": values["ppl"] / base_ppl}


def layer_message(asked: int, layer: int) -> str:
    return (f"--layer {asked}: this NLA's AR rebuilds block {layer} only, so its vectors "
            f"belong there; drop --layer or use an NLA of block {asked} (a raw vector can go "
            "to any block with nlakit.steer)")


NO_NORM_MESSAGE = ("this NLA records no mean activation norm (dataset_stats.mean_norm); pass "
                   "--norm or --acts")
