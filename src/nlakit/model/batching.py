"""Batches of token sequences: right padding, the one layout every forward here uses.

Right padding keeps each real token at its own index (positions index rows directly, causal
attention never lets a real token see the padding after it); the mask marks the real tokens
and ``mask.sum(1) - 1`` is each row's last one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, width] ids, [n, width] 0/1 mask) of `seqs` padded on the right with `pad_id`;
    `width` (default: the longest) cuts longer sequences."""
    width = max((len(s) for s in seqs), default=0) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        n = min(len(seq), width)
        ids[i, :n] = torch.as_tensor(list(seq[:n]), dtype=torch.long)
        mask[i, :n] = 1
    return ids, mask
