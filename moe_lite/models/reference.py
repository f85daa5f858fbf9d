"""Reference classifiers that are not transformers: where a learner sees the ViTs stand.

A ViT that scores below a logistic regression on the same pixels teaches nothing about routing, so the
classification tables print these rows beside the models, trained by the same trainer on the same data.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

__all__ = ["PixelClassifier", "REFERENCES"]


class PixelClassifier(nn.Module):
    """Logistic regression (``hidden=None``) or a one-hidden-layer GELU MLP on the raw pixels.

    ``forward(images [B, C, H, W]) -> logits [B, num_classes]``.
    """

    def __init__(self, hidden: Optional[int] = None, num_classes: int = 10, pixels: int = 28 * 28) -> None:
        super().__init__()
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1):
            raise ValueError(f"hidden must be a positive int or None (logistic regression), got {hidden!r}")
        self.hidden = hidden
        layers = [nn.Flatten()]
        if hidden is None:
            layers.append(nn.Linear(pixels, num_classes))
        else:
            layers += [nn.Linear(pixels, hidden), nn.GELU(), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


#: the reference rows of the classification tables: name -> hidden width (None: logistic regression)
REFERENCES = {"reference: logistic regression": None, "reference: MLP (256)": 256}
