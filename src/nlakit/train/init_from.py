"""Continuing a trained NLA half: a supervised run that starts from an NLA's AV or AR instead of
the target.

The AR reads only text, and it is the cheap half to train, so an AR can be taught to read what
an AV writes on new text (another corpus, or an AV changed by RL) without training either half
again from the target; an AV can be shown new text the same way. The start's adapters are
merged, a fresh LoRA is trained over them, and with keep_adapters the export stacks the two
exactly (`adapters.stack_onto_target`), so the result is as small and packable as the start.
"""

from __future__ import annotations

from pathlib import Path

from nlakit.errors import NLAError
from nlakit.fileio import file_sha256, stable_hash
from nlakit.train.adapters import ADAPTER_CONFIG

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "value_head.safetensors")


def resolve_half(spec: str | Path, role: str) -> Path:
    """The `role` ("av"/"ar") directory named by `spec`: a shipped NLA's name, an NLA directory
    (holding av/ and ar/), or the half's directory itself."""
    from nlakit.nla.checkpoint import read_meta
    from nlakit.nla.pretrained import resolve

    root = resolve(spec) or Path(spec)
    for candidate in (root / role, root):
        if (candidate / "nla_meta.yaml").is_file():
            try:
                read_meta(candidate, role)
            except NLAError:
                continue
            return candidate
    raise NLAError(f"init_from {str(spec)!r} is neither a shipped NLA, an NLA directory with "
                   f"{role}/ inside, nor an {role.upper()} directory")


def fingerprint(half_dir: Path) -> str:
    """A hash of the half's weights: a run continued from other weights is another run."""
    return stable_hash([(name, file_sha256(half_dir / name)) for name in WEIGHT_FILES
                        if (half_dir / name).is_file()])


def load_start(role: str, half_dir: Path, store, cfg, dtype, device):
    """The AV (Verbalizer) or AR (Reconstructor) of `half_dir`, adapters merged, checked against
    the store and the run's settings; returns (it, its nla_meta)."""
    from nlakit.nla.facade import load_ar, load_av

    half, meta = (load_av if role == "av" else load_ar)(half_dir, dtype, device)
    layer = meta.get("extraction", {}).get("layer")
    if int(layer) != store.layer or half.d_model != store.d_model:
        raise NLAError(f"init_from {half_dir} reads layer {layer} (d_model {half.d_model}); "
                       f"the store holds layer {store.layer} (d_model {store.d_model})")
    want = store.meta["model"].get("weights_hash")
    have = meta.get("nlakit", {}).get("target_model", {}).get("weights_hash")
    if want and have and want != have:
        raise NLAError(f"init_from {half_dir} was trained on target weights {have}; the store "
                       f"was extracted from {want}")
    template, flag = (cfg.av_template, "av") if role == "av" else (cfg.ar_template, "ar")
    if half.template != template:
        raise NLAError(f"init_from {half_dir} reads the template {half.template!r}, this run's "
                       f"{flag}_template is {template!r}; set --{flag}-template to the start's")
    if role == "av":
        for key, have_value in (("marker", half.marker), ("injection_scale",
                                                          half.injection_scale)):
            if getattr(cfg, key) is not None and getattr(cfg, key) != have_value:
                raise NLAError(f"init_from {half_dir} has {key} {have_value!r}, this run asks "
                               f"for {getattr(cfg, key)!r}; leave {key} unset to keep the start's")
    if cfg.keep_adapters and not (half_dir / ADAPTER_CONFIG).is_file():
        raise NLAError(f"keep_adapters: init_from {half_dir} holds merged weights, so there is no "
                       "adapter to stack onto; continue it with keep_adapters false")
    return half, meta

