"""Routing regularizers: pure functions of a :class:`~moe_lite.routing.Routing`.

Every loss in :data:`REGISTRY` is ``fn(routing) -> scalar tensor``; none holds state, none is applied
behind the caller's back. A layer computes the ones it was asked for and exposes them unweighted.

Axis legend: b batch, l tokens per sample, e experts, n = b*l flat tokens, a assignments.

Precision: logits / weights / scores in float16 or bfloat16 are computed in float32; float32 and
float64 inputs keep their dtype (so ``torch.autograd.gradcheck`` works in float64). The result lives
on the routing's device.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .routing import Routing

__all__ = [
    "load_balance",
    "importance",
    "z_loss",
    "entropy",
    "router_similarity",
    "sequence_balance",
    "per_layer_regression",
    "REGISTRY",
    "check_loss_weights",
]


# ---- helpers ----------------------------------------------------------------------------------
def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _upcast(t: Tensor) -> Tensor:
    """``t`` in its compute dtype (see :func:`_compute_dtype`)."""
    return t.to(_compute_dtype(t))


def _check(routing: Routing) -> None:
    """Raise ``ValueError`` unless ``routing.logits`` is ``[B, L, E]`` with ``E = num_experts``."""
    logits = routing.logits
    if logits.dim() != 3:
        raise ValueError(f"routing.logits must be [B, L, E], got shape {tuple(logits.shape)}")
    if logits.shape[-1] != routing.num_experts:
        raise ValueError(
            f"routing.logits has {logits.shape[-1]} experts on its last axis, "
            f"but routing.num_experts = {routing.num_experts}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"routing.logits must be floating point, got {logits.dtype}")


def _flat_logits(routing: Routing) -> Tensor:
    """float ``[N, E]``: the logits flattened over (b, l), upcast to the compute dtype."""
    _check(routing)
    return _upcast(routing.logits).reshape(-1, routing.num_experts)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0, with a finite gradient in both branches."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


# ---- Switch / Shazeer balance -----------------------------------------------------------------
def load_balance(routing: Routing) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, arXiv 2101.03961).

    ``loss = E * sum_e f_e * P_e`` where

    * ``f_e = tokens_per_expert[e] / A``: the fraction of all ``A`` assignments that went to expert
      e (no gradient; for top-p / Race routings a token counts once for every expert it selected);
    * ``P_e = mean_n softmax(logits)[n, e]``: the mean router probability of e over the N tokens.

    Value: exactly 1.0 at perfect balance (f and P uniform: ``E * E * (1/E) * (1/E)``); ``E`` when
    every assignment and all probability go to one expert. With no assignment at all (``A = 0``) the
    loss is 0 (still attached to the graph).

    Returns a scalar, differentiable through ``routing.logits``.
    """
    probs = _flat_logits(routing).softmax(-1)  # [N, E]
    p_mean = probs.mean(0)  # [E]
    counts = routing.tokens_per_expert.to(device=probs.device, dtype=probs.dtype)  # [E], no grad
    f = _safe_div(counts, counts.sum())  # [E]
    return routing.num_experts * (f * p_mean).sum()


def importance(routing: Routing) -> Tensor:
    """Importance loss of Shazeer et al. 2017 (arXiv 1701.06538): ``CV(importance)**2``.

    ``importance_e = sum_n dense_weight[n, e]`` (the combine weights each expert received) and
    ``CV**2 = Var_e(importance) / mean_e(importance)**2`` with the *population* variance.

    Value: 0 at perfect balance (every expert gets the same total weight); ``E - 1`` when one expert
    gets all the weight. Returns 0 when the mean importance is 0 (e.g. no assignment).
    Meant for non-negative combine weights (softmax / sigmoid gating); with identity gating the
    weights can be negative and the mean can come close to 0, which makes the loss explode.

    Returns a scalar, differentiable through ``routing.weight`` (the logits only reach it through
    the weights the router produced).
    """
    _check(routing)
    imp = _upcast(routing.dense_weight).sum(0)  # [E]
    mean = imp.mean()
    var = imp.var(unbiased=False)
    return _safe_div(var, mean * mean)


# ---- logit regularizers -----------------------------------------------------------------------
def z_loss(routing: Routing) -> Tensor:
    """Router z-loss of ST-MoE (Zoph et al. 2022, arXiv 2202.08906).

    ``loss = mean_n logsumexp_e(logits[n, e]) ** 2``; keeps the logits small.

    Value: for the uniform router with all logits 0 it is ``log(E) ** 2``; 0 only when
    ``logsumexp = 0`` for every token. Returns a scalar, differentiable through ``routing.logits``.
    """
    lse = torch.logsumexp(_flat_logits(routing), dim=-1)  # [N]
    return (lse * lse).mean()


def entropy(routing: Routing) -> Tensor:
    """Mean router entropy, the "dynamic loss" of Huang et al. 2024 (arXiv 2403.07652).

    ``loss = mean_n H(p_n)`` with ``p_n = softmax(logits[n])`` and ``H(p) = -sum_e p_e log p_e``
    (natural log, ``0 log 0 = 0``). Minimised to sharpen top-p routing.

    Value: ``log(E)`` for the uniform router (equal logits), 0 for a one-hot router.
    Returns a scalar, differentiable through ``routing.logits``.
    """
    logits = _flat_logits(routing)  # [N, E]
    logp = logits.log_softmax(-1)  # [N, E]
    p = logp.exp()
    plogp = torch.where(p > 0, p * torch.where(p > 0, logp, torch.zeros_like(logp)), torch.zeros_like(p))
    return -plogp.sum(-1).mean()


# ---- Expert Race ------------------------------------------------------------------------------
def _similarity_weight(mask: Tensor, num_experts: int) -> Tensor:
    """The constant ``W [E, E]`` of the router-similarity loss, from a float ``mask [N, E]``.

    ``M' = Mᵀ M``; its diagonal is scaled to sum to ``E`` and its off-diagonal to sum to ``E² - E``.
    A part that sums to 0 (the off-diagonal when every token has one expert, e.g. top-1; or
    everything when there is no assignment) stays 0 instead of NaN.
    """
    co = mask.T @ mask  # [E, E] co-selection counts
    diag = torch.diag_embed(torch.diagonal(co))  # [E, E]
    off = co - diag  # [E, E]
    e = num_experts
    w_diag = _safe_div(diag * e, diag.sum())
    w_off = _safe_div(off * (e * e - e), off.sum())
    return (w_diag + w_off).detach()


def router_similarity(routing: Routing) -> Tensor:
    """Router-similarity loss of Expert Race (Yuan et al. 2025, arXiv 2503.16057, eqs. 9-11).

    With ``P = softmax(logits)`` ``[N, E]`` and ``M = mask`` as float ``[N, E]``:
    ``P' = Pᵀ P``, ``M' = Mᵀ M`` (co-selection counts), ``W`` = ``M'`` with its diagonal scaled to
    sum to ``E`` and its off-diagonal scaled to sum to ``E² - E`` (detached), and
    ``loss = sum(W ⊙ P') / N``.

    The diagonal is a Switch-like load term (``E f_e * mean_n P_ne²``); the off-diagonal penalises
    expert pairs that are both often co-selected and jointly probable, so the router spreads its
    probability over diverse pairs.

    Degenerate cases: when no token has two experts (top-1, Switch) the off-diagonal of ``M'`` is 0
    and contributes 0 (no NaN); with no assignment at all the loss is 0.

    Value: 1.0 whenever co-selection is uniform (then ``W`` is all ones and
    ``sum_ij P'_ij / N = mean_n (sum_e P_ne)² = 1`` for any P), in particular for a balanced uniform
    router. Returns a scalar, differentiable through ``routing.logits``.
    """
    probs = _flat_logits(routing).softmax(-1)  # [N, E]
    n = probs.shape[0]
    if n == 0:
        return probs.sum()
    mask = routing.mask.to(device=probs.device, dtype=probs.dtype)  # [N, E]
    w = _similarity_weight(mask, routing.num_experts)  # [E, E]
    p_corr = probs.T @ probs  # [E, E]
    return (w * p_corr).sum() / n


# ---- DeepSeek-V3 ------------------------------------------------------------------------------
def _normalised_scores(routing: Routing) -> Tensor:
    """float ``[B, L, E]``: gating scores ``s'`` normalised to sum to 1 over experts.

    ``routing.scores`` when given (clamped at 0 first, so identity scores work), else
    ``softmax(logits)``. A token whose clamped scores are all 0 gets the uniform ``1/E``.
    """
    if routing.scores is None:
        return _upcast(routing.logits).softmax(-1)
    scores = routing.scores
    if scores.shape != routing.logits.shape:
        raise ValueError(
            f"routing.scores must have the logits' shape {tuple(routing.logits.shape)}, "
            f"got {tuple(scores.shape)}"
        )
    s = _upcast(scores).clamp_min(0)  # [B, L, E]
    total = s.sum(-1, keepdim=True)  # [B, L, 1]
    uniform = torch.full_like(s, 1.0 / routing.num_experts)
    return torch.where(total > 0, _safe_div(s, total), uniform)


def sequence_balance(routing: Routing) -> Tensor:
    """Sequence-wise balance loss of DeepSeek-V3 (arXiv 2412.19437, eqs. 17-20).

    For every sequence (sample) b with L tokens, and ``K = A / N`` the mean experts per token of the
    whole routing:

    * ``f_i = E / (K * L) * sum_t 1[token t of b -> expert i]`` (no gradient);
    * ``P_i = mean_t s'_{i,t}``, with ``s'`` the gating scores normalised to sum to 1 over experts:
      ``routing.scores`` if set (clamped at 0, so identity scores work), else ``softmax(logits)``;

    and ``loss = mean_b sum_i f_i P_i`` (the paper sums a single sequence; we average over the batch
    so the value does not grow with B).

    Value: 1.0 at perfect balance (each expert gets ``K*L/E`` tokens of every sequence, so f_i = 1,
    and ``P_i = 1/E``); ``E`` when one expert takes everything. 0 with no assignment at all.
    Returns a scalar, differentiable through ``routing.scores`` when set, else ``routing.logits``.
    """
    _check(routing)
    b, l, e = routing.logits.shape
    s = _normalised_scores(routing)  # [B, L, E]
    mask = routing.mask.to(device=s.device, dtype=s.dtype).reshape(b, l, e)  # [B, L, E], no grad
    k = routing.num_assignments / max(routing.num_tokens, 1)
    if k == 0 or b == 0 or l == 0:
        return s.sum() * 0
    f = mask.sum(1) * (e / (k * l))  # [B, E]
    p = s.mean(1)  # [B, E]
    return (f * p).sum(-1).mean()


def per_layer_regression(predictions: Sequence[Tensor], target: Tensor) -> Tensor:
    """Per-layer regularization (PLR) of Expert Race (Yuan et al. 2025, arXiv 2503.16057, §3.4).

    Every MoE layer's target head predicts the final regression target from its own tokens; the
    loss is the L2 error of each layer, summed over layers:
    ``loss = sum_i mean((predictions[i] - target) ** 2)``.

    Args:
        predictions: a non-empty sequence (list / tuple) of float ``[B, L, P]`` tensors, one per layer.
        target: float ``[B, L, P]`` (e.g. the patchified noise / velocity a DiT regresses).
    Returns:
        A scalar; 0 when every head predicts the target exactly.
    Raises:
        ValueError: empty ``predictions``, a bare tensor instead of a sequence, a target that is not
            ``[B, L, P]``, or a prediction whose shape differs from the target's.
    """
    if isinstance(predictions, Tensor):
        raise ValueError("predictions must be a sequence of [B, L, P] tensors, not a single tensor")
    preds = list(predictions)
    if not preds:
        raise ValueError("predictions is empty: per_layer_regression needs at least one layer")
    if target.dim() != 3:
        raise ValueError(f"target must be [B, L, P], got shape {tuple(target.shape)}")
    total = None
    for i, pred in enumerate(preds):
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(
                f"predictions[{i}] has shape {tuple(pred.shape)}, target has {tuple(target.shape)}"
            )
        dtype = torch.promote_types(_compute_dtype(pred), _compute_dtype(target))
        diff = pred.to(dtype) - target.to(device=pred.device, dtype=dtype)  # [B, L, P]
        mse = (diff * diff).mean()
        total = mse if total is None else total + mse
    return total


REGISTRY: Dict[str, Callable[[Routing], Tensor]] = {
    "load_balance": load_balance,
    "importance": importance,
    "z_loss": z_loss,
    "entropy": entropy,
    "router_similarity": router_similarity,
    "sequence_balance": sequence_balance,
}


def check_loss_weights(weights: Optional[Mapping[str, Any]], who: str) -> Dict[str, float]:
    """``weights`` (``{loss name: weight}``; None is ``{}``) as ``{name: float}``, checked by the one rule
    every layer and config uses: a dict, each name a key of :data:`REGISTRY`, each weight a real
    number (not a bool), finite and ``>= 0`` (a negative weight would reward the imbalance the loss
    measures; nan or inf poisons training). ``ValueError`` naming ``who`` and the loss otherwise."""
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise ValueError(f"{who}: losses must be a dict {{name: weight}}, got {type(weights).__name__}")
    unknown = [name for name in weights if name not in REGISTRY]
    if unknown:
        raise ValueError(f"{who}: unknown loss name(s) {unknown}; valid names: {sorted(REGISTRY)}")
    out = {}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{who}: weight of loss {name!r} must be a finite number >= 0, got {w!r}")
        out[name] = float(w)
    return out
