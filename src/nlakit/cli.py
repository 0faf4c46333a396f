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
