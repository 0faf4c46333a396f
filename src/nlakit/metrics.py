"""Reconstruction metrics of the NLA literature, batched over rows.

Notation: p = prediction, g = ground truth (raw activations), rows of [n, d] tensors;
p̂ = p/||p||, ĝ = g/||g||, s = sqrt(d). Norms are computed in float32 (or float64 if given).
Per-row functions return [n]; dataset constants (rawvar, meannorm) are scalars computed from
the ground truth of a reference set (pass them explicitly to score a subset against a store).
State the denominator whenever you report an FVE: fve_nrm (rawvar) and fve_meannorm (meannorm)
differ a lot on the same predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nlakit.errors import NLAError


def _as_rows(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise NLAError(f"{name} must be [n, d] (or [d]), got shape {tuple(t.shape)}")
    if not torch.is_floating_point(t) or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if not torch.isfinite(t).all():
        raise NLAError(f"{name} holds NaN or inf values")
    return t


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; zero rows are an error (their direction is undefined)."""
    x = _as_rows(x, "vectors")
    norms = x.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise NLAError("a vector has zero norm; its direction (and every metric) is undefined")
    return x / norms


def _pair(pred, target):
    p, g = _as_rows(pred, "pred"), _as_rows(target, "target")
    if p.shape != g.shape:
        raise NLAError(f"pred {tuple(p.shape)} and target {tuple(g.shape)} differ in shape")
    return p, g


def cos(pred, target) -> torch.Tensor:
    """Cosine similarity per row: p̂·ĝ. [n]"""
    p, g = _pair(pred, target)
    return (unit(p) * unit(g)).sum(-1)


def mse_nrm(pred, target) -> torch.Tensor:
    """Normalised MSE per row: mean_dims (s·p̂ − s·ĝ)² = ||p̂ − ĝ||² = 2(1 − cos). Range 0..4. [n]"""
    p, g = _pair(pred, target)
    return ((unit(p) - unit(g)) ** 2).sum(-1)


def mean_unit_direction(target) -> torch.Tensor:
    """E ĝ over rows (not renormalised). [d]"""
    return unit(target).mean(0)


def rawvar(target) -> float:
    """mean over rows and dims of (s·ĝ − μ)², μ = E[s·ĝ]; equals 1 − ||E ĝ||².

    The error of predicting the un-normalised mean vector: the fve_nrm denominator.
    """
    m = mean_unit_direction(target)
    return float(1.0 - (m * m).sum())


def meannorm(target) -> float:
    """mse_nrm of the best constant unit prediction, the mean direction: 2(1 − ||E ĝ||)."""
    return float(2.0 * (1.0 - mean_unit_direction(target).norm()))


def fve_nrm(pred, target, rawvar_value: float | None = None) -> torch.Tensor:
    """Per-row fraction of variance explained: 1 − mse_nrm / rawvar. [n]

    The headline metric; its mean over rows is the reported FVE. 1 is perfect; the mean
    direction scores 1 − 2/(1 + ||E ĝ||) < 0, so 0 already beats every constant.
    rawvar_value: the denominator, by default computed from `target` itself.
    """
    denom = rawvar(target) if rawvar_value is None else float(rawvar_value)
    if denom <= 0:
        raise NLAError(f"rawvar must be positive, got {denom}")
    return 1.0 - mse_nrm(pred, target) / denom


def fve_meannorm(pred, target, meannorm_value: float | None = None) -> torch.Tensor:
    """Per-row 1 − mse_nrm / meannorm: 0 for the mean direction, 1 perfect. [n]"""
    denom = meannorm(target) if meannorm_value is None else float(meannorm_value)
    if denom <= 0:
        raise NLAError(f"meannorm must be positive, got {denom}")
    return 1.0 - mse_nrm(pred, target) / denom


def centered_cos(pred, target, mean) -> torch.Tensor:
    """Cosine after subtracting a mean activation `mean` [d] from both: cos(p − m, g − m). [n]"""
    p, g = _pair(pred, target)
    m = _as_rows(mean, "mean")
    return cos(p - m, g - m)


def centered_mse_nrm(pred, target, mean) -> torch.Tensor:
    """mse_nrm after centering both by `mean`: 2(1 − centered_cos). [n]"""
    p, g = _pair(pred, target)
    m = _as_rows(mean, "mean")
    return mse_nrm(p - m, g - m)


def centered_fve_nrm(pred, target, mean, rawvar_value: float | None = None) -> torch.Tensor:
    """fve_nrm of the centered vectors: 1 − centered_mse_nrm / rawvar(g − mean). [n]"""
    p, g = _pair(pred, target)
    m = _as_rows(mean, "mean")
    return fve_nrm(p - m, g - m, rawvar_value)


def summarize(pred, target, *, rawvar_value: float, meannorm_value: float) -> dict[str, float]:
    """Mean mse_nrm, cos, fve_nrm and fve_meannorm with explicit denominators."""
    return {
        "mse_nrm": float(mse_nrm(pred, target).mean()),
        "cos": float(cos(pred, target).mean()),
        "fve_nrm": float(fve_nrm(pred, target, rawvar_value).mean()),
        "fve_meannorm": float(fve_meannorm(pred, target, meannorm_value).mean()),
        "rawvar": float(rawvar_value),
        "meannorm": float(meannorm_value),
    }


def best_candidates(pred, target, n: int) -> torch.Tensor:
    """Indices into `pred` [m*n, d] (each target's n candidates, row-major) of the candidate
    with the lowest mse_nrm to its row of `target` [m, d]: best-of-n reranking's choice."""
    pred, target = _pair(pred, torch.as_tensor(target).repeat_interleave(n, 0))
    return torch.arange(pred.shape[0] // n) * n + mse_nrm(pred, target).view(-1, n).argmin(1)


def bootstrap_ci(
    values, groups: Sequence | None = None, *, n_boot: int = 1000, level: float = 0.95,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Mean of per-row `values` with a percentile bootstrap CI that resamples *groups*.

    groups: one label per row (e.g. doc_id); whole documents are resampled, because rows of a
    document are correlated and a row-level bootstrap would give falsely narrow intervals.
    Returns {"mean", "ci": [lo, hi], "n", "n_groups"}.
    """
    v = np.asarray(torch.as_tensor(values).double().cpu().numpy(), dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise NLAError("cannot bootstrap an empty set of values")
    if not np.isfinite(v).all():
        raise NLAError("values for the bootstrap hold NaN or inf")
    if groups is None:
        groups = np.arange(v.size)
    labels, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if inverse.size != v.size:
        raise NLAError(f"{v.size} values but {inverse.size} group labels")
    g = labels.size
    sums = np.bincount(inverse, weights=v, minlength=g)
    counts = np.bincount(inverse, minlength=g).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, size=(n_boot, g))
    boot = sums[draws].sum(1) / counts[draws].sum(1)  # ratio estimator: rows weighted equally
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return {"mean": float(v.mean()), "ci": [float(lo), float(hi)], "n": int(v.size),
            "n_groups": int(g)}
