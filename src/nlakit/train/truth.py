"""The claim-truth reward of RL: how true a sampled explanation's checkable claims are of its row.

Each claim is checked by `nlakit.nla.claims` against the row's own text and the target's real
next-token distribution there, deterministically (no model judges a claim). The target runs
once per rl row, on the first step that draws it, and the row's truth is kept.
"""

from __future__ import annotations

import torch

from nlakit.extract.store import RL, ActivationStore, load_target
from nlakit.nla.claims import Claims, Truth, parse_claims, truth_score, truths_for_prefixes, verify


class RowTruths:
    """The truth at each row of the store's rl split (context tokens, text, the target's real
    top-5 next tokens), computed on first use with the store's own target model."""

    def __init__(self, store: ActivationStore, device=None):
        self.model, self.tokenizer = load_target(store, device=device)
        self.model.eval().requires_grad_(False)
        # row_id order, as `store.vectors(RL)` and so the rows RL draws
        self.prefixes = store.table(RL, columns=["row_id", "prefix"]).column("prefix").to_pylist()
        self._cache: dict[int, Truth] = {}

    @torch.no_grad()
    def truths(self, rows: list[int]) -> list[Truth]:
        """The truth of each rl row index (the target runs for the rows not seen yet)."""
        new = [r for r in dict.fromkeys(rows) if r not in self._cache]
        if new:  # no stated tokens to price: the top 5 is what the reward checks
            found = truths_for_prefixes(self.model, self.tokenizer,
                                        [self.prefixes[r] for r in new], [Claims()] * len(new))
            self._cache.update(zip(new, found))
        return [self._cache[r] for r in rows]

    def scores(self, rows: list[int], texts: list[str], group_size: int) -> torch.Tensor:
        """`truth_score` of each explanation; texts are activation-major (row i's group_size
        samples together), as rollouts are. [len(texts)]"""
        truths = [t for t in self.truths(rows) for _ in range(group_size)]
        return torch.tensor([truth_score(verify(parse_claims(text), truth))
                             for text, truth in zip(texts, truths)], dtype=torch.float32)
