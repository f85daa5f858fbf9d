"""Analysis views of MoE routing: expert co-activation, expert load over training, cross-layer paths.

Pure functions of :class:`~moe_lite.routing.Routing` records and of the records the
:class:`~moe_lite.experiments.common.StepStats` training callback logs; the figures that draw them
are in :mod:`moe_lite.viz` (``coactivation_heatmap``, ``expert_load_heatmap``, ``expert_sankey``).
Router entropy, the fourth view, is a statistic of every routing: ``routing.summary()``.

Axis legend: n = b*l flat tokens, e experts, t logged steps.

Counts (``normalize=False``) add up over batches: sum them over a test set, then normalise once.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .routing import Routing

__all__ = [
    "EXPERT_LOAD",
    "coactivation",
    "expert_load",
    "top_expert",
    "expert_transitions",
    "layer_transitions",
    "transition_predictability",
    "load_over_training",
]

#: the key suffix under which StepStats logs a layer's :func:`expert_load`: ``"<layer>/expert_load"``.
EXPERT_LOAD = "expert_load"


def _check(routing: Any, name: str = "routing") -> Routing:
    if not isinstance(routing, Routing):
        raise ValueError(f"{name} must be a moe_lite.Routing, got {type(routing).__name__}")
    return routing


def coactivation(routing: Routing, normalize: bool = True) -> Tensor:
    """float ``[E, E]``: how often experts i and j serve the same token.

    ``C[i, j]`` = tokens sent to both i and j (``maskᵀ mask``); the diagonal ``C[i, i]`` is expert
    i's load (tokens sent to it). ``normalize`` (default) divides by the N tokens, so an entry is the
    share of all tokens (the diagonal sums to the mean experts per token). Symmetric. Top-1 routing
    has a zero off-diagonal.
    """
    m = _check(routing).mask.float()  # [N, E]
    co = m.t() @ m
    return co / max(routing.num_tokens, 1) if normalize else co


def expert_load(routing: Routing) -> Tensor:
    """float ``[E]``: each expert's share of the assignments (sums to 1; all zero with none; 1/E = balanced)."""
    tpe = _check(routing).tokens_per_expert.float()
    return tpe / tpe.sum().clamp_min(1.0)


def top_expert(routing: Routing) -> Tensor:
    """long ``[N]``: each token's highest-weight expert (lowest index on a tie), ``-1`` with none."""
    routing = _check(routing)
    mask = routing.mask  # [N, E]
    w = routing.dense_weight.detach().float().masked_fill(~mask, float("-inf"))
    return torch.where(mask.any(-1), w.argmax(-1), torch.full((routing.num_tokens,), -1, device=mask.device))


def expert_transitions(first: Routing, second: Routing) -> Tensor:
    """float ``[E1, E2]`` counts: tokens whose top expert is i in ``first`` and j in ``second``.

    Both routings must be over the same N tokens (two MoE layers of one forward). Tokens without an
    expert in either layer (dropped, skipped) are left out. Sum over batches, then
    :func:`transition_predictability`.
    """
    first, second = _check(first, "first"), _check(second, "second")
    if first.num_tokens != second.num_tokens:
        raise ValueError(f"first and second must route the same tokens, got N={first.num_tokens} "
                         f"and N={second.num_tokens}")
    a, b = top_expert(first), top_expert(second)  # [N] each
    keep = (a >= 0) & (b >= 0)
    e1, e2 = first.num_experts, second.num_experts
    flat = torch.bincount(a[keep] * e2 + b[keep], minlength=e1 * e2)
    return flat.float().view(e1, e2)


def layer_transitions(routings: Mapping[str, Routing]) -> Dict[Tuple[str, str], Tensor]:
    """``{(layer, next layer): [E, E] counts}`` of :func:`expert_transitions` for every pair of
    consecutive layers of ``routings`` (in its order, e.g. ``{name: layer.routing}`` of
    :func:`moe_lite.moe_layers`)."""
    names = list(routings)
    return {(a, b): expert_transitions(routings[a], routings[b]) for a, b in zip(names, names[1:])}


def transition_predictability(counts: Any) -> Dict[str, float]:
    """How predictable the next layer's top expert B is from this layer's A, from ``[E1, E2]`` counts.

    Keys (entropies in nats):
        ``tokens``: the counted tokens;
        ``entropy_next`` ``H(B)``; ``conditional_entropy`` ``H(B | A)``;
        ``mutual_information`` ``I(A; B) = H(B) - H(B | A)``;
        ``normalized_mi`` ``I / H(B)``: the share of the next layer's uncertainty that this layer's
        expert removes (0 = independent, 1 = determined; 1 when ``H(B) = 0``, nothing to predict);
        ``top1_accuracy``: accuracy of guessing, for each A, its most frequent B;
        ``baseline_accuracy``: accuracy of always guessing the overall most frequent B.
    With no token counted every value but ``tokens`` is nan.
    """
    c = torch.as_tensor(counts, dtype=torch.float64).detach().cpu()
    if c.dim() != 2 or (c < 0).any() or not torch.isfinite(c).all():
        raise ValueError(f"counts must be a non-negative finite [E1, E2] matrix, got shape {tuple(c.shape)}")
    total = float(c.sum())
    if total <= 0:
        nan = float("nan")
        return {"tokens": 0.0, "entropy_next": nan, "conditional_entropy": nan, "mutual_information": nan,
                "normalized_mi": nan, "top1_accuracy": nan, "baseline_accuracy": nan}
    joint = c / total  # [E1, E2]
    pa, pb = joint.sum(1), joint.sum(0)

    def h(p: Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    h_b = h(pb)
    h_b_given_a = max(h(joint.reshape(-1)) - h(pa), 0.0)  # H(A, B) - H(A)
    mi = max(h_b - h_b_given_a, 0.0)
    return {"tokens": total, "entropy_next": h_b, "conditional_entropy": h_b_given_a, "mutual_information": mi,
            "normalized_mi": mi / h_b if h_b > 1e-12 else 1.0,
            "top1_accuracy": float(c.max(1).values.sum()) / total,
            "baseline_accuracy": float(pb.max())}


def load_over_training(records: Sequence[Mapping[str, Any]], layer: Optional[str] = None,
                       x: str = "step") -> Dict[str, Tuple[List[float], Tensor]]:
    """Per-expert load over training from StepStats records: ``{layer: (xs [T], load [T, E])}``.

    Reads every ``"<layer>/expert_load"`` entry (an ``[E]`` list of assignment shares, see
    :func:`expert_load`); records without one are skipped (e.g. logged by an older StepStats), so
    ``T`` may differ between layers. ``layer`` keeps one layer (a ValueError names the ones logged).
    """
    if isinstance(records, Mapping) or isinstance(records, (str, bytes)):
        raise ValueError(f"records must be a list of dicts, got {type(records).__name__}")
    suffix = "/" + EXPERT_LOAD
    series: Dict[str, Tuple[List[float], List[List[float]]]] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"records[{i}] must be a dict, got {type(record).__name__}")
        for key, value in record.items():
            if not (isinstance(key, str) and key.endswith(suffix)):
                continue
            name = key[: -len(suffix)]
            xs, rows = series.setdefault(name, ([], []))
            if rows and len(value) != len(rows[0]):
                raise ValueError(f"records[{i}][{key!r}] has {len(value)} experts, earlier records {len(rows[0])}")
            xs.append(float(record.get(x, i)))
            rows.append([float(v) for v in value])
    if layer is not None:
        if layer not in series:
            raise ValueError(f"no {EXPERT_LOAD!r} logged for layer {layer!r}; logged layers: {sorted(series)}")
        series = {layer: series[layer]}
    return {name: (xs, torch.tensor(rows, dtype=torch.float32)) for name, (xs, rows) in series.items()}

