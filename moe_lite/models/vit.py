"""ViT, ViMoE and dynamic (top-p) routing on small grayscale images (28x28 Fashion-MNIST).

Axis legend: b batch, l tokens per sample (patches, plus one ``cls`` token with ``pooling="cls"``),
d model width, e experts, h hidden width, c classes.

One model class, :class:`ViT`, built from a :class:`ViTConfig`; a block is MoE or dense according to
``config.moe_layers``. Config helpers build the variants the notebooks compare:

* :func:`vimoe_config`: ViMoE (Han et al. 2024): top-2 of 8 experts in the last blocks plus one
  always-on shared expert.
* :func:`dynamic_config` / :func:`top2_config`: dynamic top-p routing (Huang et al. 2024) and its
  top-2 baseline at the same parameter count.
* :func:`dense_equivalent`: the dense ViT with the same *active* parameters per token.

Routing analysis lives in :mod:`moe_lite.inspect`; :func:`experts_per_token`, :func:`experts_per_sample`
(re-exported from there) and :func:`patch_experts` stay here for the notebooks and experiments (a
trained model's top-p threshold moves with :class:`moe_lite.inspect.inference_threshold`);
:func:`count_parameters`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import losses as _losses
from ..layers import FFN, MoE, SoftMoE, moe_layers
from .blocks import STEMS, Attention, Block, PatchEmbed
from ..inspect import experts_per_sample, experts_per_token, last_routings, top_experts
from ..routers import ROUTERS, LearnedThreshold, RouterSpec, TopP

__all__ = [
    "ViTConfig",
    "ViT",
    "Block",
    "Attention",
    "PatchEmbed",
    "resolve_placement",
    "build_router",
    "router_from_name",
    "nominal_active_experts",
    "dense_equivalent",
    "count_parameters",
    "vimoe_config",
    "dynamic_config",
    "top2_config",
    "experts_per_token",
    "experts_per_sample",
    "patch_experts",
]

Placement = Union[str, Sequence[int]]
#: what a config's ``router`` field takes: a name, a :class:`~moe_lite.routers.RouterSpec`, or a factory.
RouterField = Union[str, RouterSpec, Callable[[], nn.Module]]

#: by convention, the nominal number of active experts per token of a dynamic router (top-p,
#: learned threshold): Huang et al. 2024 compare top-p against top-2 and report < 2 realised.
DYNAMIC_NOMINAL_K = 2.0

#: kinds of MoE block (``ViTConfig.moe_type``): a routed MoE, or a Soft MoE.
MOE_TYPES = ("routed", "soft")


def normalize_router_fields(config: Any, who: str) -> None:
    """A :class:`~moe_lite.routers.RouterSpec` in ``config.router`` becomes today's ``router`` name and
    ``router_kwargs`` fields (a spec with no keywords: None), so the config's repr, the checkpoint
    cache key, is the one the same router always had. ``router_kwargs`` must then be None."""
    if isinstance(config.router, RouterSpec):
        if config.router_kwargs is not None:
            raise ValueError(f"{who}.router_kwargs must be None when router is a RouterSpec (the spec carries "
                             f"its keywords), got {config.router_kwargs!r}")
        config.router, config.router_kwargs = config.router.to_fields()


def router_spec_of(config: Any) -> Optional[RouterSpec]:
    """``config``'s router as a :class:`~moe_lite.routers.RouterSpec` (None for a factory)."""
    if not isinstance(config.router, str):
        return None
    return RouterSpec.from_fields(config.router, config.router_kwargs)


def check_moe_fields(config: Any, who: str) -> None:
    """Validate the MoE fields a model config shares (``router``, ``router_kwargs``, ``num_shared``,
    ``expert_hidden``, ``shared_hidden``, ``moe_losses``); ``ValueError`` naming ``who`` and the field.
    Used by :class:`ViTConfig` and the language model's ``LMConfig``."""
    def int_at_least(value: Any, minimum: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    if isinstance(config.router, nn.Module):
        raise ValueError(
            f"{who}.router must be a router name or a zero-argument factory (e.g. lambda: TopK(2)), "
            "not a router instance: every MoE layer needs its own router"
        )
    if not (isinstance(config.router, str) or callable(config.router)):
        raise ValueError(f"{who}.router must be a name or a callable, got {type(config.router).__name__}")
    if isinstance(config.router, str) and config.router not in ROUTERS:
        raise ValueError(f"{who}: unknown router {config.router!r}; choose one of {sorted(ROUTERS)}")
    if config.router_kwargs is not None and not isinstance(config.router_kwargs, Mapping):
        raise ValueError(f"{who}.router_kwargs must be a dict, got {type(config.router_kwargs).__name__}")
    if isinstance(config.router, str):
        try:  # a keyword the router does not take fails here, not when the model is built
            router_spec_of(config)
        except ValueError as err:
            raise ValueError(f"{who}: {err}") from None
    if not isinstance(config.router, str) and config.router_kwargs:
        raise ValueError(f"{who}.router_kwargs must be empty when router is a factory (put them in the factory)")
    if not int_at_least(config.num_shared, 0):
        raise ValueError(f"{who}.num_shared must be a non-negative int, got {config.num_shared!r}")
    for name in ("expert_hidden", "shared_hidden"):
        value = getattr(config, name)
        if value is not None and not int_at_least(value, 1):
            raise ValueError(f"{who}.{name} must be None or a positive int, got {value!r}")
    if not isinstance(config.moe_losses, Mapping):
        raise ValueError(f"{who}.moe_losses must be a dict {{name: weight}}, got {type(config.moe_losses).__name__}")
    _losses.check_loss_weights(config.moe_losses, f"{who}.moe_losses")


# ---- configuration ----------------------------------------------------------------------------
@dataclass
class ViTConfig:
    """Everything that defines a :class:`ViT`.

    The defaults (dim 64, depth 4, heads 4, patch 4 -> 49 tokens, mlp 128; ~0.14 M parameters) are
    sized for a 2-core CPU: a few epochs over a 10k-image Fashion-MNIST subset in a few minutes.

    Attributes:
        image_size, patch_size: square images and patches; ``image_size % patch_size == 0``
            (28 with patch 4 -> 7x7 = 49 tokens, patch 7 -> 4x4 = 16 tokens).
        in_channels, num_classes: input channels and output classes.
        dim, depth, heads, mlp_hidden: width, number of blocks, attention heads (``dim % heads == 0``),
            hidden width of the dense FFNs.
        block_hidden: optional per-block dense FFN widths (a list of ``depth`` ints) overriding
            ``mlp_hidden`` for the dense blocks; :func:`dense_equivalent` uses it for mixed placements.
        dropout: dropout on the embeddings, attention probabilities and block outputs.
        pooling: ``"mean"`` (mean over patch tokens) or ``"cls"`` (a learned class token).
        stem: ``"patch"`` (a linear patch embedding) or ``"conv"`` (a 3x3 conv with
            ``stem_channels`` maps and a GELU before it; same tokens), see :class:`PatchEmbed`.
        activation: FFN / expert activation, passed to :class:`~moe_lite.layers.FFN` / ``MoE``.
        moe_layers: which blocks get an MoE instead of the dense FFN (see :func:`resolve_placement`):
            ``"none"``, ``"all"``, ``"every-2"`` (every second block *ending with the last*: blocks
            1, 3, 5, ... for an even depth, 0, 2, 4 for depth 5), ``"last-n"`` (e.g. ``"last-2"``),
            or an explicit list of block indices in ``[0, depth)``.
        moe_type: ``"routed"`` (default: a :class:`~moe_lite.layers.MoE` with ``router``) or
            ``"soft"``: a :class:`~moe_lite.layers.SoftMoE` (Puigcerver et al. 2023) with
            ``num_experts`` experts of width ``expert_hidden`` and ``slots_per_expert`` slots each. A
            soft block mixes all tokens of an image into each slot, so it drops no token but is not
            causal (a token's output depends on every other token); it ignores ``router`` and has no
            shared experts or auxiliary losses (``num_shared`` must be 0, ``moe_losses`` empty).
        num_experts: experts per MoE layer.
        slots_per_expert: slots per expert of a soft MoE block (unused by routed ones).
        expert_hidden: hidden width of each routed expert (default ``mlp_hidden``).
        router: a router name of :data:`moe_lite.routers.ROUTERS` (with ``router_kwargs``), a
            :class:`~moe_lite.routers.RouterSpec` (stored as its name and ``router_kwargs``, so the repr
            is that of the same router given by name; :attr:`router_spec` reads it back), or a
            zero-argument factory returning a fresh router (e.g. ``lambda: TopK(2)``). Every MoE layer
            builds its *own* instance: routers such as Race keep state in buffers.
        router_kwargs: the router's keywords; ``None`` (default) takes the router class's ``defaults``
            (``k=2`` for the routers that need a k, nothing else); must be None or empty with a factory,
            None with a RouterSpec.
        num_shared: always-on shared experts per MoE layer (ViMoE uses 1).
        shared_hidden: hidden width of each shared expert (default ``expert_hidden``).
        moe_losses: ``{loss name: weight}`` with names from :data:`moe_lite.losses.REGISTRY`; each
            MoE layer computes them; add ``moe_lite.aux_loss(model)`` to the task loss.
        dispatch: expert dispatch backend passed to ``MoE``.
    """

    image_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_hidden: int = 128
    block_hidden: Optional[Sequence[int]] = None
    dropout: float = 0.0
    pooling: str = "mean"
    activation: str = "gelu"
    stem: str = "patch"
    stem_channels: int = 8
    # MoE options
    moe_layers: Placement = "none"
    moe_type: str = "routed"
    num_experts: int = 8
    slots_per_expert: int = 1
    expert_hidden: Optional[int] = None
    router: RouterField = "topk"
    router_kwargs: Optional[Dict[str, Any]] = None
    num_shared: int = 0
    shared_hidden: Optional[int] = None
    moe_losses: Dict[str, float] = field(default_factory=dict)
    dispatch: str = "auto"

    def __post_init__(self) -> None:
        normalize_router_fields(self, "ViTConfig")
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "dim", "depth", "heads", "mlp_hidden",
                     "stem_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size} "
                f"(for 28x28 use patch 4 -> 49 tokens, 7 -> 16 tokens, 2 or 14)"
            )
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.block_hidden is not None:
            widths = list(self.block_hidden)
            if len(widths) != self.depth or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
                raise ValueError(f"block_hidden must be {self.depth} positive ints (one per block), got {self.block_hidden!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        indices = resolve_placement(self.moe_layers, self.depth)  # validates the placement
        check_moe_fields(self, "ViTConfig")
        if indices and (not isinstance(self.num_experts, int) or self.num_experts < 1):
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if self.moe_type not in MOE_TYPES:
            raise ValueError(f"moe_type must be one of {MOE_TYPES}, got {self.moe_type!r}")
        if not isinstance(self.slots_per_expert, int) or isinstance(self.slots_per_expert, bool) \
                or self.slots_per_expert < 1:
            raise ValueError(f"ViTConfig.slots_per_expert must be a positive int, got {self.slots_per_expert!r}")
        if self.moe_type == "soft" and self.num_shared:
            raise ValueError(f"moe_type='soft' has no shared experts: set num_shared=0 (got {self.num_shared})")
        if self.moe_type == "soft" and self.moe_losses:
            raise ValueError(f"moe_type='soft' has no auxiliary loss (nothing is routed): set moe_losses={{}} "
                             f"(got {dict(self.moe_losses)})")

    # -- derived --------------------------------------------------------------------------------
    @property
    def router_spec(self) -> Optional[RouterSpec]:
        """The MoE layers' router as a :class:`~moe_lite.routers.RouterSpec` (None for a factory)."""
        return router_spec_of(self)

    @property
    def grid(self) -> int:
        """Patches per side (7 for 28 / 4)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (49 for 28 / 4)."""
        return self.grid ** 2

    @property
    def seq_len(self) -> int:
        """Tokens per image entering the blocks: patches, plus 1 with ``pooling="cls"``."""
        return self.num_patches + (1 if self.pooling == "cls" else 0)

    @property
    def moe_block_indices(self) -> List[int]:
        """Sorted indices of the MoE blocks."""
        return resolve_placement(self.moe_layers, self.depth)

    def dense_hidden(self, index: int) -> int:
        """Hidden width of block ``index``'s dense FFN (``block_hidden[index]`` or ``mlp_hidden``)."""
        return int(self.block_hidden[index]) if self.block_hidden is not None else self.mlp_hidden

    @property
    def expert_width(self) -> int:
        """Hidden width of a routed expert."""
        return self.expert_hidden if self.expert_hidden is not None else self.mlp_hidden

    @property
    def shared_width(self) -> int:
        """Hidden width of a shared expert."""
        return self.shared_hidden if self.shared_hidden is not None else self.expert_width


def resolve_placement(placement: Placement, depth: int) -> List[int]:
    """Sorted MoE block indices for a placement.

    * ``"none"`` -> ``[]``; ``"all"`` -> ``[0, ..., depth-1]``;
    * ``"every-n"`` (e.g. ``"every-2"``): every n-th block counting back from the last, so the last
      block is always MoE: depth 4 -> ``[1, 3]``, depth 5 -> ``[0, 2, 4]``, depth 6 every-3 -> ``[2, 5]``;
    * ``"last-n"``: the last n blocks, ``1 <= n <= depth``;
    * a list/tuple of distinct ints in ``[0, depth)`` (no negative indices).

    Raises:
        ValueError: on anything else.
    """
    if isinstance(placement, str):
        if placement == "none":
            return []
        if placement == "all":
            return list(range(depth))
        match = re.fullmatch(r"(every|last)-(\d+)", placement)
        if match is None:
            raise ValueError(
                f"unknown moe_layers {placement!r}: use 'none', 'all', 'every-N', 'last-N' or a list of indices"
            )
        kind, n = match.group(1), int(match.group(2))
        if n < 1:
            raise ValueError(f"moe_layers {placement!r}: N must be >= 1")
        if kind == "every":
            return sorted(range(depth - 1, -1, -n))
        if n > depth:
            raise ValueError(f"moe_layers {placement!r} asks for more MoE blocks than depth {depth}")
        return list(range(depth - n, depth))
    try:
        indices = [int(i) for i in placement]
    except TypeError:
        raise ValueError(f"moe_layers must be a string or a list of block indices, got {placement!r}") from None
    if any(isinstance(i, bool) or int(i) != i for i in placement):
        raise ValueError(f"moe_layers indices must be ints, got {placement!r}")
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f"moe_layers indices {bad} out of range [0, {depth})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"moe_layers has duplicate indices: {indices}")
    return sorted(indices)


def router_from_name(name: str, kwargs: Optional[Mapping[str, Any]], dim: int, num_experts: int) -> nn.Module:
    """``RouterSpec(name, **kwargs).build(dim, num_experts)``: the layer's width and expert count go
    to the routers that declare they need them (LearnedThreshold, BiasBalanced, Hash, TopK's learned
    noise), so the config need not repeat them; empty or None ``kwargs``: the router's defaults."""
    return RouterSpec.from_fields(name, kwargs).build(dim, num_experts)


def build_router(config: Any) -> nn.Module:
    """A fresh router for one MoE layer of ``config`` (a :class:`ViTConfig` or ``LMConfig``; never
    shared between layers): ``config.router_spec.build(dim, num_experts)``, or the factory's router."""
    spec = router_spec_of(config)
    if spec is not None:
        router = spec.build(config.dim, config.num_experts)
    else:
        router = config.router()
    if not isinstance(router, nn.Module):
        raise ValueError(f"the router factory must return an nn.Module router, got {type(router).__name__}")
    return router


def nominal_active_experts(router: nn.Module) -> float:
    """The nominal number of routed experts a token activates under ``router``.

    Rule: ``TopP`` and ``LearnedThreshold`` (dynamic) -> 2 by convention (the top-2 baseline they are
    compared against; capped by a ``max_k`` if the router has one); any router with a ``k`` attribute
    (TopK, ExpertChoice, Race, BiasBalanced: the mean experts per token) -> ``k``; every other router
    (Switch, Hash, BalancedAssignment) -> 1. The realised value of a dynamic router is in
    :func:`experts_per_token`.
    """
    if isinstance(router, (TopP, LearnedThreshold)):
        max_k = getattr(router, "max_k", None)
        return float(min(DYNAMIC_NOMINAL_K, max_k)) if max_k else DYNAMIC_NOMINAL_K
    k = getattr(router, "k", None)
    if k is not None:
        return float(k)
    return 1.0


# ---- modules (PatchEmbed, Attention, Block: models/blocks.py) ----------------------------------
class ViT(nn.Module):
    """Vision Transformer whose FFNs are dense or MoE according to ``config.moe_layers``.

    ``forward(images [B, C, H, W]) -> logits [B, num_classes]``; ``features(images) -> [B, L, D]``
    (the normed tokens before pooling).

    Attributes:
        config: the :class:`ViTConfig`.
        blocks: ``nn.ModuleList`` of :class:`Block`; ``blocks[i].is_moe`` says whether block i is MoE
            (its MoE layer is ``blocks[i].mlp``, named ``"blocks.{i}.mlp"`` by the collectors).
        moe_block_indices: tuple of the MoE block indices.
    """

    def __init__(self, config: Optional[ViTConfig] = None) -> None:
        super().__init__()
        config = config if config is not None else ViTConfig()
        if not isinstance(config, ViTConfig):
            raise ValueError(f"ViT expects a ViTConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.moe_block_indices: Tuple[int, ...] = tuple(c.moe_block_indices)
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.in_channels, c.dim, c.stem, c.stem_channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.pooling == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.seq_len, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, self._make_mlp(i), c.dropout, i in self.moe_block_indices) for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _make_mlp(self, index: int) -> nn.Module:
        c = self.config
        if index not in self.moe_block_indices:
            return FFN(c.dim, c.dense_hidden(index), activation=c.activation)
        if c.moe_type == "soft":
            return SoftMoE(c.dim, c.expert_width, c.num_experts, c.slots_per_expert, activation=c.activation)
        return MoE(
            c.dim,
            c.expert_width,
            c.num_experts,
            build_router(c),
            c.num_shared,
            activation=c.activation,
            shared_hidden=c.shared_width if c.num_shared else None,
            losses=dict(c.moe_losses),
            dispatch=c.dispatch,
        )

    def features(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W] -> tokens [B, L, D]`` after the final norm (L includes ``cls``)."""
        x = self.patch_embed(images)  # [b, l, d]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        x = self.features(images)
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # [b, d]
        return self.head(pooled)


# ---- config helpers ---------------------------------------------------------------------------
def _with_moe(base: ViTConfig, placement: Optional[Placement], default: Placement, **changes: Any) -> ViTConfig:
    """``base`` with MoE changes; placement: given, else base's, else ``default`` if base has none."""
    if placement is None:
        placement = base.moe_layers if resolve_placement(base.moe_layers, base.depth) else default
    return dataclasses.replace(base, moe_layers=placement, **changes)


def vimoe_config(
    base: Optional[ViTConfig] = None,
    num_experts: int = 8,
    k: int = 2,
    placement: Placement = "last-2",
    num_shared: int = 1,
    balance_weight: float = 1e-2,
) -> ViTConfig:
    """ViMoE (Han et al. 2024): ``TopK(k)`` over ``num_experts`` routed experts in the ``placement``
    blocks plus ``num_shared`` always-on shared experts, with a Switch load-balance loss."""
    base = base if base is not None else ViTConfig()
    return dataclasses.replace(
        base,
        moe_layers=placement,
        num_experts=num_experts,
        router="topk",
        router_kwargs={"k": k},
        num_shared=num_shared,
        moe_losses={"load_balance": balance_weight} if balance_weight else {},
    )


def dynamic_config(
    base: Optional[ViTConfig] = None,
    p: float = 0.4,
    entropy_weight: float = 1e-4,
    balance_weight: float = 1e-2,
    placement: Optional[Placement] = None,
) -> ViTConfig:
    """Dynamic routing (Huang et al. 2024): ``TopP(p)`` with losses
    ``{"entropy": entropy_weight, "load_balance": balance_weight}``.

    Everything else (experts, widths, shared experts) comes from ``base``. Placement: ``placement``
    if given, else ``base.moe_layers``, or ``"every-2"`` (the paper's ``expert_frequency=2``) when
    ``base`` has no MoE block.
    """
    base = base if base is not None else ViTConfig()
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(f"top-p threshold p must be in (0, 1], got {p}")
    losses = {"entropy": entropy_weight, "load_balance": balance_weight}
    return _with_moe(
        base, placement, "every-2", router="topp", router_kwargs={"p": float(p)},
        moe_losses={k: v for k, v in losses.items() if v},
    )


def topk_config(
    base: Optional[ViTConfig] = None,
    k: int = 2,
    balance_weight: float = 1e-2,
    placement: Optional[Placement] = None,
) -> ViTConfig:
    """The fixed-k baselines of :func:`dynamic_config`: ``TopK(k)`` and ``{"load_balance": balance_weight}``,
    same experts, widths and placement rule (hence the same parameters)."""
    base = base if base is not None else ViTConfig()
    return _with_moe(
        base, placement, "every-2", router="topk", router_kwargs={"k": k},
        moe_losses={"load_balance": balance_weight} if balance_weight else {},
    )


def top2_config(
    base: Optional[ViTConfig] = None,
    balance_weight: float = 1e-2,
    placement: Optional[Placement] = None,
) -> ViTConfig:
    """:func:`topk_config` with k = 2, the paper's baseline."""
    return topk_config(base, 2, balance_weight, placement)


def dense_equivalent(config: ViTConfig, k_active: Optional[float] = None) -> ViTConfig:
    """A dense ViT with the same *active* parameters per token as ``config``'s ViMoE.

    Each MoE block becomes a dense FFN of width ``k_active * expert_hidden + num_shared * shared_hidden``
    (rounded); dense blocks keep theirs. ``k_active`` defaults to :func:`nominal_active_experts` of
    the config's router (2 for top-p by convention). With every block MoE this is ``mlp_hidden``;
    with a mixed placement (``"last-2"``) the widths go in ``block_hidden``. A dense config is
    returned unchanged.

    The FFN weight matrices match exactly (experts and FFNs have no biases), so by
    :func:`count_parameters` the MoE's active parameters exceed the dense total only by its gates
    (``dim * E`` per MoE layer) and any router parameters (a learned threshold's projection).
    """
    moe = config.moe_block_indices
    if not moe:
        return config
    if k_active is None:
        k_active = nominal_active_experts(build_router(config))
    if k_active <= 0:
        raise ValueError(f"k_active must be positive, got {k_active}")
    hidden = max(1, int(round(k_active * config.expert_width + config.num_shared * config.shared_width)))
    widths = [hidden if i in moe else config.dense_hidden(i) for i in range(config.depth)]
    uniform = all(w == widths[0] for w in widths)
    return dataclasses.replace(
        config,
        moe_layers="none",
        mlp_hidden=widths[0] if uniform else config.mlp_hidden,
        block_hidden=None if uniform else widths,
        expert_hidden=config.expert_width,
        moe_losses={},
        num_shared=0,
        shared_hidden=None,
    )


def count_parameters(model: nn.Module, k_active: Optional[float] = None) -> Dict[str, float]:
    """Total parameters and active parameters per token.

    Rule: every parameter counts once per token except the routed experts of each MoE layer
    (``layer.experts``), which count ``k / E`` of their total, ``k`` being ``k_active`` if given, else
    :func:`nominal_active_experts` of that layer's router. Gates, routers, shared experts, attention,
    embeddings, norms and the head count in full, as do layers without a discrete router (SoftMoE).

    Returns:
        ``{"total": int, "active_per_token": float, "routed_expert_params": int}``.
    """
    total = sum(p.numel() for p in model.parameters())
    active = float(total)
    routed = 0
    for _, layer in moe_layers(model):
        experts, router = getattr(layer, "experts", None), getattr(layer, "router", None)
        if experts is None or router is None:  # e.g. SoftMoE (no discrete routing): counted in full
            continue
        n = sum(p.numel() for p in experts.parameters())
        k = k_active if k_active is not None else nominal_active_experts(router)
        routed += n
        active -= n * (1.0 - float(k) / layer.num_experts)
    return {"total": total, "active_per_token": active, "routed_expert_params": routed}


# ---- routing analysis: moe_lite.inspect (these names stay for notebooks and experiments) -----------
def patch_experts(model: nn.Module, layer: Union[str, int], k: int = 1) -> Tensor:
    """``long [B, P, k]``: the ``k`` highest-weight experts of each *patch* in the last forward
    (:func:`moe_lite.inspect.top_experts` of that layer's routing, the ``cls`` token left out).

    ``layer`` is a collector name (``"blocks.3.mlp"``) or a block index. ``P`` = patches in row-major
    order, so ``.reshape(B, grid, grid, k)`` gives the image layout; ``-1`` where a patch has fewer
    than k experts.
    """
    routings = last_routings(model)
    name = f"blocks.{layer}.mlp" if isinstance(layer, int) else layer
    if name not in routings:
        raise ValueError(f"no MoE layer named {name!r}; MoE layers: {sorted(routings)}")
    r = routings[name]
    top = top_experts(r, k)
    config = getattr(model, "config", None)
    patches = config.num_patches if isinstance(config, ViTConfig) and config.seq_len == r.seq_len else r.seq_len
    return top[:, r.seq_len - patches:]
