"""`nlakit steer`: load the NLA (and the store), measure, and write steer.json / steer.md."""

from __future__ import annotations

from pathlib import Path

import torch

from nlakit.apps.steering.bench import NO_NORM_MESSAGE, SteerReport, layer_message, measure_steering
from nlakit.apps.steering.config import SteerConfig, SteerInputs
from nlakit.errors import NLAError
from nlakit.report.tables import format_steer


def write_report(report: SteerReport, out: str | Path) -> tuple[Path, Path]:
    """OUT/steer.json and OUT/steer.md, each written atomically."""
    from nlakit.fileio import write_json, write_text_atomic

    out = Path(out)
    write_json(out / "steer.json", report.to_dict())
    write_text_atomic(out / "steer.md", format_steer(report) + "\n")
    return out / "steer.json", out / "steer.md"


def _store_facts(acts: str) -> tuple[float, torch.Tensor, int]:
    from nlakit.extract.store import ActivationStore

    store = ActivationStore(acts)
    return float(store.stats("all")["mean_norm"]), store.mean_unit_direction("all"), store.layer


def _check_before_loading(config: SteerConfig, inputs: SteerInputs, has_norm: bool) -> None:
    """The layer and the norm, read from the AR's nla_meta.yaml before any model is loaded
    (a malformed directory is left to NLA.load, which says what is wrong)."""
    from nlakit.nla.checkpoint import read_meta
    from nlakit.nla.pretrained import resolve

    try:
        meta = read_meta((resolve(inputs.nla) or Path(inputs.nla)) / "ar", "ar")
    except NLAError:
        return
    layer = meta.get("extraction", {}).get("layer")
    if config.layer is not None and layer is not None and int(layer) != config.layer:
        raise NLAError(layer_message(config.layer, int(layer)))
    stats = meta.get("nlakit", {}).get("dataset_stats", {}) or {}
    if not has_norm and not stats.get("mean_norm"):
        raise NLAError(NO_NORM_MESSAGE)


def run_steer(config: SteerConfig, inputs: SteerInputs) -> SteerReport:
    """``nlakit steer``: load the NLA (and the store), measure, write OUT/steer.json and .md."""
    from nlakit.nla.facade import NLA

    config.prompt_list(), config.held_out_text()  # a missing file fails before any loading
    norm, mean_direction, store_layer = config.norm, None, None
    if inputs.acts:
        store_norm, mean_direction, store_layer = _store_facts(inputs.acts)
        norm = norm or store_norm
    _check_before_loading(config, inputs, norm is not None)
    nla = NLA.load(inputs.nla, device=inputs.device)
    if store_layer is not None and store_layer != nla.layer:
        raise NLAError(f"--acts {inputs.acts} holds block {store_layer}, the NLA reads block "
                       f"{nla.layer}; pass the store of the NLA's layer")
    report = measure_steering(nla, config, norm=norm, mean_direction=mean_direction,
                              progress=inputs.progress)
    if inputs.out:
        write_report(report, inputs.out)
    return report
