"""Training curves as a PNG from a training log (RL `metrics.jsonl` or SFT `log.jsonl`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from nlakit.errors import NLAError

# (key, label) pairs drawn when present, one panel each
PANELS = [
    ("heldout_fve_nrm", "held-out fve_nrm (greedy)"),
    ("fve_nrm", "batch fve_nrm"),
    ("reward_mean", "reward mean"),
    ("kl", "KL to the SFT policy"),
    ("response_len", "response length (tokens)"),
    ("loss", "training loss"),
    ("eval_loss", "held-out loss"),
    ("eval_fve_nrm", "held-out fve_nrm"),
]


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        candidates = [path / "metrics.jsonl", path / "log.jsonl"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise NLAError(f"no training log at {path}: pass a metrics.jsonl / log.jsonl file or the "
                       "directory holding it")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise NLAError(f"{path}:{lineno}: not JSON ({e.msg})") from e
    if not rows:
        raise NLAError(f"{path} is empty")
    return rows


def plot_log(log: str | Path, out: str | Path, title: str | None = None) -> list[str]:
    """Draw every known metric present in the log against `step`; return the keys drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log)
    drawn = [(k, label) for k, label in PANELS if any(k in r for r in rows)]
    if not drawn:
        raise NLAError(f"{log} has none of the metrics {[k for k, _ in PANELS]}")
    fig, axes = plt.subplots(len(drawn), 1, figsize=(7, 2.2 * len(drawn)), sharex=True,
                             squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], drawn):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or str(log), fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [k for k, _ in drawn]


def plot_ladder(ladder: dict[str, dict[int, float]], lines: dict[str, dict[str, float]],
                path: str | Path, *, title: str = "") -> Path:
    """One panel per metric: the SAE ladder (metric vs k, log2 axis) with horizontal lines for
    the NLA and the baselines. ladder: {metric: {k: value}}; lines: {metric: {name: value}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ladder)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1))]
    for ax, metric in zip(axes[0], names):
        ks = sorted(ladder[metric])
        ax.plot(ks, [ladder[metric][k] for k in ks], "o-", color="black", label="TopK SAE")
        for j, (name, v) in enumerate(lines.get(metric, {}).items()):
            if v is not None and math.isfinite(v):
                ax.axhline(v, linestyle=styles[j % len(styles)], color=f"C{j}", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (active latents)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
