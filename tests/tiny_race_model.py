"""A tiny model the checkpoint-cache specs share: its Race router keeps an EMA threshold in a buffer,
so a checkpoint round trip must carry buffers too."""
import torch
from torch import nn

from moe_lite import MoE
from moe_lite.routers import Race


class Tiny(nn.Module):
    """8x8 image -> 4 patch tokens -> a Race MoE layer (an EMA threshold in a buffer) -> 2 classes."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(16, 8)
        self.moe = MoE(8, 8, 4, Race(k=1))
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        b = x.shape[0]
        h = self.embed(x.reshape(b, 1, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, 4, 16))
        return self.head((h + self.moe(h)).flatten(1))
