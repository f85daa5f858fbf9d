"""Helpers the router specs share: hand-made logits, routings as ``{(token, expert): weight}``, and the
comparison of a router with its slow per-token reference (outputs and the gradient reaching the logits).
"""
from __future__ import annotations

import pytest
import torch

from moe_lite.routing import Routing

F64 = torch.float64
SEEDS = (0, 1, 2, 3)


def num(t) -> float:
    return float(t.detach()) if torch.is_tensor(t) else float(t)


def logits_of(probs) -> torch.Tensor:
    """float64 logits ``[B, L, E]`` whose softmax is ``probs`` (nested lists)."""
    return torch.tensor(probs, dtype=F64).log()


def pairs(r: Routing) -> dict:
    """``{(token, expert): weight}`` as plain Python numbers."""
    return {(int(t), int(e)): num(w) for t, e, w in zip(r.token, r.expert, r.weight)}


def assert_pairs(r: Routing, expected: dict, atol: float = 1e-9) -> None:
    got = pairs(r)
    assert set(got) == set(expected), f"pairs {sorted(got)} != expected {sorted(expected)}"
    for key, w in expected.items():
        assert got[key] == pytest.approx(w, abs=atol), f"weight of {key}: {got[key]} != {w}"


def assert_pairs_tensors(got: dict, ref: dict) -> None:
    """Two ``{(t, e): weight}`` maps hold the same pairs and weights (to 1e-10)."""
    assert set(got) == set(ref), f"pairs {sorted(got)} != reference {sorted(ref)}"
    for key in ref:
        assert num(got[key]) == pytest.approx(num(ref[key]), abs=1e-10), key


def as_dict(router):
    """A router -> ``logits -> {(t, e): weight tensor}`` (differentiable weights)."""
    def fn(lg):
        r = router(lg)
        return {(int(t), int(e)): w for t, e, w in zip(r.token, r.expert, r.weight)}
    return fn


def loss_grad(fn, logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum_(t, e) weight * c[t, e]`` w.r.t. the logits; ``fn(logits) -> {(t, e): weight}``."""
    lg = logits.detach().clone().requires_grad_(True)
    loss = sum(w * c[t, e] for (t, e), w in fn(lg).items())
    loss.backward()
    return lg.grad


def assert_matches(router, ref_fn, logits: torch.Tensor, seed: int, constant: bool = False) -> None:
    """Same pairs, weights and gradient of a random weighted loss as the reference (float64).
    ``constant``: the weights do not depend on the logits (one expert renormalised), so the gradient is 0."""
    assert_pairs_tensors(as_dict(router)(logits), ref_fn(logits))
    n, e = logits.shape[0] * logits.shape[1], logits.shape[2]
    c = torch.randn(n, e, dtype=F64, generator=torch.Generator().manual_seed(100 + seed))
    g_router, g_ref = loss_grad(as_dict(router), logits, c), loss_grad(ref_fn, logits, c)
    assert constant or g_router.abs().sum() > 0, "no gradient reached the logits"
    assert torch.allclose(g_router, g_ref, atol=1e-10)


def gate_row(row: torch.Tensor, gating: str) -> torch.Tensor:
    """The selection scores of one token's logits ``[E]``: softmax, sigmoid or the logits themselves."""
    if gating == "softmax":
        ex = torch.exp(row - row.max())
        return ex / ex.sum()
    if gating == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-row))
    return row
