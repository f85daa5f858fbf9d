"""One evaluation pass: the task's metrics plus routing statistics, without moving the training run.

:func:`evaluate` runs ``task.evaluate`` in eval mode under ``no_grad`` and the run's autocast, inside
a forked RNG seeded with the run's seed (so a diffusion task's random timesteps repeat, and training
randomness is untouched), and reads ``routing_stats(model)`` right after the model's forward on the
*first* batch (a forward hook: no extra forward), so the statistics always describe a full batch,
never a ragged last one.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from ..layers import routing_stats
from .device import _amp_dtype, _autocast, to_device
from .rng import _forked_rng, _seed_forked
from .tasks import Task

__all__ = ["evaluate"]


def evaluate(model: nn.Module, task: Task, loader: Iterable[Any], *, device: Optional[torch.device] = None,
             amp: str = "off", log_routing: bool = True, seed: int = 0) -> Dict[str, Any]:
    """``task.evaluate`` over ``loader`` in eval mode, under ``no_grad``, plus routing statistics.

    Runs inside a forked RNG seeded with ``seed``: evaluation is repeatable (e.g. a diffusion task's
    random timesteps are the same each time) and leaves the training randomness untouched.
    With ``log_routing``, adds ``routing``: ``routing_stats(model)`` (layer -> statistics) as the
    model's forward on the first batch of ``loader`` left them; omitted when there are no MoE layers.
    The model's train/eval mode is restored afterwards.
    """
    device = device or next(model.parameters()).device
    dtype = _amp_dtype(amp, device)
    was_training = model.training
    first_batch: Dict[str, Dict[str, float]] = {}
    seen = []

    def read_routing(module: nn.Module, inputs: Any, output: Any) -> None:
        if not seen:  # the first forward only: later batches may be ragged
            seen.append(True)
            first_batch.update(routing_stats(module))

    hook = model.register_forward_hook(read_routing) if log_routing else None
    model.eval()
    try:
        with _forked_rng(device), torch.no_grad(), _autocast(device, dtype):
            _seed_forked(seed, device)
            metrics: Dict[str, Any] = dict(task.evaluate(model, (to_device(b, device) for b in loader)))
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if first_batch:
        metrics["routing"] = first_batch
    return metrics
