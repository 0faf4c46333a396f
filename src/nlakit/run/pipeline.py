"""`nlakit pipeline CONFIG.yaml`: every stage of an NLA run from one YAML file.

`STAGES` below is the one place the data flow is written: each stage's name, the stages whose
output it reads, its config class (the YAML section of the same name holds exactly its fields),
its ``run`` function (`nlakit.run.stages`, the same one the CLI subcommand calls), the inputs it is
given inside a run directory, its outputs under ``runs/NAME/`` (NAME = the config's ``name``),
and when it is enabled.

A stage is skipped when its stamp (``runs/NAME/.pipeline/STAGE.json``) holds the hash of the
same stage config and the same upstream stages; a stage without a stamp is run, and the stage's
own resume logic continues a partial output (extraction shards, label cache, SFT and RL
checkpoints). A stamp with another hash means the config changed after the stage ran: the
pipeline refuses rather than silently mixing outputs, and ``--from STAGE`` redoes that stage and
every later one (an SFT stage changed only by training longer continues its checkpoint). A
change of a setting that only sets speed (`Stage.throughput`: a batch size of extraction,
labelling or label_ar: forward passes and greedy decoding, whose outputs it moves only by float
rounding) keeps the stamp.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nlakit.config import load_ref, numbers_from_text
from nlakit.errors import ConfigMismatchError, NLAError
from nlakit.fileio import read_yaml, stable_hash, write_json
from nlakit.run import stages as S

log = logging.getLogger(__name__)

STAMP_DIR = ".pipeline"
SFT_CONFIG = "nlakit.train.sft:SFTConfig"
RL_CONFIG = "nlakit.train.rl:RLConfig"


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""
    name: str
    upstream: tuple[str, ...]  # stages whose outputs this one reads
    config: str | None  # "module:Class" of the section's dataclass (imported on use)
    run: Callable  # run(config, inputs) -> output path, from nlakit.run.stages
    inputs: Callable  # (pipeline, progress) -> the run's inputs inside the run directory
    outputs: tuple[str, ...]  # paths under the run directory (the first is the result; all
    #                           are deleted by --from)
    enabled: bool | None = None  # default of the section's `enabled` key; None: always runs
    exclude: tuple[str, ...] = ()  # config fields set from the top level, not the section
    inherits: str | None = None  # a section whose settings this one starts from
    optional_upstream: tuple[str, ...] = ()  # upstream stages read only when they are enabled
    command: tuple[str, ...] | None = None  # the CLI subcommand that runs the same `run`
    inputs_class: type | None = None  # the CLI's inputs dataclass
    training: bool = False  # runs in every process under torchrun / accelerate launch
    throughput: tuple[str, ...] = ()  # settings that change speed, not output ("a.b": nested)

    def config_class(self) -> type | None:
        if self.config is None:
            return None
        return load_ref(self.config)

    def section_keys(self) -> set[str]:
        """The keys a config section of this stage may hold."""
        keys = {f.name for f in fields(self.config_class())} - set(self.exclude)
        return keys | ({"enabled"} if self.enabled is not None else set())


# ---- the inputs of each stage inside a run directory ----------------------------------------


def _extract_inputs(p: Pipeline, progress: bool) -> S.ExtractInputs:
    c = p.cfg
    return S.ExtractInputs(out=str(p.path("acts")), model=c.model, layer=c.layer, dtype=c.dtype,
                           device=c.device, progress=progress)


def _label_inputs(p: Pipeline, progress: bool) -> S.LabelInputs:
    return S.LabelInputs(acts=str(p.path("acts")), out=str(p.path("labels")), progress=progress)


def _sft_inputs(out: str):
    def inputs(p: Pipeline, progress: bool) -> S.SFTInputs:
        return S.SFTInputs(data=str(p.path("labels")), out=str(p.path(out)),
                           acts=str(p.path("acts")), progress=progress)
    return inputs


def _label_ar_inputs(p: Pipeline, progress: bool) -> S.ARLabelInputs:
    return S.ARLabelInputs(acts=str(p.path("acts")), av=str(p.path("sft/av")),
                           out=str(p.path("labels_ar")), device=p.cfg.device, progress=progress)


def _train_ar_inputs(p: Pipeline, progress: bool) -> S.SFTInputs:
    """The AR trains on the AV's explanations when label_ar is enabled, else on the labels."""
    data = "labels_ar" if p.enabled("label_ar") else "labels"
    return S.SFTInputs(data=str(p.path(data)), out=str(p.path("sft")), acts=str(p.path("acts")),
                       progress=progress)


def _rl_inputs(p: Pipeline, progress: bool) -> S.RLInputs:
    resume = (p.path("rl") / ".train-rl" / "checkpoint" / "state.pt").is_file()
    if resume:
        print(f"[pipeline {p.cfg.name}] resuming RL from its checkpoint", flush=True)
    return S.RLInputs(nla=str(p.path("sft")), acts=str(p.path("acts")), out=str(p.path("rl")),
                      resume=resume, progress=progress)


def _nla_inputs(p: Pipeline, progress: bool) -> S.NLAInputs:
    return S.NLAInputs(source=str(p.path("rl" if p.enabled("train_rl") else "sft")),
                       out=str(p.path("nla")))


def _eval_inputs(p: Pipeline, progress: bool) -> S.EvalInputs:
    control = p.enabled("train_control")
    return S.EvalInputs(acts=str(p.path("acts")), nla=str(p.path("nla")), device=p.cfg.device,
                        dtype=p.cfg.dtype, json=str(p.path("eval/eval.json")),
                        label_set=str(p.path("labels")),
                        control=str(p.path("control/av")) if control else None,
                        progress=progress)


def _audit_inputs(p: Pipeline, progress: bool) -> S.AuditInputs:
    # the explanations the eval already generated, when it evaluated the same rows
    return S.AuditInputs(acts=str(p.path("acts")), nla=str(p.path("nla")), device=p.cfg.device,
                         dtype=p.cfg.dtype, json=str(p.path("audit/audit.json")),
                         explanations=str(p.path("eval/eval.json")), progress=progress)


def _report_inputs(p: Pipeline, progress: bool) -> S.ReportInputs:
    audit = p.path("audit/audit.json")
    return S.ReportInputs(out=str(p.path("report/report.html")),
                          eval=str(p.path("eval/eval.json")),
                          audit=str(audit) if p.enabled("audit") and audit.is_file() else None)


def _extensible_settings(config_path: str | None) -> tuple[str, ...] | None:
    """The settings a training stage's checkpoint survives; None for a stage that cannot
    continue a finished run (imported lazily: the training modules load torch)."""
    if config_path == SFT_CONFIG:
        from nlakit.train.sft import EXTENSIBLE_SETTINGS
    elif config_path == RL_CONFIG:
        from nlakit.train.rl import EXTENSIBLE_SETTINGS
    else:
        return None
    return EXTENSIBLE_SETTINGS


# ---- the stage table: the only place the data flow is written -------------------------------

STAGE_TABLE: tuple[Stage, ...] = (
    Stage("extract", (), "nlakit.extract.extraction:ExtractConfig", S.run_extract, _extract_inputs,
          ("acts",), command=("extract",), inputs_class=S.ExtractInputs,
          throughput=("batch_size",)),
    Stage("label", ("extract",), "nlakit.labels:LabelConfig", S.run_label, _label_inputs,
          ("labels",), command=("label",), inputs_class=S.LabelInputs,
          throughput=("options.batch_size",)),
    Stage("train_av", ("label",), SFT_CONFIG, S.run_train_av, _sft_inputs("sft"),
          ("sft/av", "sft/.train-av"), exclude=("dtype",), command=("train", "av"),
          inputs_class=S.SFTInputs, training=True),
    Stage("label_ar", ("train_av",), "nlakit.train.label_ar:ARLabelConfig", S.run_label_ar,
          _label_ar_inputs, ("labels_ar",), enabled=False, throughput=("batch_size",)),
    Stage("train_ar", ("label",), SFT_CONFIG, S.run_train_ar, _train_ar_inputs,
          ("sft/ar", "sft/.train-ar"), exclude=("dtype", "control"), command=("train", "ar"),
          inputs_class=S.SFTInputs, training=True, optional_upstream=("label_ar",)),
    Stage("train_control", ("label",), SFT_CONFIG, S.run_train_control, _sft_inputs("control"),
          ("control",), enabled=False, exclude=("dtype", "control"), inherits="train_av",
          command=("train", "control"), inputs_class=S.SFTInputs, training=True),
    Stage("train_rl", ("train_av", "train_ar", "extract"), RL_CONFIG,
          S.run_train_rl, _rl_inputs, ("rl",), enabled=True, exclude=("dtype",),
          command=("train", "rl"), inputs_class=S.RLInputs, training=True),
    Stage("nla", ("train_av", "train_ar", "train_rl"), None, S.run_nla, _nla_inputs, ("nla",)),
    Stage("eval", ("nla", "label"), "nlakit.eval.evaluate:EvalConfig", S.run_eval, _eval_inputs,
          ("eval/eval.json", "eval"), optional_upstream=("train_control",), command=("eval",),
          inputs_class=S.EvalInputs),
    Stage("audit", ("nla", "eval"), "nlakit.eval.audit:AuditConfig", S.run_audit, _audit_inputs,
          ("audit/audit.json", "audit"), enabled=True, command=("audit",),
          inputs_class=S.AuditInputs),
    Stage("report", ("eval", "audit"), "nlakit.report.render:ReportConfig", S.run_report,
          _report_inputs, ("report/report.html", "report"), command=("report",),
          inputs_class=S.ReportInputs),
)
BY_NAME = {s.name: s for s in STAGE_TABLE}
STAGES = tuple(BY_NAME)
TRAINING_STAGES = tuple(s.name for s in STAGE_TABLE if s.training)
SECTIONS = tuple(s.name for s in STAGE_TABLE if s.config is not None)


def stage_config(stage: str | Stage, section: dict, overrides: dict | None = None) -> Any:
    """The stage's config dataclass from a section mapping (an unknown key is an error; the
    ``enabled`` switch is not part of the config) and `overrides` (the CLI's flags, the
    pipeline's top-level dtype). The pipeline and every CLI subcommand build configs here."""
    st = BY_NAME[stage] if isinstance(stage, str) else stage
    _check_keys(st.name, section, st.section_keys())
    cls = st.config_class()
    values = numbers_from_text(cls, {k: v for k, v in section.items() if k != "enabled"},
                               st.name)
    values.update(overrides or {})
    try:
        return cls(**values)
    except TypeError as e:  # a field the dataclass does not have
        raise NLAError(f"stage {st.name}: {e}") from None


def _default(f):
    from dataclasses import MISSING

    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass
class PipelineConfig:
    """The parsed YAML: top-level settings and one mapping per stage section."""
    name: str
    model: str = "smollm2-135m"
    layer: int | None = None
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None  # torch intra-op threads (1 per job when jobs share the cores)
    runs_dir: str = "runs"
    extract: dict = field(default_factory=dict)
    label: dict = field(default_factory=dict)
    train_av: dict = field(default_factory=dict)
    label_ar: dict = field(default_factory=dict)
    train_ar: dict = field(default_factory=dict)
    train_control: dict = field(default_factory=dict)
    train_rl: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _without(config: dict, paths: tuple[str, ...]) -> dict:
    """A copy of `config` without the settings at `paths` ("a.b" names a nested key)."""
    out = copy.deepcopy(config)
    for path in paths:
        *parents, key = path.split(".")
        node = out
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return out


def _check_keys(section: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise NLAError(f"config section {section!r} has unknown key(s) {unknown}; known keys: "
                       f"{', '.join(sorted(allowed))}")


def set_value(data: dict, assignment: str) -> None:
    """Apply one ``--set a.b=value`` override (value parsed as YAML) to the raw config dict."""
    if "=" not in assignment:
        raise NLAError(f"--set expects KEY=VALUE (e.g. train_rl.max_steps=2), got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise NLAError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> PipelineConfig:
    """Read and validate a pipeline YAML; every section's config is built before any work."""
    path = Path(path)
    if not path.is_file():
        raise NLAError(f"pipeline config {path} does not exist (see configs/ for examples)")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise NLAError(f"{path} must hold a YAML mapping of sections")
    for assignment in overrides:
        set_value(data, assignment)
    _check_keys("top level", data, {f.name for f in fields(PipelineConfig)})
    if not re.fullmatch(r"[\w.-]+", str(data.get("name") or "")):
        raise NLAError(f"{path}: `name` must be a plain run name (letters, digits, - _ .), got "
                       f"{data.get('name')!r}; outputs go to runs/NAME/")
    for section in SECTIONS:
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise NLAError(f"{path}: section {section!r} must be a mapping")
    cfg = PipelineConfig(**data)
    if cfg.threads is not None and int(cfg.threads) < 1:
        raise NLAError(f"threads must be >= 1, got {cfg.threads}")
    pipe = Pipeline(cfg)
    for stage in SECTIONS:  # build each config once now, so a bad value fails before hours of work
        pipe.config(stage)
    return cfg


# ---- stage bookkeeping ------------------------------------------------------------------------


@dataclass
class StageResult:
    stage: str
    status: str  # done (ran now) | skipped (complete) | disabled
    seconds: float
    output: str


class Pipeline:
    """Runs the stages of one config; see the module docstring for the rules."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.run = cfg.run_dir
        self.stamps = self.run / STAMP_DIR
        self.hashes: dict[str, str] = {}

    def path(self, relative: str) -> Path:
        return self.run / relative

    def section(self, stage: str) -> dict:
        """The stage's section as written (a section that inherits starts from its parent's);
        a deep copy, so that filling in a config's defaults never edits what is hashed."""
        st = BY_NAME[stage]
        own = copy.deepcopy(getattr(self.cfg, stage, None) or {})
        if st.inherits:
            return {**copy.deepcopy(getattr(self.cfg, st.inherits)), **own}
        return own

    def enabled(self, stage: str) -> bool:
        st = BY_NAME[stage]
        return st.enabled is None or bool(
            (getattr(self.cfg, stage, None) or {}).get("enabled", st.enabled))

    def config(self, stage: str) -> Any:
        """The stage's config dataclass (None for the config-less nla stage)."""
        st = BY_NAME[stage]
        if st.config is None:
            return None
        section = self.section(stage)
        if st.inherits:  # the parent's keys, checked against the parent's section
            section = {k: v for k, v in section.items() if k not in st.exclude}
        top = {k: getattr(self.cfg, k) for k in st.exclude if hasattr(self.cfg, k)}
        cfg = stage_config(st, section, top)
        if stage == "label":
            self._label_defaults(cfg)
        if stage == "report" and cfg.title is None:
            cfg.title = f"nlakit run {self.cfg.name}"
        return cfg

    def _label_defaults(self, cfg) -> None:
        """A labeller that runs a model gets the run's dtype and device unless its options say."""
        from nlakit.labels import get_labeller_class

        takes = get_labeller_class(cfg.labeller).OPTIONS or ()
        for key in ("dtype", "device"):
            if key in takes:
                cfg.options.setdefault(key, getattr(self.cfg, key))

    def stage_config(self, stage: str) -> dict:
        """Everything that determines a stage's output besides its upstream stages, in the
        form nlakit 0.1 stamped it (so the stamps of older run directories still match)."""
        c = self.cfg
        section = self.section(stage)
        cls = BY_NAME[stage].config_class()
        defaults = ({f.name: _default(f) for f in fields(cls) if f.name not in ("dtype",)}
                    if cls else {})
        extra = {"enabled": BY_NAME[stage].enabled} if BY_NAME[stage].enabled else {}
        return {"extract": lambda: {"model": c.model, "layer": c.layer, "dtype": c.dtype,
                                    **defaults, **section},
                "label": lambda: {**defaults, **section},
                "train_av": lambda: {"dtype": c.dtype, **section},
                "label_ar": lambda: {**defaults, **section},
                "train_ar": lambda: {"dtype": c.dtype, **section},
                "train_control": lambda: {
                    "dtype": c.dtype, **{k: v for k, v in section.items() if k != "enabled"},
                    "control": "shuffled"},
                "train_rl": lambda: {"dtype": c.dtype, **extra, **section},
                "nla": lambda: {"from": "rl" if self.enabled("train_rl") else "sft"},
                "eval": lambda: {"labels": True, **section},
                "audit": lambda: {**extra, "paraphraser": "rules", "paraphraser_options": {},
                                  **section},
                "report": lambda: {"title": section.get("title", f"nlakit run {c.name}")},
                }[stage]()

    def stage_hash(self, stage: str) -> str:
        if stage not in self.hashes:
            st = BY_NAME[stage]
            upstream = st.upstream + tuple(u for u in st.optional_upstream if self.enabled(u))
            ups = [self.stage_hash(u) for u in upstream]
            config = self.stage_config(stage)
            self.hashes[stage] = (self._stamp_if_only_throughput_changed(stage, config, ups)
                                  or stable_hash(stage, config, ups))
        return self.hashes[stage]

    def _stamp_if_only_throughput_changed(self, stage: str, config: dict,
                                          ups: list[str]) -> str | None:
        """The stamp's hash when the stage ran with these upstreams and a config that differs
        only in settings that change its speed, not its output (`Stage.throughput`, e.g. a
        batch size): the stage stays complete, and so do the stages after it."""
        paths = BY_NAME[stage].throughput
        if not paths or not self.stamp_path(stage).is_file():
            return None
        stamp = json.loads(self.stamp_path(stage).read_text())
        old = stamp.get("config", {})
        new = json.loads(json.dumps(config, default=str))
        if old == new or _without(old, paths) != _without(new, paths) \
                or stable_hash(stage, old, ups) != stamp.get("hash"):
            return None
        log.info("stage %s: only throughput settings changed (%s); its output stands",
                 stage, ", ".join(paths))
        return stamp["hash"]

    def stamp_path(self, stage: str) -> Path:
        return self.stamps / f"{stage}.json"

    def status(self, stage: str) -> str:
        """complete | changed (stamp of another config) | todo."""
        path = self.stamp_path(stage)
        if not path.is_file():
            return "todo"
        stamp = json.loads(path.read_text())
        return "complete" if stamp.get("hash") == self.stage_hash(stage) else "changed"

    def _stamp_change(self, stage: str) -> tuple[dict, dict, list[str]]:
        """(stamped config, current config, the keys that differ) of a stamped stage."""
        stamp = json.loads(self.stamp_path(stage).read_text())
        old, new = stamp.get("config", {}), json.loads(json.dumps(self.stage_config(stage),
                                                                  default=str))
        return old, new, sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

    def extends(self, stage: str) -> bool:
        """Whether a stamped training stage changed only by training longer on the same
        trajectory (a larger max_steps, or settings its checkpoint survives: for SFT also
        evaluation, checkpoint or decoding ones) with its upstream stages unchanged: its
        checkpoint can then continue instead of restarting."""
        extensible = _extensible_settings(BY_NAME[stage].config)
        if extensible is None or not self.stamp_path(stage).is_file():
            return False
        old, new, diff = self._stamp_change(stage)
        st = BY_NAME[stage]
        ups = [self.stage_hash(u) for u in
               st.upstream + tuple(u for u in st.optional_upstream if self.enabled(u))]
        stamp_hash = json.loads(self.stamp_path(stage).read_text()).get("hash")
        if not diff or not set(diff) <= set(extensible) \
                or stable_hash(stage, old, ups) != stamp_hash:
            return False
        before, after = old.get("max_steps"), new.get("max_steps")
        return before == after or (isinstance(before, int) and isinstance(after, int)
                                   and after > before)

    def _changed_error(self, stage: str) -> ConfigMismatchError:
        old, new, diff = self._stamp_change(stage)
        why = (f"its settings changed ({', '.join(diff)})" if diff
               else "a stage before it was redone or changed")
        how = (f"`nlakit pipeline CONFIG --from {stage}` continues its training from its "
               f"checkpoint (max_steps {old.get('max_steps')} -> {new.get('max_steps')}) and "
               "redoes every later stage" if self.extends(stage) else
               f"Run `nlakit pipeline CONFIG --from {stage}` to redo it and every later stage")
        return ConfigMismatchError(
            f"stage {stage!r} of run {self.cfg.name!r} was completed with another configuration: "
            f"{why}. {how}, or give the config another name")

    def clear_from(self, stage: str) -> None:
        """Delete the outputs and stamps of `stage` and every later stage; a stage that only
        trains longer (`extends`) keeps its checkpoint and continues from it."""
        if self.extends(stage):
            log.info("stage %s: continuing its training from its checkpoint", stage)
            self.stamp_path(stage).unlink()
            stage = STAGES[STAGES.index(stage) + 1]
        for s in STAGES[STAGES.index(stage):]:
            for p in BY_NAME[s].outputs:
                p = self.path(p)
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            self.stamp_path(s).unlink(missing_ok=True)

    def write_stamp(self, stage: str, seconds: float) -> None:
        write_json(self.stamp_path(stage), {
            "stage": stage, "hash": self.stage_hash(stage),
            "config": json.loads(json.dumps(self.stage_config(stage), default=str)),
            "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    # ---- running ----------------------------------------------------------------------------

    def run_all(self, *, start: str | None = None, stop: str | None = None,
                progress: bool = True) -> list[StageResult]:
        for s in (start, stop):
            if s is not None and s not in STAGES:
                raise NLAError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
        from nlakit.train.common import process_state

        state = process_state()  # under torchrun / accelerate launch: forms the process group
        main = state.is_main_process
        if start is not None and main:
            self.clear_from(start)
        self.run.mkdir(parents=True, exist_ok=True)
        if self.cfg.threads:
            import torch

            torch.set_num_threads(int(self.cfg.threads))
        from nlakit import __version__
        from nlakit.fileio import write_yaml

        if main:
            write_yaml(self.run / "pipeline.yaml", {"nlakit_version": __version__,
                                                   **json.loads(json.dumps(asdict(self.cfg)))})
        state.wait_for_everyone()
        last = STAGES.index(stop) if stop else len(STAGES) - 1
        return [self.run_stage(stage, progress) for stage in STAGES[:last + 1]]

    def run_stage(self, stage: str, progress: bool = True) -> StageResult:
        st = BY_NAME[stage]
        output = str(self.path(st.outputs[0]))
        if not self.enabled(stage):
            return StageResult(stage, "disabled", 0.0, "-")
        status = self.status(stage)
        if status == "complete":
            log.info("stage %s: complete, skipped", stage)
            return StageResult(stage, "skipped", 0.0, output)
        if status == "changed":
            raise self._changed_error(stage)
        # Under several processes the training stages run data-parallel in all of them; the
        # other stages run in the main process while the rest wait.
        from nlakit.train.common import process_state

        state = process_state()
        main = state.is_main_process
        if main:
            print(f"[pipeline {self.cfg.name}] stage {stage} ...", flush=True)
        t0 = time.perf_counter()
        if main or st.training:
            try:
                st.run(self.config(stage), st.inputs(self, progress and main))
            except ConfigMismatchError as e:  # a partial output of other settings
                raise ConfigMismatchError(
                    f"{e} (in the pipeline: `nlakit pipeline CONFIG --from {stage}` deletes "
                    f"that output and redoes the stage and every later one)") from e
        seconds = time.perf_counter() - t0
        if main:
            self.write_stamp(stage, seconds)
        state.wait_for_everyone()
        if main:
            print(f"[pipeline {self.cfg.name}] stage {stage} done in {seconds:.0f} s -> "
                  f"{output}", flush=True)
        return StageResult(stage, "done", seconds, output)

    # ---- summary ------------------------------------------------------------------------------

    def summary(self, results: list[StageResult]) -> dict:
        out: dict[str, Any] = {"name": self.cfg.name, "run_dir": str(self.run),
                               "stages": [asdict(r) for r in results]}
        eval_json, audit_json = self.path("eval/eval.json"), self.path("audit/audit.json")
        if eval_json.is_file():
            ev = json.loads(eval_json.read_text())
            out["eval"] = {name: m["fve_nrm"]["mean"] for name, m in ev["methods"].items()}
            out["eval_rows"] = ev.get("n_rows")
        if audit_json.is_file():
            au = json.loads(audit_json.read_text())
            out["audit"] = {name: t.get("drop", {}).get("mean") for name, t in
                            au.get("tests", {}).items() if "drop" in t}
        return out


def run_pipeline(config: str | Path | PipelineConfig, *, overrides: list[str] | tuple = (),
                 start: str | None = None, stop: str | None = None,
                 progress: bool = True) -> dict:
    """Load the config (unless given) and run its stages; returns the summary dict, also
    written to runs/NAME/summary.json."""
    cfg = config if isinstance(config, PipelineConfig) else load_config(config, overrides)
    pipe = Pipeline(copy.deepcopy(cfg))
    t0 = time.perf_counter()
    results = pipe.run_all(start=start, stop=stop, progress=progress)
    summary = pipe.summary(results)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    from nlakit.train.common import process_state

    if process_state().is_main_process:
        write_json(pipe.run / "summary.json", summary)
    return summary


def plan(config: str | Path, overrides: list[str] | tuple = ()) -> list[tuple[str, str]]:
    """(stage, status) for every stage without running anything."""
    pipe = Pipeline(load_config(config, overrides))

    def status(s: str) -> str:
        st = pipe.status(s)
        return "extends" if st == "changed" and pipe.extends(s) else st

    return [(s, status(s) if pipe.enabled(s) else "disabled") for s in STAGES]




__all__ = ["STAGES", "STAGE_TABLE", "Pipeline", "PipelineConfig", "Stage",
           "load_config", "plan", "run_pipeline", "set_value",
           "stage_config"]
