"""The `nlakit` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import NLAError


def _add_model_options(p: argparse.ArgumentParser, default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", default=default,
                   help="target model: alias smollm2-135m, a .gguf file, a model directory or "
                        "a Hugging Face id (default: %(default)s)")
    p.add_argument("--dtype", default=None,
                   help="float32 (CPU default), bfloat16, float16 or auto")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or auto")


def _add_corpus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="builtin",
                   help="builtin[:docs|:chats], a text file/folder, .jsonl, .parquet, or a saved "
                        "datasets folder (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="text field/column for jsonl/parquet")
    p.add_argument("--blocks", action="store_true",
                   help="text files: one document per blank-line separated block")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--max-tokens-per-doc", type=int, default=1024,
                   help="truncate documents to this many tokens (default: %(default)s)")


def cmd_extract(args) -> int:
    from .activations import extract, parse_fractions
    from .corpus import load_corpus
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    corpus = load_corpus(args.corpus, tokenizer=tok, text_field=args.text_field,
                         blocks=args.blocks, max_docs=args.max_docs, chat_model=(model, tok))
    store = extract(
        (model, tok), corpus, args.out, layer=args.layer,
        positions_per_doc=args.positions_per_doc, min_position=args.min_position,
        seed=args.seed, split_fractions=parse_fractions(args.splits) if args.splits else None,
        batch_size=args.batch_size, max_tokens_per_doc=args.max_tokens_per_doc,
        shard_docs=args.shard_docs, overwrite=args.overwrite,
    )
    _print_store(store)
    return 0


def _print_store(store) -> None:
    meta = store.meta
    counts, stats = meta["counts"], meta["stats"]["all"]
    print(f"store      {store.path}")
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


def cmd_info(args) -> int:
    from .store import ActivationStore

    store = ActivationStore(args.path)
    if args.json:
        print(json.dumps(store.meta, indent=2, default=str))
    else:
        _print_store(store)
    return 0


def _config_from_args(config_cls, args, **overrides):
    """A config dataclass from the CLI arguments that name its fields (None = keep default)."""
    from dataclasses import fields

    known = {f.name for f in fields(config_cls)}
    values = {k: v for k, v in vars(args).items() if k in known and v is not None}
    return config_cls(**{**values, **overrides})


def cmd_train(args) -> int:
    if args.role == "rl":
        return cmd_train_rl(args)
    if args.data is None:
        raise NLAError(f"`nlakit train {args.role}` needs --data (a labelled set from "
                       "`nlakit label`)")
    from .train.sft import SFTConfig, train_sft

    overrides = {"lora_rank": 0} if args.full else {}
    summary = train_sft(args.role, args.data, args.out,
                        _config_from_args(SFTConfig, args, **overrides), acts=args.acts,
                        overwrite=args.overwrite)
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_train_rl(args) -> int:
    from .train.rl import RLConfig, train_rl

    if not args.nla or not args.acts:
        raise NLAError("`nlakit train rl` needs --nla (the SFT NLA directory) and --acts (the "
                       "activation store with rl and heldout splits)")
    overrides = {}
    if args.full:
        overrides["lora_rank"] = 0
    if args.ar_full:
        overrides["ar_lora_rank"] = 0
    if args.no_failure_penalty:
        overrides["failure_reward"] = None
    summary = train_rl(args.nla, args.acts, args.out,
                       _config_from_args(RLConfig, args, **overrides), resume=args.resume,
                       overwrite=args.overwrite)
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_explain(args) -> int:
    from .nla import NLA

    nla = NLA.load(args.nla, device=args.device) if args.nla else NLA.load(
        av=args.av, ar=args.ar, device=args.device)
    if args.positions in ("last", "all"):
        positions = args.positions
    else:
        try:
            positions = [int(p) for p in args.positions.split(",")]
        except ValueError:
            raise NLAError(f"--positions must be last, all or comma-separated integers, got "
                           f"{args.positions!r}") from None
    rows = nla.explain_text(args.text, positions, best_of=args.best_of,
                            max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps([{k: v for k, v in vars(r).items() if k != "reconstruction"}
                          for r in rows], indent=2, ensure_ascii=False))
        return 0
    print(f"{'pos':>4}  {'token':<14} {'fve_nrm':>7} {'cos':>6}  explanation")
    for r in rows:
        flag = "" if r.complete else " [unfinished]"
        text = " ".join(r.explanation.split())
        print(f"{r.position:>4}  {r.token!r:<14} {r.fve_nrm:>7.3f} {r.cos:>6.3f}  {text}{flag}")
    print(f"(fve_nrm denominator: rawvar {nla.dataset_stats.get('rawvar', float('nan')):.4f} "
          "of the training store)")
    return 0


def cmd_export(args) -> int:
    from .nla import NLA

    nla = NLA.load(args.nla)
    path = nla.save(args.out, layout=args.layout)
    print(f"wrote {path / 'av'} and {path / 'ar'} ({args.layout} layout)")
    return 0


def cmd_label(args) -> int:
    from .labels import label_store

    names = ("model", "dtype", "device", "batch_size", "temperature", "top_p", "max_new_tokens",
             "seed", "max_prefix_chars", "top_k", "base_url", "api_model", "api_key_env",
             "concurrency", "max_requests", "max_retries", "timeout")
    options = {name: getattr(args, name) for name in names}
    options["no_api_key"] = args.no_api_key or None
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    labels = label_store(args.acts, args.labeller, args.out, splits=splits,
                         max_rows=args.max_rows, progress=not args.no_progress, **options)
    meta = labels.meta
    counts = meta["counts"]
    print(f"labels     {labels.path}")
    print(f"labeller   {meta['labeller']['kind']}  "
          f"{meta['labeller'].get('model') or meta['labeller'].get('api_model')}  "
          f"prompt {meta['labeller']['prompt_version']}")
    print(f"rows       {counts['rows']} ({', '.join(meta['splits'])}): kept {counts['kept']}, "
          f"dropped {counts['dropped']} {counts['dropped_by_reason'] or ''}")
    print(f"cache      {counts['from_cache']} from cache, {counts['labelled_now']} labelled now"
          + (f" at {meta['labelling_rows_per_s']} rows/s" if meta["labelling_rows_per_s"]
             else ""))
    return 0


def _load_nla_args(args):
    from .nla import NLA

    if args.nla:
        return NLA.load(args.nla, device=args.device)
    return NLA.load(av=args.av, ar=args.ar, device=args.device)


def _out_paths(args, default_name: str):
    from pathlib import Path

    if args.json:
        json_path = Path(args.json)
    elif args.report:
        json_path = Path(args.report).with_name(default_name)
    else:
        json_path = Path(default_name)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    return json_path


def cmd_eval(args) -> int:
    import time

    from .evaluate import EvalConfig, evaluate, format_table, write_eval_json
    from .store import ActivationStore

    t0 = time.perf_counter()
    if args.baselines_only:
        from .evaluate import ReconstructorOnly

        if not (args.ar or args.nla):
            raise NLAError("--baselines-only needs --ar AR_DIR or --nla DIR")
        nla = ReconstructorOnly.load(args.ar or f"{args.nla}/ar", device=args.device)
    else:
        nla = _load_nla_args(args)
    store = ActivationStore(args.acts)
    control = None
    if args.control:
        from .nla import NLA

        control = NLA.load(av=args.control, ar=args.ar or f"{args.nla}/ar", device=args.device)
    try:
        quotes = tuple(int(x) for x in args.quote.split(",") if x.strip())
    except ValueError:
        raise NLAError(f"--quote must be comma-separated token counts, got "
                       f"{args.quote!r}") from None
    cfg = EvalConfig(split=args.split, max_rows=args.max_rows,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     quote_tokens=quotes, best_of=args.best_of, seed=args.seed,
                     n_boot=args.n_boot)
    result = evaluate(nla, store, cfg, labels=args.labels, control_av=control)
    result.data["timings_s"]["wall_including_load"] = round(time.perf_counter() - t0, 3)
    json_path = write_eval_json(result, _out_paths(args, "eval.json"))
    print(format_table(result.data))
    print(f"wrote {json_path}")
    if args.report:
        from .report import write_report

        html, md = write_report(args.report, eval_data=result.data, title="nlakit eval")
        print(f"wrote {html} and {md}")
    return 0


def cmd_audit(args) -> int:
    import time

    from .audit import PARAPHRASER_OPTIONS, AuditConfig, audit, make_paraphraser
    from .audit import format_audit_table as format_table
    from .fileio import write_json
    from .store import ActivationStore

    t0 = time.perf_counter()
    nla = _load_nla_args(args)
    store = ActivationStore(args.acts)
    para = None
    if args.paraphraser != "none":
        options = dict(per_unit=args.paraphrase_per_line, model=args.paraphraser_model,
                       device=args.device, batch_size=args.batch_size,
                       max_new_tokens=args.paraphrase_max_new_tokens,
                       base_url=args.base_url, api_model=args.api_model,
                       api_key_env=args.api_key_env, no_api_key=args.no_api_key or None,
                       max_requests=args.max_requests)
        para = make_paraphraser(args.paraphraser, **{
            k: v for k, v in options.items() if k in PARAPHRASER_OPTIONS[args.paraphraser]})
    given = None
    if args.explanations:
        from pathlib import Path

        data = json.loads(Path(args.explanations).read_text())
        given = {int(r["row_id"]): r["explanation"] for r in data.get("rows", [])}
    cfg = AuditConfig(split=args.split, max_rows=args.max_rows,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      seed=args.seed, n_boot=args.n_boot)
    data = audit(nla, store, cfg, paraphraser=para, explanations=given)
    data["timings_s"]["wall_including_load"] = round(time.perf_counter() - t0, 3)
    json_path = _out_paths(args, "audit.json")
    write_json(json_path, data)
    print(format_table(data))
    print(f"wrote {json_path}")
    if args.report:
        from .report import write_report

        eval_data = None
        if args.eval_json:
            from pathlib import Path

            eval_data = json.loads(Path(args.eval_json).read_text())
        html, md = write_report(args.report, eval_data=eval_data, audit_data=data,
                                title="nlakit audit" if eval_data is None else "nlakit report")
        print(f"wrote {html} and {md}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from .report import write_report

    ev = json.loads(Path(args.eval).read_text()) if args.eval else None
    au = json.loads(Path(args.audit).read_text()) if args.audit else None
    html, md = write_report(args.out, eval_data=ev, audit_data=au, title=args.title)
    print(f"wrote {html} and {md}")
    return 0


def _add_eval_common(p) -> None:
    p.add_argument("--nla", default=None, help="NLA directory (holding av/ and ar/)")
    p.add_argument("--av", default=None, help="AV directory (official layout)")
    p.add_argument("--ar", default=None, help="AR directory (official layout)")
    p.add_argument("--acts", required=True, help="activation store of the NLA's layer")
    p.add_argument("--split", default="heldout", help="a split name or all (default heldout)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="evaluate about this many rows, choosing whole documents (seeded)")
    p.add_argument("--max-new-tokens", type=int, default=150, help="explanation length cap")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="result JSON (default: next to --report)")
    p.add_argument("--report", default=None,
                   help="write a self-contained HTML report here (and a .md summary beside it)")


def cmd_pipeline(args) -> int:
    from .pipeline import format_summary, plan, run_pipeline

    if args.plan:
        for stage, status in plan(args.config, args.set):
            print(f"{stage:<13} {status}")
        return 0
    summary = run_pipeline(args.config, overrides=args.set, start=args.start, stop=args.stop,
                           progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under torchrun/accelerate launch
        from pathlib import Path

        eval_json = Path(summary["run_dir"]) / "eval" / "eval.json"
        if eval_json.is_file():
            from .evaluate import format_table

            print("\nheld-out evaluation (" + str(eval_json) + "):")
            print(format_table(json.loads(eval_json.read_text())))
        print()
        print(format_summary(summary))
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_log

    drawn = plot_log(args.log, args.out, title=args.title)
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="nlakit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nlakit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="store block-K activations of a model over a corpus")
    _add_model_options(p)
    _add_corpus_options(p)
    p.add_argument("--layer", type=int, default=None, help="block K (default floor(2L/3))")
    p.add_argument("--out", required=True, help="output store directory")
    p.add_argument("--positions-per-doc", type=int, default=10)
    p.add_argument("--min-position", type=int, default=50,
                   help="sample only tokens at index >= this (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default=None,
                   help="document-level split fractions, e.g. "
                        "av_sft=0.25,ar_sft=0.25,rl=0.4,heldout=0.1 (the default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-docs", type=int, default=64,
                   help="documents per parquet part (the unit of resumption)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store made with another configuration")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("info", help="summarise an activation store")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the whole meta.yaml as JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("train", help="supervised warm start of the AV or the AR, or RL (GRPO) "
                                     "of an NLA")
    p.add_argument("role", choices=["av", "ar", "rl"])
    p.add_argument("--data", default=None, help="av/ar: labelled set from `nlakit label` "
                                                "(required for av and ar)")
    p.add_argument("--acts", default=None, help="activation store (default: the labels' store)")
    p.add_argument("--out", required=True,
                   help="NLA directory: writes OUT/av or OUT/ar (train both into one dir)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per process per step")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 16)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--keep-adapters", action="store_true",
                   help="AV: save LoRA adapters instead of merged weights")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--eval-rows", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-response-tokens", type=int, default=None)
    p.add_argument("--control", choices=["shuffled"], default=None,
                   help="AV control: train on vectors permuted across rows")
    p.add_argument("--injection-scale", type=float, default=None)
    p.add_argument("--marker", default=None, help="override the injection marker character")
    p.add_argument("--dtype", default=None)
    p.add_argument("--overwrite", action="store_true", help="discard an earlier checkpoint")
    rl = p.add_argument_group("rl (GRPO on the AV, AR trained alongside)")
    rl.add_argument("--nla", default=None, help="rl: the starting NLA directory (SFT warm start)")
    rl.add_argument("--resume", action="store_true", help="rl: continue the checkpoint in --out")
    rl.add_argument("--group-size", type=int, default=None,
                    help="rl: explanations sampled per activation (default 4 CPU, 8 GPU)")
    rl.add_argument("--av-lr", type=float, default=None, help="rl: AV learning rate (1e-5)")
    rl.add_argument("--ar-lr", type=float, default=None, help="rl: AR learning rate (5e-5)")
    rl.add_argument("--ar-lora-rank", type=int, default=None, help="rl: AR body LoRA rank (16)")
    rl.add_argument("--ar-full", action="store_true", help="rl: full fine-tuning of the AR body")
    rl.add_argument("--temperature", type=float, default=None, help="rl: sampling temperature")
    rl.add_argument("--top-p", type=float, default=None, help="rl: nucleus sampling (1.0)")
    rl.add_argument("--max-new-tokens", type=int, default=None,
                    help="rl: response cap in tokens; hitting it scores -2 (default 150)")
    rl.add_argument("--reward", choices=["negmse", "neglog", "contrastive"], default=None,
                    help="rl: -mse_nrm (default), -log mse_nrm, or InfoNCE over the batch")
    rl.add_argument("--contrastive-temperature", type=float, default=None)
    rl.add_argument("--no-failure-penalty", action="store_true",
                    help="rl: do not replace the reward of failed samples with -2")
    rl.add_argument("--length-penalty", type=float, default=None,
                    help="rl: reward lost by a response of full cap length (default 0)")
    rl.add_argument("--kl-coef", type=float, default=None, help="rl: KL coefficient (0.01)")
    rl.add_argument("--kl-estimator", choices=["k1", "k3"], default=None)
    rl.add_argument("--clip", type=float, default=None, help="rl: ratio clip (0.2)")
    rl.add_argument("--truncate-explanations", action="store_true", default=None,
                    help="rl: matryoshka - score a random-length prefix of each explanation")
    rl.add_argument("--truncate-min-tokens", type=int, default=None)
    rl.add_argument("--max-grad-norm", type=float, default=None)
    rl.add_argument("--eval-max-new-tokens", type=int, default=None)
    rl.add_argument("--rollout-batch-size", type=int, default=None,
                    help="rl: sequences per generation batch (default 64)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("explain", help="explain tokens of a text with a trained NLA")
    p.add_argument("text")
    p.add_argument("--nla", default=None, help="NLA directory (holding av/ and ar/)")
    p.add_argument("--av", default=None, help="AV directory (official layout)")
    p.add_argument("--ar", default=None, help="AR directory (official layout)")
    p.add_argument("--positions", default="last", help="last, all, or indices like 3,7,-1")
    p.add_argument("--best-of", type=int, default=1,
                   help="sample N explanations per token and keep the AR's favourite")
    p.add_argument("--max-new-tokens", type=int, default=150)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="write an NLA in the official two-directory layout")
    p.add_argument("--nla", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=["official", "nlakit"], default="official")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("label", help="warm-start labels for SFT rows (local model, "
                                     "OpenAI-compatible API, or grounded context labels)")
    p.add_argument("--acts", required=True, help="activation store directory")
    p.add_argument("--labeller", required=True,
                   help="local, openai, context, or a registered/entry-point labeller")
    p.add_argument("--out", required=True, help="output label-set directory")
    p.add_argument("--splits", default="av_sft,ar_sft,heldout",
                   help="comma-separated splits to label (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=None, help="at most this many rows per split")
    p.add_argument("--model", default=None,
                   help="local/context: model to run (default: the store's target model)")
    p.add_argument("--dtype", default=None, help="local/context: float32, bfloat16, auto ...")
    p.add_argument("--device", default=None, help="local/context: cpu, cuda, auto")
    p.add_argument("--batch-size", type=int, default=None, help="local/context: rows per batch")
    p.add_argument("--temperature", type=float, default=None,
                   help="local/openai sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="local/openai nucleus sampling")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="local/openai: cap on generated tokens (default 64 local, 200 openai)")
    p.add_argument("--seed", type=int, default=None, help="local: sampling seed")
    p.add_argument("--max-prefix-chars", type=int, default=None,
                   help="local/openai: show the labeller at most the last N characters of the "
                        "prefix (default 300 local, 2000 openai)")
    p.add_argument("--top-k", type=int, default=None, help="context: predictions shown (3)")
    p.add_argument("--base-url", default=None,
                   help="openai: endpoint base, e.g. https://api.openai.com/v1 or "
                        "http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", default=None, help="openai: model name at the endpoint")
    p.add_argument("--api-key-env", default=None,
                   help="openai: environment variable holding the key (default OPENAI_API_KEY)")
    p.add_argument("--no-api-key", action="store_true",
                   help="openai: send no key (local servers without authentication)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="openai: concurrent requests (default 8)")
    p.add_argument("--max-requests", type=int, default=None,
                   help="openai: hard budget of HTTP requests for this run (retries count)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="openai: retries per request on 429/5xx/timeouts (default 5)")
    p.add_argument("--timeout", type=float, default=None,
                   help="openai: seconds per request (default 60)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("eval", help="score an NLA against baselines with document-level CIs")
    _add_eval_common(p)
    p.add_argument("--quote", default="8,32",
                   help="quote baseline lengths in tokens, comma-separated (default %(default)s)")
    p.add_argument("--best-of", type=int, default=1,
                   help="also score best-of-N sampled explanations reranked by the AR")
    p.add_argument("--labels", default=None, help="label set for the label baseline")
    p.add_argument("--control", default=None,
                   help="control AV directory (trained on shuffled activations)")
    p.add_argument("--baselines-only", action="store_true",
                   help="load only the AR and score the baselines (no AV needed)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("audit", help="robustness of reconstruction under meaning-preserving "
                                     "edits of the explanations")
    _add_eval_common(p)
    p.add_argument("--paraphraser", choices=["rules", "local", "openai", "none"],
                   default="rules", help="paraphraser for the paraphrase test (default rules)")
    p.add_argument("--paraphraser-model", default=None, help="local: model spec")
    p.add_argument("--paraphrase-max-new-tokens", type=int, default=160)
    p.add_argument("--paraphrase-per-line", action="store_true",
                   help="paraphrase each line/sentence separately (keeps structure with small "
                        "paraphraser models)")
    p.add_argument("--base-url", default=None, help="openai: endpoint base URL")
    p.add_argument("--api-model", default=None, help="openai: model name")
    p.add_argument("--api-key-env", default=None, help="openai: env var with the key")
    p.add_argument("--no-api-key", action="store_true", help="openai: send no key")
    p.add_argument("--max-requests", type=int, default=None, help="openai: request budget")
    p.add_argument("--explanations", default=None,
                   help="eval.json whose explanations to audit (same rows) instead of "
                        "generating them again")
    p.add_argument("--eval-json", default=None,
                   help="include this eval.json in the --report")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("report", help="HTML + Markdown report from eval/audit JSON files")
    p.add_argument("--eval", default=None, help="eval.json")
    p.add_argument("--audit", default=None, help="audit.json")
    p.add_argument("--out", required=True, help="report.html (report.md is written beside it)")
    p.add_argument("--title", default="nlakit report")
    p.set_defaults(func=cmd_report)
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
                   help="print each stage's status (complete/todo/changed) and exit")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("plot", help="PNG of training curves from metrics.jsonl / log.jsonl")
    p.add_argument("log", help="a metrics.jsonl / log.jsonl file or the directory holding it")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
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
