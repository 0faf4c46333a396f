"""A corpus the shipped NLA never saw: the long descriptions (READMEs) of the Python packages
installed beside nlakit, one document per package (issue 11's "text you have never seen").

    python scripts/unseen_corpus.py OUT_DIR [--min-chars 2000]
    nlakit extract --model smollm2-135m --layer 10 --corpus OUT_DIR --out STORE ...
    nlakit eval --nla smollm2-135m --acts STORE --split heldout

The built-in corpus is Python's reference documentation and standard-library docstrings;
package READMEs are other authors' prose, markdown and code.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
from pathlib import Path


def package_readmes(min_chars: int) -> dict[str, str]:
    docs = {}
    for dist in md.distributions():
        name = dist.metadata.get("Name") or ""
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if name and len(body) >= min_chars:
            docs[re.sub(r"[^A-Za-z0-9_.-]", "_", name.lower())] = body.strip()
    return dict(sorted(docs.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--min-chars", type=int, default=2000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = package_readmes(args.min_chars)
    for name, text in docs.items():
        (out / f"{name}.md").write_text(text + "\n")
    print(f"{len(docs)} documents, {sum(map(len, docs.values()))} characters -> {out}")


if __name__ == "__main__":
    main()
