"""`nlakit pipeline CONFIG.yaml`: every stage of an NLA run from one YAML file.

Stages, in order, each writing under ``runs/NAME/`` (NAME = the config's ``name``):

  extract   -> acts/        activation store (train/rl/heldout splits)
  label     -> labels/      warm-start labels of the SFT (and heldout) rows
  train_av  -> sft/av       supervised AV
  train_ar  -> sft/ar       supervised AR
  train_control -> control/av  the same AV trained on activations shuffled across rows (off
                            unless ``train_control: {enabled: true}``); the eval's control
  train_rl  -> rl/          GRPO on the AV, AR trained alongside (``train_rl: {enabled: false}``
                            skips it)
  nla       -> nla/         the final NLA checkpoint (hard links to rl/ or sft/)
  eval      -> eval/eval.json   held-out scores against the baselines
  audit     -> audit/audit.json robustness of the explanations to meaning-preserving edits
  report    -> report/report.html (+ report.md)

A stage is skipped when its stamp (``runs/NAME/.pipeline/STAGE.json``) holds the hash of the
same stage config and the same upstream stages; a stage without a stamp is run, and the stage's
own resume logic continues a partial output (extraction shards, label cache, SFT and RL
checkpoints). A stamp with another hash means the config changed after the stage ran: the
pipeline refuses rather than silently mixing outputs, and ``--from STAGE`` redoes that stage and
every later one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigMismatchError, NLAError
from .fileio import read_yaml, stable_hash, write_json

log = logging.getLogger(__name__)

STAGES = ("extract", "label", "train_av", "train_ar", "train_control", "train_rl", "nla",
          "eval", "audit", "report")
STAMP_DIR = ".pipeline"
TRAINING_STAGES = ("train_av", "train_ar", "train_control", "train_rl")

# Keys of each section that are not fields of the stage's config dataclass.
EXTRACT_KEYS = {"corpus": "builtin", "text_field": "text", "blocks": False, "max_docs": None,
                "max_tokens_per_doc": 1024, "positions_per_doc": 10, "min_position": 50,
                "seed": 0, "splits": None, "batch_size": 8, "shard_docs": 64}
LABEL_KEYS = {"labeller": "context", "splits": ["av_sft", "ar_sft", "heldout"],
              "max_rows": None, "options": {}}
AUDIT_EXTRA = {"enabled": True, "paraphraser": "rules", "paraphraser_options": {}}
EVAL_EXTRA = {"labels": True}
RL_EXTRA = {"enabled": True}
CONTROL_EXTRA = {"enabled": False}


@dataclass
class PipelineConfig:
    """The parsed YAML. Sections are plain dicts, validated against the stage configs."""
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
    train_ar: dict = field(default_factory=dict)
    train_control: dict = field(default_factory=dict)
    train_rl: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _check_keys(section: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise NLAError(f"config section {section!r} has unknown key(s) {unknown}; known keys: "
                       f"{', '.join(sorted(allowed))}")


def _dataclass_keys(cls) -> set[str]:
    return {f.name for f in fields(cls)}


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
    """Read and validate a pipeline YAML; every section's keys are checked before any work."""
    from .audit import AuditConfig
    from .evaluate import EvalConfig
    from .train.rl import RLConfig
    from .train.sft import SFTConfig

    path = Path(path)
    if not path.is_file():
        raise NLAError(f"pipeline config {path} does not exist (see configs/ for examples)")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise NLAError(f"{path} must hold a YAML mapping of sections")
    for assignment in overrides:
        set_value(data, assignment)
    top = _dataclass_keys(PipelineConfig)
    _check_keys("top level", data, top)
    if not re.fullmatch(r"[\w.-]+", str(data.get("name") or "")):
        raise NLAError(f"{path}: `name` must be a plain run name (letters, digits, - _ .), got "
                       f"{data.get('name')!r}; outputs go to runs/NAME/")
    for section in ("extract", "label", "train_av", "train_ar", "train_control", "train_rl",
                    "eval", "audit", "report"):
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise NLAError(f"{path}: section {section!r} must be a mapping")
    cfg = PipelineConfig(**data)
    _check_keys("extract", cfg.extract, set(EXTRACT_KEYS))
    _check_keys("label", cfg.label, set(LABEL_KEYS))
    sft_keys = _dataclass_keys(SFTConfig) - {"dtype"}
    _check_keys("train_av", cfg.train_av, sft_keys)
    _check_keys("train_ar", cfg.train_ar, sft_keys - {"control"})
    _check_keys("train_control", cfg.train_control, (sft_keys - {"control"}) | set(CONTROL_EXTRA))
    _check_keys("train_rl", cfg.train_rl, (_dataclass_keys(RLConfig) - {"dtype"}) | set(RL_EXTRA))
    _check_keys("eval", cfg.eval, _dataclass_keys(EvalConfig) | set(EVAL_EXTRA))
    _check_keys("audit", cfg.audit, _dataclass_keys(AuditConfig) | set(AUDIT_EXTRA))
    _check_keys("report", cfg.report, {"title"})
    # build each dataclass once now, so a bad value fails before hours of work
    SFTConfig(**cfg.train_av)
    SFTConfig(**cfg.train_ar)
    SFTConfig(**_control_section(cfg))
    rl = RLConfig(**_without(cfg.train_rl, RL_EXTRA))
    from .train import rewards

    if rl.reward not in rewards.REWARDS or rl.kl_estimator not in rewards.KL_ESTIMATORS:
        raise NLAError(f"train_rl: reward must be one of {', '.join(rewards.REWARDS)} and "
                       f"kl_estimator one of {', '.join(rewards.KL_ESTIMATORS)}; got "
                       f"{rl.reward!r} / {rl.kl_estimator!r}")
    EvalConfig(**_eval_config_kwargs(cfg.eval))
    AuditConfig(**_audit_config_kwargs(cfg.audit))
    if cfg.threads is not None and int(cfg.threads) < 1:
        raise NLAError(f"threads must be >= 1, got {cfg.threads}")
    return cfg


def _control_section(cfg: PipelineConfig) -> dict:
    """The control AV's SFT settings: the real AV's, overridden by train_control, shuffled."""
    return {**cfg.train_av, **_without(cfg.train_control, CONTROL_EXTRA), "control": "shuffled"}


def _without(section: dict, extra: dict) -> dict:
    return {k: v for k, v in section.items() if k not in extra}


def _eval_config_kwargs(section: dict) -> dict:
    kw = _without(section, EVAL_EXTRA)
    if "quote_tokens" in kw:
        kw["quote_tokens"] = tuple(kw["quote_tokens"])
    return kw


def _audit_config_kwargs(section: dict) -> dict:
    kw = _without(section, AUDIT_EXTRA)
    if "edits" in kw:
        kw["edits"] = tuple(kw["edits"])
    return kw


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

    # paths
    @property
    def acts(self) -> Path:
        return self.run / "acts"

    @property
    def labels(self) -> Path:
        return self.run / "labels"

    @property
    def sft(self) -> Path:
        return self.run / "sft"

    @property
    def rl(self) -> Path:
        return self.run / "rl"

    @property
    def nla(self) -> Path:
        return self.run / "nla"

    @property
    def eval_json(self) -> Path:
        return self.run / "eval" / "eval.json"

    @property
    def audit_json(self) -> Path:
        return self.run / "audit" / "audit.json"

    @property
    def report_html(self) -> Path:
        return self.run / "report" / "report.html"

    def rl_enabled(self) -> bool:
        return bool(self.cfg.train_rl.get("enabled", True))

    def control_enabled(self) -> bool:
        return bool(self.cfg.train_control.get("enabled", False))

    def disabled(self, stage: str) -> bool:
        return ((stage == "train_rl" and not self.rl_enabled())
                or (stage == "train_control" and not self.control_enabled())
                or (stage == "audit" and not self.audit_enabled()))

    def audit_enabled(self) -> bool:
        return bool(self.cfg.audit.get("enabled", True))

    def outputs(self, stage: str) -> list[Path]:
        """What a stage writes (deleted by --from STAGE)."""
        return {"extract": [self.acts], "label": [self.labels],
                "train_av": [self.sft / "av", self.sft / ".train-av"],
                "train_ar": [self.sft / "ar", self.sft / ".train-ar"],
                "train_control": [self.run / "control"],
                "train_rl": [self.rl], "nla": [self.nla], "eval": [self.eval_json.parent],
                "audit": [self.audit_json.parent], "report": [self.report_html.parent]}[stage]

    def stage_config(self, stage: str) -> dict:
        """Everything that determines a stage's output, besides its upstream stages."""
        c = self.cfg
        target = {"model": c.model, "layer": c.layer, "dtype": c.dtype}
        return {"extract": {**target, **EXTRACT_KEYS, **c.extract},
                "label": {**LABEL_KEYS, **c.label},
                "train_av": {"dtype": c.dtype, **c.train_av},
                "train_ar": {"dtype": c.dtype, **c.train_ar},
                "train_control": {"dtype": c.dtype, **_control_section(c)},
                "train_rl": {"dtype": c.dtype, **RL_EXTRA, **c.train_rl},
                "nla": {"from": "rl" if self.rl_enabled() else "sft"},
                "eval": {**EVAL_EXTRA, **c.eval},
                "audit": {**AUDIT_EXTRA, **c.audit},
                "report": {"title": c.report.get("title", f"nlakit run {c.name}")}}[stage]

    # the stages whose output each stage reads (eval also reads train_control when enabled)
    UPSTREAM = {"extract": (), "label": ("extract",), "train_av": ("label",),
                "train_ar": ("label",), "train_control": ("label",),
                "train_rl": ("train_av", "train_ar", "extract"),
                "nla": ("train_av", "train_ar", "train_rl"), "eval": ("nla", "label"),
                "audit": ("nla", "eval"), "report": ("eval", "audit")}

    def stage_hash(self, stage: str) -> str:
        if stage not in self.hashes:
            upstream = self.UPSTREAM.get(stage, ())
            if stage == "eval" and self.control_enabled():
                upstream = (*upstream, "train_control")
            ups = [self.stage_hash(u) for u in upstream]
            self.hashes[stage] = stable_hash(stage, self.stage_config(stage), ups)
        return self.hashes[stage]

    def stamp_path(self, stage: str) -> Path:
        return self.stamps / f"{stage}.json"

    def status(self, stage: str) -> str:
        """complete | changed (stamp of another config) | todo."""
        path = self.stamp_path(stage)
        if not path.is_file():
            return "todo"
        stamp = json.loads(path.read_text())
        return "complete" if stamp.get("hash") == self.stage_hash(stage) else "changed"

    def _changed_error(self, stage: str) -> ConfigMismatchError:
        stamp = json.loads(self.stamp_path(stage).read_text())
        old, new = stamp.get("config", {}), json.loads(json.dumps(self.stage_config(stage),
                                                                  default=str))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        why = (f"its settings changed ({', '.join(diff)})" if diff
               else "a stage before it was redone or changed")
        return ConfigMismatchError(
            f"stage {stage!r} of run {self.cfg.name!r} was completed with another configuration: "
            f"{why}. Run `nlakit pipeline CONFIG --from {stage}` to redo it and every later "
            f"stage, or give the config another name")

    def clear_from(self, stage: str) -> None:
        """Delete the outputs and stamps of `stage` and every later stage."""
        for s in STAGES[STAGES.index(stage):]:
            for p in self.outputs(s):
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
        main = int(os.environ.get("RANK", "0")) == 0
        if start is not None and main:
            self.clear_from(start)
        self.run.mkdir(parents=True, exist_ok=True)
        if self.cfg.threads:
            import torch

            torch.set_num_threads(int(self.cfg.threads))
        from . import __version__
        from .fileio import write_yaml

        if main:
            write_yaml(self.run / "pipeline.yaml", {"nlakit_version": __version__,
                                                   **json.loads(json.dumps(asdict(self.cfg)))})
        dist = self._distributed()
        if dist is not None:
            dist.wait_for_everyone()
        last = STAGES.index(stop) if stop else len(STAGES) - 1
        results = []
        for stage in STAGES[:last + 1]:
            results.append(self.run_stage(stage, progress))
        return results

    def _distributed(self):
        """accelerate's process state under torchrun / `accelerate launch` (None alone)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        import torch
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available())

    def run_stage(self, stage: str, progress: bool = True) -> StageResult:
        output = str(self.outputs(stage)[0] if stage not in ("eval", "audit", "report") else
                     {"eval": self.eval_json, "audit": self.audit_json,
                      "report": self.report_html}[stage])
        if self.disabled(stage):
            return StageResult(stage, "disabled", 0.0, "-")
        status = self.status(stage)
        if status == "complete":
            log.info("stage %s: complete, skipped", stage)
            return StageResult(stage, "skipped", 0.0, output)
        if status == "changed":
            raise self._changed_error(stage)
        # Under several processes the training stages run data-parallel in all of them; the
        # other stages run in the main process while the rest wait.
        dist = self._distributed()
        main = dist is None or dist.is_main_process
        if main:
            print(f"[pipeline {self.cfg.name}] stage {stage} ...", flush=True)
        t0 = time.perf_counter()
        if main or stage in TRAINING_STAGES:
            try:
                getattr(self, f"_run_{stage}")(progress and main)
            except ConfigMismatchError as e:  # a partial output of other settings
                raise ConfigMismatchError(
                    f"{e} (in the pipeline: `nlakit pipeline CONFIG --from {stage}` deletes "
                    f"that output and redoes the stage and every later one)") from e
        seconds = time.perf_counter() - t0
        if main:
            self.write_stamp(stage, seconds)
        if dist is not None:
            dist.wait_for_everyone()
        if not main:
            return StageResult(stage, "done", seconds, output)
        print(f"[pipeline {self.cfg.name}] stage {stage} done in {seconds:.0f} s -> {output}",
              flush=True)
        return StageResult(stage, "done", seconds, output)

    def _run_extract(self, progress: bool) -> None:
        from .activations import extract, parse_fractions
        from .corpus import load_corpus
        from .models import load_model

        e = {**EXTRACT_KEYS, **self.cfg.extract}
        model, tok = load_model(self.cfg.model, dtype=self.cfg.dtype, device=self.cfg.device)
        corpus = load_corpus(e["corpus"], tokenizer=tok, text_field=e["text_field"],
                             blocks=e["blocks"], max_docs=e["max_docs"], chat_model=(model, tok))
        splits = e["splits"]
        if isinstance(splits, str):
            splits = parse_fractions(splits)
        extract((model, tok), corpus, self.acts, layer=self.cfg.layer,
                positions_per_doc=e["positions_per_doc"], min_position=e["min_position"],
                seed=e["seed"], split_fractions=splits, batch_size=e["batch_size"],
                max_tokens_per_doc=e["max_tokens_per_doc"], shard_docs=e["shard_docs"])

    def _run_label(self, progress: bool) -> None:
        from .labels import label_store

        lab = {**LABEL_KEYS, **self.cfg.label}
        splits = lab["splits"]
        if isinstance(splits, str):
            splits = [s.strip() for s in splits.split(",") if s.strip()]
        options = dict(lab["options"] or {})
        if lab["labeller"] in ("local", "context"):  # their OPTIONS take dtype and device
            options.setdefault("dtype", self.cfg.dtype)
            options.setdefault("device", self.cfg.device)
        label_store(self.acts, lab["labeller"], self.labels, splits=splits,
                    max_rows=lab["max_rows"], progress=progress, **options)

    def _train_sft(self, role: str, progress: bool) -> None:
        from .train.sft import SFTConfig, train_sft

        section = self.cfg.train_av if role == "av" else self.cfg.train_ar
        cfg = SFTConfig(**{"dtype": self.cfg.dtype, **section})
        train_sft(role, self.labels, self.sft, cfg, acts=self.acts, progress=progress)

    def _run_train_av(self, progress: bool) -> None:
        self._train_sft("av", progress)

    def _run_train_ar(self, progress: bool) -> None:
        self._train_sft("ar", progress)

    def _run_train_control(self, progress: bool) -> None:
        from .train.sft import SFTConfig, train_sft

        cfg = SFTConfig(**{"dtype": self.cfg.dtype, **_control_section(self.cfg)})
        train_sft("av", self.labels, self.run / "control", cfg, acts=self.acts,
                  progress=progress)

    def _run_train_rl(self, progress: bool) -> None:
        from .train.rl import RLConfig, train_rl

        cfg = RLConfig(**{"dtype": self.cfg.dtype, **_without(self.cfg.train_rl, RL_EXTRA)})
        resume = (self.rl / ".train-rl" / "checkpoint" / "state.pt").is_file()
        if resume:
            print(f"[pipeline {self.cfg.name}] resuming RL from its checkpoint", flush=True)
        train_rl(self.sft, self.acts, self.rl, cfg, resume=resume, progress=progress)

    def _run_nla(self, progress: bool) -> None:
        from .checkpoint import write_dir_atomic

        source = self.rl if self.rl_enabled() else self.sft

        def write(tmp: Path) -> None:
            for sub in ("av", "ar"):
                shutil.copytree(source / sub, tmp / sub, copy_function=_link_or_copy)
            if (source / "nla.yaml").is_file():
                _link_or_copy(source / "nla.yaml", tmp / "nla.yaml")

        write_dir_atomic(self.nla, write)

    def _load_nla(self):
        from .nla import NLA

        return NLA.load(self.nla, device=self.cfg.device)

    def _run_eval(self, progress: bool) -> None:
        from .evaluate import EvalConfig, evaluate, write_eval_json
        from .store import ActivationStore

        section = {**EVAL_EXTRA, **self.cfg.eval}
        t0 = time.perf_counter()
        control = None
        if self.control_enabled():
            from .nla import NLA

            control = NLA.load(av=self.run / "control" / "av", ar=self.nla / "ar",
                               device=self.cfg.device)
        result = evaluate(self._load_nla(), ActivationStore(self.acts),
                          EvalConfig(**_eval_config_kwargs(section)),
                          labels=self.labels if section["labels"] else None,
                          control_av=control, progress=progress)
        result.data["timings_s"]["wall_including_load"] = round(time.perf_counter() - t0, 3)
        write_eval_json(result, self.eval_json)  # its table is printed after the last stage

    def _run_audit(self, progress: bool) -> None:
        from .audit import AuditConfig, audit, make_paraphraser
        from .audit import format_audit_table as format_table
        from .store import ActivationStore

        section = {**AUDIT_EXTRA, **self.cfg.audit}
        para = None
        if section["paraphraser"] not in (None, "none"):
            options = dict(section["paraphraser_options"] or {})
            if section["paraphraser"] == "local":
                options.setdefault("device", self.cfg.device)
            para = make_paraphraser(section["paraphraser"], **options)
        cfg = AuditConfig(**_audit_config_kwargs(section))
        # the explanations the eval already generated, when it evaluated the same rows
        from .evaluate import select_rows

        store = ActivationStore(self.acts)
        ev = json.loads(self.eval_json.read_text())
        given = {int(r["row_id"]): r["explanation"] for r in ev.get("rows", [])
                 if r.get("explanation") is not None}
        wanted = select_rows(store, cfg.split, cfg.max_rows, cfg.seed).row_ids
        if not all(int(r) in given for r in wanted):
            given = None  # other rows than the eval's: the audit generates its own
        t0 = time.perf_counter()
        data = audit(self._load_nla(), store, cfg, paraphraser=para, explanations=given)
        data["timings_s"]["wall_including_load"] = round(time.perf_counter() - t0, 3)
        write_json(self.audit_json, data)
        print(format_table(data), flush=True)

    def _run_report(self, progress: bool) -> None:
        from .report import write_report

        ev = json.loads(self.eval_json.read_text())
        au = json.loads(self.audit_json.read_text()) if (
            self.audit_enabled() and self.audit_json.is_file()) else None
        write_report(self.report_html, eval_data=ev, audit_data=au,
                     title=self.stage_config("report")["title"])

    # ---- summary ------------------------------------------------------------------------------

    def summary(self, results: list[StageResult]) -> dict:
        out: dict[str, Any] = {"name": self.cfg.name, "run_dir": str(self.run),
                               "stages": [asdict(r) for r in results]}
        if self.eval_json.is_file():
            ev = json.loads(self.eval_json.read_text())
            out["eval"] = {name: m["fve_nrm"]["mean"] for name, m in ev["methods"].items()}
            out["eval_rows"] = ev.get("n_rows")
        if self.audit_json.is_file():
            au = json.loads(self.audit_json.read_text())
            out["audit"] = {name: t.get("drop", {}).get("mean") for name, t in
                            au.get("tests", {}).items() if "drop" in t}
        return out


def _link_or_copy(src, dst) -> None:
    """Hard link (no extra disk for a ~1 GB checkpoint); copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(pipe.run / "summary.json", summary)
    return summary


def plan(config: str | Path, overrides: list[str] | tuple = ()) -> list[tuple[str, str]]:
    """(stage, status) for every stage without running anything."""
    pipe = Pipeline(load_config(config, overrides))
    out = []
    for s in STAGES:
        if pipe.disabled(s):
            out.append((s, "disabled"))
        else:
            out.append((s, pipe.status(s)))
    return out


def format_summary(summary: dict) -> str:
    lines = [f"run {summary['name']} in {summary['run_dir']} "
             f"({summary.get('seconds', 0):.0f} s this time)",
             f"{'stage':<13} {'status':<9} {'seconds':>8}  output"]
    for r in summary["stages"]:
        lines.append(f"{r['stage']:<13} {r['status']:<9} {r['seconds']:>8.0f}  {r['output']}")
    if "eval" in summary:
        lines.append(f"held-out fve_nrm ({summary.get('eval_rows')} rows): " + ", ".join(
            f"{k} {v:+.3f}" for k, v in summary["eval"].items()))
    return "\n".join(lines)


__all__ = ["STAGES", "Pipeline", "PipelineConfig", "format_summary", "load_config", "plan",
           "run_pipeline", "set_value"]
