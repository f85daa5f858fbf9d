"""What a run is: :class:`TrainConfig` (every field checked, with an error naming the field), and the
optimizer and learning-rate schedule built from it.

AdamW decays >= 2-D parameters only; the lr warms up linearly, then follows a half cosine down to
``lr * min_lr_ratio`` (:func:`lr_factor`). The schedule is a :class:`CosineSchedule` object, not a
lambda, so a time budget can shrink its ``total_steps`` mid-run and the scheduler's state saves it.

``repr(TrainConfig(...))`` is part of the checkpoint cache key (``RunContext.checkpoint_path``):
adding, renaming or reordering a field retrains every cached run.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from .device import AMP_CHOICES

__all__ = ["TrainConfig", "PathLike", "lr_factor", "build_optimizer", "CosineSchedule", "build_scheduler"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class TrainConfig:
    """Everything :func:`fit` needs; defaults suit the kit's small models.

    Attributes:
        epochs: passes over the train loader (ignored when ``max_steps`` is given).
        max_steps: total optimizer steps; overrides ``epochs`` (the loader is cycled as needed).
        lr, weight_decay: AdamW; weight decay applies to >= 2-D parameters only (not to biases,
            norms' scales or other 1-D parameters).
        warmup_fraction: linear warm-up length as a share of the total steps ...
        warmup_steps: ... or as a number of steps (overrides ``warmup_fraction``).
        min_lr_ratio: the cosine decays from ``lr`` to ``lr * min_lr_ratio`` at the last step.
        grad_clip: max global gradient norm (None: no clipping; the norm is logged either way).
        batch_size: for callers that build loaders from the config (``fit`` takes loaders as given).
        amp: ``"auto"`` (bf16 autocast on CUDA when supported, else fp16 with a grad scaler;
            float32 on CPU and MPS), ``"bf16"``, ``"fp16"`` (CUDA only) or ``"off"``.
        seed: passed to :func:`seed_everything` at the start of :func:`fit`; also seeds evaluation.
        device: ``"auto"`` (cuda, mps, cpu) or anything ``torch.device`` takes.
        eval_every: evaluate (and checkpoint) every this many steps; None: at the end of each
            epoch. Training always ends with an evaluation.
        checkpoint: file written at each evaluation (atomically); None: no checkpoints.
        progress: show a ``tqdm.auto`` bar per epoch.
        time_budget_s: a wall-time budget, e.g. for CPU "quick" runs on machines of unknown speed.
            After a few steps the step time is measured and, if the planned steps would not fit,
            the plan shrinks so that warm-up + cosine *completes* within about 90% of the budget
            (a run cut off mid-schedule would stop at a high learning rate). Training also stops
            cleanly (final evaluation and checkpoint) if the budget runs out anyway. None: no budget.
        log_routing: add ``routing_stats(model)`` to each evaluation record.
        sync_every: copy per-step logs to the host (and check for divergence) every this many
            steps; None: every step on CPU, every 16 steps on GPU.
    """

    epochs: int = 1
    max_steps: Optional[int] = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0
    batch_size: int = 128
    amp: str = "auto"
    seed: int = 0
    device: str = "auto"
    eval_every: Optional[int] = None
    checkpoint: Optional[str] = None
    progress: bool = True
    time_budget_s: Optional[float] = None
    log_routing: bool = True
    sync_every: Optional[int] = None

    def __post_init__(self) -> None:
        # every field is checked (and numbers made plain ints / floats, which safe checkpoint loading
        # accepts); a bad value names its field
        self.epochs = _config_int("epochs", self.epochs, 0 if self.max_steps is not None else 1)
        self.max_steps = _config_int("max_steps", self.max_steps, 1, optional=True)
        self.lr = _config_float("lr", self.lr, "> 0", lambda v: v > 0)
        self.weight_decay = _config_float("weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)
        self.warmup_fraction = _config_float("warmup_fraction", self.warmup_fraction, "in [0, 1)",
                                             lambda v: 0 <= v < 1)
        self.warmup_steps = _config_int("warmup_steps", self.warmup_steps, 0, optional=True)
        self.min_lr_ratio = _config_float("min_lr_ratio", self.min_lr_ratio, "in [0, 1]", lambda v: 0 <= v <= 1)
        self.grad_clip = _config_float("grad_clip", self.grad_clip, "> 0", lambda v: v > 0,
                                       optional=True)
        self.batch_size = _config_int("batch_size", self.batch_size, 1)
        if not isinstance(self.amp, str) or self.amp not in AMP_CHOICES:
            raise ValueError(f"TrainConfig: amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        self.seed = _config_int("seed", self.seed, None)
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"TrainConfig: device must be a string or torch.device, got {self.device!r}")
        self.eval_every = _config_int("eval_every", self.eval_every, 1, optional=True)
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, (str, os.PathLike)):
                raise ValueError(f"TrainConfig: checkpoint must be a path or None, got {self.checkpoint!r}")
            self.checkpoint = str(self.checkpoint)
        self.time_budget_s = _config_float("time_budget_s", self.time_budget_s, "> 0",
                                           lambda v: v > 0, optional=True)
        self.sync_every = _config_int("sync_every", self.sync_every, 1, optional=True)
        for name in ("progress", "log_routing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig: {name} must be True or False, got {getattr(self, name)!r}")

    def total_steps(self, steps_per_epoch: int) -> int:
        """``max_steps`` if given, else ``epochs * steps_per_epoch``."""
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def num_warmup_steps(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round(self.warmup_fraction * total_steps))

    def to_dict(self) -> Dict[str, Any]:
        """Plain values only (a path set after construction becomes a string)."""
        return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in dataclasses.asdict(self).items()}


def _config_int(name: str, value: Any, minimum: Optional[int], optional: bool = False) -> Optional[int]:
    """``value`` as a plain int, or a ValueError naming the TrainConfig field (bools are not ints)."""
    if value is None and optional:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        if minimum is None or value >= minimum:
            return int(value)
    bound = f" >= {minimum}" if minimum is not None else ""
    raise ValueError(f"TrainConfig: {name} must be an int{bound}{' or None' if optional else ''}, got {value!r}")


def _config_float(name: str, value: Any, rule: str, ok: Callable[[float], bool],
                  optional: bool = False) -> Optional[float]:
    """``value`` as a plain float, or a ValueError naming the TrainConfig field (NaN and inf refused)."""
    if value is None and optional:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) \
            and math.isfinite(value) and ok(float(value)):
        return float(value)
    raise ValueError(f"TrainConfig: {name} must be a finite number {rule}{' or None' if optional else ''}, "
                     f"got {value!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the base lr at 0-based optimizer step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` (reaching 1 at the last warm-up step), then a
    half cosine from 1 down to ``min_lr_ratio`` at step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D trainable parameters only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr)


class CosineSchedule:
    """The lr multiplier of :func:`lr_factor` as a callable object, so the planned ``total_steps``
    can shrink during training (a time budget) and is saved with the scheduler's state."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine (:func:`lr_factor`) over ``total_steps``, stepped once per optimizer step;
    its :class:`CosineSchedule` is ``scheduler.lr_lambdas[0]``."""
    schedule = CosineSchedule(total_steps, config.num_warmup_steps(total_steps), config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
