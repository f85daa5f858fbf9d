"""Sparse adaptation of a frozen model with a mixture of LoRA experts (MixLoRA / AdaMoLE style).

Axis legend: b batch, l tokens per sample, n = b*l flat tokens, a assignments, e experts,
r LoRA rank, i / o input / output features of the adapted ``nn.Linear``.

Protocol (notebook 07): pretrain a dense :class:`~moe_lite.models.vit.ViT` on one task (classes 0-4),
then adapt it to another (classes 5-9 relabelled 0-4, see :func:`split_classes`) with
:func:`adapt`, comparing

* ``"linear_probe"``: everything frozen, a new head;
* ``"lora"``: one :class:`LoRALinear` on each FFN linear, rank matched to the LoRA-expert config
  (:func:`matched_lora_rank`), plus the new head;
* ``"lora_experts"``: :class:`LoRAExperts` (a routed mixture of LoRA experts) on each FFN linear,
  plus the new head;
* ``"full"``: full fine-tuning with a new head.

:func:`adapter_cost` counts trainable parameters and the adapter FLOPs per token actually spent in
the last forward (sparse routing only pays for the experts a token used).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import losses as _losses
from ..layers import GATE_INIT_STD, MoELayer
from ..routers import FixedThreshold, InferenceThreshold, RouterSpec, _check_real
from ..routing import Routing
from .vit import ViT

__all__ = [
    "LoRALinear",
    "LoRAExperts",
    "METHODS",
    "adapt",
    "matched_lora_rank",
    "adapter_cost",
    "ffn_linears",
    "split_classes",
    "threshold_routing",
]

#: the adaptation methods :func:`adapt` knows.
METHODS = ("linear_probe", "lora", "lora_experts", "full")

#: the router a name gives :func:`adapt` when ``router_kwargs`` is not given (other names: the
#: router class's own defaults).
_ROUTER_DEFAULTS: Mapping[str, RouterSpec] = MappingProxyType({
    "topk": RouterSpec("topk", k=2, renormalize=True),  # MixLoRA: softmax -> top-2 -> renormalise
    "topp": RouterSpec("topp", p=0.4),  # Huang et al. 2024
})

RouterFactory = Callable[[int, int], nn.Module]


def _check_linear(base: nn.Module) -> None:
    if not isinstance(base, nn.Linear):
        raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")


# ---- LoRA -------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (Hu et al. 2021).

    ``y = base(x) + (alpha / rank) * x A^T B^T`` with ``A [r, i]`` (Kaiming-uniform init) and
    ``B [o, r]`` (zero init), so the module equals ``base`` at initialisation. The base weights are
    frozen in place (``requires_grad=False``). ``alpha`` defaults to ``rank`` (scaling 1).

    ``forward(x [..., i]) -> [..., o]``.
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: Optional[float] = None) -> None:
        super().__init__()
        _check_linear(base)
        _check_rank(rank)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.scaling = self.alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        """``[o, i]``: the dense update ``scaling * B @ A`` (to merge into the base weight)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


# ---- a routed mixture of LoRA experts ---------------------------------------------------------
def threshold_routing(logits: Tensor, threshold: float, renormalize: bool = True) -> Routing:
    """``FixedThreshold(threshold, renormalize)(logits)`` (:class:`moe_lite.routers.FixedThreshold`):
    every expert whose softmax probability is ``>= threshold``, at least the top one.

    Args:
        logits: float ``[B, L, E]``.
        threshold: in ``[0, 1]``.
        renormalize: weights are the kept probabilities divided by their sum (so they sum to 1 per
            token, the scale of ``TopK(k, renormalize=True)``); else the raw probabilities.

    Returns:
        a :class:`~moe_lite.routing.Routing` with ``info["threshold"] = threshold``.
    """
    return FixedThreshold(threshold, renormalize)(logits)


class LoRAExperts(MoELayer, InferenceThreshold):
    """A frozen ``nn.Linear`` plus a routed mixture of LoRA experts (MixLoRA / AdaMoLE style).

    ``y = base(x) + (alpha / rank) * sum_{e routed} w_e * x A_e^T B_e^T``, with the routing decided
    by ``router(gate(x))``, ``gate = Linear(i, E, bias=False)`` (init N(0, 0.02), MixLoRA). ``A_e``
    Kaiming-uniform, ``B_e`` zero, so the module equals ``base`` at initialisation.

    A :class:`~moe_lite.layers.MoELayer`, so ``moe_lite.moe_layers`` / ``aux_loss`` /
    ``aux_losses`` / ``routing_stats`` find it. Like :class:`~moe_lite.layers.MoE`, after each forward
    it holds ``.routing`` (the :class:`~moe_lite.routing.Routing`), ``.aux_losses``
    (``{name: unweighted scalar}``), ``.aux_loss`` (the weighted sum, a tensor; zero without losses)
    and ``.loss_weights``.

    Args:
        base: the frozen linear (frozen in place).
        num_experts: ``E``.
        rank: ``r`` of every expert.
        router: a router module (its own instance), called ``router(logits [B, L, E], x=x [B, L, i])``.
        alpha: LoRA alpha, default ``rank`` (scaling 1).
        losses: ``{name: weight}`` from :data:`moe_lite.losses.REGISTRY`.
        inference_threshold: if set, in **eval** mode the router is bypassed and every expert whose
            softmax probability (of the gate logits) is ``>= inference_threshold`` is used, at least
            the top one, with the kept probabilities renormalised (:func:`threshold_routing`).
            Training always uses ``router``. ``None``: eval uses the router too. Kept in the buffer
            ``threshold`` (negative = None), so ``state_dict`` carries it (one saved before that
            loads and keeps this layer's value); move it with :meth:`set_inference_threshold` or
            ``layer.inference_threshold = ...``, checked to be in [0, 1] or None on every set.
        dispatch: ``"loop"`` (gathers the routed tokens of each expert: sparse compute, the
            reference) or ``"dense"`` (every expert on every token, masked by the routing weights:
            the same result, faster on CPU for tiny ranks).

    ``forward(x [B, L, i] or [N, i]) -> [..., o]``; a 2-D input is routed as one sample ``[1, N, i]``.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        router: nn.Module,
        alpha: Optional[float] = None,
        losses: Optional[Mapping[str, float]] = None,
        inference_threshold: Optional[float] = None,
        dispatch: str = "loop",
    ) -> None:
        super().__init__()
        _check_linear(base)
        _check_rank(rank)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(router, nn.Module):
            raise ValueError(f"router must be a router module, got {type(router).__name__}")
        if inference_threshold is not None:
            inference_threshold = _check_real(inference_threshold, "inference_threshold", 0, 1)
        if dispatch not in ("loop", "dense"):
            raise ValueError(f"dispatch must be 'loop' or 'dense', got {dispatch!r}")
        losses = dict(losses or {})
        for name, weight in losses.items():
            if name not in _losses.REGISTRY:
                raise ValueError(f"unknown loss {name!r}; known: {sorted(_losses.REGISTRY)}")
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"weight of loss {name!r} must be a non-negative number, got {weight!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.rank = num_experts, rank
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.scaling = self.alpha / rank
        self.dispatch = dispatch
        self.loss_weights: Dict[str, float] = {k: float(v) for k, v in losses.items()}
        w = base.weight
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float64, device=w.device))
        self.set_inference_threshold(inference_threshold)
        self.gate = nn.Linear(self.in_features, num_experts, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.gate.weight, std=GATE_INIT_STD)
        self.router = router
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank, device=w.device, dtype=w.dtype))
        for a in self.lora_A.data.unbind(0):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    threshold_optional_in_state_dict = True

    @property
    def inference_threshold(self) -> Optional[float]:
        """The eval-mode probability threshold in [0, 1], or None (eval uses the router)."""
        value = float(self.threshold)
        return None if value < 0 else value

    @inference_threshold.setter
    def inference_threshold(self, value: Optional[float]) -> None:
        self.set_inference_threshold(value)

    @torch.no_grad()
    def set_inference_threshold(self, value: Optional[float]) -> None:
        """Set the eval threshold (in [0, 1]) or None; the next eval forward uses it."""
        self.threshold.fill_(-1.0 if value is None else _check_real(value, "inference_threshold", 0, 1))

    def _check_stored_threshold(self, value: float) -> None:
        if not value < 0:  # negative means None; NaN is checked (and refused)
            _check_real(value, "inference_threshold", 0, 1)

    def route(self, x: Tensor) -> Routing:
        """``x [B, L, i] -> Routing`` (router in training, or the fixed threshold in eval if set)."""
        logits = self.gate(x)  # [b, l, e]
        if not self.training:
            threshold = self.inference_threshold  # a host read in eval only (the routing syncs anyway)
            if threshold is not None:
                return FixedThreshold(threshold)(logits)
        return self.router(logits, x=x)

    def _experts(self, x: Tensor, routing: Routing) -> Tensor:
        """``x [N, i]`` through the routed experts -> ``[N, o]`` (weights and scaling applied)."""
        n = x.shape[0]
        weight = routing.weight.to(x.dtype) * self.scaling  # [a]
        if self.dispatch == "dense":
            dense = torch.zeros(n, self.num_experts, dtype=x.dtype, device=x.device)
            dense = dense.index_put((routing.token, routing.expert), weight)  # [n, e]
            z = torch.einsum("ni,eri->ner", x, self.lora_A) * dense[:, :, None]
            return torch.einsum("ner,eor->no", z, self.lora_B)
        y = x.new_zeros(n, self.out_features)
        for e, (a_e, b_e) in enumerate(zip(self.lora_A.unbind(0), self.lora_B.unbind(0))):
            sel = (routing.expert == e).nonzero(as_tuple=True)[0]  # assignments of expert e
            if sel.numel() == 0:
                continue
            tok = routing.token[sel]
            h = (x[tok] @ a_e.T) @ b_e.T  # [a_e, o]
            y = y.index_add(0, tok, h * weight[sel, None])
        return y

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}] with at least 2 dims, got {tuple(x.shape)}")
        x3 = x.unsqueeze(0) if x.dim() == 2 else x.reshape(-1, x.shape[-2], x.shape[-1])  # [b, l, i]
        routing = self.route(x3)
        flat = x3.reshape(-1, self.in_features)  # [n, i]
        delta = self._experts(flat, routing).reshape(*x.shape[:-1], self.out_features)
        self.routing = routing
        self.aux_losses = {name: _losses.REGISTRY[name](routing) for name in self.loss_weights}
        total = torch.zeros((), device=x.device)
        for name, w in self.loss_weights.items():
            total = total + w * self.aux_losses[name]
        self.aux_loss = total
        return self.base(x) + delta

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
            f"alpha={self.alpha}, inference_threshold={self.inference_threshold}, dispatch={self.dispatch!r}"
        )


# ---- adapting a ViT ---------------------------------------------------------------------------
def ffn_linears(model: nn.Module) -> List[Tuple[str, nn.Module, str, nn.Linear]]:
    """Every ``nn.Linear`` inside each block's dense FFN (``blocks[i].mlp``): ``fc_in`` and ``fc_out``
    (with SwiGLU, ``fc_in`` is the fused ``[a | b]`` projection). Attention, embeddings and head are
    not included.

    Returns ``[(qualified name, parent module, attribute, linear)]``.

    Raises:
        ValueError: when the model has no ``blocks`` or a block is MoE (adapt a dense model).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("the model has no .blocks: adapt expects a moe_lite ViT")
    found = []
    for i, block in enumerate(blocks):
        if getattr(block, "is_moe", False):
            raise ValueError(f"block {i} is an MoE block: LoRA adaptation expects a dense ViT")
        for name, parent in block.mlp.named_modules():
            for attr, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    qual = ".".join(x for x in (f"blocks.{i}.mlp", name, attr) if x)
                    found.append((qual, parent, attr, child))
    if not found:
        raise ValueError("no nn.Linear found in the blocks' FFNs")
    return found


def _expert_router(
    router: Union[str, RouterSpec, RouterFactory], router_kwargs: Optional[Mapping[str, Any]], in_features: int,
    num_experts: int,
) -> nn.Module:
    """A fresh router for one :class:`LoRAExperts` with ``in_features`` inputs."""
    if isinstance(router, nn.Module):
        raise ValueError("pass a router name, a RouterSpec or a factory (in_features, num_experts) -> router, "
                         "not an instance")
    if isinstance(router, (str, RouterSpec)):
        if isinstance(router, RouterSpec):
            if router_kwargs:
                raise ValueError("router_kwargs must be empty when router is a RouterSpec (it carries its keywords)")
            spec = router
        elif router_kwargs is None and router in _ROUTER_DEFAULTS:
            spec = _ROUTER_DEFAULTS[router]
        else:
            spec = RouterSpec.from_fields(router, router_kwargs)
        built = spec.build(in_features, num_experts)  # the input width and E go where the router needs them
    else:
        if router_kwargs:
            raise ValueError("router_kwargs must be empty when router is a factory")
        built = router(in_features, num_experts)
    if not isinstance(built, nn.Module):
        raise ValueError(f"the router factory must return an nn.Module, got {type(built).__name__}")
    return built


def adapt(
    model: ViT,
    method: str,
    num_classes: int,
    *,
    rank: int = 4,
    num_experts: int = 4,
    router: Union[str, RouterSpec, RouterFactory] = "topk",
    router_kwargs: Optional[Mapping[str, Any]] = None,
    losses: Optional[Mapping[str, float]] = None,
    alpha: Optional[float] = None,
    inference_threshold: Optional[float] = None,
    lora_rank: Optional[int] = None,
    dispatch: str = "loop",
) -> ViT:
    """A copy of ``model`` (left untouched) prepared for adaptation to a ``num_classes`` task.

    Every method replaces the head by a fresh ``Linear(dim, num_classes)`` (trainable) and updates
    ``config.num_classes``. Adapters wrap every ``nn.Linear`` of each block's dense FFN
    (:func:`ffn_linears`: ``fc_in`` and ``fc_out``); attention, patch embedding and norms stay
    untouched and frozen (except with ``"full"``).

    * ``"linear_probe"``: all backbone parameters frozen.
    * ``"lora"``: frozen backbone + :class:`LoRALinear` of rank ``lora_rank``, by default the rank
      whose trainable parameters best match the ``"lora_experts"`` config given by the same
      ``rank`` / ``num_experts`` / ``router`` arguments (:func:`matched_lora_rank`).
    * ``"lora_experts"``: frozen backbone + :class:`LoRAExperts` (``num_experts`` experts of rank
      ``rank``; one router each, built from ``router``). ``router``: a name of
      :data:`~moe_lite.routers.ROUTERS` with ``router_kwargs`` (defaults: ``"topk"`` ->
      ``k=2, renormalize=True``; ``"topp"`` -> ``p=0.4``; other names: the router's own defaults;
      the input width / expert count go to routers that need them), a
      :class:`~moe_lite.routers.RouterSpec`, or a factory ``(in_features, num_experts) -> router``.
      ``losses`` default ``{"load_balance": 0.01}`` (MixLoRA's coefficient); pass ``{}`` for none.
    * ``"full"``: everything trainable.

    Returns the adapted :class:`ViT` with an ``adaptation`` attribute naming the method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not isinstance(model, ViT):
        raise ValueError(f"adapt expects a moe_lite ViT, got {type(model).__name__}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if method in ("lora", "lora_experts"):
        ffn_linears(model)  # a clear error for MoE blocks before anything is copied
    if method == "lora" and lora_rank is None:
        lora_rank = matched_lora_rank(
            model, num_experts=num_experts, rank=rank, router=router, router_kwargs=router_kwargs
        )
    new = copy.deepcopy(model)
    for p in new.parameters():
        p.requires_grad_(method == "full")
    if method == "lora":
        for _, parent, attr, linear in ffn_linears(new):
            setattr(parent, attr, LoRALinear(linear, lora_rank, alpha))
    elif method == "lora_experts":
        losses = {"load_balance": 0.01} if losses is None else dict(losses)
        for _, parent, attr, linear in ffn_linears(new):
            r = _expert_router(router, router_kwargs, linear.in_features, num_experts)
            setattr(
                parent, attr,
                LoRAExperts(linear, num_experts, rank, r, alpha, losses, inference_threshold, dispatch),
            )
    old = new.head
    new.head = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
    new.config = dataclasses.replace(new.config, num_classes=num_classes)
    new.adaptation = method
    return new


def _adapter_params(model: nn.Module) -> int:
    """Trainable parameters outside the head."""
    head = {id(p) for p in model.head.parameters()} if hasattr(model, "head") else set()
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head)


def matched_lora_rank(
    model: ViT,
    num_experts: int = 4,
    rank: int = 4,
    router: Union[str, RouterSpec, RouterFactory] = "topk",
    router_kwargs: Optional[Mapping[str, Any]] = None,
) -> int:
    """The rank R of a single LoRA (on the same FFN linears) whose trainable parameters come closest
    to those of ``adapt(model, "lora_experts", rank=rank, num_experts=num_experts, router=...)``.

    Counted outside the head (identical for both): LoRA has ``R * sum(i + o)``; the experts have
    ``E * r * sum(i + o)`` plus the gates ``sum(i * E)`` plus any router parameters. R is the
    nearest integer to their ratio (a tie goes to the smaller), at least 1.
    """
    experts = adapt(model, "lora_experts", 1, rank=rank, num_experts=num_experts, router=router,
                    router_kwargs=router_kwargs)
    target = _adapter_params(experts)
    per_rank = sum(lin.in_features + lin.out_features for *_, lin in ffn_linears(model))
    low = max(1, target // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - target), r))


def adapter_cost(model: nn.Module, tokens_per_image: Optional[int] = None) -> Dict[str, float]:
    """Trainable parameters and adapter FLOPs of an adapted model.

    FLOPs rule (1 multiply-add = 2 FLOPs), per token, summed over the adapters:

    * :class:`LoRALinear`: ``2 * r * (i + o)`` (``x A^T``: r*i MACs, then ``B``: o*r MACs);
    * :class:`LoRAExperts`: the gate ``2 * i * E`` plus ``m * 2 * r * (i + o)``, ``m`` = the mean
      experts per token of that module's routing in the **last forward** (so top-2 -> 2, top-p ->
      realised). Router internals (softmax, sort, a learned threshold's projection) and the
      per-assignment weighting are not counted;
    * the frozen base, the head and full fine-tuning add no adapter FLOPs (0).

    Returns:
        ``{"trainable_params": int, "adapter_flops_per_token": float,
        "adapter_flops_per_image": float}`` (per image = per token * ``tokens_per_image``, by default
        ``model.config.seq_len``).

    Raises:
        ValueError: when a :class:`LoRAExperts` has not run a forward yet.
    """
    if tokens_per_image is None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "seq_len"):
            raise ValueError("pass tokens_per_image (the model has no config.seq_len)")
        tokens_per_image = config.seq_len
    flops = 0.0
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            flops += 2.0 * m.rank * (m.in_features + m.out_features)
        elif isinstance(m, LoRAExperts):
            if m.routing is None:
                raise ValueError(f"LoRAExperts {name!r} has no routing yet: run a forward pass first")
            mean_k = float(m.routing.experts_per_token.float().mean())
            flops += 2.0 * m.in_features * m.num_experts + mean_k * 2.0 * m.rank * (m.in_features + m.out_features)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_params": trainable,
        "adapter_flops_per_token": flops,
        "adapter_flops_per_image": flops * tokens_per_image,
    }


def split_classes(
    ds_images: Tensor, ds_labels: Tensor, classes: Sequence[int]
) -> Tuple[Tensor, Tensor]:
    """The images of ``classes``, relabelled ``classes[j] -> j``.

    Args:
        ds_images: ``[N, ...]`` (tensor or array).
        ds_labels: long ``[N]``.
        classes: distinct class ids, e.g. ``[5, 6, 7, 8, 9]``.

    Returns:
        ``(images [M, ...], labels long [M])`` in the original order, labels in ``[0, len(classes))``.
    """
    images = torch.as_tensor(ds_images)
    labels = torch.as_tensor(ds_labels).long()
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes must not be empty")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct, got {classes}")
    if labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"need images [N, ...] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if min(classes) < 0 or (labels.numel() and labels.min() < 0):
        raise ValueError("classes and labels must be non-negative")
    top = max(max(classes), int(labels.max()) if labels.numel() else 0)
    lookup = torch.full((top + 1,), -1, dtype=torch.long, device=labels.device)
    lookup[torch.tensor(classes, device=labels.device)] = torch.arange(len(classes), device=labels.device)
    new = lookup[labels]
    keep = new >= 0
    return images[keep], new[keep]
