"""NLAs that ship inside the package, loaded by name: ``NLA.load("smollm2-135m")``.

A shipped NLA is an ordinary nlakit NLA directory whose two halves are kept as LoRA adapters
over the embedded target (``nlakit.weights: adapter`` in each nla_meta.yaml; the AR also holds
its value head), stored in float16 so the package stays small. Beside them:

  provenance/       how it was made: the config, the store's statistics, its eval table
  MANIFEST.json     the sha256 of every file; loading refuses a directory whose files differ

`pack_nla` writes such a directory from a trained NLA whose halves are adapters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nlakit.errors import NLAError
from nlakit.fileio import file_sha256, read_yaml, write_json, write_yaml

SHIPPED_ROOT = Path(__file__).parents[1] / "data" / "nlas"
MANIFEST_FILE = "MANIFEST.json"
SKIPPED_FILES = ("README.md",)  # peft's model card: not needed to load
# Provenance keys the trainers fill with absolute paths of the machine that trained, and the
# file that identifies what such a path held (a store, a label set, an NLA).
PATH_KEYS = ("labels", "acts", "from_nla")
IDENTITY_FILES = ("meta.yaml", "av/nla_meta.yaml")


def shipped_names(root: Path = SHIPPED_ROOT) -> list[str]:
    """Names of the NLAs shipped in the package."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST_FILE).is_file())


def _listed_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE and "__pycache__" not in p.parts)


def verify(directory: Path) -> dict:
    """Check every file of a shipped NLA against MANIFEST.json; NLAError naming the first file
    that is missing, added or changed. Returns the manifest."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise NLAError(f"{directory} has no {MANIFEST_FILE}: not a shipped NLA")
    manifest = json.loads(manifest_path.read_text())
    recorded = manifest.get("files", {})
    present = _listed_files(directory)
    extra = sorted(set(present) - set(recorded))
    if extra:
        raise NLAError(f"shipped NLA {directory} holds files its manifest does not list: {extra}; "
                       "reinstall nlakit")
    for rel, digest in recorded.items():
        path = directory / rel
        if not path.is_file():
            raise NLAError(f"shipped NLA {directory} is missing {rel}; reinstall nlakit")
        if file_sha256(path) != digest:
            raise NLAError(f"shipped NLA file {path} does not match its recorded sha256 (it was "
                           "modified or corrupted); reinstall nlakit")
    return manifest


def resolve(spec: str | Path, root: Path = SHIPPED_ROOT) -> Path | None:
    """The verified directory of a shipped NLA named `spec`, or None when `spec` is no such
    name (a path that exists on disk always wins over a name)."""
    if Path(spec).exists() or str(spec) not in shipped_names(root):
        return None
    directory = root / str(spec)
    verify(directory)
    return directory


def _half_precision_copy(src: Path, dst: Path) -> None:
    """A safetensors file with its floating tensors in float16 (adapters, value head)."""
    tensors = load_file(str(src))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}, str(dst))


def _portable_reference(path: str) -> tuple[str, str | None]:
    """An absolute path as a portable name (its last two parts) and the sha256 of the file that
    identifies what it held, or None when that is no longer on disk."""
    p = Path(path)
    name = "/".join(p.parts[-2:])
    for rel in IDENTITY_FILES:
        if (p / rel).is_file():
            return name, f"{rel}:sha256:{file_sha256(p / rel)}"
    return name, None


def portable_provenance(node):
    """A copy of an nla_meta.yaml's provenance with every absolute path of PATH_KEYS replaced by
    a portable name and a `<key>_sha256` of what it held: a shipped NLA must not carry the
    training machine's paths, which mean nothing elsewhere."""
    if isinstance(node, list):
        return [portable_provenance(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in PATH_KEYS and isinstance(value, str) and Path(value).is_absolute():
            out[key], digest = _portable_reference(value)
            if digest:
                out[f"{key}_sha256"] = digest
        else:
            out[key] = portable_provenance(value)
    return out


def _copy_meta(src: Path, dst: Path) -> None:
    meta = read_yaml(src)
    nl = meta.get("nlakit", {})
    if "provenance" in nl:
        nl["provenance"] = portable_provenance(nl["provenance"])
    write_yaml(dst, meta)


def pack_nla(nla_dir: str | Path, out: str | Path, *, provenance: dict[str, Path] | None = None,
             overwrite: bool = False) -> Path:
    """Write a shipped-NLA directory from a trained NLA whose AV and AR are both kept as LoRA
    adapters (train the AV with keep_adapters; the AR dir with ``nlakit.weights: adapter``).
    provenance: {file name: source path} copied under provenance/ (config, eval table...)."""
    from nlakit.nla.checkpoint import NLA_META_FILE, read_meta

    nla_dir, out = Path(nla_dir), Path(out)
    for role in ("av", "ar"):
        meta = read_meta(nla_dir / role, role)
        if meta.get("nlakit", {}).get("weights") != "adapter":
            raise NLAError(f"{nla_dir / role} holds merged weights; only an NLA kept as LoRA "
                           "adapters can be packed (train the AV with keep_adapters)")
    if out.exists():
        if not overwrite:
            raise NLAError(f"{out} exists; pass overwrite=True to replace it")
        shutil.rmtree(out)
    for role in ("av", "ar"):
        (out / role).mkdir(parents=True)
        for src in sorted((nla_dir / role).iterdir()):
            if not src.is_file() or src.name in SKIPPED_FILES:
                continue
            if src.suffix == ".safetensors":
                _half_precision_copy(src, out / role / src.name)
            elif src.name == NLA_META_FILE:
                _copy_meta(src, out / role / src.name)
            else:
                shutil.copy2(src, out / role / src.name)
    (out / "provenance").mkdir()
    for name, src in (provenance or {}).items():
        shutil.copy2(src, out / "provenance" / name)
    files = {rel: file_sha256(out / rel) for rel in _listed_files(out)}
    write_json(out / MANIFEST_FILE, {"kind": "nlakit_shipped_nla", "files": files,
                                     "torch_version": torch.__version__})
    return out


def describe(name: str, root: Path = SHIPPED_ROOT) -> str:
    """A shipped NLA's name, size, checked manifest and recorded held-out eval table."""
    if name not in shipped_names(root):
        raise NLAError(f"no shipped NLA named {name!r}; shipped: {', '.join(shipped_names(root))}"
                       " (or none)")
    directory = root / name
    manifest = verify(directory)
    size = sum((directory / rel).stat().st_size for rel in manifest["files"])
    lines = [f"{name}: {directory} ({len(manifest['files'])} files, {size / 2**20:.1f} MiB, "
             "every sha256 checked)"]
    table = directory / "provenance" / "eval.txt"
    if table.is_file():
        lines += ["recorded held-out evaluation (provenance/eval.txt):", table.read_text()]
    return "\n".join(lines)
