"""A corpus the shipped NLA never saw: the long descriptions (READMEs) of the Python packages
installed beside nlakit, one document per package (issue 11's "text you have never seen"); or,
with `--source debian`, the Debian packages' own documentation under /usr/share/doc (one
document per package: its README.Debian, else its README, else its first .txt).

    python scripts/unseen_corpus.py OUT_DIR [--source readmes|debian] [--min-chars 2000]
    nlakit extract --model smollm2-135m --layer 10 --corpus OUT_DIR --out STORE ...
    nlakit eval --nla smollm2-135m --acts STORE --split heldout

The built-in corpus is Python's reference documentation and standard-library docstrings;
package READMEs are other authors' prose, markdown and code.
"""

from __future__ import annotations

import argparse
import gzip
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


DEBIAN_DOC = Path("/usr/share/doc")
DEBIAN_PREFERENCE = ("README.Debian", "README", "")  # name prefixes, best first ("": any .txt)


def _read_doc(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def debian_docs(min_chars: int, root: Path = DEBIAN_DOC) -> dict[str, str]:
    """One document per package under `root`: its first file by `DEBIAN_PREFERENCE` with at
    least `min_chars` characters (changelogs and copyright files are not prose and are skipped)."""
    docs, seen = {}, set()
    for package in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        files = sorted(f for f in package.rglob("*") if f.is_file() and not f.is_symlink())
        for prefix in DEBIAN_PREFERENCE:
            picked = [f for f in files if f.name.startswith(prefix) and (
                prefix or f.name.removesuffix(".gz").endswith(".txt"))]
            texts = [t for t in map(_read_doc, picked) if len(t) >= min_chars]
            if texts:
                if texts[0].strip() not in seen:  # packages of one source share their README
                    seen.add(texts[0].strip())
                    docs[re.sub(r"[^A-Za-z0-9_.-]", "_", package.name.lower())] = texts[0].strip()
                break
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--source", choices=("readmes", "debian"), default="readmes")
    ap.add_argument("--min-chars", type=int, default=2000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.source == "debian" and not DEBIAN_DOC.is_dir():
        raise SystemExit(f"{DEBIAN_DOC} is missing: --source debian needs a Debian system")
    docs = (package_readmes if args.source == "readmes" else debian_docs)(args.min_chars)
    suffix = ".md" if args.source == "readmes" else ".txt"
    for name, text in docs.items():
        (out / f"{name}{suffix}").write_text(text + "\n")
    print(f"{len(docs)} documents, {sum(map(len, docs.values()))} characters -> {out}")


if __name__ == "__main__":
    main()
