"""Identities of the reconstruction metrics (REFERENCE.md §Metrics) and the grouped bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nlakit import NLAError
from nlakit import metrics as M

D = 48


def _random(n=200, d=D, seed=0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if offset:
        shared = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1000),
                             dtype=torch.float64)
        x = x + offset * shared / shared.norm()
    return x


@pytest.fixture
def aniso():
    """Anisotropic data: a large shared offset makes ||E ĝ|| far from 0 (and from 1)."""
    g = _random(300, offset=8.0)
    m = float(M.mean_unit_direction(g).norm())
    assert 0.5 < m < 0.999, m
    return g


def test_mse_nrm_is_two_one_minus_cos():
    p, g = _random(seed=1), _random(seed=2)
    mse = M.mse_nrm(p, g)
    assert mse.shape == (200,)
    torch.testing.assert_close(mse, 2 * (1 - M.cos(p, g)), atol=1e-10, rtol=0)
    # the literal definition: mean over dims of (s·p̂ − s·ĝ)² with s = sqrt(d)
    s = math.sqrt(D)
    pn, gn = p / p.norm(dim=1, keepdim=True), g / g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(mse, ((s * pn - s * gn) ** 2).mean(1), atol=1e-10, rtol=0)
    assert float(mse.min()) >= 0 and float(mse.max()) <= 4


def test_mse_nrm_is_scale_invariant_and_ranges():
    g = _random(seed=3)
    torch.testing.assert_close(M.mse_nrm(7.5 * g, g), torch.zeros(200, dtype=g.dtype),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(M.mse_nrm(-g, g), torch.full((200,), 4.0, dtype=g.dtype),
                               atol=1e-12, rtol=0)


def test_fve_nrm_of_truth_is_one(aniso):
    torch.testing.assert_close(M.fve_nrm(aniso, aniso), torch.ones(300, dtype=aniso.dtype),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(M.fve_meannorm(3 * aniso, aniso),
                               torch.ones(300, dtype=aniso.dtype), atol=1e-12, rtol=0)


def test_mean_direction_scores(aniso):
    mean = M.mean_unit_direction(aniso)
    m = float(mean.norm())
    pred = (mean / mean.norm()).expand_as(aniso)
    # mse_nrm of the mean direction averages to meannorm = 2(1 − ||E ĝ||)
    assert float(M.mse_nrm(pred, aniso).mean()) == pytest.approx(2 * (1 - m), abs=1e-10)
    assert M.meannorm(aniso) == pytest.approx(2 * (1 - m), abs=1e-10)
    assert float(M.fve_meannorm(pred, aniso).mean()) == pytest.approx(0.0, abs=1e-9)
    fve = float(M.fve_nrm(pred, aniso).mean())
    assert fve == pytest.approx(1 - 2 / (1 + m), abs=1e-9)
    assert fve < -0.01  # a constant prediction is worse than fve_nrm = 0


def test_rawvar_literal_definition(aniso):
    s = math.sqrt(D)
    gh = aniso / aniso.norm(dim=1, keepdim=True)
    mu = (s * gh).mean(0)
    literal = float(((s * gh - mu) ** 2).mean())
    assert M.rawvar(aniso) == pytest.approx(literal, abs=1e-10)
    m = float(M.mean_unit_direction(aniso).norm())
    assert M.rawvar(aniso) == pytest.approx(1 - m * m, abs=1e-10)
    # it is the mse of predicting the un-normalised mean vector mu (in s-scaled units)
    assert literal == pytest.approx(float(((s * gh - mu) ** 2).mean(1).mean()), abs=1e-12)
    # isotropic data: rawvar close to 1
    assert M.rawvar(_random(4000, seed=5)) == pytest.approx(1.0, abs=0.02)


def test_fve_with_explicit_denominators(aniso):
    p = aniso + _random(300, seed=9)
    mse = M.mse_nrm(p, aniso)
    torch.testing.assert_close(M.fve_nrm(p, aniso, 0.5), 1 - mse / 0.5)
    torch.testing.assert_close(M.fve_meannorm(p, aniso, 0.25), 1 - mse / 0.25)
    summary = M.summarize(p, aniso, rawvar_value=M.rawvar(aniso),
                          meannorm_value=M.meannorm(aniso))
    assert summary["fve_nrm"] == pytest.approx(float(M.fve_nrm(p, aniso).mean()))
    assert summary["fve_meannorm"] == pytest.approx(float(M.fve_meannorm(p, aniso).mean()))
    assert summary["mse_nrm"] == pytest.approx(float(mse.mean()))
    with pytest.raises(NLAError):
        M.fve_nrm(p, aniso, 0.0)
    with pytest.raises(NLAError):
        M.fve_meannorm(p, aniso, -1.0)


def test_centered_variants(aniso):
    p = aniso + 0.5 * _random(300, seed=11)
    mean = aniso.mean(0)
    pc, gc = p - mean, aniso - mean
    torch.testing.assert_close(M.centered_cos(p, aniso, mean), M.cos(pc, gc))
    torch.testing.assert_close(M.centered_mse_nrm(p, aniso, mean),
                               2 * (1 - M.centered_cos(p, aniso, mean)), atol=1e-10, rtol=0)
    torch.testing.assert_close(M.centered_fve_nrm(p, aniso, mean),
                               1 - M.mse_nrm(pc, gc) / M.rawvar(gc))
    # centering removes the shared offset: the centered data is nearly isotropic, so the
    # centered rawvar is much larger than the raw one and cos is no longer trivially high
    assert M.rawvar(gc) > 0.9 > M.rawvar(aniso)
    assert float(M.centered_cos(p, aniso, mean).mean()) < float(M.cos(p, aniso).mean())


@pytest.mark.parametrize("fn", [M.mse_nrm, M.cos, M.fve_nrm, M.fve_meannorm])
def test_bad_input_raises(fn):
    g = _random(10, seed=4)
    bad = g.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(NLAError, match="NaN"):
        fn(bad, g)
    with pytest.raises(NLAError, match="NaN"):
        fn(g, bad)
    inf = g.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(NLAError):
        fn(inf, g)
    zero = g.clone()
    zero[2] = 0
    with pytest.raises(NLAError, match="zero"):
        fn(zero, g)
    with pytest.raises(NLAError, match="shape"):
        fn(g[:, :-1], g)
    with pytest.raises(NLAError, match="shape"):
        fn(g[:-1], g)
    with pytest.raises(NLAError):
        fn(g[None], g[None])  # 3-d input


def test_rawvar_bad_input():
    with pytest.raises(NLAError):
        M.rawvar(torch.zeros(3, 4))
    with pytest.raises(NLAError):
        M.meannorm(torch.tensor([[1.0, float("nan")]]))


def test_single_vectors_and_low_precision_are_accepted():
    g = torch.randn(D)
    assert M.cos(g, g).shape == (1,)
    half = torch.randn(5, D).to(torch.bfloat16)
    out = M.mse_nrm(half, half)
    assert out.dtype == torch.float32
    assert float(out.abs().max()) < 1e-5


# ---- bootstrap -----------------------------------------------------------------------------


def test_bootstrap_mean_exact_and_ci_contains_it():
    rng = np.random.default_rng(0)
    v = rng.normal(0.3, 1.0, size=500)
    groups = np.repeat(np.arange(100), 5)
    out = M.bootstrap_ci(v, groups, n_boot=500, seed=1)
    assert out["mean"] == float(v.mean())  # exact, not a bootstrap estimate
    lo, hi = out["ci"]
    assert lo < out["mean"] < hi
    assert out["n"] == 500 and out["n_groups"] == 100
    assert hi - lo < 0.5


def test_bootstrap_deterministic_under_seed():
    rng = np.random.default_rng(1)
    v = rng.normal(size=300)
    groups = [f"doc{i // 3}" for i in range(300)]
    a = M.bootstrap_ci(v, groups, n_boot=300, seed=7)
    b = M.bootstrap_ci(v, groups, n_boot=300, seed=7)
    c = M.bootstrap_ci(v, groups, n_boot=300, seed=8)
    assert a == b
    assert a["ci"] != c["ci"]


def test_bootstrap_resamples_groups():
    # 40 groups of 25 identical rows: the effective sample size is 40, not 1000
    rng = np.random.default_rng(2)
    group_values = rng.normal(size=40)
    v = np.repeat(group_values, 25)
    groups = np.repeat(np.arange(40), 25)
    grouped = M.bootstrap_ci(v, groups, n_boot=2000, seed=0)
    by_row = M.bootstrap_ci(v, None, n_boot=2000, seed=0)
    w_group = grouped["ci"][1] - grouped["ci"][0]
    w_row = by_row["ci"][1] - by_row["ci"][0]
    assert grouped["n_groups"] == 40 and by_row["n_groups"] == 1000
    assert w_group > 3 * w_row  # sqrt(25) = 5 in expectation
    # and the group-level width matches a bootstrap over the 40 group means
    per_group = M.bootstrap_ci(group_values, None, n_boot=2000, seed=0)
    w_means = per_group["ci"][1] - per_group["ci"][0]
    assert w_group == pytest.approx(w_means, rel=0.15)


def test_bootstrap_weights_rows_equally():
    # unequal group sizes: the mean is over rows, not over group means
    v = np.array([1.0] * 9 + [0.0])
    groups = ["a"] * 9 + ["b"]
    out = M.bootstrap_ci(v, groups, n_boot=200, seed=0)
    assert out["mean"] == pytest.approx(0.9)


def test_bootstrap_bad_input():
    with pytest.raises(NLAError):
        M.bootstrap_ci([], None)
    with pytest.raises(NLAError):
        M.bootstrap_ci([1.0, float("nan")], None)
    with pytest.raises(NLAError):
        M.bootstrap_ci([1.0, 2.0, 3.0], ["a", "b"])
