"""nlakit plot: a PNG from a training log, and clear errors for bad logs."""

import json

import pytest

from nlakit import NLAError
from nlakit.run.cli import main


def test_plot_writes_png_with_the_metrics_present(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "reward_mean": -0.5 + i / 10, "fve_nrm": i / 20, "kl": 0.01 * i,
             "response_len": 40 + i} for i in range(1, 6)]
    rows[-1]["heldout_fve_nrm"] = 0.3
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curve.png"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from nlakit.report.plots import plot_log

    drawn = plot_log(log, tmp_path / "b.png")
    assert drawn == ["heldout_fve_nrm", "fve_nrm", "reward_mean", "kl", "response_len"]


def test_plot_errors(tmp_path):
    from nlakit.report.plots import plot_log

    with pytest.raises(NLAError, match="no training log"):
        plot_log(tmp_path, tmp_path / "x.png")
    bad = tmp_path / "log.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(NLAError, match="not JSON"):
        plot_log(bad, tmp_path / "x.png")
    bad.write_text(json.dumps({"step": 1, "other": 2}) + "\n")
    with pytest.raises(NLAError, match="none of the metrics"):
        plot_log(bad, tmp_path / "x.png")
