"""The tasks :func:`moe_lite.train.fit` trains: what a batch's loss is, and how a held-out pass is scored.

A task is any object with ``loss(model, batch) -> (loss, logs)`` and ``evaluate(model, batches) ->
metrics`` (:class:`Task`); the trainer adds the MoE layers' aux losses itself, so a task returns its
own loss only. :class:`ClassificationTask`: cross-entropy on ``(images, labels)`` (ViMoE, adapters);
:class:`DiffusionTask`: the rectified-flow loss of :mod:`moe_lite.models.diffusion` (DiT-MoE).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Protocol, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import random_shift_flip
from ..layers import model_device
from ..models.diffusion import T_DISTRIBUTIONS, eval_mode, interpolate, training_loss, velocity_target

__all__ = ["Task", "ClassificationTask", "DiffusionTask"]


class Task(Protocol):
    """What :func:`fit` needs from a task (e.g. :class:`ClassificationTask`, :class:`DiffusionTask`)."""

    def loss(self, model: nn.Module, batch: Any) -> Tuple[Tensor, Dict[str, Union[float, Tensor]]]:
        """The task loss (scalar, with grad) and scalars to log for one training batch."""

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> Dict[str, float]:
        """Metrics over a whole evaluation pass (a ``"loss"`` where there is one). Called under no_grad,
        in eval mode; a non-finite loss-like metric counts as divergence."""


def _image_label(batch: Any) -> Tuple[Tensor, Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"ClassificationTask expects (images, labels) batches, got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""))


@dataclass
class ClassificationTask:
    """Cross-entropy classification: ``model(images) -> logits [B, C]``; batches are ``(x, y)``.

    Args:
        label_smoothing: for the training loss only (evaluation reports plain cross-entropy).
        per_class: also report ``accuracy/<c>`` for every class ``c`` in :meth:`evaluate`.
        augment: in the training loss only, translate images by up to ``shift`` pixels and mirror
            them at random (:func:`moe_lite.data.random_shift_flip`); small ViTs overfit a 10k-image
            set without it.
        shift: the largest translation in pixels when ``augment``.
    """

    label_smoothing: float = 0.0
    per_class: bool = False
    augment: bool = False
    shift: int = 2

    def loss(self, model: nn.Module, batch: Any) -> Tuple[Tensor, Dict[str, Tensor]]:
        x, y = _image_label(batch)
        if self.augment and model.training:
            x = random_shift_flip(x, shift=self.shift)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(-1) == y).float().mean()
        return loss, {"acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> Dict[str, float]:
        """``loss`` (mean cross-entropy), ``accuracy`` and, if ``per_class``, ``accuracy/<c>``
        (NaN for a class with no example)."""
        loss_sum, correct, count = None, None, None
        for batch in batches:
            x, y = _image_label(batch)
            logits = model(x).float()
            num_classes = logits.shape[-1]
            hit = logits.argmax(-1) == y
            batch_loss = F.cross_entropy(logits, y, reduction="sum")
            batch_correct = torch.bincount(y[hit], minlength=num_classes)
            batch_count = torch.bincount(y, minlength=num_classes)
            if loss_sum is None:
                loss_sum, correct, count = batch_loss, batch_correct, batch_count
            else:
                loss_sum, correct, count = loss_sum + batch_loss, correct + batch_correct, count + batch_count
        if loss_sum is None:
            raise ValueError("ClassificationTask.evaluate got no batches")
        total = count.sum().clamp_min(1)
        per_class = torch.where(count > 0, correct.float() / count.clamp_min(1), float("nan"))
        values = torch.cat([(loss_sum / total).reshape(1), (correct.sum() / total).reshape(1).float(),
                            per_class]).tolist()  # one host copy
        metrics = {"loss": values[0], "accuracy": values[1]}
        if self.per_class:
            metrics.update({f"accuracy/{c}": v for c, v in enumerate(values[2:])})
        return metrics


@dataclass
class DiffusionTask:
    """The DiT's training objective and held-out evaluation, as the shared trainer calls them.

    ``loss(model, batch)`` -> ``(loss, logs)``: :func:`training_loss` on a batch
    ``(images [B, 1, 28, 28] normalised, labels [B])`` moved to the model's device; the MoE aux
    losses are added by the trainer, not here. ``evaluate(model, batches)`` -> ``{"loss": ...}``, the
    mean diffusion MSE
    on held-out batches in eval mode, with guidance dropout off, at the fixed timesteps
    ``eval_timesteps`` and with fixed noise (seeded by ``eval_seed`` and the batch index), so two
    evaluations of the same model agree exactly and the number has low variance.

    Attributes:
        t_distribution: training timestep distribution (``"logit_normal"`` or ``"uniform"``).
        eval_timesteps: the t's every held-out batch is scored at.
        eval_seed: seed of the held-out noise.
    """

    t_distribution: str = "logit_normal"
    eval_timesteps: Tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    eval_seed: int = 0

    def __post_init__(self) -> None:
        if self.t_distribution not in T_DISTRIBUTIONS:
            raise ValueError(f"unknown t distribution {self.t_distribution!r}; choose from {T_DISTRIBUTIONS}")
        if not self.eval_timesteps or not all(0.0 <= float(t) <= 1.0 for t in self.eval_timesteps):
            raise ValueError(f"eval_timesteps must be a non-empty sequence in [0, 1], got {self.eval_timesteps}")

    @staticmethod
    def _unpack(model: nn.Module, batch) -> Tuple[Tensor, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("a batch must be (images [B, C, H, W], labels [B])")
        device = model_device(model)
        return batch[0].to(device), batch[1].to(device=device, dtype=torch.long)

    def loss(self, model: nn.Module, batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One training loss; logs (detached scalar tensors, no device sync): ``diffusion`` and,
        under PLR, ``per_layer``."""
        x0, y = self._unpack(model, batch)
        loss, parts = training_loss(model, x0, y, t_distribution=self.t_distribution)
        return loss, {name: value.detach() for name, value in parts.items()}

    def evaluate(self, model: nn.Module, batches: Iterable) -> Dict[str, float]:
        """Held-out diffusion MSE: ``{"loss": mean over t's, "loss@t=0.50": mean at that t, ...}``.

        Every batch is scored at every t in ``eval_timesteps`` with noise from a CPU generator seeded
        ``eval_seed + batch index``; the means weight each sample equally.
        """
        times = [float(t) for t in self.eval_timesteps]
        sums = torch.zeros(len(times), dtype=torch.float64)
        count = 0
        with eval_mode(model):
            for i, batch in enumerate(batches):
                x0, y = self._unpack(model, batch)
                gen = torch.Generator().manual_seed(self.eval_seed + i)
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                for j, t in enumerate(times):
                    tb = torch.full((x0.shape[0],), t, device=x0.device)
                    pred = model(interpolate(x0, noise, tb), tb, y)
                    mse = (pred.float() - velocity_target(x0, noise).float()).pow(2).mean()
                    sums[j] += float(mse) * x0.shape[0]
                count += x0.shape[0]
        if count == 0:
            raise ValueError("evaluate() got no batches")
        per_t = sums / count
        out = {"loss": float(per_t.mean())}
        out.update({f"loss@t={t:.2f}": float(v) for t, v in zip(times, per_t)})
        return out
