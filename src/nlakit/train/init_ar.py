"""Continuing an AR: a supervised run that starts from a trained NLA's AR instead of the target.

The AR reads only text, and it is the cheap half to train, so an AR can be taught to read what
an AV writes on new text (another corpus, or an AV changed by RL) without training either half
again from the target. The start's adapters are merged, a fresh LoRA is trained over them, and
with keep_adapters the export stacks the two exactly (`adapters.stack_onto`), so the result is
as small and packable as the start.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NLAError
from ..fileio import file_sha256, stable_hash
from .adapters import ADAPTER_CONFIG

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "value_head.safetensors")


def resolve_ar_dir(spec: str | Path) -> Path:
    """The AR directory named by `spec`: a shipped NLA's name, an NLA directory (holding ar/),
    or an AR directory itself."""
    from ..shipped import resolve

    root = resolve(spec) or Path(spec)
    for candidate in (root / "ar", root):
        if (candidate / "nla_meta.yaml").is_file() and \
                (candidate / "value_head.safetensors").is_file():
            return candidate
    raise NLAError(f"init_from {str(spec)!r} is neither a shipped NLA, an NLA directory with an "
                   "ar/ inside, nor an AR directory (nla_meta.yaml + value_head.safetensors)")


def fingerprint(ar_dir: Path) -> str:
    """A hash of the AR's weights: a run continued from other weights is another run."""
    return stable_hash([(name, file_sha256(ar_dir / name)) for name in WEIGHT_FILES
                        if (ar_dir / name).is_file()])


def load_start(ar_dir: Path, store, template: str, keep_adapters: bool, dtype, device):
    """The AR of `ar_dir` (adapters merged) checked against the store and the run's settings;
    returns (Reconstructor, its nla_meta)."""
    from ..nla import _load_ar

    ar, meta = _load_ar(ar_dir, dtype, device)
    if ar.layer != store.layer or ar.d_model != store.d_model:
        raise NLAError(f"init_from {ar_dir} rebuilds layer {ar.layer} (d_model {ar.d_model}); "
                       f"the store holds layer {store.layer} (d_model {store.d_model})")
    want = store.meta["model"].get("weights_hash")
    have = meta.get("nlakit", {}).get("target_model", {}).get("weights_hash")
    if want and have and want != have:
        raise NLAError(f"init_from {ar_dir} was trained on target weights {have}; the store was "
                       f"extracted from {want}")
    if ar.template != template:
        raise NLAError(f"init_from {ar_dir} reads the template {ar.template!r}, this run's "
                       f"ar_template is {template!r}; set --ar-template to the start's template")
    if keep_adapters and not (ar_dir / ADAPTER_CONFIG).is_file():
        raise NLAError(f"keep_adapters: init_from {ar_dir} holds merged weights, so there is no "
                       "adapter to stack onto; continue it with keep_adapters false")
    return ar, meta


def stacked_body(ar_dir: Path, meta: dict, trained_body, dtype):
    """The continued AR's body as one peft adapter over a fresh truncated target: the start's
    adapters followed by this run's LoRA."""
    from ..models import load_model
    from ..reconstructor import truncate_model
    from .adapters import stack_onto

    spec = meta["nlakit"]["target_model"]["spec"]
    base, _ = load_model(spec, dtype=dtype)
    return stack_onto(truncate_model(base, int(meta["extraction"]["layer"])), ar_dir,
                      trained_body)
