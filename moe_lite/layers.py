"""Layers: the dense FFN, gates, the routed :class:`MoE`, :class:`SoftMoE`, and model-wide collectors.

Axis legend: b batch, l tokens per sample, n = b*l flat tokens, e experts, s slots (Soft MoE: e*S of
them), d model width, h hidden width, p target-head width.

Data flow of :class:`MoE`::

    x [B, L, D] --gate--> logits [B, L, E] --router--> Routing --Experts(x, token, expert, weight)--> y
                                                          +--> losses.REGISTRY[name](routing) -> aux_losses

Every layer exposes what it computed on its last forward (``routing``, ``aux_losses``, ``aux_loss``);
nothing is added to the task loss behind the caller's back: models add ``moe_lite.aux_loss(model)``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import ACTIVATIONS, DISPATCHES, Experts, _act
from .losses import REGISTRY, check_loss_weights
from .routing import NonFiniteError, Routing

__all__ = [
    "FFN",
    "LinearGate",
    "MLPGate",
    "CosineGate",
    "MoELayer",
    "MoE",
    "SoftMoE",
    "moe_layers",
    "aux_loss",
    "aux_losses",
    "routing_stats",
    "update_biases",
    "target_predictions",
    "GATE_INIT_STD",
    "model_device",
]

#: std of the normal init of gating heads (logits ~ N(0, (0.02 * |x|)^2)): small enough that no expert
#: dominates at init, large enough that tokens get distinct logits (zeros would tie every token and send
#: all of them to the same experts under top-k, and make Race / thresholds degenerate).
GATE_INIT_STD = 0.02


def _check_pos_int(owner: str, **values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")


def _check_activation(owner: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_input(owner: str, x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{owner}: x must be a torch.Tensor [B, L, {dim}], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{owner}: x must be a floating tensor [B, L, {dim}], got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{owner}: x must be [B, L, {dim}], got shape {tuple(x.shape)}")


# ---- dense FFN ---------------------------------------------------------------------------------------
class FFN(nn.Module):
    """The dense MLP, same math as one expert of :class:`~moe_lite.experts.Experts`.

    ``gelu``: ``fc_out(gelu(fc_in(x)))``; ``swiglu``: ``fc_out(silu(a) * b)`` with ``[a | b] = fc_in(x)``
    (``fc_in`` has width ``2 * hidden``). ``x [..., D] -> [..., D]``.

    Args:
        dim, hidden: widths ``D`` and ``H``.
        activation: ``"gelu"`` or ``"swiglu"``.
        bias: biases in ``fc_in`` / ``fc_out`` (default False, like the experts).
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        _check_pos_int("FFN", dim=dim, hidden=hidden)
        _check_activation("FFN", activation)
        self.dim, self.hidden, self.activation = dim, hidden, activation
        self.fc_in = nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(_act(self.fc_in(x), self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# ---- gates -------------------------------------------------------------------------------------------
class LinearGate(nn.Module):
    """``logits = x @ W_gᵀ``: ``[B, L, D] -> [B, L, E]``, no bias, ``W_g ~ N(0, GATE_INIT_STD²)``."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        _check_pos_int("LinearGate", dim=dim, num_experts=num_experts)
        self.proj = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=GATE_INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class MLPGate(nn.Module):
    """Expert Race's two-layer router (Yuan et al. 2025, §3.4 and Fig. 12).

    A shared trunk ``h = GELU(Linear(D, D)(x))`` feeds the gating head ``Linear(D, E)`` (no bias,
    ``N(0, GATE_INIT_STD²)`` init) and, when ``target_dim`` is given, a target head
    ``Linear(D, target_dim)`` that predicts the model's final regression target from this layer
    (per-layer regularization, see ``losses.per_layer_regression``).

    ``forward(x [B, L, D]) -> logits [B, L, E]``; after it, ``target_prediction`` is
    ``[B, L, target_dim]`` (``None`` without a target head).
    """

    def __init__(self, dim: int, num_experts: int, target_dim: Optional[int] = None):
        super().__init__()
        _check_pos_int("MLPGate", dim=dim, num_experts=num_experts)
        if target_dim is not None:
            _check_pos_int("MLPGate", target_dim=target_dim)
        self.trunk = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=GATE_INIT_STD)
        self.target_head = nn.Linear(dim, target_dim) if target_dim is not None else None
        self.target_prediction: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.trunk(x))
        self.target_prediction = self.target_head(h) if self.target_head is not None else None
        return self.gate(h)


class CosineGate(nn.Module):
    """Cosine gate (X-MoE, Chi et al. 2022, arXiv 2204.09179): logits from normalised embeddings.

    ``logits[b, l, e] = cos(W x[b, l], emb[e]) / temperature``: the token is projected to a low
    dimension ``proj_dim`` (``W = Linear(dim, proj_dim, bias=False)``), then the token and every
    expert embedding ``emb [E, proj_dim]`` are L2-normalised, so the logits lie in
    ``[-1/temperature, 1/temperature]`` and an expert cannot win by the norm of its embedding
    alone (X-MoE's remedy for representation collapse). ``[B, L, D] -> [B, L, E]``; any router
    reads these logits (``MoE(..., gate=CosineGate(dim, E))``).

    Args:
        dim, num_experts: ``D`` and ``E``.
        proj_dim: routing dimension (X-MoE uses a low one such as 16; default 16).
        temperature: finite > 0 (default 0.5: logits in [-2, 2] at init, no expert dominates).
        learn_temperature: learn it (default True, as X-MoE); it is kept as
            ``log_scale = log(1 / temperature)`` (a parameter, or a buffer when fixed), so it stays
            positive, and the scale ``1 / temperature`` is capped at ``1 / min_temperature``.
        min_temperature: the floor of a learned temperature (default 0.01).
    """

    log_scale: Tensor

    def __init__(self, dim: int, num_experts: int, proj_dim: int = 16, temperature: float = 0.5,
                 learn_temperature: bool = True, min_temperature: float = 0.01):
        super().__init__()
        _check_pos_int("CosineGate", dim=dim, num_experts=num_experts, proj_dim=proj_dim)
        for name, value in (("temperature", temperature), ("min_temperature", min_temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"CosineGate: {name} must be a finite number > 0, got {value!r}")
        if temperature < min_temperature:
            raise ValueError(f"CosineGate: temperature={temperature} is below min_temperature={min_temperature}")
        self.dim, self.num_experts, self.proj_dim = dim, num_experts, proj_dim
        self.min_temperature = float(min_temperature)
        self.proj = nn.Linear(dim, proj_dim, bias=False)
        # only the directions count: orthogonal rows start the experts as far apart as proj_dim allows
        self.expert_embedding = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, proj_dim)))
        log_scale = torch.tensor(-math.log(temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def temperature(self) -> float:
        """The temperature in use (after the cap), a Python float."""
        return 1.0 / min(math.exp(float(self.log_scale.detach())), 1.0 / self.min_temperature)

    def forward(self, x: Tensor) -> Tensor:
        token = F.normalize(self.proj(x), dim=-1)  # [B, L, P]
        expert = F.normalize(self.expert_embedding, dim=-1)  # [E, P]
        scale = self.log_scale.clamp(max=-math.log(self.min_temperature)).exp()  # 1 / temperature
        return scale * (token @ expert.t())  # [B, L, E]

    def extra_repr(self) -> str:
        learned = isinstance(self.log_scale, nn.Parameter)
        return (f"dim={self.dim}, num_experts={self.num_experts}, proj_dim={self.proj_dim}, "
                f"temperature={self.temperature:.4g}, learn_temperature={learned}")


# ---- routed MoE ----------------------------------------------------------------------------------------
class MoELayer(nn.Module):
    """Base of every layer the collectors find (:class:`MoE`, :class:`SoftMoE`; subclass it for more).

    After a forward a subclass sets ``routing`` (a Routing, or None when it has none), ``aux_losses``
    (dict name -> unweighted scalar) and ``aux_loss`` (the weighted sum, a tensor).
    """

    def __init__(self):
        super().__init__()
        self.routing: Optional[Routing] = None
        self.aux_losses: Dict[str, Tensor] = {}
        self.aux_loss: Optional[Tensor] = None


def _loss_weights(losses: Optional[Mapping[str, float]]) -> Dict[str, float]:
    """Validate ``{name: weight}`` (:func:`moe_lite.losses.check_loss_weights`, the one rule)."""
    return check_loss_weights(losses, "MoE")


class MoE(MoELayer):
    """Routed Mixture-of-Experts FFN, with optional always-on shared experts.

    Args:
        dim: model width ``D``.
        hidden: hidden width ``H`` of each routed expert.
        num_experts: ``E`` routed experts.
        router: a router module, ``router(logits, x=x, key=key) -> Routing``.
        num_shared: always-on shared experts (ViMoE / DeepSeekMoE): each of width
            ``shared_hidden or hidden``; their outputs are summed, which is exactly one dense
            :class:`FFN` of width ``num_shared * shared_hidden`` (the hidden units are independent),
            so ``.shared`` is that single FFN (or None).
        activation: ``"gelu"`` or ``"swiglu"`` for routed and shared experts.
        gate: module ``x [B, L, D] -> logits [B, L, E]``; default :class:`LinearGate`. With a router
            that scores extra null experts (:class:`~moe_lite.routers.NullExperts`, read off its
            ``num_null``), the gate gives ``[B, L, E + num_null]`` logits (the default one is sized so).
        losses: ``{name: weight}`` with names from ``moe_lite.losses.REGISTRY``; ``None`` = none.
        dispatch: backend of :class:`~moe_lite.experts.Experts` (default ``"auto"``).
        bias: biases in routed and shared experts (default False).

    ``forward(x [B, L, D], key=None) -> [B, L, D]`` ``= experts(routing) + shared(x)``. Afterwards:
    ``routing``, ``aux_losses`` (dict name -> unweighted scalar), ``aux_loss`` (weighted sum; a zero
    tensor on x's device without losses), ``loss_weights``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        router: nn.Module,
        num_shared: int = 0,
        *,
        activation: str = "gelu",
        shared_hidden: Optional[int] = None,
        gate: Optional[nn.Module] = None,
        losses: Optional[Mapping[str, float]] = None,
        dispatch: str = "auto",
        bias: bool = False,
    ):
        super().__init__()
        _check_pos_int("MoE", dim=dim, hidden=hidden, num_experts=num_experts)
        _check_activation("MoE", activation)
        if isinstance(num_shared, bool) or not isinstance(num_shared, int) or num_shared < 0:
            raise ValueError(f"MoE: num_shared must be an int >= 0, got {num_shared!r}")
        if shared_hidden is not None:
            _check_pos_int("MoE", shared_hidden=shared_hidden)
        if dispatch not in DISPATCHES:
            raise ValueError(f"MoE: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        if not callable(router):
            raise ValueError(f"MoE: router must be a callable module, got {type(router).__name__}")
        self.dim, self.hidden, self.num_experts, self.num_shared = dim, hidden, num_experts, num_shared
        self.shared_hidden = shared_hidden or hidden
        self.dispatch = dispatch
        self.loss_weights = _loss_weights(losses)
        # NullExperts: the gate also scores the null experts; the routing is over the E real ones
        self.gate_width = num_experts + getattr(router, "num_null", 0)
        self.gate = gate if gate is not None else LinearGate(dim, self.gate_width)
        self.router = router
        self.experts = Experts(num_experts, dim, hidden, activation, bias=bias)
        self.shared = FFN(dim, num_shared * self.shared_hidden, activation, bias=bias) if num_shared else None

    def forward(self, x: Tensor, key: Optional[Tensor] = None) -> Tensor:
        _check_input("MoE", x, self.dim)
        b, l, d = x.shape
        logits = self.gate(x)  # [B, L, E]
        if logits.shape != (b, l, self.gate_width):
            raise ValueError(f"MoE: gate returned {tuple(logits.shape)}, expected {(b, l, self.gate_width)}")
        routing = self.router(logits, x=x, key=key)
        if routing.num_experts != self.num_experts:
            raise ValueError(f"MoE: router produced {routing.num_experts} experts, layer has {self.num_experts}")
        y = self.experts(x.reshape(b * l, d), routing.token, routing.expert, routing.weight, self.dispatch)
        y = y.view(b, l, d)
        if self.shared is not None:
            y = y + self.shared(x)
        self.routing = routing
        self.aux_losses = self._losses(routing)
        total = torch.zeros((), device=x.device)
        for name, value in self.aux_losses.items():
            total = total + self.loss_weights[name] * value
        self.aux_loss = total
        return y

    def _losses(self, routing: Routing) -> Dict[str, Tensor]:
        if not self.loss_weights:
            return {}
        return {name: REGISTRY[name](routing) for name in self.loss_weights}

    def extra_repr(self) -> str:
        shared = f"{self.num_shared}x{self.shared_hidden}" if self.num_shared else "none"
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, hidden={self.hidden}, "
            f"router={type(self.router).__name__}, shared={shared}, dispatch={self.dispatch!r}, "
            f"losses={self.loss_weights}"
        )


# ---- Soft MoE ------------------------------------------------------------------------------------------
class SoftMoE(MoELayer):
    """Soft MoE (Puigcerver et al. 2023, arXiv 2308.00951): every slot is a convex mix of tokens.

    ``E*S`` slots with parameters ``phi [E*S, D]``; ``logits = scale * l2norm(x) @ l2norm(phi)ᵀ``
    ``[B, L, E*S]``. Dispatch weights = softmax over the L tokens (per sample, per slot); combine
    weights = softmax over the slots (per token). Slot inputs ``[B, E*S, D]`` = dispatchᵀ x; expert
    ``e`` processes its ``S`` slots; ``y = combine @ slot outputs``. Fully differentiable, no token is
    dropped, no auxiliary loss.

    After a forward: ``dispatch_weights`` and ``combine_weights`` ``[B, L, E*S]``; ``aux_loss`` = zero
    tensor, ``aux_losses = {}``; ``routing = None`` (a soft mix has no discrete assignment; collectors
    skip it). Raises :class:`~moe_lite.routing.NonFiniteError` on NaN or inf in ``x`` (or in its own
    parameters), as :class:`MoE`'s routers do.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, slots_per_expert: int = 1, activation: str = "gelu"):
        super().__init__()
        _check_pos_int("SoftMoE", dim=dim, hidden=hidden, num_experts=num_experts, slots_per_expert=slots_per_expert)
        _check_activation("SoftMoE", activation)
        self.dim, self.hidden, self.num_experts, self.slots_per_expert = dim, hidden, num_experts, slots_per_expert
        num_slots = num_experts * slots_per_expert
        self.phi = nn.Parameter(torch.randn(num_slots, dim) / math.sqrt(dim))
        self.scale = nn.Parameter(torch.ones(()))  # learnable temperature of the normalised logits
        self.experts = Experts(num_experts, dim, hidden, activation)
        self.register_buffer(
            "slot_expert", torch.arange(num_experts).repeat_interleave(slots_per_expert), persistent=False
        )
        self.dispatch_weights: Optional[Tensor] = None
        self.combine_weights: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        _check_input("SoftMoE", x, self.dim)
        b, l, d = x.shape
        logits = self.scale * (F.normalize(x, dim=-1) @ F.normalize(self.phi, dim=-1).t())  # [B, L, E*S]
        # Like MoE's routers (same host sync): NaN/inf in x, phi or scale always reaches the logits.
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError(f"SoftMoE: non-finite logits from x {tuple(x.shape)} (NaN or inf in x, phi or scale)")
        dispatch = logits.softmax(dim=1)  # over tokens, per slot
        combine = logits.softmax(dim=2)  # over slots, per token
        slots = dispatch.transpose(1, 2) @ x  # [B, E*S, D]
        num_slots = slots.shape[1]
        rows = torch.arange(b * num_slots, device=x.device)  # every slot row is one "token"
        expert = self.slot_expert.repeat(b)  # [B*E*S]
        ones = torch.ones(b * num_slots, dtype=x.dtype, device=x.device)
        slot_out = self.experts(slots.reshape(b * num_slots, d), rows, expert, ones).view(b, num_slots, d)
        y = combine @ slot_out  # [B, L, D]
        self.dispatch_weights, self.combine_weights = dispatch, combine
        self.routing = None
        self.aux_losses = {}
        self.aux_loss = torch.zeros((), device=x.device)
        return y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, hidden={self.hidden}, "
            f"slots_per_expert={self.slots_per_expert}"
        )


# ---- model-wide collectors --------------------------------------------------------------------------------
def moe_layers(model: nn.Module) -> List[Tuple[str, MoELayer]]:
    """``[(name, layer)]`` of every :class:`MoELayer` (MoE, SoftMoE) in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (cpu for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every layer's weighted ``aux_loss`` from its last forward (zero tensor if none)."""
    terms = [layer.aux_loss for _, layer in moe_layers(model) if layer.aux_loss is not None]
    if not terms:
        return torch.zeros((), device=model_device(model))
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def aux_losses(model: nn.Module) -> Dict[str, Tensor]:
    """``{"{layer}/{loss}": unweighted tensor}`` over every layer (for logging)."""
    return {f"{name}/{loss}": v for name, layer in moe_layers(model) for loss, v in layer.aux_losses.items()}


def routing_stats(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """``{layer name: routing.summary()}`` for every layer with a routing (SoftMoE has none)."""
    return {name: layer.routing.summary() for name, layer in moe_layers(model) if layer.routing is not None}


def update_biases(model: nn.Module) -> int:
    """Call ``update_bias()`` on every submodule that has one (BiasBalanced routers); return how many."""
    count = 0
    for m in model.modules():
        fn = getattr(m, "update_bias", None)
        if callable(fn):
            fn()
            count += 1
    return count


def target_predictions(model: nn.Module) -> List[Tensor]:
    """Target-head outputs ``[B, L, P]`` of the MLPGate gates, in layer order (layers without skipped)."""
    out = []
    for _, layer in moe_layers(model):
        gate = getattr(layer, "gate", None)
        if isinstance(gate, MLPGate) and gate.target_prediction is not None:
            out.append(gate.target_prediction)
    return out
