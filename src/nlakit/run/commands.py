"""The commands beside the stages (sae, steer, diff, audit-game, serve): one table row each.

A row names a config dataclass (``--config FILE.yaml`` holds its fields; flags override), an
optional inputs dataclass (paths and switches: flags only), a ``run(config, inputs)`` and what
the command prints. The CLI builds every command's flags and its call from this table, as it
does for the stage table (`nlakit.run.pipeline.STAGE_TABLE`). Classes are named as
``"module:Class"`` so that building the parser imports torch only for the command being run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlakit.config import load_ref


@dataclass(frozen=True)
class Command:
    name: str  # the subcommand word
    help: str  # one line for `nlakit --help`
    description: str  # the subcommand's own --help
    config: str  # "module:Class": the fields of --config FILE.yaml and of the config flags
    inputs: str | None  # "module:Class" of the paths and switches (flags only), or none
    run: Callable[[Any, Any], Any]  # (config, inputs or None) -> output
    show: Callable[[Any, Any, Any], None]  # (output, config, inputs) -> prints

    def config_class(self):
        return load_ref(self.config)

    def inputs_class(self):
        return load_ref(self.inputs) if self.inputs else None


# ---- sae -------------------------------------------------------------------------------------


def run_sae(config, inputs) -> Path:
    """ladder.json (`nlakit.eval.sae.run_ladder`), then its plot, its Markdown table and the
    optional HTML report beside it; returns ladder.json."""
    from nlakit.eval.sae import run_ladder
    from nlakit.fileio import write_text_atomic
    from nlakit.report.plots import plot_ladder
    from nlakit.report.render import write_report
    from nlakit.report.tables import format_ladder

    path = run_ladder(config, inputs)
    result = json.loads(path.read_text())
    ladder = {m: {int(k): v for k, v in r.items()} for m, r in result["ladder"].items()}
    png = plot_ladder(ladder, result["lines"], path.with_suffix(".png"),
                      title=f"{result['model']} layer {result['layer']}, {result['n_rows']} "
                            f"{result['split']} rows / {result['n_docs']} docs")
    write_text_atomic(path.with_suffix(".md"), format_ladder(result) + "\n")
    if inputs.report:
        eval_data = json.loads(Path(inputs.eval_json).read_text()) if inputs.eval_json else None
        write_report(inputs.report, eval_data=eval_data, ladder_data=result, ladder_png=png,
                     title="nlakit sae ladder")
    return path


def _show_sae(path: Path, config, inputs) -> None:
    from nlakit.report.tables import format_ladder

    data = json.loads(path.read_text())
    print(format_ladder(data))
    print(f"wrote {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}")
    if inputs.report:
        print(f"wrote {inputs.report} and {Path(inputs.report).with_suffix('.md')}")
    if data.get("timings_s"):
        print("seconds: " + ", ".join(f"{k} {v}" for k, v in data["timings_s"].items()))


# ---- steer, diff, audit-game, serve ----------------------------------------------------------


def _run_steer(config, inputs):
    from nlakit.apps.steering import run_steer

    return run_steer(config, inputs)


def _show_steer(report, config, inputs) -> None:
    from nlakit.report.tables import format_steer

    print(format_steer(report))
    print(f"seconds: {report.setup['seconds']}")
    if inputs.out:
        print(f"wrote {Path(inputs.out) / 'steer.json'} and {Path(inputs.out) / 'steer.md'}")


def _run_diff(config, inputs) -> dict:
    from nlakit.apps.diff import run

    return run(config)


def _show_diff(data: dict, config, inputs) -> None:
    from nlakit.report.tables import format_diff_summary

    print(format_diff_summary(data))
    out = Path(config.out)
    print(f"wrote {out / 'diff.json'}, {out / 'diff.md'} and {out / 'rows.jsonl'}")


def _run_audit_game(config, inputs) -> dict:
    from nlakit.apps.audit_game import run

    return run(config)


def _show_audit_game(data: dict, config, inputs) -> None:
    from nlakit.report.tables import format_game_markdown

    print(format_game_markdown(data))
    print(f"wrote {Path(config.out) / 'game.json'} and {Path(config.out) / 'game.md'}")


def _run_serve(limits, inputs) -> None:
    from nlakit.apps.serve import run_serve

    run_serve(inputs, limits)  # returns when the server stops


def _show_nothing(out, config, inputs) -> None:
    return None


COMMAND_TABLE = (
    Command("sae", "TopK SAEs on a store's training splits, scored like eval (fve_nrm, kl, "
                   "ce_recovered): how many latents an NLA's explanation is worth",
            "Train TopK SAEs (one per k) on the store's training splits, score them on a split "
            "with fve_nrm, kl and ce_recovered, put baselines, an NLA (--nla) or an eval.json's "
            "methods (--eval-json) on the ladder; writes ladder.json/.md/.png.",
            "nlakit.eval.sae:LadderConfig", "nlakit.eval.sae:LadderInputs", run_sae, _show_sae),
    Command("steer", "steer the target with AR(text) [- AR(contrast)] and measure the effect "
                     "against controls (docs/steer.md)",
            "Add the AR's vector of an explanation (or of a contrast of two) to the target's "
            "block K at several scales; measure the concept words' log-probability, their rate "
            "in sampled continuations and the perplexity cost, next to random, mean-direction "
            "and empty-explanation controls.",
            "nlakit.apps.steering.config:SteerConfig", "nlakit.apps.steering.config:SteerInputs",
            _run_steer, _show_steer),
    Command("diff", "audit a fine-tune through the base model's NLA: round trip on both models, "
                    "the rows and words that changed (docs/diff.md)",
            "Extract the base and fine-tuned models' activations at the same positions of the "
            "same documents, explain both with the base's NLA, and report round-trip scores, "
            "the rows that changed most and the words over-used in the fine-tuned model's "
            "explanations (log-odds z-scores).",
            "nlakit.apps.diff:DiffConfig", None, _run_diff, _show_diff),
    Command("audit-game", "the auditing game: fine-tune a model organism with a hidden quirk "
                          "and a control, diff both through the base's NLA (docs/audit-game.md)",
            "Make a model organism (LoRA on answers the base wrote under a hidden quirky system "
            "prompt, trained without it) and a control, run `nlakit diff` on both with the "
            "base's NLA, and rank the quirk's words against an output-diff baseline.",
            "nlakit.apps.audit_game:AuditGameConfig", None, _run_audit_game, _show_audit_game),
    Command("serve", "a local web viewer of an NLA: Explain, Browse a run, Reconstruct "
                     "(docs/serve.md)",
            "Load an NLA once and serve the viewer on 127.0.0.1 (Explain, Browse a run, "
            "Reconstruct; JSON endpoints under /api). --config FILE.yaml holds the limits.",
            "nlakit.apps.serve.limits:ServeLimits", "nlakit.apps.serve.config:ServeInputs",
            _run_serve, _show_nothing),
)
BY_COMMAND = {c.name: c for c in COMMAND_TABLE}

__all__ = ["BY_COMMAND", "COMMAND_TABLE", "Command", "run_sae"]
