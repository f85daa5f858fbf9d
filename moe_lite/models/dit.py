"""DiT and DiT-MoE / Race-DiT: a class-conditional diffusion transformer for 28x28 images.

The network (Peebles & Xie 2023) with the MoE options of Expert Race (Yuan et al. 2025):

    x_t [B, C, H, W] --patch embed (conv)--> [B, L, D] + fixed 2-D sin-cos positions
    c = TimestepEmbedding(t) + Embedding(y)          (label ``num_classes`` = null class, for guidance)
    depth x adaLN-Zero block:  x += g1 * attn(mod(norm(x), shift1, scale1))
                               x += g2 * mlp (mod(norm(x), shift2, scale2))    mlp = FFN or MoE
    final layer: mod(norm(x), shift, scale) -> Linear -> [B, L, p*p*C] -> unpatchify -> [B, C, H, W]

The six (shift, scale, gate) of every block and the final layer's modulation and projection are
zero-initialised, so at initialisation every block is the identity and the network outputs zeros.

MoE blocks (``config.moe_routing != "none"``): every block's MLP becomes a
:class:`moe_lite.layers.MoE` with ``num_experts`` experts of width ``expert_hidden`` (default
``mlp_hidden / k``, so active FLOPs match the dense MLP: the paper's "k-in-E" with hidden split k).
``moe_routing`` picks the router: ``"token_choice"`` = ``TopK(k)``, ``"expert_choice"`` =
``ExpertChoice(k)`` (per-sample groups), ``"race"`` = ``Race(k, candidates="BLE")`` (one top-K over
the whole ``B*L*E`` score tensor) and the paper's Table 6 variants ``"bl"``, ``"be"``, ``"le"``.
Race routers select with an EMA threshold in eval mode; :class:`moe_lite.inspect.inference_threshold`
moves it (the inference-compute slider; a function ``lambda t: t + offset`` shifts the learned value) and
:func:`track_experts` (:func:`moe_lite.inspect.record_routing`) measures the compute actually spent.

The diffusion process (rectified flow), the loss and the sampler are in
:mod:`moe_lite.models.diffusion` and re-exported here.

Axis legend: b batch, l tokens (patches), d width, e experts, p patch size, c channels.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..experts import x_in_y
from ..losses import check_loss_weights
from ..layers import FFN, MLPGate, MoE
from ..inspect import (inference_thresholds, record_routing, threshold_modules,
                       timestep_buckets, timestep_label)
from ..routers import GATINGS, PRESETS, Race, RouterSpec
from .diffusion import (
    PixelScale,
    guided_velocity,
    patchify,
    sample,
    to_unit_range,
    training_loss,
    unpatchify,
)
from .blocks import Attention, PatchEmbed
from .vit import count_parameters

__all__ = [
    "DiTConfig",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "TimestepEmbedding",
    "sincos_2d",
    "build_router",
    "router_spec",
    "timestep_buckets",
    "race_thresholds",
    "use_ema_threshold",
    "track_experts",
    "count_parameters",
    "MOE_ROUTINGS",
    "GATINGS",
    # re-exported from .diffusion
    "training_loss",
    "sample",
    "to_unit_range",
    "PixelScale",
    "guided_velocity",
    "patchify",
    "unpatchify",
]

#: ``DiTConfig.moe_routing`` values: dense, or a router preset of :data:`moe_lite.routers.PRESETS`.
MOE_ROUTINGS = ("none",) + tuple(PRESETS)
#: the presets that are Race routers -> their candidate axes
RACE_CANDIDATES = {name: spec.kwargs["candidates"] for name, spec in PRESETS.items() if spec.router_class is Race}


# ---- configuration ----------------------------------------------------------------------------
@dataclass
class DiTConfig:
    """Every knob of a DiT / DiT-MoE. Defaults: a dense 4-block, width-96 DiT (~0.71M parameters,
    49 tokens with patch 4) that trains on a 2-core CPU.

    Attributes:
        image_size, patch_size, in_channels: images ``[C, S, S]``; patch 4 -> 49 tokens, 2 -> 196.
        num_classes: class labels ``[0, num_classes)``; ``num_classes`` itself is the null class.
        dim, depth, heads, mlp_hidden: transformer width, blocks, attention heads, dense MLP width.
        class_dropout: probability of the null class in training (classifier-free guidance).
        moe_routing: ``"none"`` (dense) or one of ``token_choice``, ``expert_choice``, ``race``,
            ``bl``, ``be``, ``le`` (the last four: Race with candidates BLE / BL / BE / LE).
        gating: ``"identity"`` (raw logits, the paper's choice), ``"softmax"`` or ``"sigmoid"``.
        num_experts: experts per MoE layer (E).
        k: mean experts per token (an integer for token choice).
        expert_hidden: expert MLP width; ``None`` -> ``round(mlp_hidden / k)``.
        ema_decay: decay of Race's EMA eval threshold.
        ema_threshold: Race routers select by their EMA threshold at inference (the paper's
            "learnable threshold"); False: the same per-group top-K as in training, over the
            inference batch (Table 3's rows before "+ Learnable Threshold").
        per_layer_reg: per-layer regularization: every gate is an ``MLPGate`` with a target head
            predicting the patchified velocity (``target_dim = p*p*C``); weight ``per_layer_weight``.
        router_similarity, balance_weight: weights of the MoE aux losses ``router_similarity`` and
            ``load_balance`` on every MoE layer (0 = off). The trainer adds them, not training_loss.
        mlp_router: use the 2-layer ``MLPGate`` even without PLR (PLR implies it).
        activation, dispatch: passed to ``FFN`` / ``MoE``.
    """

    image_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_hidden: int = 384
    class_dropout: float = 0.1
    moe_routing: str = "none"
    gating: str = "identity"
    num_experts: int = 8
    k: float = 2
    expert_hidden: Optional[int] = None
    ema_decay: float = 0.95
    ema_threshold: bool = True
    per_layer_reg: bool = False
    per_layer_weight: float = 0.1
    router_similarity: float = 0.0
    balance_weight: float = 0.0
    mlp_router: bool = False
    activation: str = "gelu"
    dispatch: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "dim", "depth", "heads", "mlp_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.dim % 4:
            raise ValueError(f"dim {self.dim} must be a multiple of 4 (2-D sin-cos position embedding)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if self.moe_routing not in MOE_ROUTINGS:
            raise ValueError(f"moe_routing {self.moe_routing!r} is not one of {MOE_ROUTINGS}")
        if self.gating not in GATINGS:
            raise ValueError(f"gating {self.gating!r} is not one of {GATINGS}")
        if float(self.per_layer_weight) < 0:
            raise ValueError(f"per_layer_weight must be >= 0, got {self.per_layer_weight}")
        # the weights moe_losses hands to every MoE layer, checked by the layers' one rule
        check_loss_weights({"router_similarity": self.router_similarity, "load_balance": self.balance_weight},
                           "DiTConfig (router_similarity, balance_weight)")
        if not self.is_moe:
            if self.per_layer_reg or self.mlp_router or self.router_similarity or self.balance_weight:
                raise ValueError(
                    "per_layer_reg, mlp_router, router_similarity and balance_weight need an MoE: "
                    "set moe_routing to a router"
                )
            return
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 0 < float(self.k) <= self.num_experts:
            raise ValueError(f"k must be in (0, num_experts={self.num_experts}], got {self.k}")
        if self.moe_routing == "token_choice" and float(self.k) != int(self.k):
            raise ValueError(f"token_choice needs an integer k, got {self.k}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.expert_hidden is not None and int(self.expert_hidden) < 1:
            raise ValueError(f"expert_hidden must be a positive integer, got {self.expert_hidden}")
        if self.hidden_per_expert < 1:  # x_in_y raises first when mlp_hidden % k != 0
            raise ValueError(f"mlp_hidden / k = {self.mlp_hidden} / {self.k} leaves experts no width")

    @property
    def router_spec(self) -> RouterSpec:
        """The MoE layers' :class:`~moe_lite.routers.RouterSpec` (:func:`router_spec`)."""
        return router_spec(self)

    @property
    def is_moe(self) -> bool:
        return self.moe_routing != "none"

    @property
    def num_tokens(self) -> int:
        """L = (image_size / patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def target_dim(self) -> int:
        """Per-token regression target width ``p * p * C`` (final layer output, PLR head width)."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def hidden_per_expert(self) -> int:
        """``expert_hidden`` or, by default, the paper's "k-in-E" width ``mlp_hidden / k``
        (:func:`moe_lite.experts.x_in_y`; rounded for a fractional k), so active FLOPs = dense MLP."""
        if self.expert_hidden is not None:
            return int(self.expert_hidden)
        if float(self.k) == int(self.k):
            return x_in_y(int(self.k), self.num_experts, self.mlp_hidden).hidden
        return int(round(self.mlp_hidden / float(self.k)))

    @property
    def moe_losses(self) -> Dict[str, float]:
        """The ``losses={name: weight}`` given to every MoE layer (only non-zero weights)."""
        weights = {"router_similarity": self.router_similarity, "load_balance": self.balance_weight}
        return {name: float(w) for name, w in weights.items() if w > 0}


def router_spec(config: DiTConfig) -> RouterSpec:
    """The :class:`~moe_lite.routers.RouterSpec` of ``config``'s MoE layers: the preset named by
    ``moe_routing`` with the config's ``k`` and ``gating`` (and, for Race, ``ema_decay`` and
    ``eval_threshold=ema_threshold``). ``ValueError`` for a dense config."""
    if not config.is_moe:
        raise ValueError(f"moe_routing {config.moe_routing!r} has no router (dense model?)")
    k = int(config.k) if config.moe_routing == "token_choice" else config.k  # validated integral
    spec = RouterSpec.preset(config.moe_routing, k=k, gating=config.gating)
    if spec.router_class is Race:
        # eval_threshold for every variant by default (the router's default is BLE only): the paper's
        # full recipe (Table 6) includes the learned threshold, and a per-group top-K over BL or BE at
        # eval would make a sample's output depend on the rest of its batch (and on guidance batching)
        spec = spec.replace(ema_decay=config.ema_decay, eval_threshold=config.ema_threshold)
    return spec


def build_router(config: DiTConfig) -> nn.Module:
    """A fresh router for one MoE layer of ``config`` (never shared between layers)."""
    return router_spec(config).build(config.dim, config.num_experts)


# ---- embeddings -------------------------------------------------------------------------------
def sincos_1d(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[N, dim]`` (cos half, then sin half) of float ``positions [N]``."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def sincos_2d(grid_size: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid_size**2, dim]`` in row-major patch order:
    half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows = coords.repeat_interleave(grid_size)  # [L]
    cols = coords.repeat(grid_size)  # [L]
    return torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], dim=1)


class TimestepEmbedding(nn.Module):
    """``t [B]`` in [0, 1] -> ``[B, dim]``: sinusoidal features of ``1000 t`` then a SiLU MLP."""

    def __init__(self, dim: int, frequency_dim: int = 128, scale: float = 1000.0) -> None:
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        features = sincos_1d(t * self.scale, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x [B, L, D] * (1 + scale [B, D]) + shift [B, D]``."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ---- blocks -----------------------------------------------------------------------------------
class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. ``forward(x [B, L, D], c [B, D]) -> [B, L, D]``.

    ``mlp`` is a dense ``FFN`` or an ``MoE`` (``[B, L, D] -> [B, L, D]``). The modulation
    (shift, scale, gate for attention and MLP) is a zero-initialised ``Linear(D, 6D)`` of ``SiLU(c)``,
    so the block starts as the identity.
    """

    def __init__(self, dim: int, heads: int, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)  # each [B, D]
        x = x + gate1[:, None, :] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None, :] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """``[B, L, D]``, ``c [B, D]`` -> ``[B, L, out_dim]``: adaLN then a zero-initialised projection."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, out_dim)
        for linear in (self.modulation[1], self.proj):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.proj(modulate(self.norm(x), shift, scale))


# ---- the model --------------------------------------------------------------------------------
class DiT(nn.Module):
    """Class-conditional diffusion transformer (dense or MoE), see the module docstring.

    ``forward(x_t [B, C, H, W], t [B] float in [0, 1], y [B] long in [0, num_classes])`` ->
    the predicted velocity ``[B, C, H, W]``. ``y == num_classes`` is the null (unconditional) class.
    After a forward, ``last_timesteps`` holds its ``t`` (detached) for
    :func:`moe_lite.inspect.timestep_label`.
    """

    def __init__(self, config: Optional[DiTConfig] = None, pixel_scale: Optional[PixelScale] = None) -> None:
        super().__init__()
        #: how the training images were normalised (``sample(..., unit_range=True)`` reads it); not a
        #: config field, so checkpoint keys and result JSON do not change
        self.pixel_scale = pixel_scale
        self.config = config = config if config is not None else DiTConfig()
        config.validate()
        d = config.dim
        grid = config.image_size // config.patch_size
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, config.in_channels, d)
        self.register_buffer("pos_embed", sincos_2d(grid, d)[None], persistent=False)  # [1, L, D]
        self.t_embed = TimestepEmbedding(d)
        self.y_embed = nn.Embedding(config.num_classes + 1, d)  # + the null class
        nn.init.normal_(self.y_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(DiTBlock(d, config.heads, self._make_mlp()) for _ in range(config.depth))
        self.final = FinalLayer(d, config.target_dim)
        self.last_timesteps: Optional[Tensor] = None

    def _make_mlp(self) -> nn.Module:
        c = self.config
        if not c.is_moe:
            return FFN(c.dim, c.mlp_hidden, activation=c.activation)
        gate = None
        if c.per_layer_reg or c.mlp_router:
            gate = MLPGate(c.dim, c.num_experts, target_dim=c.target_dim if c.per_layer_reg else None)
        return MoE(
            c.dim,
            c.hidden_per_expert,
            c.num_experts,
            build_router(c),
            activation=c.activation,
            gate=gate,
            losses=c.moe_losses or None,
            dispatch=c.dispatch,
        )

    def condition(self, t: Tensor, y: Tensor) -> Tensor:
        """The conditioning vector ``c [B, D]`` of timesteps ``t [B]`` and labels ``y [B]``."""
        return self.t_embed(t) + self.y_embed(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c = self.config
        b = x.shape[0]
        if t.shape != (b,) or y.shape != (b,):
            raise ValueError(f"t and y must be [B={b}], got {tuple(t.shape)} and {tuple(y.shape)}")
        if not t.is_floating_point() or y.is_floating_point():
            raise ValueError("t must be float in [0, 1] and y integer class labels")
        self.last_timesteps = t.detach()
        h = self.patch_embed(x) + self.pos_embed.to(x.dtype)  # [B, L, D]
        cond = self.condition(t, y)  # [B, D]
        for block in self.blocks:
            h = block(h, cond)
        out = self.final(h, cond)  # [B, L, p*p*C]
        return unpatchify(out, c.patch_size, c.in_channels, c.image_size, c.image_size)


# ---- routing analysis and the Race threshold: moe_lite.inspect (these names stay for the notebooks) ----
def track_experts(model: DiT, num_buckets: int = 10):
    """Measure the routed-expert compute of everything run inside the block (e.g. :func:`sample`):
    :func:`moe_lite.inspect.record_routing` with the diffusion-time bucket as label ``"timestep"``
    and ``nominal_k = config.k``. With guidance, the unconditional half counts too (real compute).

    Usage::

        with track_experts(model) as usage:
            images = sample(model, labels)
        usage.experts_per_token, usage.relative_compute, usage.experts_per_token_by("timestep")
    """
    return record_routing(model, labels={"timestep": timestep_label(num_buckets)}, per_sample=False,
                          nominal_k=float(model.config.k))


def race_thresholds(model: nn.Module) -> Dict[str, Optional[float]]:
    """``{router name: its eval threshold}`` of every Race router (a snapshot):
    ``moe_lite.inspect.inference_thresholds(model, kind=Race)``."""
    return inference_thresholds(model, kind=Race)


def use_ema_threshold(model: nn.Module, enabled: bool = True) -> None:
    """Switch every Race router between its EMA threshold (``enabled``) and a per-group top-K over
    the batch at inference, and record the choice in ``model.config.ema_threshold``.

    Training is the same either way (the EMA is tracked regardless), so one trained model can be
    evaluated both ways: a paired ablation of the paper's "+ Learnable Threshold" row. (A routing
    mode, not a threshold value: the value is :class:`moe_lite.inspect.inference_threshold`'s.)
    """
    for _, router in threshold_modules(model, kind=Race):
        router.eval_threshold = bool(enabled)
    if isinstance(getattr(model, "config", None), DiTConfig):
        model.config = dataclasses.replace(model.config, ema_threshold=bool(enabled))
