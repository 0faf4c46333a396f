"""The `nlakit` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
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


def cmd_train(args) -> int:
    from dataclasses import fields

    from .train.sft import SFTConfig, train_sft

    known = {f.name for f in fields(SFTConfig)}
    values = {k: v for k, v in vars(args).items() if k in known and v is not None}
    if args.full:
        values["lora_rank"] = 0
    summary = train_sft(args.role, args.data, args.out, SFTConfig(**values), acts=args.acts,
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
    options["max_tokens"] = args.max_new_tokens  # the openai name of the same cap
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
    p = sub.add_parser("train", help="supervised warm start of the AV or the AR")
    p.add_argument("role", choices=["av", "ar"])
    p.add_argument("--data", required=True, help="labelled set from `nlakit label`")
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
    p.add_argument("--splits", default="av_sft,ar_sft",
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
