"""Pack a trained NLA (both halves kept as LoRA adapters) as a shipped NLA of the package.

    python scripts/pack_shipped_nla.py --nla runs/cpu-quality/nla --acts runs/cpu-quality/acts \
        --eval runs/cpu-quality/eval/eval.json --config configs/cpu-quality.yaml \
        --name smollm2-135m

writes src/nlakit/data/nlas/NAME/ (float16 adapters, provenance/, MANIFEST.json), loadable as
``NLA.load("NAME")`` and ``--nla NAME``. The provenance holds the config, the store's
statistics and the eval table the NLA was judged by.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from nlakit.extract.store import ActivationStore
from nlakit.nla.pretrained import SHIPPED_ROOT, pack_nla
from nlakit.report.tables import format_eval_table


def provenance_files(tmp: Path, args) -> dict[str, Path]:
    """The provenance documents, written to `tmp`: {name in provenance/: path}."""
    store = ActivationStore(args.acts)
    files = {"store.yaml": tmp / "store.yaml", "eval.json": tmp / "eval.json",
             "eval.txt": tmp / "eval.txt"}
    meta = store.meta
    files["store.yaml"].write_text(yaml.safe_dump(
        {"model": meta["model"], "layer": meta["layer"], "counts": meta["counts"],
         "stats": meta["stats"], "config": meta.get("config")}, sort_keys=False))
    ev = json.loads(Path(args.eval).read_text())
    summary = {k: v for k, v in ev.items() if k != "rows"}  # the table, not every row
    files["eval.json"].write_text(json.dumps(summary, indent=1))
    files["eval.txt"].write_text(format_eval_table(ev) + "\n")
    if args.config:
        files["config.yaml"] = Path(args.config)
    for extra in args.extra or []:
        files[Path(extra).name] = Path(extra)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", required=True, help="NLA directory whose av/ and ar/ are adapters")
    ap.add_argument("--acts", required=True, help="the activation store it was trained on")
    ap.add_argument("--eval", required=True, help="its held-out eval.json")
    ap.add_argument("--config", default=None, help="the pipeline config that made it")
    ap.add_argument("--extra", action="append", help="another provenance file (repeatable)")
    ap.add_argument("--name", required=True, help="the name it loads by")
    ap.add_argument("--root", default=str(SHIPPED_ROOT), help="where shipped NLAs live")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = pack_nla(args.nla, Path(args.root) / args.name,
                       provenance=provenance_files(Path(tmp), args), overwrite=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
