"""The `nlakit` command: parses arguments and calls the library; no logic of its own.

The stage subcommands (extract, label, train av|ar|control|rl, eval, audit, report) are
generated from the stage table (`nlakit.run.pipeline.STAGE_TABLE`): a flag for every field of the
stage's config dataclass and of its inputs dataclass, each help showing the real default, and
``--config FILE.yaml`` holding the keys of the pipeline section of the same name (flags
override it). A flag that does not belong to a subcommand is an error (argparse's).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from nlakit.config import hint_kinds, load_ref
from nlakit.errors import NLAError

# options dataclasses whose fields are flags of a subcommand and fill one mapping of its config:
# stage -> (config field, "module:Class", flag prefix)
OPTION_GROUPS = {"label": ("options", "nlakit.labels:LabellerOptions", ""),
                 "audit": ("paraphraser_options", "nlakit.eval.audit:ParaphraserOptions",
                           "paraphraser-")}
# shorthand switches: subcommand words -> {flag: (config field, value, help)}
_FULL = {"full": ("lora_rank", 0, "full fine-tuning instead of LoRA (= --lora-rank 0)")}
SHORTHANDS = {
    ("train", "av"): _FULL, ("train", "ar"): _FULL, ("train", "control"): _FULL,
    ("train", "rl"): {**_FULL,
                      "ar-full": ("ar_lora_rank", 0, "full fine-tuning of the AR body "
                                                     "(= --ar-lora-rank 0)"),
                      "no-failure-penalty": ("failure_reward", None, "do not replace the "
                                             "reward of failed samples (= --failure-reward "
                                             "none)")},
}
STAGE_HELP = {
    "extract": "store block-K activations of a model over a corpus",
    "label": "warm-start labels for SFT rows (local model, OpenAI-compatible API, or grounded "
             "context labels)",
    "train_av": "supervised warm start of the AV", "train_ar": "supervised warm start of the AR",
    "train_control": "the control AV: the AV trained on activations shuffled across rows",
    "train_rl": "RL (GRPO) of an NLA: the AV as policy, the AR trained alongside",
    "eval": "score an NLA against baselines with document-level CIs",
    "audit": "robustness of reconstruction under meaning-preserving edits of the explanations",
    "report": "HTML + Markdown report from eval/audit JSON files",
}
_NONE = ("none", "null")


# ---- flags generated from dataclass fields ----------------------------------------------------


def _converter(hint):
    """argparse `type` for a field: scalars parsed, 'none' for an optional field, a mapping as
    YAML; tuples and lists stay the comma-separated string the config parses itself."""
    kinds, optional = hint_kinds(hint)

    def convert(text: str):
        if optional and text.lower() in _NONE:
            return None
        if dict in kinds and str not in kinds:
            import yaml

            value = yaml.safe_load(text)
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a YAML mapping, got {text!r}")
            return value
        for kind in (int, float):
            if kind in kinds and not kinds & {str, tuple, list}:
                try:
                    return kind(text)
                except ValueError:
                    raise argparse.ArgumentTypeError(
                        f"expected {kind.__name__}{' or none' if optional else ''}, got "
                        f"{text!r}") from None
        return text
    convert.__name__ = "value"
    return convert


def _default_text(f) -> str:
    if f.metadata.get("required"):
        return "required"
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return f"default: {value}"


def add_dataclass_flags(parser, cls, group: str, *, exclude=(), prefix: str = "",
                        show_default: bool = True) -> None:
    """A flag for every field of `cls` (but `exclude`): ``--PREFIX-NAME``; parsed values land in
    the namespace as ``GROUP:NAME`` and only when given (so a --config file can fill the rest).
    show_default=False for options whose default is the component's own (named in the help)."""
    hints = typing.get_type_hints(cls)
    box = parser.add_argument_group(f"{cls.__name__} ({group})")
    for f in fields(cls):
        if f.name in exclude or f.name.startswith("_"):
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if show_default or f.metadata.get("required"):
            help_text = f"{help_text} ({_default_text(f)})".strip()
        kinds, _ = hint_kinds(hints[f.name])
        kw = {"dest": f"{group}:{f.name}", "help": help_text.replace("%", "%%"),
              "default": argparse.SUPPRESS}
        if kinds == {bool} and f.name.startswith("no_"):  # a negative switch: no --no-no-
            box.add_argument(flag, action="store_const", const=True, **kw)
        elif kinds == {bool}:
            box.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            box.add_argument(flag, type=_converter(hints[f.name]), metavar="X",
                             required=bool(f.metadata.get("required")), **kw)


def _given(args, group: str) -> dict:
    return {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith(group + ":")}


# ---- the stage subcommands ---------------------------------------------------------------------


def _add_stage_parser(sub, stage, words: tuple[str, ...], full: bool) -> None:
    p = sub.add_parser(words[-1], help=STAGE_HELP.get(stage.name), allow_abbrev=False,
                       description=STAGE_HELP.get(stage.name))
    p.set_defaults(func=cmd_stage, stage=stage.name)
    if not full:  # only the subcommand being run builds its flags (they import its modules)
        return
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help=f"YAML with the keys of the pipeline's `{stage.name}` section; flags "
                        "override it")
    top = {"dtype"}  # set at the pipeline's top level, a flag here
    add_dataclass_flags(p, stage.config_class(), "config",
                        exclude=set(stage.exclude) - top | set(_option_field(stage.name)))
    add_dataclass_flags(p, stage.inputs_class, "inputs")
    if stage.name in OPTION_GROUPS:
        _, ref, prefix = OPTION_GROUPS[stage.name]
        add_dataclass_flags(p, load_ref(ref), "options", prefix=prefix, show_default=False)
    for flag, (_, _, help_text) in SHORTHANDS.get(words, {}).items():
        p.add_argument("--" + flag, action="store_true", dest=f"shorthand:{flag}",
                       help=help_text)


def _option_field(stage: str) -> tuple[str, ...]:
    return (OPTION_GROUPS[stage][0],) if stage in OPTION_GROUPS else ()


def stage_from_args(args):
    """(stage, config, inputs) of a parsed stage subcommand: the --config section, then the
    flags, built into the stage's dataclasses exactly as the pipeline builds them."""
    from nlakit.fileio import read_yaml
    from nlakit.run.pipeline import BY_NAME, stage_config

    stage = BY_NAME[args.stage]
    section = {}
    if args.config:
        if not Path(args.config).is_file():
            raise NLAError(f"--config {args.config} does not exist")
        section = read_yaml(args.config) or {}
        if not isinstance(section, dict):
            raise NLAError(f"--config {args.config} must hold a mapping (the keys of the "
                           f"pipeline's `{stage.name}` section)")
    overrides = _given(args, "config")
    if stage.name in OPTION_GROUPS:
        name = OPTION_GROUPS[stage.name][0]
        overrides[name] = {**(section.get(name) or {}), **_given(args, "options")}
    for flag, (name, value, _) in SHORTHANDS.get(stage.command, {}).items():
        if getattr(args, f"shorthand:{flag}", False):
            overrides[name] = value
    config = stage_config(stage, section, overrides)
    return stage, config, stage.inputs_class(**_given(args, "inputs"))


def cmd_stage(args) -> int:
    stage, config, inputs = stage_from_args(args)
    out = stage.run(config, inputs)
    PRINTERS[stage.name](out, inputs)
    return 0


# ---- what each stage subcommand prints ---------------------------------------------------------


def _print_store(path, inputs=None) -> None:
    from nlakit.extract.store import ActivationStore

    meta = ActivationStore(path).meta
    counts, stats = meta["counts"], meta["stats"]["all"]
    print(f"store      {path}")
    print(f"model      {meta['model'].get('spec')}  layer {meta['layer']} of "
          f"{meta['num_layers']}  d_model {meta['d_model']}")
    print(f"documents  {counts['docs']} read, {counts['docs_short']} too short "
          f"(< min_position + 1 tokens), {counts['tokens']} tokens")
    print("rows       " + ", ".join(f"{k} {v}" for k, v in counts["rows_per_split"].items())
          + f"  (total {counts['rows']})")
    pct = stats["norm_percentiles"]
    print(f"norms      mean {stats['mean_norm']:.2f}  p5 {pct['p5']:.2f}  p50 {pct['p50']:.2f}"
          f"  p95 {pct['p95']:.2f}  max {stats['max_norm']:.2f}")
    print(f"baselines  ||E g_hat|| {stats['mean_unit_direction_norm']:.4f}  rawvar "
          f"{stats['rawvar']:.4f}  meannorm {stats['meannorm']:.4f}  mean-direction fve_nrm "
          f"{stats['mean_direction_fve_nrm']:.4f}  (all {stats['n']} rows)")


def _print_labels(path, inputs) -> None:
    from nlakit.labels import LabelSet

    meta = LabelSet(path).meta
    counts = meta["counts"]
    print(f"labels     {path}")
    print(f"labeller   {meta['labeller']['kind']}  "
          f"{meta['labeller'].get('model') or meta['labeller'].get('api_model')}  "
          f"prompt {meta['labeller']['prompt_version']}")
    print(f"rows       {counts['rows']} ({', '.join(meta['splits'])}): kept {counts['kept']}, "
          f"dropped {counts['dropped']} {counts['dropped_by_reason'] or ''}")
    print(f"cache      {counts['from_cache']} from cache, {counts['labelled_now']} labelled now"
          + (f" at {meta['labelling_rows_per_s']} rows/s" if meta["labelling_rows_per_s"]
             else ""))


def _print_train(role: str):
    def show(path, inputs) -> None:  # the run's summary.json, once under torchrun
        from nlakit.train.common import process_state

        summary = Path(path) / f".train-{role}" / "summary.json"
        if process_state().is_main_process and summary.is_file():
            print(summary.read_text().strip())
    return show


def _print_scores(table: str):
    def show(path, inputs) -> None:
        data = json.loads(Path(path).read_text())
        from nlakit.report.tables import format_audit_table, format_eval_table

        print((format_eval_table if table == "eval" else format_audit_table)(data))
        print(f"wrote {path}")
        if inputs.report:
            print(f"wrote {inputs.report} and {Path(inputs.report).with_suffix('.md')}")
    return show


def _print_report(path, inputs) -> None:
    print(f"wrote {path} and {Path(path).with_suffix('.md')}")


PRINTERS = {"extract": _print_store, "label": _print_labels, "train_av": _print_train("av"),
            "train_ar": _print_train("ar"), "train_control": _print_train("av"),
            "train_rl": _print_train("rl"), "eval": _print_scores("eval"),
            "audit": _print_scores("audit"), "report": _print_report}


# ---- the other commands ------------------------------------------------------------------------


def cmd_info(args) -> int:
    from nlakit.extract.store import ActivationStore

    store = ActivationStore(args.path)
    if args.json:
        print(json.dumps(store.meta, indent=2, default=str))
    else:
        _print_store(store.path)
    return 0


def cmd_corpus_export(args) -> int:
    from nlakit.corpus.load import check_export_path, export_jsonl, load_corpus
    from nlakit.model.load import load_model

    check_export_path(args.out)  # before loading the model
    model, tok = load_model(args.model)  # its chat template renders the chat transcripts
    corpus = load_corpus(args.corpus, tokenizer=tok, text_field=args.text_field,
                         max_docs=args.max_docs, chat_model=(model, tok))
    done = export_jsonl(corpus, args.out)
    print(f"wrote {done['docs']} documents to {done['path']} (sha256 {done['sha256']}); "
          f"train on them with --corpus {done['path']}")
    return 0


def cmd_shipped(args) -> int:
    from nlakit.nla.pretrained import describe, shipped_names

    names = [args.name] if args.name else shipped_names()
    if not names:
        print("no NLA ships with this installation")
    for name in names:
        print(describe(name))
    return 0


def cmd_explain(args) -> int:
    from nlakit.nla.facade import NLA
    from nlakit.nla.hedge import check_hedge

    nla = NLA.load(args.nla, device=args.device) if args.nla else NLA.load(
        av=args.av, ar=args.ar, device=args.device)
    if args.hedge is not None:
        nla.av.hedge = check_hedge(args.hedge, "--hedge")
    rows = nla.explain_text(args.text, args.positions, best_of=args.best_of,
                            max_new_tokens=args.max_new_tokens, verify=args.verify)
    if args.json:
        for r in rows:  # JSON has no NaN: a verdict of no claim is null
            r.claims = r.claims and {k: None if v != v else v for k, v in r.claims.items()}
        print(json.dumps([{k: v for k, v in vars(r).items() if k != "reconstruction"}
                          for r in rows], indent=2, ensure_ascii=False, allow_nan=False))
        return 0
    print(f"{'pos':>4}  {'token':<14} {'fve_nrm':>7} {'cos':>6}  explanation")
    for r in rows:
        flag = "" if r.complete else " [unfinished]"
        text = " ".join(r.explanation.split())
        print(f"{r.position:>4}  {r.token!r:<14} {r.fve_nrm:>7.3f} {r.cos:>6.3f}  {text}{flag}")
        if r.verification:
            print("\n".join(f"{'':>6}{line}" for line in r.verification.splitlines()))
        elif args.verify:
            print(f"{'':>6}(no checkable claim)")
    print(f"(fve_nrm denominator: rawvar {nla.dataset_stats.get('rawvar', float('nan')):.4f} "
          "of the training store)")
    return 0


def cmd_export(args) -> int:
    from nlakit.nla.facade import NLA

    nla = NLA.load(args.nla)
    path = nla.save(args.out, layout=args.layout)
    print(f"wrote {path / 'av'} and {path / 'ar'} ({args.layout} layout)")
    return 0


def cmd_pipeline(args) -> int:
    from nlakit.report.tables import format_eval_table, format_pipeline_summary
    from nlakit.run.pipeline import plan, run_pipeline

    if args.plan:
        for stage, status in plan(args.config, args.set):
            print(f"{stage:<13} {status}")
        return 0
    summary = run_pipeline(args.config, overrides=args.set, start=args.start, stop=args.stop,
                           progress=not args.no_progress)
    from nlakit.train.common import process_state

    if process_state().is_main_process:  # one summary under torchrun / accelerate launch
        eval_json = Path(summary["run_dir"]) / "eval" / "eval.json"
        if eval_json.is_file():
            print("\nheld-out evaluation (" + str(eval_json) + "):")
            print(format_eval_table(json.loads(eval_json.read_text())))
        print()
        print(format_pipeline_summary(summary))
    return 0


def cmd_plot(args) -> int:
    from nlakit.report.plots import plot_log

    drawn = plot_log(args.log, args.out, title=args.title)
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


def cmd_table_command(args) -> int:
    """A row of the command table: its config from --config FILE.yaml and the flags, its
    inputs from the flags, then run and show."""
    from nlakit.config import build_config, read_config_file
    from nlakit.run.commands import BY_COMMAND

    command = BY_COMMAND[args.table_command]
    section = read_config_file(args.config, command.name)
    config = build_config(command.config_class(), section, command.name, _given(args, "config"))
    inputs_class = command.inputs_class()
    inputs = inputs_class(**_given(args, "inputs")) if inputs_class else None
    command.show(command.run(config, inputs), config, inputs)
    return 0


def _add_other_commands(sub) -> None:
    p = sub.add_parser("info", help="summarise an activation store")
    p.add_argument("path", help="an activation store directory")
    p.add_argument("--json", action="store_true", help="print the whole meta.yaml as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("explain", help="explain tokens of a text with a trained NLA")
    p.add_argument("text", help="the text whose tokens to explain")
    p.add_argument("--nla", default=None, help="NLA directory (holding av/ and ar/)")
    p.add_argument("--av", default=None, help="AV directory (official layout)")
    p.add_argument("--ar", default=None, help="AR directory (official layout)")
    p.add_argument("--positions", default="last", help="last, all, or indices like 3,7,-1")
    p.add_argument("--best-of", type=int, default=1,
                   help="sample N explanations per token and keep the AR's favourite")
    p.add_argument("--max-new-tokens", type=int, default=150, help="explanation length cap")
    p.add_argument("--hedge", type=float, default=None,
                   help="leave out the claims the AV wrote with less confidence than this "
                        "probability (default: the NLA's own decoding.hedge, 0 keeps all)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (None: a GPU if any)")
    p.add_argument("--verify", action="store_true",
                   help="check each claim against the text and the target's real next-token "
                        "distribution, and mark it (✓ true, ✗ false, a share for partly true)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("corpus-export", help="write a corpus (e.g. builtin, which depends on "
                                             "this Python's stdlib) to JSONL, ids kept")
    p.add_argument("corpus", help="a corpus spec, as extract's --corpus (builtin, a folder, ...)")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--model", default="smollm2-135m",
                   help="the target whose chat template renders chat transcripts (and which "
                        "writes the built-in ones)")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--text-field", default="text", help="text field of a jsonl/parquet corpus")
    p.set_defaults(func=cmd_corpus_export)

    p = sub.add_parser("shipped", help="the NLAs shipped in the package (load with --nla NAME)"
                                       ": their files checked, provenance and eval table")
    p.add_argument("name", nargs="?", default=None, help="one shipped NLA (default: list all)")
    p.set_defaults(func=cmd_shipped)

    p = sub.add_parser("export", help="write an NLA in the official two-directory layout")
    p.add_argument("--nla", required=True, help="NLA directory or shipped name")
    p.add_argument("--out", required=True, help="output directory (gets av/ and ar/)")
    p.add_argument("--layout", choices=["official", "nlakit"], default="official")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pipeline", help="run every stage (extract -> label -> train av/ar/rl "
                                        "-> eval -> audit -> report) from one YAML config")
    p.add_argument("config", help="pipeline YAML (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train_rl.max_steps=2 (repeatable)")
    p.add_argument("--from", dest="start", default=None, metavar="STAGE",
                   help="redo this stage and every later one (deletes their outputs)")
    p.add_argument("--to", dest="stop", default=None, metavar="STAGE",
                   help="stop after this stage")
    p.add_argument("--plan", action="store_true",
                   help="print each stage's status (complete, todo, changed, or extends: "
                   "changed only by training longer) and exit")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("plot", help="PNG of training curves from metrics.jsonl / log.jsonl")
    p.add_argument("log", help="a metrics.jsonl / log.jsonl file or the directory holding it")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--title", default=None, help="plot title")
    p.set_defaults(func=cmd_plot)


def _add_table_commands(sub, wanted: tuple[str, ...] | None = None) -> None:
    """The command table's subcommands; only the one being run (or all, for the reference)
    builds its flags: building them imports the command's modules, and most import torch."""
    from nlakit.run.commands import COMMAND_TABLE

    for command in COMMAND_TABLE:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           allow_abbrev=False)
        p.set_defaults(func=cmd_table_command, table_command=command.name)
        if wanted is not None and wanted != (command.name,):
            continue
        p.add_argument("--config", default=None, metavar="FILE.yaml",
                       help=f"YAML with {command.config.rpartition(':')[2]} fields; flags "
                            "override it")
        add_dataclass_flags(p, command.config_class(), "config")
        if command.inputs:
            add_dataclass_flags(p, command.inputs_class(), "inputs")


def _command_words(argv: list[str]) -> tuple[str, ...]:
    words = [a for a in argv if not a.startswith("-")][:2]
    return tuple(words[:2] if words[:1] == ["train"] else words[:1])


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the stage subcommand it names gets its generated flags
    (building them imports that stage's modules), without it every subcommand does."""
    from nlakit import __version__
    from nlakit.run.pipeline import STAGE_TABLE

    wanted = _command_words(argv) if argv is not None else None
    parser = argparse.ArgumentParser(prog="nlakit", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"nlakit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True)
    train = None
    for stage in STAGE_TABLE:
        if stage.command is None:
            continue
        full = wanted is None or wanted == stage.command
        if stage.command[0] == "train":
            if train is None:
                tp = sub.add_parser("train", help="supervised warm start of the AV or the AR, "
                                                  "the control AV, or RL (GRPO) of an NLA")
                train = tp.add_subparsers(dest="role", required=True)
            _add_stage_parser(train, stage, stage.command, full)
        else:
            _add_stage_parser(sub, stage, stage.command, full)
    _add_other_commands(sub)
    _add_table_commands(sub, wanted)
    return parser


# Library notices a user of the CLI cannot act on; -v shows them. Python warnings:
HARMLESS_WARNINGS = (
    # peft reads the attribute transformers 5 renamed; nlakit never checkpoints activations
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # the AV prompt is embeddings; the penalty is meant for the explanation it writes
    (UserWarning, r"Passing `repetition_penalty` with `inputs_embeds`"),
)
# ... and messages of transformers' own logger:
HARMLESS_LOG_MESSAGES = (
    # GGUF-converted tokenizers carry the flag; transformers ignores it for BPE, as we want
    "Ignoring clean_up_tokenization_spaces",
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(known in message for known in HARMLESS_LOG_MESSAGES)


def quiet_libraries() -> None:
    """Hide the known harmless library warnings and transformers' per-load "Loading weights"
    bars, so that a command's output reads as nlakit's report; nlakit's own progress bar per
    long step stays. Done here, at the CLI's entry, never inside the library."""
    import warnings

    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for handler in logging.getLogger("transformers").handlers:  # its own stderr handler
        handler.addFilter(_DropHarmless())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_libraries()
    try:
        return args.func(args)
    except NLAError as e:
        print(f"nlakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nlakit: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
