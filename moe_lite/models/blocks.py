"""Transformer blocks the models share: :class:`PatchEmbed` (ViT, DiT), :class:`Attention` (ViT,
DiT, and the language model's causal one), the pre-norm :class:`Block` (ViT, language model).

Axis legend: b batch, l tokens, d width, c channels, g patches per side.
Parameter names are part of every checkpoint (``qkv``, ``proj``, ``norm1``, ``attn``, ``norm2``,
``mlp``, ``stem``): keep them.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["STEMS", "PatchEmbed", "Attention", "Block"]

#: patch-embedding stems (:class:`PatchEmbed`): a linear patch embedding, or a 3x3 conv before it.
STEMS = ("patch", "conv")


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided conv, optionally after a small conv stem.

    ``stem="patch"`` (default): the strided conv sees the raw pixels (a linear patch embedding).
    ``stem="conv"``: a 3x3 conv (``stem_channels`` maps, same resolution) + GELU first, so each token
    also sees the pixels just outside its patch (Xiao et al. 2021, "Early convolutions help
    transformers see better"); the token grid, and so ``L``, is unchanged.

    ``forward(images [B, C, H, W]) -> [B, L, D]`` with ``L = (H / patch)**2``, row-major patch order.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int,
                 stem: str = "patch", stem_channels: int = 8) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.stem: Optional[nn.Module] = None
        channels = in_channels
        if stem == "conv":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, padding=1), nn.GELU())
            channels = stem_channels
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
        x = self.stem(images) if self.stem is not None else images  # [b, c, h, w]
        return self.proj(x).flatten(2).transpose(1, 2)  # [b, d, g, g] -> [b, l, d]


class Attention(nn.Module):
    """Multi-head self-attention with ``F.scaled_dot_product_attention``; ``causal``: position ``t``
    attends to positions ``<= t`` only.

    ``forward(x [B, L, D]) -> [B, L, D]``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout, self.causal = heads, dropout, bool(causal)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, l, d = x.shape
        qkv = self.qkv(x).reshape(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [b, heads, l, d/heads]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, l, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``mlp`` is a dense :class:`~moe_lite.layers.FFN` or, when ``is_moe``, a :class:`~moe_lite.layers.MoE`
    (or a :class:`~moe_lite.layers.SoftMoE`). ``forward(x [B, L, D]) -> [B, L, D]``.
    """

    def __init__(self, dim: int, heads: int, mlp: nn.Module, dropout: float = 0.0, is_moe: bool = False) -> None:
        super().__init__()
        self.is_moe = bool(is_moe)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))
