"""An RL'd NLA kept as LoRA adapters: the SFT adapters and RL's own, stacked exactly.

RL trains a fresh LoRA over the SFT checkpoint, whose adapters were merged when it was loaded.
The result W + s1·B1A1 + s2·B2A2 is one LoRA of rank r1 + r2, [s1·A1; s2·A2] and [B1, B2]
(peft's ``add_weighted_adapter`` with ``combination_type="cat"``), so the RL'd NLA stays as
small and packable as an SFT one, with no approximation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nlakit.errors import NLAError

ADAPTER_CONFIG = "adapter_config.json"


def check_stackable(nla_dir: Path, av_rank: int, ar_rank: int) -> None:
    """Refuse keep_adapters before any step when the result could not be written as adapters."""
    if av_rank == 0 or ar_rank == 0:
        raise NLAError("train_rl.keep_adapters needs LoRA on both halves (lora_rank and "
                       "ar_lora_rank > 0): full fine-tuning leaves no adapter to keep")
    for half in ("av", "ar"):
        if not (nla_dir / half / ADAPTER_CONFIG).is_file():
            raise NLAError(f"train_rl.keep_adapters: {nla_dir / half} holds merged weights, not "
                           "LoRA adapters; start from an NLA trained with keep_adapters (or set "
                           "keep_adapters: false to export merged weights)")


def stack_onto_target(spec: str, layer: int | None, sft_dir: Path, trained):
    """`stack_onto` a fresh copy of the target `spec` (truncated after `layer` for an AR body;
    None for an AV) in `trained`'s dtype: the export of an RL'd or continued NLA half."""
    from nlakit.model.load import load_model
    from nlakit.nla.reconstructor import truncate_model

    base, _ = load_model(spec, dtype=next(trained.parameters()).dtype)
    if layer is not None:
        base = truncate_model(base, layer)
    return stack_onto(base, sft_dir, trained)


def stack_onto(base, sft_dir: Path, rl_model):
    """`base` (the plain target, or its truncation for an AR) as a peft model whose one adapter,
    "default", is the SFT adapters of `sft_dir` followed by the LoRA of `rl_model` (a peft model
    trained over the merged SFT weights)."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        rl_model.save_pretrained(tmp)  # the RL adapter alone
        model = PeftModel.from_pretrained(base, sft_dir, adapter_name="sft")
        model.load_adapter(tmp, adapter_name="rl")
    model.add_weighted_adapter(["sft", "rl"], [1.0, 1.0], "default", combination_type="cat")
    model.set_adapter("default")
    for name in ("sft", "rl"):
        model.delete_adapter(name)
    return model
