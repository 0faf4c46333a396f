"""Steering vectors from text (the AR's reconstruction of an explanation) and the control
directions every measurement compares them with."""

from __future__ import annotations

import torch

from nlakit.errors import NLAError


def checked_text(text, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise NLAError(f"{what} is empty: write the explanation to steer towards, e.g. "
                       "\"The text is about the ocean.\"")
    return text


def text_vector(nla, text: str, contrast: str | None = None) -> torch.Tensor:
    """[d] ``AR(text)``, or ``AR(text) - AR(contrast)`` when a contrast is given (not rescaled)."""
    texts = [checked_text(text, "text")]
    if contrast is not None:
        texts.append(checked_text(contrast, "contrast"))
    rec = nla.reconstruct(texts).float()
    v = rec[0] - rec[1] if contrast is not None else rec[0]
    if not float(v.norm()) > 0:
        raise NLAError("the steering vector is zero (text and contrast read the same); "
                       "write two explanations that differ")
    return v


def unit(v: torch.Tensor) -> torch.Tensor:
    """[d] v / ||v|| in float32 (a zero vector is an NLAError: it has no direction)."""
    from nlakit.metrics import unit as unit_rows

    return unit_rows(v.float())[0]


def control_directions(d: int, mean_direction: torch.Tensor, empty: torch.Tensor,
                       n_random: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit [d] directions of the controls: random_i (seeded Gaussian), mean_direction,
    ar_empty (the AR's reading of an empty explanation)."""
    out = {}
    for i in range(n_random):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        out[f"random_{i}"] = unit(torch.randn(d, generator=g))
    out["mean_direction"] = unit(mean_direction)
    out["ar_empty"] = unit(empty)
    return out
