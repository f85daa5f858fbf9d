"""Every router: logits ``[B, L, E]`` -> :class:`~moe_lite.routing.Routing`. No expert code here.

Axis legend: ``b`` batch, ``l`` tokens per sample, ``e`` experts, ``n = b*l`` flat tokens,
``a`` assignments (token, expert pairs), ``g`` selection groups, ``c`` candidates per group.

Every router shares one recipe: compute *scores* from the logits (softmax / sigmoid / identity),
decide a bool *mask* ``[B, L, E]`` of selected (token, expert) pairs, and read the combine
*weights* off a dense ``[B, L, E]`` tensor at the selected pairs (so the gradient reaches the
logits through ``Routing.weight``). Selection itself is discrete and carries no gradient.

Train and eval run the same code except where the method differs: noise (``TopK``) is train-only,
``Race`` may select with its EMA threshold in eval, ``BalancedAssignment`` solves the balanced
problem only in training, ``BiasBalanced`` counts its load only in training.

Routers: :class:`TopK`, :class:`Switch`, :class:`ExpertChoice`, :class:`TopP`, :class:`Race`,
:class:`Hash`, :class:`BalancedAssignment`, :class:`BiasBalanced`, :class:`LearnedThreshold`,
:class:`FixedThreshold`. A router is described and built in one place: :data:`ROUTERS` maps each
lowercase name to its class, and each class declares what it needs from its layer (``needs``), the
keywords a bare spec builds with (``defaults``) and its tunable :class:`Knob` s (``knobs``);
:class:`RouterSpec` ``(name, **kwargs)`` is the frozen, serialisable description that configs,
presets (:data:`PRESETS`, DiT's routing names), the explorer and the bench take, and
``spec.build(dim, num_experts)`` builds a fresh router. Adding a router = one class here, one line
in the registry (or :func:`register`), and its tests. :func:`make_router` builds one by name.
:class:`Capacity` wraps any router with a
per-expert capacity (dropping), :class:`NullExperts` adds zero-compute null experts (AdaMoE);
``TopK`` and ``BiasBalanced`` take group-limited routing (``groups``, ``top_groups``);
``ExpertChoice`` takes its capacity factor and per-sample or per-batch groups. Cosine routing
(X-MoE) is a gate: :class:`moe_lite.layers.CosineGate`.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .routing import NonFiniteError, Routing

__all__ = [
    "Router",
    "TopK",
    "Switch",
    "ExpertChoice",
    "TopP",
    "Race",
    "Hash",
    "BalancedAssignment",
    "BiasBalanced",
    "LearnedThreshold",
    "InferenceThreshold",
    "FixedThreshold",
    "Capacity",
    "NullExperts",
    "Knob",
    "CAPACITY_KNOB",
    "RouterSpec",
    "router_class",
    "ROUTERS",
    "PRESETS",
    "LAYER_FACTS",
    "register",
    "unregister",
    "make_router",
    "balanced_assignment",
    "check_logits",
    "group_topk_count",
]

GATINGS = ("softmax", "sigmoid", "identity")
AXES = "BLE"


# ---- validation -------------------------------------------------------------------------------
def check_logits(logits: Any) -> Tuple[int, int, int]:
    """Validate router logits and return ``(B, L, E)``.

    Raises ``ValueError`` unless ``logits`` is a finite, floating, 3-D tensor ``[B, L, E]`` with at
    least one token and one expert.
    """
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a torch.Tensor of shape [B, L, E], got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D [B, L, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype} (shape {tuple(logits.shape)})")
    b, l, e = logits.shape
    if b * l == 0 or e == 0:
        raise ValueError(f"logits must hold at least one token and one expert, got shape {tuple(logits.shape)}")
    # a sum is non-finite if any element is (one fast pass); only then (or on overflow) look closer
    if not bool(torch.isfinite(logits.float().sum())) and not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(f"logits must be finite (no NaN or inf), shape {tuple(logits.shape)}")
    return b, l, e


def _check_k(k: Any, *, integer: bool, name: str = "k") -> Any:
    """``k >= 1`` (an int when ``integer``); ``k <= E`` is checked in forward, once E is known."""
    is_number = isinstance(k, (int, float)) and not isinstance(k, bool)
    if not is_number or (integer and not isinstance(k, int)):
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind} >= 1, got {k!r}")
    if not math.isfinite(k) or k < 1:
        raise ValueError(f"{name} must be >= 1, got {k!r}")
    return k


def _check_k_fits(k: Any, num_experts: int, name: str = "k") -> None:
    if k > num_experts:
        raise ValueError(f"{name}={k} exceeds the number of experts E={num_experts}")


def _check_choice(value: Any, choices: Sequence[Any], name: str) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_real(value: Any, name: str, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False) -> float:
    """A finite real number (a one-element tensor is read), in ``[low, high]`` (``(low, high]``
    when ``low_open``) where bounds are given; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low is None and high is None:
            where = "a finite number"
        elif high is None:
            where = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be {where}, got {value!r}")
    return float(value)


def _check_experts(num_experts: int, logits_experts: int, who: str) -> None:
    if num_experts != logits_experts:
        raise ValueError(
            f"{who} was built for num_experts={num_experts} but logits have E={logits_experts} experts"
        )


def _check_x(x: Optional[Tensor], logits: Tensor, dim: int, who: str, weight: Optional[Tensor] = None) -> Tensor:
    """``x`` must be a floating ``[B, L, dim]`` tensor matching the logits' B and L, and (outside
    autocast) of the dtype of ``weight``, the projection that reads it."""
    if x is None:
        raise ValueError(f"{who} needs the layer input x [B, L, {dim}] (got x=None)")
    b, l, _ = logits.shape
    if not isinstance(x, Tensor) or tuple(x.shape) != (b, l, dim):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} needs x of shape [B, L, dim] = {(b, l, dim)}, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{who} needs a floating x [B, L, {dim}], got x of dtype {x.dtype}")
    if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{who} needs x in its projection's dtype {weight.dtype} (or autocast), "
                         f"got x of dtype {x.dtype}")
    return x


# ---- shared building blocks -------------------------------------------------------------------
def _gate(logits: Tensor, gating: str) -> Tensor:
    """Gating scores ``[B, L, E]``: softmax / sigmoid over experts, or the raw logits."""
    if gating == "softmax":
        return logits.softmax(-1)
    if gating == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def _topk_mask(scores: Tensor, k: int) -> Tensor:
    """bool ``[B, L, E]``: each token's ``k`` highest scores."""
    idx = scores.detach().topk(k, dim=-1).indices  # [B, L, k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def _routing(
    logits: Tensor,
    mask: Tensor,
    weight: Tensor,
    scores: Optional[Tensor],
    info: Dict[str, Any],
) -> Routing:
    """Build a :class:`Routing` from a selection ``mask [B, L, E]`` and dense ``weight [B, L, E]``.

    Assignments come out token-major (sorted by token, then expert); ``weight`` is indexed, so
    its gradient flows back to whatever produced it.
    """
    b, l, e = logits.shape
    token, expert = mask.reshape(b * l, e).nonzero(as_tuple=True)  # [A], [A]
    return Routing(
        logits=logits,
        token=token,
        expert=expert,
        weight=weight.reshape(b * l, e)[token, expert],  # [A]
        num_experts=e,
        scores=scores,
        info=info,
    )


def _topk_indices(ranked: Tensor, k: int) -> Tensor:
    """Indices of each row's ``k`` largest entries, ascending: ``[..., E] -> [..., k]`` long (no grad).

    On CPU (float32/float64, ``8 k <= E``) it takes ``k`` passes of vectorised row maxima (``amax``;
    the first index that holds the maximum; that entry masked with -inf for the next pass): for 3136
    tokens x 64 experts, k=2, 0.23 ms against 1.8 ms for ``topk``, whose per-row overhead dominates
    short rows (one thread; with fewer experts per pick ``topk`` is as fast). Rows must hold at least
    ``k`` entries above -inf (finite scores do; so do group-limited ones). Ties go to the lower index.
    """
    ranked = ranked.detach()
    e = ranked.shape[-1]
    if ranked.device.type != "cpu" or ranked.dtype not in (torch.float32, torch.float64) or 8 * k > e:
        return ranked.topk(k, dim=-1).indices.sort(-1).values
    reverse = torch.arange(e - 1, -1, -1, dtype=ranked.dtype)  # [E]: the largest marks the first index
    # two [..., E] buffers in all: fresh large allocations cost page faults on every call
    ranked = ranked.clone() if k > 1 else ranked  # masked in place below
    hit = torch.empty_like(ranked)
    picks = []
    for j in range(k):
        torch.eq(ranked, ranked.amax(-1, keepdim=True), out=hit)  # 1.0 at each row's maxima
        picks.append((e - 1) - hit.mul_(reverse).amax(-1, keepdim=True).long())  # [..., 1]
        if j + 1 < k:
            ranked.scatter_(-1, picks[-1], float("-inf"))
    return torch.cat(picks, -1).sort(-1).values


def _routing_from_topk(logits: Tensor, scores: Tensor, k: int, renormalize: bool,
                       info: Dict[str, Any], select: Optional[Tensor] = None,
                       log_scores: Optional[Tensor] = None) -> Routing:
    """Token-choice top-k straight from ``topk``'s indices: the same assignments, order (token-major,
    then expert) and gradients as ``_routing(_topk_mask(...))``, without building and scanning a
    dense ``[N, E]`` mask (the mask path costs about as much as a fine-grained expert layer).
    ``select [B, L, E]``: what the top-k ranks, when not ``scores`` (group-limited routing); the
    weights are always read off ``scores``. ``log_scores [B, L, E]``: ``log(scores)`` computed
    without underflow; when given, ``renormalize`` is a softmax over the chosen log scores (the same
    ratio, finite even where every chosen score underflows to 0, as sigmoid does below -88 in float32)."""
    b, l, e = logits.shape
    ranked = scores if select is None else select
    idx = _topk_indices(ranked, k).reshape(b * l, k)  # [N, k], expert order as nonzero() gives it
    weight = scores.reshape(b * l, e).gather(1, idx)  # [N, k], differentiable
    if renormalize and log_scores is not None:
        weight = log_scores.reshape(b * l, e).gather(1, idx).softmax(-1)  # no 0/0
    elif renormalize:  # softmax scores: the chosen k hold the top one (>= 1/E), so the sum is > 0
        weight = weight / weight.sum(-1, keepdim=True)
    token = torch.arange(b * l, device=logits.device).repeat_interleave(k)  # [A]
    return Routing(logits=logits, token=token, expert=idx.reshape(-1), weight=weight.reshape(-1),
                   num_experts=e, scores=scores, info=info)


def _canonical_candidates(candidates: Any) -> str:
    """``"LB"`` -> ``"BL"``; ``ValueError`` unless a non-empty set of distinct letters from ``BLE``."""
    if not isinstance(candidates, str) or not candidates:
        raise ValueError(f"candidates must be a non-empty string of letters from 'BLE', got {candidates!r}")
    letters = candidates.upper()
    if set(letters) - set(AXES) or len(set(letters)) != len(letters):
        raise ValueError(f"candidates must be distinct letters from 'BLE' (any order), got {candidates!r}")
    return "".join(a for a in AXES if a in letters)


def group_topk_count(shape: Sequence[int], candidates: str, k: float) -> int:
    """Winners per group ``K = max(1, round(k * C / E))``, capped at ``C``.

    ``C`` is the product of the candidate axes' sizes of ``shape = (B, L, E)``; ``candidates`` a
    canonical string (see :class:`Race`). Python's ``round`` (half to even) is used.
    """
    sizes = dict(zip(AXES, shape))
    group = math.prod(sizes[a] for a in candidates)
    return min(group, max(1, round(k * group / sizes["E"])))


def _grouped(t: Tensor, candidates: str) -> Tensor:
    """``[B, L, E]`` -> ``[G, C]``: the non-candidate axes become groups, the candidate axes one row."""
    perm = [i for i, a in enumerate(AXES) if a not in candidates] + [i for i, a in enumerate(AXES) if a in candidates]
    group = math.prod(t.shape[i] for i, a in enumerate(AXES) if a in candidates)
    return t.permute(perm).reshape(-1, group)


def _ungrouped(g: Tensor, shape: Sequence[int], candidates: str) -> Tensor:
    """Inverse of :func:`_grouped`: ``[G, C]`` -> ``[B, L, E]``."""
    perm = [i for i, a in enumerate(AXES) if a not in candidates] + [i for i, a in enumerate(AXES) if a in candidates]
    inverse = sorted(range(3), key=perm.__getitem__)
    return g.reshape([shape[i] for i in perm]).permute(inverse)


def _group_topk(scores: Tensor, candidates: str, k_per_group: int) -> Tuple[Tensor, Tensor]:
    """Top-``K`` inside every group. Returns bool mask ``[B, L, E]`` and each group's K-th largest ``[G]``."""
    g = _grouped(scores.detach(), candidates)  # [G, C]
    values, idx = g.topk(k_per_group, dim=-1)  # [G, K]
    mask_g = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return _ungrouped(mask_g, scores.shape, candidates), values[:, -1]


# ---- group-limited (node-limited) routing, DeepSeek-V3 ----------------------------------------
def _check_groups(groups: Any, top_groups: Any) -> Tuple[Optional[int], Optional[int]]:
    """Both None (no limit), or ints with ``1 <= top_groups <= groups``."""
    if groups is None and top_groups is None:
        return None, None
    for name, value in (("groups", groups), ("top_groups", top_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (groups and top_groups are given together, "
                             f"or both None), got groups={groups!r}, top_groups={top_groups!r}")
    if top_groups > groups:
        raise ValueError(f"top_groups={top_groups} exceeds groups={groups}")
    return groups, top_groups


def _check_groups_fit(k: Any, num_experts: int, groups: int, top_groups: int, who: str) -> None:
    """E splits into ``groups`` equal groups, and the kept groups hold at least ``k`` experts."""
    if num_experts % groups:
        raise ValueError(f"{who}: E={num_experts} experts do not split into groups={groups} equal groups")
    kept = top_groups * (num_experts // groups)
    if k > kept:
        raise ValueError(f"{who}: k={k} exceeds the {kept} experts of the top_groups={top_groups} kept groups "
                         f"({num_experts // groups} experts per group)")


def _group_limit(select: Tensor, groups: int, top_groups: int) -> Tensor:
    """Group-limited selection scores (DeepSeek-V3 node-limited routing), detached ``[B, L, E]``.

    Group g holds experts ``[g*E/G, (g+1)*E/G)``; a group's score is the sum of its two highest
    selection scores (its one score for one-expert groups). Experts outside each token's
    ``top_groups`` best groups get -inf, so a top-k over the result only picks kept groups' experts.
    """
    b, l, e = select.shape
    size = e // groups
    select = select.detach()
    group_score = select.reshape(b, l, groups, size).topk(min(2, size), dim=-1).values.sum(-1)  # [B, L, G]
    kept = group_score.topk(top_groups, dim=-1).indices  # [B, L, top_groups]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, kept, True)  # [B, L, G]
    return select.masked_fill(~keep.repeat_interleave(size, dim=-1), float("-inf"))


# ---- declarations: knobs ----------------------------------------------------------------------
#: what a layer can tell a router when it builds one (:meth:`RouterSpec.build`): its input width and E.
LAYER_FACTS = ("dim", "num_experts")
PHASES = ("train", "eval")


@dataclass(frozen=True)
class Knob:
    """A tunable setting a router declares (explorer sliders, sweeps, docs read it).

    Attributes:
        name: the constructor keyword; a knob that is not a constructor keyword is moved on a built
            router with ``router.set_inference_threshold(value)`` (Race's eval threshold).
        low, high: its range; ``"E"`` stands for the number of experts, ``"groups"`` for the value
            of the ``groups`` knob, ``None`` for the range of the scores (known only from data).
        step: a slider step (``None``: continuous, or a set of choices the caller derives).
        default: a starting value.
        inference: True when it can move after training (at inference) without retraining.
        phase: ``"train"`` or ``"eval"`` when the router reads it in that phase only; None = both.
        off: a value meaning "not applied" (the router is built without the knob), or None.
        label: a short human label.
    """

    name: str
    low: Any = None
    high: Any = None
    step: Optional[float] = None
    default: Any = None
    inference: bool = False
    phase: Optional[str] = None
    off: Any = None
    label: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Knob.name must be a Python identifier, got {self.name!r}")
        if self.phase is not None and self.phase not in PHASES:
            raise ValueError(f"Knob.phase must be None or one of {PHASES}, got {self.phase!r}")

    @property
    def title(self) -> str:
        """``label``, or the name."""
        return self.label or self.name

    def applies(self, phase: str) -> bool:
        """Whether a router reads this knob in ``phase`` (``"train"`` / ``"eval"``)."""
        return self.phase is None or self.phase == phase


# the knobs several routers share (one slider per name in the explorer)
_K = Knob("k", 1, "E", 1, 2, label="k")
_GROUPS = Knob("groups", 1, "E", None, 1, off=1, label="groups")
_TOP_GROUPS = Knob("top_groups", 1, "groups", 1, 1, label="top groups")
#: the capacity factor (Switch's own; :class:`Capacity` wraps any other router with it); 0 = off
CAPACITY_KNOB = Knob("capacity_factor", 0.0, 4.0, 0.25, 1.25, off=0.0, label="capacity factor (0 = off)")


# ---- base -------------------------------------------------------------------------------------
class Router(nn.Module):
    """Base router: validates logits, then :meth:`route` decides.

    ``forward(logits [B, L, E], x=None [B, L, D], key=None [B, L] or [L]) -> Routing``.
    ``x`` is only read by routers with input-dependent parameters (learned noise, learned
    threshold); ``key`` only by :class:`Hash`.

    Every router class declares (class attributes, read by :class:`RouterSpec`, the configs, the
    explorer and the bench):

    * ``needs``: the layer facts (:data:`LAYER_FACTS`: ``"dim"``, ``"num_experts"``) its
      constructor must get; :meth:`RouterSpec.build` passes them (:meth:`needs_for` when it depends
      on the other keywords).
    * ``defaults``: the keywords a bare ``RouterSpec(name)`` builds with (e.g. ``k=2``); a spec
      that gives keywords builds with exactly those.
    * ``knobs``: its tunable :class:`Knob` s.
    * ``explorable``: offered by the router explorer (which builds it from logits alone).
    """

    needs: ClassVar[Tuple[str, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    knobs: ClassVar[Tuple[Knob, ...]] = ()
    explorable: ClassVar[bool] = True

    @classmethod
    def needs_for(cls, kwargs: Mapping[str, Any]) -> Tuple[str, ...]:
        """The layer facts a router built with ``kwargs`` needs (default: :attr:`needs`)."""
        return cls.needs

    def forward(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        check_logits(logits)
        return self.route(logits, x=x, key=key)

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        """Decide on validated logits ``[B, L, E]``; subclasses implement this."""
        raise NotImplementedError


class InferenceThreshold(nn.Module):
    """Mixin for a module with an inference threshold that can be moved after training.

    One interface for all of them (:class:`TopP`'s ``p``, :class:`Race`'s EMA threshold,
    :class:`~moe_lite.models.adapters.LoRAExperts`' ``inference_threshold``):
    :meth:`set_inference_threshold` moves it (validated, ``ValueError`` naming it otherwise) and
    :attr:`inference_threshold` reads it as a Python float. The value lives in the buffer
    ``threshold``, so ``state_dict`` and checkpoints carry it; a stored value is validated when a
    state dict is loaded (a bad one is a load error naming the key). With
    ``threshold_optional_in_state_dict``, a state dict saved before the buffer existed still loads
    and the module keeps its current (constructor's) value.
    """

    threshold: Tensor
    threshold_optional_in_state_dict = False

    @property
    def inference_threshold(self) -> Optional[float]:
        raise NotImplementedError

    def set_inference_threshold(self, value: Any) -> None:
        raise NotImplementedError

    def _check_stored_threshold(self, value: float) -> None:
        """Raise ``ValueError`` unless ``value`` (read off a state dict) is a valid buffer value."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "threshold"
        stored = state_dict.get(key)
        if isinstance(stored, Tensor) and stored.numel() == 1:  # other sizes: torch's size-mismatch error
            try:
                self._check_stored_threshold(float(stored))
            except ValueError as err:
                error_msgs.append(f"{key}: {err}")
                return  # this module stays as it was
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if stored is None and self.threshold_optional_in_state_dict and key in missing_keys:
            missing_keys.remove(key)


# ---- token choice -----------------------------------------------------------------------------
class TopK(Router):
    """Token choice: each token takes its ``k`` highest gating scores.

    Args:
        k: experts per token (int, ``1 <= k <= E``).
        renormalize: divide the chosen scores by their sum over the k (softmax / sigmoid only).
        gating: ``"softmax"``, ``"sigmoid"`` or ``"identity"`` (raw logits) scores.
        noise: ``None``; ``"jitter"``: in training add ``noise_std * randn`` to the logits before
            scoring (one ``torch.randn_like(logits)`` draw); ``"learned"``: Shazeer et al. 2017
            noisy top-k, ``H = logits + randn * softplus(x @ W_noise.T)`` in training,
            ``W_noise = Linear(dim, num_experts, bias=False)`` zero-initialised, and the weights are
            ``softmax(keep_top_k(H))`` (non-kept set to -inf before the softmax: a softmax over the
            kept k, so ``renormalize`` is implied and ``gating`` must be ``"softmax"``).
        noise_std: jitter scale (``>= 0``).
        dim, num_experts: required for ``noise="learned"`` (the noise projection's shape).
        groups, top_groups: group-limited routing (DeepSeek-V3), both given or both None (no
            limit). The E experts form ``groups`` equal contiguous groups; each token keeps its
            ``top_groups`` groups ranked by the sum of their two highest gating scores, then
            takes its top k among those groups' experts only. Weights are unchanged (the chosen
            gating scores, or Shazeer's softmax). ``ValueError`` in forward when E does not
            split into ``groups`` or the kept groups hold fewer than k experts.
            ``info``: ``groups``, ``top_groups`` (see :func:`moe_lite.routing.groups_per_token`).

    Noise is train-only; with noise the noisy logits drive both selection and weights, while
    ``Routing.logits`` keeps the clean logits (for losses). ``Routing.scores`` = gated noisy logits.
    """

    defaults = MappingProxyType({"k": 2})
    knobs = (_K, _GROUPS, _TOP_GROUPS)

    @classmethod
    def needs_for(cls, kwargs: Mapping[str, Any]) -> Tuple[str, ...]:
        """Learned noise needs ``dim`` and ``num_experts`` (its projection); nothing else does."""
        return LAYER_FACTS if kwargs.get("noise") == "learned" else ()

    def __init__(
        self,
        k: int,
        renormalize: bool = False,
        gating: str = "softmax",
        noise: Optional[str] = None,
        noise_std: float = 1.0,
        dim: Optional[int] = None,
        num_experts: Optional[int] = None,
        groups: Optional[int] = None,
        top_groups: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.k = _check_k(k, integer=True)
        self.groups, self.top_groups = _check_groups(groups, top_groups)
        self.renormalize = bool(renormalize)
        self.gating = _check_choice(gating, GATINGS, "gating")
        self.noise = _check_choice(noise, (None, "jitter", "learned"), "noise")
        if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        if renormalize and gating == "identity":
            raise ValueError("renormalize=True needs positive scores: use gating 'softmax' or 'sigmoid'")
        self.dim = dim
        self.num_experts = num_experts
        self.noise_proj: Optional[nn.Linear] = None
        if noise == "learned":
            if gating != "softmax":
                raise ValueError(f"noise='learned' (Shazeer noisy top-k) uses softmax gating, got gating={gating!r}")
            if not isinstance(dim, int) or dim < 1 or not isinstance(num_experts, int) or num_experts < 1:
                raise ValueError(
                    f"noise='learned' needs dim and num_experts (positive ints) for its noise projection "
                    f"Linear(dim, num_experts); got dim={dim!r}, num_experts={num_experts!r}"
                )
            self.noise_proj = nn.Linear(dim, num_experts, bias=False)  # W_noise
            nn.init.zeros_(self.noise_proj.weight)  # start at std = softplus(0) = log 2 for every expert
            if self.groups is not None:  # E is known here: fail early
                _check_groups_fit(self.k, num_experts, self.groups, self.top_groups, "TopK")

    def extra_repr(self) -> str:
        groups = "" if self.groups is None else f", groups={self.groups}, top_groups={self.top_groups}"
        return f"k={self.k}, renormalize={self.renormalize}, gating={self.gating!r}, noise={self.noise!r}{groups}"

    def _noisy(self, logits: Tensor, x: Optional[Tensor]) -> Tensor:
        """The logits selection sees ``[B, L, E]``: clean in eval or without noise."""
        if not self.training or self.noise is None:
            return logits
        if self.noise == "jitter":
            return logits + self.noise_std * torch.randn_like(logits)
        assert self.noise_proj is not None
        x = _check_x(x, logits, self.noise_proj.in_features, "TopK(noise='learned')", self.noise_proj.weight)
        std = F.softplus(self.noise_proj(x)).to(logits.dtype)  # [B, L, E]
        return logits + torch.randn_like(logits) * std

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        e = logits.shape[-1]
        _check_k_fits(self.k, e)
        if self.noise == "learned":
            _check_experts(self.noise_proj.out_features, e, "TopK(noise='learned')")  # type: ignore[union-attr]
        h = self._noisy(logits, x)  # [B, L, E]
        scores = _gate(h, self.gating)  # [B, L, E]
        info: Dict[str, Any] = {"k": self.k}
        select = None  # rank the scores themselves
        if self.groups is not None:
            _check_groups_fit(self.k, e, self.groups, self.top_groups, "TopK")
            select = _group_limit(scores, self.groups, self.top_groups)  # [B, L, E]
            info.update(groups=self.groups, top_groups=self.top_groups)
        if self.noise != "learned":
            log_scores = F.logsigmoid(h) if self.renormalize and self.gating == "sigmoid" else None
            return _routing_from_topk(logits, scores, self.k, self.renormalize, info, select, log_scores)
        mask = _topk_mask(scores if select is None else select, self.k)  # [B, L, E]
        weight = h.masked_fill(~mask, float("-inf")).softmax(-1)  # Shazeer: keep top-k, then softmax
        return _routing(logits, mask, weight, scores, info)


class Switch(Router):
    """Switch Transformer (Fedus et al. 2021): top-1 on softmax with a per-expert capacity.

    ``capacity = max(1, int(capacity_factor * N / E))`` with ``N = B*L`` (at least 1: with fewer
    tokens than ``E / capacity_factor`` the product rounds to 0, which would drop every token and
    output zeros without a word). Tokens claim their expert first
    come first served in flat token order; a token arriving at a full expert is dropped (no
    assignment). Weight = the softmax probability of the chosen expert.
    ``info``: ``capacity`` (int), ``dropped`` (long scalar tensor: number of dropped tokens).
    """

    knobs = (CAPACITY_KNOB,)

    def __init__(self, capacity_factor: float = 1.25) -> None:
        super().__init__()
        if not (isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
                and math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
        self.capacity_factor = float(capacity_factor)

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}"

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        b, l, e = logits.shape
        n = b * l
        capacity = max(1, int(self.capacity_factor * n / e))
        probs = logits.softmax(-1)  # [B, L, E]
        choice = F.one_hot(probs.detach().reshape(n, e).argmax(-1), e)  # [N, E] long
        # 0-based place of each token in its expert's queue, in flat token order
        place = (choice.cumsum(0) * choice).sum(-1) - 1  # [N]
        kept = place < capacity  # [N]
        mask = (choice.bool() & kept[:, None]).reshape(b, l, e)
        info = {"capacity": capacity, "dropped": (~kept).sum()}
        return _routing(logits, mask, probs, probs, info)


class TopP(Router, InferenceThreshold):
    """Dynamic top-p routing (Huang et al. 2024).

    Softmax, sort descending; each token keeps the smallest prefix whose cumulative probability
    exceeds ``p`` (the expert that crosses ``p`` is kept, so always at least one); at most
    ``max_k`` experts if given. ``p = 1`` keeps all E (a float cumsum may never exceed 1).
    Weights are the raw probabilities, NOT renormalised.

    ``p`` lives in the float64 buffer ``threshold`` (a state dict carries it; one saved before
    that loads and keeps the constructor's ``p``). Move it after training with
    :meth:`set_inference_threshold` or ``router.p = ...``: in (0, 1], checked on every set.
    ``info``: ``p`` (0-d tensor), ``max_k``.
    """

    knobs = (Knob("p", 0.05, 1.0, 0.05, 0.4, inference=True, label="top-p"),)

    threshold_optional_in_state_dict = True

    def __init__(self, p: float = 0.4, max_k: Optional[int] = None) -> None:
        super().__init__()
        p = _check_real(p, "p", 0, 1, low_open=True)
        self.register_buffer("threshold", torch.tensor(p, dtype=torch.float64))  # float64: p reads back exactly
        self.max_k = None if max_k is None else _check_k(max_k, integer=True, name="max_k")

    @property
    def p(self) -> float:
        """The top-p threshold, read off the buffer ``threshold``."""
        return float(self.threshold)

    @p.setter
    def p(self, value: float) -> None:
        self.set_inference_threshold(value)

    @property
    def inference_threshold(self) -> float:
        """Same as :attr:`p`."""
        return self.p

    @torch.no_grad()
    def set_inference_threshold(self, value: float) -> None:
        """Move ``p`` (in (0, 1]); the next forward uses it, training or eval."""
        self.threshold.fill_(_check_real(value, "p", 0, 1, low_open=True))

    def _check_stored_threshold(self, value: float) -> None:
        _check_real(value, "p", 0, 1, low_open=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, max_k={self.max_k}"

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        e = logits.shape[-1]
        if self.max_k is not None:
            _check_k_fits(self.max_k, e, "max_k")
        probs = logits.softmax(-1)  # [B, L, E]
        sorted_p, order = probs.detach().sort(dim=-1, descending=True, stable=True)  # [B, L, E]
        p = self.threshold  # 0-d tensor: compared in the probabilities' dtype, as a Python float is; no host read
        # mass strictly before each position; position j is kept while that mass is still <= p
        before = F.pad(sorted_p.cumsum(-1)[..., :-1], (1, 0))  # [B, L, E]
        keep = (before <= p) | (p >= 1.0)  # p = 1: all E, even where the float cumsum stays below 1
        if self.max_k is not None:
            keep &= torch.arange(e, device=logits.device) < self.max_k
        mask = torch.zeros_like(keep).scatter_(-1, order, keep)  # back to expert order
        return _routing(logits, mask, probs, probs, {"p": p.detach().clone(), "max_k": self.max_k})


# ---- expert choice and the generalised race ---------------------------------------------------
class ExpertChoice(Router):
    """Expert choice (Zhou et al. 2022, arXiv 2202.09368): every expert picks its top tokens.

    Each expert takes its top ``capacity = max(1, round(c * n / E))`` tokens of a group of ``n``
    tokens (capped at ``n``) by gating score; weights are those scores. A token may get 0..E
    experts; ``c`` is the average experts per token (Zhou et al.'s capacity factor: their main
    setting is ``c = 2``).

    Args:
        k: ``c`` as an average number of experts per token, ``1 <= k <= E`` (int or float).
        gating: ``"softmax"`` (the paper), ``"sigmoid"`` or ``"identity"`` scores.
        capacity_factor: ``c`` under the paper's name, instead of ``k``; any finite ``0 < c <= E``,
            so fewer than one expert per token on average (``c = 0.5``) is possible. Give ``k`` or
            ``capacity_factor``, not both. ``router.k`` holds ``c`` either way.
        group: which tokens compete for an expert: ``"sample"`` (default: the ``n = L`` tokens of
            each sample, as in the Expert Race paper's table; a sample's routing never depends on
            the rest of the batch) or ``"batch"`` (all ``n = B*L`` tokens, as in Zhou et al.; the
            routing of a sample then depends on the batch it comes in).

    ``info``: ``capacity`` (tokens per expert per group), ``k``, and ``group`` when ``"batch"``.
    """

    defaults = MappingProxyType({"k": 2})
    knobs = (_K,)

    GROUPS = {"sample": "L", "batch": "BL"}  # group name -> competing axes (see Race's candidates)

    def __init__(self, k: Optional[float] = None, gating: str = "softmax",
                 capacity_factor: Optional[float] = None, group: str = "sample") -> None:
        super().__init__()
        if (k is None) == (capacity_factor is None):
            raise ValueError(f"ExpertChoice takes k or capacity_factor (one of them), "
                             f"got k={k!r}, capacity_factor={capacity_factor!r}")
        if k is not None:
            self.k = _check_k(k, integer=False)
        else:
            self.k = _check_factor(capacity_factor, "capacity_factor")
        self.gating = _check_choice(gating, GATINGS, "gating")
        self.group = _check_choice(group, tuple(self.GROUPS), "group")

    @property
    def capacity_factor(self) -> float:
        """Zhou et al.'s capacity factor ``c``: the same number as :attr:`k`."""
        return float(self.k)

    def extra_repr(self) -> str:
        group = "" if self.group == "sample" else f", group={self.group!r}"
        return f"k={self.k}, gating={self.gating!r}{group}"

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        _check_k_fits(self.k, logits.shape[-1])
        candidates = self.GROUPS[self.group]
        capacity = group_topk_count(logits.shape, candidates, self.k)
        scores = _gate(logits, self.gating)  # [B, L, E]
        mask, _ = _group_topk(scores, candidates, capacity)
        info: Dict[str, Any] = {"capacity": capacity, "k": self.k}
        if self.group != "sample":
            info["group"] = self.group
        return _routing(logits, mask, scores, scores, info)


class Race(Router, InferenceThreshold):
    """Expert Race (Yuan et al. 2025): generalised top-K where chosen axes compete in one group.

    ``candidates`` names the axes that compete inside one group (letters in any order):

    ==========  ==================  ===================
    candidates  groups              K per group
    ==========  ==================  ===================
    ``"E"``     B*L (token choice)  k
    ``"L"``     B*E (expert choice) k*L/E
    ``"BL"``    E                   B*L*k/E
    ``"BE"``    L                   B*k
    ``"LE"``    B                   L*k
    ``"BLE"``   1 (the race)        B*L*k
    ==========  ==================  ===================

    In general ``K = max(1, round(k * prod(candidate sizes) / E))`` (capped at the group size).
    Scores by ``gating`` (identity = raw logits by default); weights = the selected scores.

    Training: top-K per group, and the buffer ``threshold`` tracks an EMA (``ema_decay``) of the
    K-th largest score (mean over groups of each group's K-th largest), initialised from the
    first training batch (buffer flag ``initialized``; both survive ``state_dict``).
    Eval: with ``eval_threshold`` (default: True exactly when candidates is ``"BLE"``) every
    (token, expert) whose score is ``>= threshold`` is selected, independent of the batch; an
    eval call before any training batch raises ``RuntimeError``. Without it, the same top-K.
    Move the threshold by hand with :meth:`set_inference_threshold` (alias :meth:`set_threshold`;
    finite, checked on every set and on loading a state dict); read it with
    :attr:`inference_threshold`.
    ``info``: ``threshold`` (EMA, after this call's update), ``K``, and in training
    ``batch_threshold``.
    """

    defaults = MappingProxyType({"k": 2})
    # training reads k (the batch top-K); eval selects against the threshold, which moves after training
    knobs = (Knob("k", 1, "E", 1, 2, phase="train", label="k"),
             Knob("threshold", None, None, None, None, inference=True, phase="eval", label="eval threshold"))

    threshold: Tensor
    initialized: Tensor

    def __init__(
        self,
        k: float,
        ema_decay: float = 0.95,
        candidates: str = "BLE",
        gating: str = "identity",
        eval_threshold: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.k = _check_k(k, integer=False)
        if not (isinstance(ema_decay, (int, float)) and 0 <= ema_decay < 1):
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self.candidates = _canonical_candidates(candidates)
        self.gating = _check_choice(gating, GATINGS, "gating")
        if eval_threshold is None:
            eval_threshold = self.candidates == "BLE"
        self.eval_threshold = bool(eval_threshold)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return (f"k={self.k}, ema_decay={self.ema_decay}, candidates={self.candidates!r}, "
                f"gating={self.gating!r}, eval_threshold={self.eval_threshold}")

    @property
    def inference_threshold(self) -> Optional[float]:
        """The eval threshold; None before any training batch or set."""
        return float(self.threshold) if bool(self.initialized) else None

    @torch.no_grad()
    def set_inference_threshold(self, value: float) -> None:
        """Set the eval threshold by hand (a finite number; also marks it initialised)."""
        self.threshold.fill_(_check_real(value, "threshold"))
        self.initialized.fill_(True)

    def _check_stored_threshold(self, value: float) -> None:
        _check_real(value, "threshold")

    @torch.no_grad()
    def _update_threshold(self, batch_threshold: Tensor) -> None:
        """``threshold <- decay * threshold + (1 - decay) * batch`` (or ``batch`` on the first call)."""
        new = batch_threshold.to(self.threshold.dtype)
        ema = self.ema_decay * self.threshold + (1.0 - self.ema_decay) * new
        self.threshold.copy_(torch.where(self.initialized, ema, new))
        self.initialized.fill_(True)

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        _check_k_fits(self.k, logits.shape[-1])
        k_group = group_topk_count(logits.shape, self.candidates, self.k)
        scores = _gate(logits, self.gating)  # [B, L, E]
        info: Dict[str, Any] = {"K": k_group, "candidates": self.candidates}
        if not self.training and self.eval_threshold:
            if not bool(self.initialized):
                raise RuntimeError(
                    "Race eval with eval_threshold needs a threshold: run at least one training batch "
                    "first (or call set_inference_threshold / load a state_dict)"
                )
            mask = scores.detach() >= self.threshold.to(scores.dtype)  # batch-independent
        else:
            mask, kth = _group_topk(scores, self.candidates, k_group)  # kth: [G]
            if self.training:
                info["batch_threshold"] = kth.mean()
                self._update_threshold(kth.mean())
        info["threshold"] = self.threshold.detach().clone()
        return _routing(logits, mask, scores, scores, info)


# ---- fixed routing ----------------------------------------------------------------------------
class Hash(Router):
    """Hash layers (Roller et al. 2021): a fixed expert per token key, no learned router.

    ``key`` long ``[B, L]`` or ``[L]`` (broadcast over the batch), given by the caller (e.g. the
    vocabulary id); default: the position index ``0..L-1``. The expert is ``table[key]``, where the
    buffer ``table`` (``num_keys`` entries) is a seeded random permutation of ``0..num_keys-1``
    taken modulo E: a *balanced* hash (every expert owns ``num_keys / E`` keys, floor or ceil).
    Keys must lie in ``[0, num_keys)``.

    k = 1 and weight = 1.0. The weights carry NO gradient (nothing is learned); the logits are still
    returned in the Routing for losses and plots. ``Routing.scores`` is the one-hot assignment.
    """

    needs = ("num_experts",)

    table: Tensor

    def __init__(self, num_experts: int, seed: int = 0, num_keys: int = 4096) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if not isinstance(num_keys, int) or num_keys < 1:
            raise ValueError(f"num_keys must be an int >= 1, got {num_keys!r}")
        self.num_experts = num_experts
        self.seed = int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.register_buffer("table", torch.randperm(num_keys, generator=generator) % num_experts)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, seed={self.seed}, num_keys={self.table.numel()}"

    def _keys(self, key: Optional[Tensor], b: int, l: int, device: torch.device) -> Tensor:
        """long ``[B, L]`` keys (validated)."""
        if key is None:
            key = torch.arange(l, device=device)
        if not isinstance(key, Tensor) or key.is_floating_point() or key.is_complex() or key.dtype == torch.bool:
            raise ValueError(f"key must be an integer tensor [B, L] or [L], got {getattr(key, 'dtype', type(key))}")
        if tuple(key.shape) not in ((b, l), (l,)):
            raise ValueError(f"key must have shape [B, L] = {(b, l)} or [L] = {(l,)}, got {tuple(key.shape)}")
        num_keys = self.table.numel()
        if key.numel() and (int(key.min()) < 0 or int(key.max()) >= num_keys):
            raise ValueError(f"keys must lie in [0, num_keys={num_keys}), got range [{int(key.min())}, {int(key.max())}]")
        return key.long().to(self.table.device).expand(b, l)

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        b, l, e = logits.shape
        _check_experts(self.num_experts, e, "Hash")
        expert = self.table[self._keys(key, b, l, logits.device)].to(logits.device)  # [B, L]
        scores = F.one_hot(expert, e).to(logits.dtype)  # [B, L, E]
        weight = torch.ones_like(scores)  # constant: no gradient by design
        return _routing(logits, scores.bool(), weight, scores, {"k": 1})


# ---- balanced assignment (BASE layers) --------------------------------------------------------
def _sinkhorn(affinity: Tensor, num_iters: int, temperature: float) -> Tuple[Tensor, Tensor]:
    """Entropic balanced transport of ``affinity [N, E]``: rows sum 1, columns N/E.

    Works in the exp domain (two mat-vecs per iteration) in the affinity's dtype (float64 here:
    the scalings span far more than float32's range); the kernel is shifted by each row's max and
    floored at exp(-300) so it never underflows.
    Returns the log plan ``[N, E]`` and each expert's price ``[E]`` (``-temperature * log v``:
    high = much wanted).
    """
    n, e = affinity.shape
    log_kernel = affinity - affinity.max(1, keepdim=True).values  # [N, E], in place below: big tensors
    log_kernel.div_(temperature).clamp_min_(-300.0)
    kernel = log_kernel.exp()
    u = torch.ones(n, dtype=affinity.dtype, device=affinity.device)  # [N]
    v = torch.ones(e, dtype=affinity.dtype, device=affinity.device)  # [E]
    for _ in range(num_iters):
        u = 1.0 / (kernel @ v)
        v = (n / e) / (kernel.T @ u)
    log_v = v.log()
    return log_kernel.add_(u.log()[:, None]).add_(log_v), -temperature * log_v


def _balanced_capacity(n: int, e: int, price: Tensor) -> Tensor:
    """long ``[E]``: ``N // E`` each, plus one for the ``N % E`` most wanted (highest-price) experts."""
    q, r = divmod(n, e)
    capacity = torch.full((e,), q, dtype=torch.long, device=price.device)
    if r:
        capacity[price.topk(r).indices] += 1
    return capacity


def _greedy_fill(preference: Tensor, capacity: Tensor) -> Tensor:
    """Capacity-constrained greedy, in rounds: long ``[N]`` expert per token.

    Each round, every unassigned token proposes to its most preferred expert that still has room;
    each expert accepts its best proposers up to its remaining room. A round either places every
    proposer or fills an expert, so at most E + 1 rounds (``sum(capacity)`` must equal N).
    """
    n, e = preference.shape
    owner = torch.full((n,), -1, dtype=torch.long, device=preference.device)  # [N]
    room = capacity.clone()  # [E]
    arange = torch.arange(n, device=preference.device)
    for _ in range(e + 1):
        free = (owner < 0).nonzero().squeeze(1)  # [U]
        if free.numel() == 0:
            break
        pref = preference.index_select(0, free).masked_fill(room[None, :] <= 0, float("-inf"))  # [U, E]
        score, best = pref.max(1)  # [U], [U]
        # rank proposers inside each expert, best score first (two stable sorts)
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        best, tokens = best[order], free[order]
        counts = torch.bincount(best, minlength=e)  # [E]
        rank = arange[: free.numel()] - (counts.cumsum(0) - counts)[best]
        won = rank < room[best]
        owner[tokens[won]] = best[won]
        room -= torch.bincount(best[won], minlength=e)
    return owner


def _members(owner: Tensor, load: Tensor, slots: int) -> Tensor:
    """long ``[E, S]``: the tokens of each expert in token order, padded with -1."""
    order = torch.argsort(owner, stable=True)  # [N] tokens grouped by expert
    expert = owner[order]
    place = torch.arange(owner.numel(), device=owner.device) - (load.cumsum(0) - load)[expert]
    members = torch.full((load.numel(), slots), -1, dtype=torch.long, device=owner.device)
    members[expert, place] = order
    return members


def _refine(affinity: Tensor, owner: Tensor, floor: int, num_iters: int) -> Tensor:
    """Local search that keeps the balance: pairwise swaps, then single moves (vectorised).

    Each iteration finds, for every (source, target) expert pair, the largest gain of moving one
    source token to the target. Swaps between mutually-best expert pairs are applied together
    (they are disjoint, so their gains add up); when no swap helps, the best single move from an
    expert holding ``floor + 1`` tokens to one holding ``floor`` (every load stays in
    {floor, floor + 1}). Stops early when nothing improves.
    """
    n, e = affinity.shape
    slots = floor + 1  # every load is floor or floor + 1
    members = _members(owner, torch.bincount(owner, minlength=e), slots)  # [E, S], -1 = hole
    padded = torch.cat([affinity, affinity.new_zeros(1, e)])  # [N + 1, E]; row N stands for a hole
    inf = affinity.new_full((1,), float("inf"))
    arange_e = torch.arange(e, device=affinity.device)
    tol = 1e-9 * (1.0 + float(affinity.abs().max()))
    for _ in range(num_iters):
        idx = torch.where(members < 0, n, members).flatten()  # [E * S]
        own = torch.cat([affinity.gather(1, owner[:, None]).squeeze(1), inf])  # [N + 1]; hole: +inf
        gain = (padded.index_select(0, idx) - own[idx][:, None]).view(e, slots, e)  # [E_src, S, E_dst]
        best = gain.amax(1)  # [E_src, E_dst] best gain of moving one token src -> dst
        swap = best + best.T  # [E, E]
        swap.fill_diagonal_(float("-inf"))
        value, partner = swap.max(1)  # [E]
        mutual = (partner[partner] == arange_e) & (arange_e < partner) & (value > tol)
        if bool(mutual.any()):
            e1 = mutual.nonzero().squeeze(1)  # [P]
            e2 = partner[e1]
            s1, s2 = gain[e1, :, e2].argmax(-1), gain[e2, :, e1].argmax(-1)  # [P] slots
            t1, t2 = members[e1, s1], members[e2, s2]
            owner[t1], owner[t2] = e2, e1
            members[e1, s1], members[e2, s2] = t2, t1
            continue
        load = (members >= 0).sum(1)  # [E]
        movable = (load[:, None] > floor) & (load[None, :] <= floor)
        move = torch.where(movable, best, torch.full_like(best, float("-inf")))
        if not bool(move.max() > tol):
            break
        e1, e2 = divmod(int(move.argmax()), e)
        s1 = int(gain[e1, :, e2].argmax())
        hole = int((members[e2] < 0).nonzero()[0])  # an expert at floor has exactly one hole
        t = members[e1, s1].clone()
        owner[t] = e2
        members[e1, s1], members[e2, hole] = -1, t
    return owner


@torch.no_grad()
def balanced_assignment(
    affinity: Tensor,
    num_iters: int = 10,
    temperature: float = 0.1,
    refine_iters: int = 10,
) -> Tensor:
    """Assign ``N`` tokens to ``E`` experts, exactly balanced, approximately maximising affinity.

    Every expert gets ``N // E`` or ``N // E + 1`` tokens (exactly N/E when E divides N), every
    token exactly one expert. Approximate solution of BASE layers' balanced linear assignment
    ``max sum_n affinity[n, a_n]``, fully vectorised (no loop over tokens):

    1. Sinkhorn (``num_iters`` iterations, entropic temperature ``temperature * std(affinity)``)
       gives a balanced soft plan and expert prices; the ``N % E`` highest-priced experts get
       the extra token.
    2. Capacity-constrained greedy on the log plan (at most E + 1 rounds).
    3. ``refine_iters`` rounds of balance-keeping swaps / moves (:func:`_refine`).

    Args:
        affinity: float ``[N, E]`` (e.g. router logits). Sinkhorn runs in float64, the local
            search in the input's precision (float32 unless the input is float64).
    Returns:
        long ``[N]``: the expert of each token.
    """
    if affinity.dim() != 2 or affinity.shape[0] == 0 or affinity.shape[1] == 0:
        raise ValueError(f"affinity must be a non-empty [N, E] tensor, got shape {tuple(affinity.shape)}")
    n, e = affinity.shape
    if e == 1:
        return torch.zeros(n, dtype=torch.long, device=affinity.device)
    a = affinity.detach().double()  # Sinkhorn's kernel needs float64's range
    scale = float(a.std()) if n * e > 1 else 0.0
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0  # constant affinity: any balance is optimal
    log_plan, price = _sinkhorn(a, num_iters, temperature * scale)
    owner = _greedy_fill(log_plan, _balanced_capacity(n, e, price))
    work = affinity.detach().to(torch.promote_types(affinity.dtype, torch.float32))  # float32 unless float64
    return _refine(work, owner, n // e, refine_iters)


class BalancedAssignment(Router):
    """BASE layers (Lewis et al. 2021): balanced token-to-expert assignment, one expert per token.

    Training: :func:`balanced_assignment` on the raw logits (affinities) over all ``N = B*L``
    tokens, so each expert gets exactly N/E tokens (floor/ceil when E does not divide N).
    Eval: greedy argmax (token choice top-1). Weight = ``sigmoid(logit of the chosen expert)``
    (BASE's output gate), differentiable; the assignment itself is not.
    ``Routing.scores`` = the logits (the affinity selection used).
    """

    def __init__(self, num_iters: int = 10, temperature: float = 0.1, refine_iters: int = 10) -> None:
        super().__init__()
        if not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(refine_iters, int) or refine_iters < 0:
            raise ValueError(f"refine_iters must be an int >= 0, got {refine_iters!r}")
        self.num_iters = num_iters
        self.temperature = float(temperature)
        self.refine_iters = refine_iters

    def extra_repr(self) -> str:
        return f"num_iters={self.num_iters}, temperature={self.temperature}, refine_iters={self.refine_iters}"

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        b, l, e = logits.shape
        flat = logits.detach().reshape(b * l, e)  # [N, E]
        if self.training:
            expert = balanced_assignment(flat, self.num_iters, self.temperature, self.refine_iters)
        else:
            expert = flat.argmax(-1)
        mask = F.one_hot(expert, e).bool().reshape(b, l, e)
        info = {"balanced": self.training, "k": 1}
        return _routing(logits, mask, torch.sigmoid(logits), logits, info)


# ---- auxiliary-loss-free balancing ------------------------------------------------------------
class BiasBalanced(Router):
    """DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024).

    ``scores = sigmoid(logits)``; selection = top-k of ``scores + bias``; weights = the chosen
    scores normalised over the chosen k, times ``scale``. The buffer ``bias [E]`` is used ONLY for
    selection (no gradient). The buffer ``load [E]`` accumulates tokens per expert over training
    forwards; call :meth:`update_bias` after the optimizer step.

    ``groups``, ``top_groups``: group-limited routing as in DeepSeek-V3 (see :class:`TopK`), with
    ``scores + bias`` as the selection scores, so the bias also steers which groups a token keeps.
    ``num_experts`` must split into ``groups`` and the kept groups hold at least k experts.
    """

    needs = ("num_experts",)
    defaults = MappingProxyType({"k": 2})
    knobs = (_K, _GROUPS, _TOP_GROUPS)

    bias: Tensor
    load: Tensor

    def __init__(self, num_experts: int, k: int, update_rate: float = 1e-3, scale: float = 1.0,
                 groups: Optional[int] = None, top_groups: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        self.k = _check_k(k, integer=True)
        _check_k_fits(self.k, num_experts)
        self.groups, self.top_groups = _check_groups(groups, top_groups)
        if self.groups is not None:
            _check_groups_fit(self.k, num_experts, self.groups, self.top_groups, "BiasBalanced")
        if not (isinstance(update_rate, (int, float)) and math.isfinite(update_rate) and update_rate >= 0):
            raise ValueError(f"update_rate must be a finite number >= 0, got {update_rate!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.num_experts = num_experts
        self.update_rate = float(update_rate)
        self.scale = float(scale)
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("load", torch.zeros(num_experts))

    def extra_repr(self) -> str:
        groups = "" if self.groups is None else f", groups={self.groups}, top_groups={self.top_groups}"
        return f"num_experts={self.num_experts}, k={self.k}, update_rate={self.update_rate}, scale={self.scale}{groups}"

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """``bias += update_rate * sign(mean(load) - load)``; reset ``load``; return the load used ``[E]``."""
        load = self.load.clone()
        self.bias.add_(self.update_rate * torch.sign(load.mean() - load))
        self.load.zero_()
        return load

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        _check_experts(self.num_experts, logits.shape[-1], "BiasBalanced")
        scores = torch.sigmoid(logits)  # [B, L, E]
        select = scores.detach() + self.bias.to(scores.dtype)  # bias: selection only
        info: Dict[str, Any] = {"k": self.k, "bias": self.bias.detach().clone()}
        if self.groups is not None:
            select = _group_limit(select, self.groups, self.top_groups)  # the bias ranks groups too
            info.update(groups=self.groups, top_groups=self.top_groups)
        mask = _topk_mask(select, self.k)
        # sigmoid(l_i) / sum_chosen sigmoid(l_j) as a softmax of logsigmoid over the chosen: the same
        # value and gradient, but no 0/0 when every chosen sigmoid underflows (logits < -88 in float32)
        weight = self.scale * F.logsigmoid(logits).masked_fill(~mask, float("-inf")).softmax(-1)
        if self.training:
            with torch.no_grad():
                self.load += mask.sum((0, 1)).to(self.load.dtype)
        return _routing(logits, mask, weight, scores, info)


# ---- learned threshold ------------------------------------------------------------------------
class LearnedThreshold(Router):
    """AdaMoLE (Liu & Luo 2024): a learned, per-token threshold on the softmax probabilities.

    ``p = softmax(logits)``, ``tau = sigmoid(W_t x + b_t) * max_threshold`` per token (default
    ``max_threshold = 1 / num_experts``); experts with ``p - tau >= 0`` are selected with weights
    ``p - tau`` normalised to sum 1 per token. A token may get zero experts. Needs ``x [B, L, dim]``.
    ``info``: ``threshold`` (tau ``[B, L]``, detached).
    """

    needs = LAYER_FACTS
    explorable = False  # it reads the layer input x, which the explorer's logits alone do not give

    def __init__(self, dim: int, num_experts: int, max_threshold: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if max_threshold is None:
            max_threshold = 1.0 / num_experts
        if not (isinstance(max_threshold, (int, float)) and 0 < max_threshold <= 1):
            raise ValueError(f"max_threshold must be in (0, 1], got {max_threshold!r}")
        self.dim = dim
        self.num_experts = num_experts
        self.max_threshold = float(max_threshold)
        self.threshold_proj = nn.Linear(dim, 1)  # W_t, b_t

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, max_threshold={self.max_threshold}"

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        _check_experts(self.num_experts, logits.shape[-1], "LearnedThreshold")
        x = _check_x(x, logits, self.dim, "LearnedThreshold", self.threshold_proj.weight)
        probs = logits.softmax(-1)  # [B, L, E]
        tau = torch.sigmoid(self.threshold_proj(x)).to(probs.dtype) * self.max_threshold  # [B, L, 1]
        adapted = probs - tau  # [B, L, E]
        mask = adapted >= 0
        kept = adapted * mask
        total = kept.sum(-1, keepdim=True)  # [B, L, 1]
        weight = kept / torch.where(total > 0, total, torch.ones_like(total))  # no expert: no division
        info = {"threshold": tau.detach().squeeze(-1)}
        return _routing(logits, mask, weight, probs, info)


# ---- fixed probability threshold -------------------------------------------------------------
class FixedThreshold(Router, InferenceThreshold):
    """Fixed-threshold routing: every expert whose softmax probability is ``>= threshold``, and at
    least each token's top one (so no token is left without an expert).

    Probabilities are computed in float32 (whatever the logits' dtype); the weights are the kept
    probabilities divided by their sum per token (``renormalize``, the scale of
    ``TopK(k, renormalize=True)``), else the raw probabilities, cast back to the logits' dtype.
    :class:`~moe_lite.models.adapters.LoRAExperts` routes with it in eval when its
    ``inference_threshold`` is set. ``threshold`` (in [0, 1]) lives in the float64 buffer
    ``threshold``; :meth:`set_inference_threshold` moves it. ``info``: ``threshold`` (a float).
    """

    threshold_optional_in_state_dict = True
    defaults = MappingProxyType({"threshold": 0.5})
    knobs = (Knob("threshold", 0.0, 1.0, 0.05, 0.5, inference=True, label="probability threshold"),)
    # the explorer's "threshold" slider is Race's (a score), and its top-p slider shows the same idea
    explorable = False

    def __init__(self, threshold: float, renormalize: bool = True) -> None:
        super().__init__()
        value = _check_real(threshold, "threshold", 0, 1)
        self.register_buffer("threshold", torch.tensor(value, dtype=torch.float64))
        self.renormalize = bool(renormalize)

    @property
    def inference_threshold(self) -> float:
        return float(self.threshold)

    @torch.no_grad()
    def set_inference_threshold(self, value: float) -> None:
        """Move the threshold (in [0, 1]); the next forward uses it."""
        self.threshold.fill_(_check_real(value, "threshold", 0, 1))

    def _check_stored_threshold(self, value: float) -> None:
        _check_real(value, "threshold", 0, 1)

    def extra_repr(self) -> str:
        return f"threshold={self.inference_threshold}, renormalize={self.renormalize}"

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        b, l, e = logits.shape
        threshold = self.inference_threshold
        probs = logits.float().softmax(-1).reshape(b * l, e)  # [N, E]
        keep = probs >= threshold
        keep[torch.arange(b * l, device=logits.device), probs.argmax(-1)] = True  # at least the top one
        token, expert = keep.nonzero(as_tuple=True)  # token-major order
        weight = probs[token, expert]  # [A]
        if self.renormalize:
            weight = weight / (probs * keep).sum(-1)[token]
        return Routing(logits=logits, token=token, expert=expert, weight=weight.to(logits.dtype), num_experts=e,
                       info={"threshold": threshold})


# ---- capacity for any router ------------------------------------------------------------------
def _check_factor(value: Any, name: str) -> float:
    """A capacity factor: a finite number > 0."""
    return _check_real(value, name, 0, low_open=True)


def _float_order_key(x: Tensor) -> Tensor:
    """long ``[A]`` ordered exactly as the floats ``x [A]`` (from their IEEE bits; on CPU an integer
    sort is several times faster than a float sort). Half precisions go through float32 exactly."""
    x = x.detach()
    if x.dtype == torch.float64:
        bits = x.view(torch.int64)
        magnitude = bits & 0x7FFF_FFFF_FFFF_FFFF
    else:
        bits = x.float().view(torch.int32).long()
        magnitude = bits & 0x7FFF_FFFF
    return torch.where(bits < 0, -magnitude, bits)  # negative floats: larger magnitude sorts lower


def _capacity_keep(token: Tensor, expert: Tensor, weight: Tensor, num_tokens: int, num_experts: int,
                   capacity: int, policy: str) -> Tensor:
    """bool ``[A]``: the assignments each expert keeps, at most ``capacity`` per expert.

    ``"probs"``: each expert's highest weights (ties: earlier token first); ``"position"``: each
    expert's first tokens in flat token order. Ranks come from sorts (no loop over experts).
    """
    if policy == "position":
        order = torch.argsort(expert * num_tokens + token)  # [A] by expert, then token (keys unique)
    else:
        order = torch.argsort(token, stable=True)  # [A] flat token order, for the ties
        # best weight first: ascending on the negated key (a descending stable sort is slower on CPU)
        order = order[torch.argsort(-_float_order_key(weight)[order], stable=True)]
        order = order[torch.argsort(expert[order], stable=True)]  # by expert, best weight first
    counts = torch.bincount(expert, minlength=num_experts)  # [E]
    sorted_expert = expert[order]
    rank = torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[sorted_expert]
    keep = torch.empty_like(rank, dtype=torch.bool)
    keep[order] = rank < capacity
    return keep


class Capacity(Router):
    """Per-expert capacity and dropping for any router (GShard, Switch, Megatron-LM, ST-MoE).

    The wrapped ``router`` decides first (``A`` assignments over ``E`` experts); then each expert
    keeps at most ``capacity = ceil(capacity_factor * A / E)`` of its assignments and the rest are
    dropped (no renormalisation of the kept weights; a token with nothing left gets zero from the
    routed experts, which the statistics count as dropped).

    Args:
        router: the inner router module (registered as a submodule: ``.train()`` / ``.eval()``
            reach it and its buffers are in ``state_dict`` under ``router.``).
        capacity_factor: finite > 0, used in training.
        policy: ``"probs"`` keeps each expert's highest-weight assignments (ties: earlier token);
            ``"position"`` the first in flat token order (first come, first served).
        eval_capacity_factor: used in eval (as st-moe-pytorch's separate train / eval factors);
            None = ``capacity_factor``.

    ``Routing.logits`` / ``scores`` are the inner router's; ``info`` keeps the inner info (an inner
    ``capacity`` / ``dropped`` is renamed ``inner_capacity`` / ``inner_dropped``) and adds
    ``capacity`` (int), ``capacity_factor`` (the one used) and ``dropped`` (long scalar tensor:
    assignments dropped here).
    """

    POLICIES = ("probs", "position")

    def __init__(self, router: nn.Module, capacity_factor: float, policy: str = "probs",
                 eval_capacity_factor: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(router, nn.Module):
            raise ValueError(f"router must be a router nn.Module (e.g. TopK(2)), got {type(router).__name__}")
        self.router = router
        self.capacity_factor = _check_factor(capacity_factor, "capacity_factor")
        self.policy = _check_choice(policy, self.POLICIES, "policy")
        self.eval_capacity_factor = (None if eval_capacity_factor is None
                                     else _check_factor(eval_capacity_factor, "eval_capacity_factor"))

    def extra_repr(self) -> str:
        return (f"capacity_factor={self.capacity_factor}, policy={self.policy!r}, "
                f"eval_capacity_factor={self.eval_capacity_factor}")

    def forward(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        return self.route(logits, x=x, key=key)  # the inner router validates the logits

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        inner = self.router(logits, x=x, key=key)
        e, a = inner.num_experts, inner.num_assignments
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        capacity = math.ceil(factor * a / e)
        keep = _capacity_keep(inner.token, inner.expert, inner.weight, inner.num_tokens, e, capacity,
                              self.policy)  # [A]
        info = {("inner_" + name if name in ("capacity", "dropped") else name): value
                for name, value in inner.info.items()}
        info.update(capacity=capacity, capacity_factor=factor, dropped=(~keep).sum())
        return Routing(logits=inner.logits, token=inner.token[keep], expert=inner.expert[keep],
                       weight=inner.weight[keep], num_experts=e, scores=inner.scores, info=info)


# ---- null (zero-compute) experts --------------------------------------------------------------
class NullExperts(Router):
    """Null experts (AdaMoE, Zeng et al. 2024, arXiv 2406.13233): "no extra expert" as a choice.

    The gate scores ``E`` real experts and ``num_null`` null ones: logits ``[B, L, E + num_null]``,
    the null experts last. The wrapped ``router`` routes over all ``E + num_null``; assignments to a
    null expert are then dropped (a null expert computes nothing and outputs zero), so a token that
    picks ``j`` null experts among its ``k`` uses only ``k - j`` real experts. AdaMoE raises ``k``
    (say top-4 over 8 real + 8 null) and keeps the *average* use of the null experts in check with
    the load-balance loss, so the number of real experts varies per token.

    Returns a :class:`~moe_lite.routing.Routing` over the ``E`` real experts: ``logits`` and
    ``scores`` are the real experts' slices ``[..., :E]`` (so the kit's losses balance the real
    experts only; the null experts' share is in ``info``), ``weight`` the inner router's weights of
    the kept assignments (their gradient reaches the null logits too, through softmax denominators).

    In :class:`~moe_lite.layers.MoE` the default gate is sized ``num_experts + num_null`` (read off
    this router's ``num_null``): ``MoE(dim, hidden, 8, NullExperts(TopK(4), 8))``. Wrap other
    wrappers inside it, e.g. ``NullExperts(Capacity(TopK(4), 1.25), 8)``.

    Args:
        router: the inner router module (a submodule: ``.train()`` / ``.eval()`` reach it).
        num_null: null experts, an int ``>= 1``; the logits need at least one real expert more.
        renormalize: divide each token's kept (real) weights by their sum, so they sum to one over
            the real experts it uses (a token whose kept weights sum to zero keeps them as they are).

    ``info``: the inner info, plus ``num_null`` and ``null_fraction`` (0-d tensor: the fraction of
    the inner assignments that went to a null expert).
    """

    def __init__(self, router: nn.Module, num_null: int, renormalize: bool = False) -> None:
        super().__init__()
        if not isinstance(router, nn.Module):
            raise ValueError(f"router must be a router nn.Module (e.g. TopK(4)), got {type(router).__name__}")
        if not isinstance(num_null, int) or isinstance(num_null, bool) or num_null < 1:
            raise ValueError(f"num_null must be an int >= 1, got {num_null!r}")
        self.router = router
        self.num_null = num_null
        self.renormalize = bool(renormalize)

    def extra_repr(self) -> str:
        return f"num_null={self.num_null}, renormalize={self.renormalize}"

    def forward(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        return self.route(logits, x=x, key=key)  # the inner router validates the logits

    def route(self, logits: Tensor, x: Optional[Tensor] = None, key: Optional[Tensor] = None) -> Routing:
        inner = self.router(logits, x=x, key=key)
        b, l, total = logits.shape
        e = total - self.num_null  # real experts come first
        if e < 1:
            raise ValueError(f"NullExperts(num_null={self.num_null}) needs logits [B, L, E + num_null] with "
                             f"E >= 1 real experts, got {total} logits per token")
        real = inner.expert < e  # [A]
        token, expert, weight = inner.token[real], inner.expert[real], inner.weight[real]
        if self.renormalize:
            total_weight = weight.new_zeros(b * l).index_add(0, token, weight)[token]  # [A]
            weight = weight / torch.where(total_weight != 0, total_weight, torch.ones_like(total_weight))
        info = dict(inner.info)
        info.update(num_null=self.num_null,
                    null_fraction=(~real).sum().to(logits.dtype) / max(inner.num_assignments, 1))
        scores = None if inner.scores is None else inner.scores[..., :e]
        return Routing(logits=logits[..., :e], token=token, expert=expert, weight=weight, num_experts=e,
                       scores=scores, info=info)


# ---- registry, specs and presets -------------------------------------------------------------
_REGISTRY: Dict[str, Type[Router]] = {
    "topk": TopK,
    "switch": Switch,
    "expert_choice": ExpertChoice,
    "topp": TopP,
    "race": Race,
    "hash": Hash,
    "balanced": BalancedAssignment,
    "bias_balanced": BiasBalanced,
    "learned_threshold": LearnedThreshold,
    "fixed_threshold": FixedThreshold,
}
ROUTERS: Mapping[str, Type[Router]] = MappingProxyType(_REGISTRY)
"""Read-only map: lowercase router name -> class, in the order the explorer offers them. Every list of
routers (configs, explorer, bench, CLI) derives from it; :func:`register` adds one."""


def register(name: str, cls: Optional[Type[Router]] = None) -> Any:
    """Add router class ``cls`` under ``name`` (also usable as a decorator: ``@register("mine")``).

    ``ValueError`` if the name is taken or not a lowercase identifier, or ``cls`` is not a
    :class:`Router` subclass with valid declarations.
    """
    def add(cls: Type[Router]) -> Type[Router]:
        if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
            raise ValueError(f"a router name must be a lowercase identifier, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(f"router name {name!r} is taken (by {_REGISTRY[name].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise ValueError(f"register needs a Router subclass, got {cls!r}")
        bad = [need for need in cls.needs if need not in LAYER_FACTS]
        if bad:
            raise ValueError(f"{cls.__name__}.needs names {bad}; a layer gives only {list(LAYER_FACTS)}")
        _REGISTRY[name] = cls
        return cls

    return add if cls is None else add(cls)


def unregister(name: str) -> None:
    """Remove a router added with :func:`register` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is a built-in router and cannot be removed")
    if name not in _REGISTRY:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(_REGISTRY)}")
    del _REGISTRY[name]


_BUILT_IN = frozenset(_REGISTRY)


def router_class(name: str) -> Type[Router]:
    """The router class registered as ``name``; ``ValueError`` listing the names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def _keywords(cls: Type[Router]) -> Optional[Tuple[str, ...]]:
    """The constructor keywords of ``cls`` (None: it takes any, through ``**kwargs``)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # less self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _required(cls: Type[Router]) -> Tuple[str, ...]:
    """The constructor parameters of ``cls`` that have no default."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return tuple(p.name for p in params if p.default is inspect.Parameter.empty
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


class RouterSpec:
    """A router described by name and keywords: frozen, hashable, comparable, serialisable.

    ``RouterSpec("topk", k=2)``; ``RouterSpec("topk")`` builds with the class's ``defaults``
    (``k=2``). The name must be registered (:data:`ROUTERS`) and every keyword one the router's
    constructor takes (``ValueError`` listing the valid ones otherwise); values are checked by the
    constructor when :meth:`build` runs. ``spec.build(dim, num_experts)`` makes a fresh router and
    passes the layer facts the class ``needs``. ``to_dict`` / ``from_dict`` round-trip through JSON
    (for JSON-able keyword values).
    """

    __slots__ = ("name", "kwargs")
    name: str
    kwargs: Mapping[str, Any]

    def __init__(self, name: str, **kwargs: Any) -> None:
        cls = router_class(name)
        accepted = _keywords(cls)
        unknown = sorted(k for k in kwargs if accepted is not None and k not in accepted)
        if unknown:
            raise ValueError(f"router {name!r} ({cls.__name__}) takes no keyword {', '.join(map(repr, unknown))}; "
                             f"valid keywords: {list(accepted or ())}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kwargs", MappingProxyType(dict(kwargs)))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"RouterSpec is frozen: use spec.replace({key}=...)")

    def __delattr__(self, key: str) -> None:
        raise AttributeError("RouterSpec is frozen")

    def __reduce__(self) -> Any:  # pickle / copy: through the constructor (slots, no __dict__)
        return (_spec_from_dict, ({"name": self.name, "kwargs": dict(self.kwargs)},))

    # -- identity --------------------------------------------------------------------------------
    def _key(self) -> Tuple[str, Tuple[Tuple[str, Any], ...]]:
        return self.name, tuple(sorted(self.kwargs.items()))

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, RouterSpec):
            return NotImplemented
        return self.name == other.name and dict(self.kwargs) == dict(other.kwargs)

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"RouterSpec({self.name!r}{args})"

    # -- reading the declarations ----------------------------------------------------------------
    @property
    def router_class(self) -> Type[Router]:
        return _REGISTRY[self.name]

    @property
    def effective_kwargs(self) -> Dict[str, Any]:
        """The keywords :meth:`build` uses before the layer facts: the spec's, or the class
        ``defaults`` when the spec gives none."""
        return dict(self.kwargs) if self.kwargs else dict(self.router_class.defaults)

    @property
    def needs(self) -> Tuple[str, ...]:
        """The layer facts this spec's router needs (and the spec does not give itself)."""
        kwargs = self.effective_kwargs
        return tuple(n for n in self.router_class.needs_for(kwargs) if n not in kwargs)

    @property
    def knobs(self) -> Tuple[Knob, ...]:
        return self.router_class.knobs

    def accepts(self, keyword: str) -> bool:
        """Whether the router's constructor takes ``keyword``."""
        accepted = _keywords(self.router_class)
        return accepted is None or keyword in accepted

    # -- making things ---------------------------------------------------------------------------
    def replace(self, **kwargs: Any) -> "RouterSpec":
        """A new spec: :attr:`effective_kwargs` updated with ``kwargs``."""
        return RouterSpec(self.name, **{**self.effective_kwargs, **kwargs})

    def build(self, dim: Optional[int] = None, num_experts: Optional[int] = None) -> Router:
        """A fresh router (never share one between layers: some keep state in buffers), with the
        layer facts the class needs (``ValueError`` when one it needs is not given)."""
        kwargs = self.effective_kwargs
        facts = {"dim": dim, "num_experts": num_experts}
        for need in self.needs:
            if facts[need] is None:
                raise ValueError(f"router {self.name!r} needs {need} from its layer: "
                                 f"spec.build(dim=..., num_experts=...) or give it in the spec")
            kwargs[need] = facts[need]
        missing = [k for k in _required(self.router_class) if k not in kwargs]
        if missing:
            defaults = dict(self.router_class.defaults)
            raise ValueError(f"{self!r} gives no {', '.join(missing)} (required by {self.router_class.__name__}); "
                             f"the defaults {defaults} apply only to a spec with no keywords")
        return self.router_class(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """``{"name": ..., "kwargs": {...}}``."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RouterSpec":
        """Inverse of :meth:`to_dict`; ``ValueError`` on anything else."""
        if not isinstance(data, Mapping) or set(data) - {"name", "kwargs"} or "name" not in data:
            raise ValueError(f"a RouterSpec dict is {{'name': str, 'kwargs': dict}}, got {data!r}")
        kwargs = data.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"RouterSpec kwargs must be a dict, got {type(kwargs).__name__}")
        return cls(data["name"], **kwargs)

    @classmethod
    def from_fields(cls, name: str, kwargs: Optional[Mapping[str, Any]]) -> "RouterSpec":
        """From a config's ``router`` name and ``router_kwargs`` (None: the defaults)."""
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(f"router_kwargs must be a dict, got {type(kwargs).__name__}")
        return cls(name, **(kwargs or {}))

    def to_fields(self) -> Tuple[str, Optional[Dict[str, Any]]]:
        """``(router name, router_kwargs)`` as configs store them (no keywords: None)."""
        return self.name, (dict(self.kwargs) if self.kwargs else None)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RouterSpec":
        """The named preset (:data:`PRESETS`), updated with ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown router preset {name!r}; choose one of {list(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def _spec_from_dict(data: Mapping[str, Any]) -> RouterSpec:
    return RouterSpec.from_dict(data)


PRESETS: Mapping[str, RouterSpec] = MappingProxyType({
    # the Expert Race paper's routing names (DiT's ``moe_routing``); DiT adds k, gating and Race's EMA
    "token_choice": RouterSpec("topk", renormalize=False),
    "expert_choice": RouterSpec("expert_choice"),
    "race": RouterSpec("race", candidates="BLE"),
    "bl": RouterSpec("race", candidates="BL"),
    "be": RouterSpec("race", candidates="BE"),
    "le": RouterSpec("race", candidates="LE"),
})
"""Named router presets: name -> :class:`RouterSpec` (:meth:`RouterSpec.preset`)."""


def make_router(name: str, **kwargs: Any) -> Router:
    """Build a router by lowercase name (see :data:`ROUTERS`), e.g. ``make_router("topk", k=2)``:
    ``RouterSpec(name, **kwargs).build()`` (no keywords: the class defaults; layer facts it needs
    must be given, e.g. ``make_router("hash", num_experts=8)``)."""
    return RouterSpec(name, **kwargs).build()
