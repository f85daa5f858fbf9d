"""Hand-made router inputs the notebooks use to show a rule on a handful of tokens."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


def pair_logits(pairs: Sequence[Tuple[int, int]], num_experts: int = 4, scale: float = 2.0) -> Tensor:
    """Router logits ``[1, T, E]`` for ``T = len(pairs)`` tokens, token t preferring the expert pair
    ``pairs[t] = (i, j)``: logit ``scale`` on experts i and j, 0 on the others. So a top-2 router
    sends token t to exactly that pair, and the pairs given decide the co-selection pattern.

    >>> pair_logits([(0, 1), (2, 3)]).shape
    torch.Size([1, 2, 4])
    """
    logits = torch.zeros(1, len(pairs), num_experts)
    for token, pair in enumerate(pairs):
        i, j = pair
        if i == j or not (0 <= i < num_experts and 0 <= j < num_experts):
            raise ValueError(f"pair {token} is {pair!r}: it needs two different experts in [0, {num_experts})")
        logits[0, token, [i, j]] = scale
    return logits


__all__ = ["pair_logits"]
