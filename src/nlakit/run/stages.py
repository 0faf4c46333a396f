"""Every stage's inputs and its ``run(config, inputs) -> output`` function.

A stage is a config dataclass (what the pipeline's section of the same name holds: one place
per default, validated in ``__post_init__``, a help string per field) and a `run` function.
Its *inputs* (the directories it reads and writes, the target model, the device, overwrite and
resume switches) are a second small dataclass here: the CLI fills them from flags, the
pipeline from its run directory (see `nlakit.run.pipeline.STAGES`). Both call the same `run`.

  stage          config                       inputs            run
  extract        activations.ExtractConfig    ExtractInputs     run_extract
  label          labels.LabelConfig           LabelInputs       run_label
  train_av       train.sft.SFTConfig          SFTInputs         run_train_av
  train_ar       train.sft.SFTConfig          SFTInputs         run_train_ar
  train_control  train.sft.SFTConfig          SFTInputs         run_train_control
  train_rl       train.rl.RLConfig            RLInputs          run_train_rl
  eval           evaluate.EvalConfig          EvalInputs        run_eval
  audit          audit.AuditConfig            AuditInputs       run_audit
  report         report.ReportConfig          ReportInputs      run_report
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from nlakit.config import hint, required
from nlakit.errors import NLAError

log = logging.getLogger(__name__)


# ---- inputs -----------------------------------------------------------------------------------


@dataclass
class ExtractInputs:
    out: str = required("output store directory")
    model: str = field(default="smollm2-135m", metadata=hint(
        "target model: alias smollm2-135m, a .gguf file, a model directory or a Hugging Face "
        "id"))
    layer: int | None = field(default=None, metadata=hint("block K (None: floor(2L/3))"))
    dtype: str | None = field(default=None, metadata=hint(
        "float32 (CPU default), bfloat16, float16 or auto"))
    device: str | None = field(default=None, metadata=hint("cpu (default), cuda, cuda:N, auto"))
    overwrite: bool = field(default=False, metadata=hint(
        "replace a store made with another configuration"))
    progress: bool = field(default=True, metadata=hint("show a progress bar"))


@dataclass
class LabelInputs:
    acts: str = required("activation store directory")
    out: str = required("output label-set directory")
    progress: bool = field(default=True, metadata=hint("show a progress bar"))


@dataclass
class SFTInputs:
    data: str = required("labelled set from `nlakit label`")
    out: str = required("NLA directory: writes OUT/av or OUT/ar (train both into one dir)")
    acts: str | None = field(default=None, metadata=hint(
        "activation store (None: the labels' store)"))
    overwrite: bool = field(default=False, metadata=hint("discard an earlier checkpoint"))
    progress: bool = field(default=True, metadata=hint("show a progress bar"))


@dataclass
class RLInputs:
    nla: str = required("the starting NLA directory (the SFT warm start)")
    acts: str = required("activation store with rl and heldout splits")
    out: str = required("output NLA directory")
    resume: bool = field(default=False, metadata=hint("continue the checkpoint in --out"))
    overwrite: bool = field(default=False, metadata=hint("discard an earlier checkpoint"))
    progress: bool = field(default=True, metadata=hint("show a progress bar"))


@dataclass
class _ScoreInputs:
    """What eval and audit both read: the NLA, the store, where the results go."""
    acts: str = required("activation store of the NLA's layer")
    nla: str | None = field(default=None, metadata=hint("NLA directory (holding av/ and ar/)"))
    av: str | None = field(default=None, metadata=hint("AV directory (official layout)"))
    ar: str | None = field(default=None, metadata=hint("AR directory (official layout)"))
    device: str | None = field(default=None, metadata=hint("cpu, cuda, cuda:N or auto"))
    dtype: str | None = field(default=None, metadata=hint(
        "model dtype (float32, bfloat16, ...); default: the device's (bfloat16 on a GPU that "
        "supports it)"))
    json: str | None = field(default=None, metadata=hint(
        "result JSON (None: next to --report, else in the current directory)"))
    report: str | None = field(default=None, metadata=hint(
        "also write a self-contained HTML report here (and a .md summary beside it)"))
    progress: bool = field(default=True, metadata=hint("show a progress bar"))


@dataclass
class EvalInputs(_ScoreInputs):
    label_set: str | None = field(default=None, metadata=hint(
        "label set of the `label` baseline (scored when the config's labels is true)"))
    control: str | None = field(default=None, metadata=hint(
        "control AV directory (trained on shuffled activations)"))
    baselines_only: bool = field(default=False, metadata=hint(
        "load only the AR and score the baselines (no AV needed)"))


@dataclass
class AuditInputs(_ScoreInputs):
    explanations: str | None = field(default=None, metadata=hint(
        "eval.json whose explanations to audit instead of generating them again (used when it "
        "holds every audited row)"))
    explanations_kind: str = field(default="greedy", metadata=hint(
        "which of the eval.json's explanations: greedy (the NLA's own; generated again when the "
        "eval lacks a row) or best_of (the eval's best-of-N choices; required)"))
    eval_json: str | None = field(default=None, metadata=hint(
        "include this eval.json in the --report"))


@dataclass
class ReportInputs:
    out: str = required("report.html (report.md is written beside it)")
    eval: str | None = field(default=None, metadata=hint("eval.json"))
    audit: str | None = field(default=None, metadata=hint("audit.json"))
    ladder: str | None = field(default=None, metadata=hint(
        "ladder.json of `nlakit sae` (its ladder.png beside it is embedded)"))


# ---- run functions ----------------------------------------------------------------------------


def run_extract(config, inputs: ExtractInputs) -> Path:
    """Activations of the target model over the corpus -> the store directory."""
    from nlakit.extract.extraction import extract
    from nlakit.model.load import load_model

    model, tok = load_model(inputs.model, dtype=inputs.dtype, device=inputs.device)
    extract((model, tok), config.corpus, inputs.out, config, layer=inputs.layer,
            overwrite=inputs.overwrite, progress=inputs.progress)
    return Path(inputs.out)


def run_label(config, inputs: LabelInputs) -> Path:
    """Warm-start labels of the config's splits -> the label-set directory."""
    from nlakit.labels import label_store

    label_store(inputs.acts, config.labeller, inputs.out, splits=config.splits,
                max_rows=config.max_rows, progress=inputs.progress, **config.options)
    return Path(inputs.out)


@dataclass
class ARLabelInputs:
    acts: str = required("activation store directory")
    av: str = required("the trained AV directory whose explanations label the rows")
    out: str = required("output label-set directory")
    device: str | None = field(default=None, metadata=hint("cpu (default), cuda, auto"))
    progress: bool = field(default=True, metadata=hint("show a progress bar"))


def run_label_ar(config, inputs: ARLabelInputs) -> Path:
    """The trained AV's greedy explanations of the AR's training rows -> a label set the AR
    trains on (instead of the warm-start labels)."""
    from nlakit.extract.store import ActivationStore
    from nlakit.labels import label_store
    from nlakit.train.label_ar import VerbalizerLabeller

    store = ActivationStore(inputs.acts)
    labeller = VerbalizerLabeller(store, inputs.av, device=inputs.device,
                                  batch_size=config.batch_size,
                                  max_new_tokens=config.max_new_tokens,
                                  keep_unfinished=config.keep_unfinished)
    label_store(store, labeller, inputs.out, splits=config.splits, max_rows=config.max_rows,
                progress=inputs.progress)
    return Path(inputs.out)


def _train_sft(role: str, config, inputs: SFTInputs) -> Path:
    from nlakit.train.sft import train_sft

    summary = train_sft(role, inputs.data, inputs.out, config, acts=inputs.acts,
                        overwrite=inputs.overwrite, progress=inputs.progress)
    if summary is not None:
        log.info("train %s: %s", role, json.dumps(summary, default=str))
    return Path(inputs.out)


def run_train_av(config, inputs: SFTInputs) -> Path:
    """Supervised AV (response-only cross-entropy) -> OUT/av."""
    return _train_sft("av", config, inputs)


def run_train_ar(config, inputs: SFTInputs) -> Path:
    """Supervised AR (normalised MSE) -> OUT/ar."""
    return _train_sft("ar", config, inputs)


def run_train_control(config, inputs: SFTInputs) -> Path:
    """The same AV trained on activations shuffled across rows (the eval's control) -> OUT/av."""
    return _train_sft("av", replace(config, control="shuffled"), inputs)


def run_train_rl(config, inputs: RLInputs) -> Path:
    """GRPO on the AV with the AR trained alongside -> the RL'd NLA directory."""
    from nlakit.train.rl import train_rl

    summary = train_rl(inputs.nla, inputs.acts, inputs.out, config, resume=inputs.resume,
                       overwrite=inputs.overwrite, progress=inputs.progress)
    if summary is not None:
        log.info("train rl: %s", json.dumps(summary, default=str))
    return Path(inputs.out)


def _load_nla(inputs: _ScoreInputs):
    from nlakit.nla.facade import NLA

    if inputs.nla:
        return NLA.load(inputs.nla, device=inputs.device, dtype=inputs.dtype)
    if inputs.av and inputs.ar:
        return NLA.load(av=inputs.av, ar=inputs.ar, device=inputs.device, dtype=inputs.dtype)
    raise NLAError("give --nla DIR, or --av AV_DIR and --ar AR_DIR")


def _ar_dir(inputs: _ScoreInputs) -> str:
    if not (inputs.ar or inputs.nla):
        raise NLAError("this needs --ar AR_DIR or --nla DIR")
    if inputs.ar:
        return inputs.ar
    from nlakit.nla.pretrained import resolve

    return str((resolve(inputs.nla) or Path(inputs.nla)) / "ar")


def _json_path(inputs: _ScoreInputs, default_name: str) -> Path:
    if inputs.json:
        return Path(inputs.json)
    if inputs.report:
        return Path(inputs.report).with_name(default_name)
    return Path(default_name)


def run_eval(config, inputs: EvalInputs) -> Path:
    """Held-out scores of the NLA and its baselines -> eval.json (and --report)."""
    from nlakit.eval.evaluate import ReconstructorOnly, evaluate, write_eval_json
    from nlakit.extract.store import ActivationStore
    from nlakit.nla.facade import NLA

    t0 = time.perf_counter()
    if inputs.baselines_only:
        nla = ReconstructorOnly.load(_ar_dir(inputs), device=inputs.device, dtype=inputs.dtype)
    else:
        nla = _load_nla(inputs)
    control = None
    if inputs.control:
        control = NLA.load(av=inputs.control, ar=_ar_dir(inputs), device=inputs.device,
                           dtype=inputs.dtype)
    labels = inputs.label_set if config.labels else None
    result = evaluate(nla, ActivationStore(inputs.acts), config, labels=labels,
                      control_av=control, progress=inputs.progress)
    result.data["timings_s"]["wall_including_load"] = round(time.perf_counter() - t0, 3)
    path = write_eval_json(result, _json_path(inputs, "eval.json"))
    if inputs.report:
        from nlakit.report.render import write_report

        write_report(inputs.report, eval_data=result.data, title="nlakit eval")
    return path


EXPLANATION_KINDS = {"greedy": "explanation", "best_of": "best_of_explanation"}


def reusable_explanations(eval_json: str | Path, store, config,
                          kind: str = "greedy") -> dict[int, str] | None:
    """The explanations an eval.json holds for exactly the rows this audit chooses, or None
    (other rows: the audit generates its own greedy ones) -- the same rule for the CLI and the
    pipeline. Best-of-N texts cannot be generated again the same way: missing ones are an error."""
    from nlakit.eval.scoring import select_rows

    if kind not in EXPLANATION_KINDS:
        raise NLAError(f"unknown explanations kind {kind!r}: use "
                       f"{' or '.join(EXPLANATION_KINDS)}")
    key = EXPLANATION_KINDS[kind]
    data = json.loads(Path(eval_json).read_text())
    given = {int(r["row_id"]): r[key] for r in data.get("rows", []) if r.get(key) is not None}
    wanted = select_rows(store, config.split, config.max_rows, config.seed).row_ids
    if all(int(r) in given for r in wanted):
        return given
    if kind == "best_of":
        raise NLAError(f"{eval_json} does not hold best-of-N explanations of every audited row: "
                       "run the eval with --best-of N on the same --split/--max-rows/--seed")
    log.warning("%s does not hold explanations of every audited row; the audit generates its "
                "own", eval_json)
    return None


def make_stage_paraphraser(config, device: str | None = None):
    """The audit config's paraphraser (None for ``none``); a local one runs on `device`."""
    from nlakit.eval.audit import make_paraphraser

    if config.paraphraser == "none":
        return None
    options = dict(config.paraphraser_options)
    if config.paraphraser == "local" and device is not None:
        options.setdefault("device", device)
    return make_paraphraser(config.paraphraser, **options)


def run_audit(config, inputs: AuditInputs) -> Path:
    """Reconstruction under meaning-preserving edits of the explanations -> audit.json."""
    from nlakit.eval.audit import audit
    from nlakit.extract.store import ActivationStore
    from nlakit.fileio import write_json

    t0 = time.perf_counter()
    nla = _load_nla(inputs)
    store = ActivationStore(inputs.acts)
    given = None
    if inputs.explanations and Path(inputs.explanations).is_file():
        given = reusable_explanations(inputs.explanations, store, config,
                                      inputs.explanations_kind)
    elif inputs.explanations_kind != "greedy":
        raise NLAError(f"--explanations-kind {inputs.explanations_kind} needs --explanations "
                       "EVAL_JSON (an eval run with --best-of N)")
    data = audit(nla, store, config, paraphraser=make_stage_paraphraser(config, inputs.device),
                 explanations=given, explanations_source=f"given (the {inputs.explanations_kind}"
                 " explanations of an eval result)")
    data["timings_s"]["wall_including_load"] = round(time.perf_counter() - t0, 3)
    path = _json_path(inputs, "audit.json")
    write_json(path, data)
    if inputs.report:
        from nlakit.report.render import write_report

        eval_data = json.loads(Path(inputs.eval_json).read_text()) if inputs.eval_json else None
        write_report(inputs.report, eval_data=eval_data, audit_data=data,
                     title="nlakit audit" if eval_data is None else "nlakit report")
    return path


def run_report(config, inputs: ReportInputs) -> Path:
    """HTML + Markdown report of eval/audit JSON files -> report.html (report.md beside it)."""
    from nlakit.report.render import write_report

    ev = json.loads(Path(inputs.eval).read_text()) if inputs.eval else None
    au = json.loads(Path(inputs.audit).read_text()) if inputs.audit else None
    ld = json.loads(Path(inputs.ladder).read_text()) if inputs.ladder else None
    html, _ = write_report(inputs.out, eval_data=ev, audit_data=au,
                           title=config.title or "nlakit report", ladder_data=ld,
                           ladder_png=Path(inputs.ladder).with_suffix(".png") if ld else None)
    return html


@dataclass
class NLAInputs:
    source: str = required("directory holding the final av/ and ar/ (rl/ or sft/)")
    out: str = required("the NLA directory to write")


def run_nla(config, inputs: NLAInputs) -> Path:
    """The final NLA checkpoint: hard links to the chosen av/ and ar/ (no extra disk)."""
    import shutil

    from nlakit.nla.checkpoint import write_dir_atomic

    source, out = Path(inputs.source), Path(inputs.out)

    def write(tmp: Path) -> None:
        for sub in ("av", "ar"):
            shutil.copytree(source / sub, tmp / sub, copy_function=link_or_copy)
        if (source / "nla.yaml").is_file():
            link_or_copy(source / "nla.yaml", tmp / "nla.yaml")

    write_dir_atomic(out, write)
    return out


def link_or_copy(src, dst) -> None:
    """Hard link (no extra disk for a ~1 GB checkpoint); copy across filesystems."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


__all__ = ["AuditInputs", "EvalInputs", "ExtractInputs", "LabelInputs", "NLAInputs", "RLInputs",
           "ReportInputs", "SFTInputs", "make_stage_paraphraser",
           "reusable_explanations", "run_audit", "run_eval", "run_extract", "run_label",
           "run_nla", "run_report", "run_train_ar", "run_train_av", "run_train_control",
           "run_train_rl"]
