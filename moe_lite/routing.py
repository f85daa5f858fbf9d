"""The `Routing` record: what a router decided, and every statistic derived from it.

Axis legend used throughout the package:
    b batch, l tokens per sample, e experts, n = b*l flat tokens, a assignments (token, expert) pairs.

A router turns logits ``[B, L, E]`` into a :class:`Routing`; experts, losses, statistics and plots
only ever read a ``Routing``. Nothing here holds state between calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "Routing",
    "routing_summary",
    "router_entropy",
    "combination_usage",
    "max_violation",
    "load_cv",
    "by_label",
    "groups_per_token",
]


class NonFiniteError(ValueError):
    """A tensor inside the forward that must be finite holds NaN or inf.

    Raised by routers and MoE layers on non-finite input. During training this almost always means the
    model diverged, so the trainer turns it into its ``TrainingDiverged`` error (with the step); outside
    training it is an ordinary ``ValueError``.
    """


@dataclass
class Routing:
    """A routing decision for ``N = B*L`` tokens over ``E`` experts.

    Attributes:
        logits: float ``[B, L, E]``, the router's raw logits (what losses read).
        token: long ``[A]``, flat token index in ``[0, N)`` of each assignment.
        expert: long ``[A]``, expert index in ``[0, E)`` of each assignment.
        weight: float ``[A]``, combine weight of each assignment (carries gradient to the router).
        num_experts: ``E``.
        scores: optional float ``[B, L, E]``, the gating scores the router selected on
            (softmax, sigmoid or identity of the logits); ``None`` means softmax(logits).
        info: router-specific scalars or tensors worth logging (e.g. ``threshold`` for Race,
            ``capacity`` for Switch). Never used by the dispatch.

    Each (token, expert) pair appears at most once. A token with no assignment gets zero
    from the routed experts (for Switch this is a *dropped* token).

    Construction checks the record cheaply (``ValueError`` naming the field): shapes, dtypes,
    devices, equal lengths, ``num_experts`` = the logits' E, and, for CPU tensors only, that the
    token and expert indices are in range (on a GPU that check would stall every forward on a
    host read). Whether a pair repeats is not checked; ``scores`` is checked by the losses that
    read it.
    """

    logits: Tensor
    token: Tensor
    expert: Tensor
    weight: Tensor
    num_experts: int
    scores: Optional[Tensor] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_routing(self)

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    @property
    def seq_len(self) -> int:
        return self.logits.shape[1]

    @property
    def num_tokens(self) -> int:
        """``N = B * L``."""
        return self.logits.shape[0] * self.logits.shape[1]

    @property
    def num_assignments(self) -> int:
        """``A``."""
        return int(self.token.numel())

    # ---- derived views ------------------------------------------------------------------------
    @property
    def tokens_per_expert(self) -> Tensor:
        """long ``[E]``: how many tokens each expert received."""
        return torch.bincount(self.expert, minlength=self.num_experts)

    @property
    def experts_per_token(self) -> Tensor:
        """long ``[N]``: how many experts each flat token was sent to (0 = skipped/dropped)."""
        return torch.bincount(self.token, minlength=self.num_tokens)

    @property
    def mask(self) -> Tensor:
        """bool ``[N, E]``: ``mask[n, e]`` is True when token n was sent to expert e."""
        m = torch.zeros(self.num_tokens, self.num_experts, dtype=torch.bool, device=self.token.device)
        m[self.token, self.expert] = True
        return m

    @property
    def dense_weight(self) -> Tensor:
        """float ``[N, E]``: combine weights scattered into a dense matrix (0 where unassigned)."""
        w = torch.zeros(self.num_tokens, self.num_experts, dtype=self.weight.dtype, device=self.weight.device)
        return w.index_put((self.token, self.expert), self.weight)

    @property
    def probs(self) -> Tensor:
        """float ``[N, E]``: softmax of the logits over experts (what the balance losses use).

        Computed in float32 for half / bfloat16 logits; float64 logits stay float64.
        """
        logits = self.logits.reshape(-1, self.num_experts)
        if logits.dtype != torch.float64:
            logits = logits.float()
        return logits.softmax(-1)

    def summary(self) -> Dict[str, float]:
        """Plain-float statistics of this routing; see :func:`routing_summary`."""
        return routing_summary(self)


def _describe(t: Any) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def _check_routing(r: Routing) -> None:
    """The checks of :class:`Routing` construction (no host read of a non-CPU tensor)."""
    logits = r.logits
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"Routing: logits must be a floating tensor [B, L, E], got {_describe(logits)}")
    b, l, e = logits.shape
    if not isinstance(r.num_experts, int) or isinstance(r.num_experts, bool) or r.num_experts != e:
        raise ValueError(f"Routing: num_experts={r.num_experts!r} must be the int E={e} of the logits "
                         f"{tuple(logits.shape)}")
    for name in ("token", "expert"):
        t = getattr(r, name)
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != torch.long:
            raise ValueError(f"Routing: {name} must be a long tensor [A], got {_describe(t)}")
    if not isinstance(r.weight, Tensor) or r.weight.dim() != 1 or not r.weight.is_floating_point():
        raise ValueError(f"Routing: weight must be a floating tensor [A], got {_describe(r.weight)}")
    lengths = (r.token.numel(), r.expert.numel(), r.weight.numel())
    if len(set(lengths)) != 1:
        raise ValueError(f"Routing: token, expert and weight must have the same length A, got {lengths}")
    devices = {t.device for t in (logits, r.token, r.expert, r.weight)}
    if len(devices) != 1:
        raise ValueError(f"Routing: logits, token, expert and weight must be on one device, "
                         f"got {sorted(map(str, devices))}")
    if not isinstance(r.info, Mapping):
        raise ValueError(f"Routing: info must be a dict, got {type(r.info).__name__}")
    if r.token.device.type == "cpu" and lengths[0]:  # a value check costs no device sync only here
        for name, t, bound in (("token", r.token, b * l), ("expert", r.expert, e)):
            low, high = (int(v) for v in torch.aminmax(t))
            if low < 0 or high >= bound:
                raise ValueError(f"Routing: {name} indices must lie in [0, {bound}), got range [{low}, {high}]")


# ---- statistics -------------------------------------------------------------------------------
def load_cv(tokens_per_expert: Tensor) -> float:
    """Coefficient of variation (std / mean, population std) of the per-expert load. 0 = balanced."""
    load = tokens_per_expert.float()
    mean = load.mean()
    if mean <= 0:
        return 0.0
    return float(load.std(unbiased=False) / mean)


def max_violation(tokens_per_expert: Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load (Wang et al. 2024). 0 = balanced."""
    load = tokens_per_expert.float()
    mean = load.mean()
    if mean <= 0:
        return 0.0
    return float((load.max() - mean) / mean)


def combination_usage(mask: Tensor, coverage: float = 0.95) -> float:
    """Combination usage in percent, as the Expert Race paper's pseudocode computes it (Fig. 13).

    Count, for every unordered expert pair (i < j), the tokens whose selected set holds both;
    sort the counts descending, normalise, and return the share of all ``E*(E-1)/2`` pairs whose
    cumulative share is still below ``coverage`` (``100 * (c.cumsum() < 0.95).mean()``): the pair
    that reaches the line is not counted, so one pair used by every token scores 0, like no
    co-activation at all. High = many distinct pairs in use.

    Args:
        mask: bool ``[N, E]``.
    Returns:
        A float in [0, 100]; 0.0 when no token has two experts (no co-activation at all).
    """
    m = mask.float()
    num_experts = m.shape[1]
    if num_experts < 2:
        return 0.0
    co = m.T @ m  # [E, E] co-selection counts
    iu = torch.triu_indices(num_experts, num_experts, offset=1, device=co.device)
    counts = co[iu[0], iu[1]]  # [E*(E-1)/2]
    total = counts.sum()
    if total <= 0:
        return 0.0
    share = counts.sort(descending=True).values / total
    # the tolerance keeps a cumulative share that is exactly 95% in exact arithmetic from counting
    below = int((share.cumsum(0) < coverage - 1e-9).sum().item())
    return 100.0 * below / counts.numel()


def router_entropy(routing: Routing) -> Tensor:
    """float ``[N]``: entropy (nats) of each token's router distribution ``softmax(logits)``.

    ``H(p) = -sum_e p_e log p_e`` with ``0 log 0 = 0``: ``log E`` for a router that cannot decide
    (equal logits), 0 for a one-hot one. Read off the logits, so it is the same for every router
    over the same gate (what :func:`moe_lite.losses.entropy` minimises, averaged there).
    """
    p = routing.probs  # [N, E]
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


def routing_summary(routing: Routing) -> Dict[str, float]:
    """Every headline statistic of one routing decision, as plain floats.

    Keys: ``experts_per_token`` (mean), ``experts_per_token_max``, ``dropped_fraction`` (share of
    tokens with no expert), ``load_cv``, ``max_vio``, ``dead_experts`` (experts with no token),
    ``combination_usage`` (percent), ``tokens_per_expert_min`` / ``_max``, ``router_entropy`` (mean
    over tokens of :func:`router_entropy`, nats) and ``router_entropy_norm`` (that divided by
    ``log E``: 1 = undecided router, 0 = one-hot; 0 when E = 1).
    """
    tpe = routing.tokens_per_expert
    ept = routing.experts_per_token
    entropy = float(router_entropy(routing).detach().mean()) if routing.num_tokens else 0.0
    log_e = math.log(routing.num_experts)
    return {
        "experts_per_token": float(ept.float().mean()),
        "experts_per_token_max": float(ept.max()) if ept.numel() else 0.0,
        "dropped_fraction": float((ept == 0).float().mean()),
        "load_cv": load_cv(tpe),
        "max_vio": max_violation(tpe),
        "dead_experts": float((tpe == 0).sum()),
        "combination_usage": combination_usage(routing.mask),
        "tokens_per_expert_min": float(tpe.min()),
        "tokens_per_expert_max": float(tpe.max()),
        "router_entropy": entropy,
        "router_entropy_norm": entropy / log_e if log_e > 0 else 0.0,
    }


def by_label(routing: Routing, labels: Tensor, num_labels: Optional[int] = None) -> Dict[str, Tensor]:
    """Break routing down by a per-token label (class, diffusion timestep bucket, patch position).

    Args:
        routing: a Routing over ``N = B*L`` tokens.
        labels: long, either ``[B]`` (one label per sample, e.g. its class or timestep bucket,
            broadcast over its L tokens), ``[L]`` (one per position, e.g. the patch index,
            broadcast over the batch), ``[B, L]`` or ``[N]``. When ``B == L`` a 1-D tensor is read
            as ``[B]``.
        num_labels: number of label values; defaults to ``labels.max() + 1``.

    Returns a dict of tensors, row ``c`` for label ``c``:
        ``counts`` float ``[C, E]``: assignments of label-c tokens to each expert;
        ``fraction`` float ``[C, E]``: share of label-c tokens that were sent to each expert;
        ``tokens`` float ``[C]``: how many tokens carry label c;
        ``experts_per_token`` float ``[C]``: mean experts per token within label c (nan if none);
        ``dropped_fraction`` float ``[C]``: share of label-c tokens with no expert (nan if none).
    """
    b, l, n = routing.batch_size, routing.seq_len, routing.num_tokens
    labels = torch.as_tensor(labels, device=routing.token.device).long()
    if labels.dim() == 1 and labels.numel() == b and b != n:
        flat = labels.repeat_interleave(l)
    elif labels.dim() == 1 and labels.numel() == l and l != n:
        flat = labels.repeat(b)
    elif (labels.dim() == 1 and labels.numel() == n) or tuple(labels.shape) == (b, l):
        flat = labels.reshape(-1)
    else:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} fit neither [B]=({b},), [L]=({l},), "
            f"[B, L]=({b}, {l}) nor [N]=({n},)"
        )
    if flat.numel() and flat.min() < 0:
        raise ValueError("labels must be non-negative integers")
    c = int(num_labels) if num_labels is not None else int(flat.max()) + 1 if flat.numel() else 0
    if flat.numel() and int(flat.max()) >= c:
        raise ValueError(f"labels must be < num_labels={c}, got {int(flat.max())}")
    e = routing.num_experts
    counts = torch.zeros(c, e, device=flat.device)
    counts.index_put_((flat[routing.token], routing.expert), torch.ones_like(routing.token, dtype=torch.float), accumulate=True)
    tokens = torch.bincount(flat, minlength=c).float()
    ept = routing.experts_per_token.float()
    ept_sum = torch.zeros(c, device=flat.device).index_add_(0, flat, ept)
    zero_sum = torch.zeros(c, device=flat.device).index_add_(0, flat, (ept == 0).float())
    denom = tokens.clamp_min(1)
    nan = torch.full_like(tokens, float("nan"))
    return {
        "counts": counts,
        "fraction": counts / denom[:, None],
        "tokens": tokens,
        "experts_per_token": torch.where(tokens > 0, ept_sum / denom, nan),
        "dropped_fraction": torch.where(tokens > 0, zero_sum / denom, nan),
    }


def groups_per_token(routing: Routing, groups: Optional[int] = None) -> Tensor:
    """long ``[N]``: how many distinct expert groups each token was sent to (0 = no expert).

    The experts form ``groups`` equal contiguous groups (group g holds ``[g*E/G, (g+1)*E/G)``, e.g.
    the experts of one device or node), so this counts the groups a token's activations travel
    to: the cross-group traffic that group-limited routing (``TopK(..., groups, top_groups)``)
    caps at ``top_groups``. ``groups`` defaults to ``routing.info["groups"]``.
    """
    if groups is None:
        groups = routing.info.get("groups")
        if groups is None:
            raise ValueError("groups_per_token needs groups: pass groups=..., or a routing whose "
                             "info has 'groups' (a group-limited router)")
    e = routing.num_experts
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or e % groups:
        raise ValueError(f"groups={groups!r} must be an int >= 1 that splits the E={e} experts into equal groups")
    hit = torch.zeros(routing.num_tokens, groups, dtype=torch.bool, device=routing.token.device)  # [N, G]
    hit[routing.token, routing.expert // (e // groups)] = True
    return hit.sum(-1)
