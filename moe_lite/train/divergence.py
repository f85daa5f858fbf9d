"""Divergence: which logged value went NaN/inf, and the :class:`TrainingDiverged` error that says so.

Checked, most specific first: the task loss, each aux part, the aux total, the total, and (without a
grad scaler, which skips such steps itself) the gradient norm; in evaluation, the loss-like metrics.
A :class:`moe_lite.NonFiniteError` raised inside the forward (a router given NaN/inf logits) is
divergence too; the error then names the first parameter or buffer holding NaN/inf, if any. The
message names the step, where training stopped, and whether the last good checkpoint is intact.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

from .checkpoint import _first_line
from .history import History

__all__ = ["TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """A loss (or gradient norm) became NaN or inf. Attributes: ``step``, ``part`` (which value),
    ``value``, ``checkpoint`` (path of the last good checkpoint or None), ``checkpoint_step``,
    ``history`` (everything logged up to the divergence)."""

    def __init__(self, message: str, *, step: int, part: str, value: float,
                 checkpoint: Optional[Path], checkpoint_step: Optional[int], history: History):
        super().__init__(message)
        self.step, self.part, self.value = step, part, value
        self.checkpoint, self.checkpoint_step, self.history = checkpoint, checkpoint_step, history


def _non_finite_part(record: Mapping[str, Any], check_grad: bool) -> Optional[str]:
    """The first non-finite value among the loss parts (most specific first), else None."""
    parts = ["task_loss"] + sorted(k for k in record if k.startswith("aux/")) + ["aux_loss", "loss"]
    if check_grad:
        parts.append("grad_norm")
    for part in parts:
        value = record.get(part)
        if isinstance(value, float) and not math.isfinite(value):
            return part
    return None


def _non_finite_tensor(model: nn.Module) -> Optional[Tuple[str, float]]:
    """``("parameter <name>", nan or inf)`` for the first parameter (then buffer) holding NaN or inf."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{kind} {name}", float("nan") if bool(torch.isnan(tensor).any()) else float("inf")
    return None


def _non_finite_metric(metrics: Mapping[str, Any]) -> Optional[str]:
    """The first non-finite loss-like metric (keys containing "loss"; every float metric if none)."""
    floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
    checked = [k for k in floats if "loss" in k] or list(floats)
    return next((k for k in checked if not math.isfinite(floats[k])), None)


def _stopped_where(during_eval: bool, sync_every: int) -> str:
    """Where the divergence was caught, for the message: how far training ran past it."""
    if during_eval:
        return "in the evaluation after it, so it was not checkpointed"
    if sync_every == 1:
        return "before its optimizer step"
    return f"(checked every {sync_every} steps, so later steps may have run)"


def _checkpoint_note(checkpoint: Optional[str], saved: Optional[Tuple[int, int]]) -> str:
    """Whether the last good checkpoint (``saved``: its step and file size) is still there, untouched."""
    if not checkpoint:
        return "No checkpoint was configured (TrainConfig.checkpoint)."
    path = Path(checkpoint)
    if saved is None:
        return f"No checkpoint had been written to {path} yet."
    step, size = saved
    if not path.is_file() or path.stat().st_size != size:
        return f"WARNING: the checkpoint of step {step} at {path} was changed or removed by something else."
    return f"The last good checkpoint (step {step}) is intact at {path}."


def _diverged_error(step: int, part: str, value: float, record: Mapping[str, Any], *, where: str,
                    checkpoint: Optional[str], saved: Optional[Tuple[int, int]], history: History,
                    what: Optional[str] = None) -> TrainingDiverged:
    """The error for ``part`` (a key of ``record``, or a tensor's name) being ``value`` at ``step``."""
    losses = ", ".join(f"{k}={record[k]:.4g}" for k in ("task_loss", "aux_loss", "loss")
                       if isinstance(record.get(k), float) and k != part)
    what = what or f"{part} is {value} ({losses})"
    message = (f"training diverged at step {step}: {what}; stopped {where}. "
               f"{_checkpoint_note(checkpoint, saved)} Try a lower lr, a smaller grad_clip, or amp='off'.")
    return TrainingDiverged(message, step=step, part=part, value=value,
                            checkpoint=Path(checkpoint) if saved else None,
                            checkpoint_step=saved[0] if saved else None, history=history)


def _forward_failure(model: nn.Module, err: BaseException) -> Tuple[str, float, str]:
    """``(part, value, what)`` for a forward that raised on NaN/inf: the first non-finite parameter or
    buffer if there is one (host syncs: on this error path only), else ``"forward"``."""
    found = _non_finite_tensor(model)
    if found is not None:
        part, value = found
        detail = f"{part} holds {value}"
    else:
        part, value = "forward", float("nan")
        detail = "the parameters and buffers are finite (an activation overflowed, or the input is not finite)"
    what = f"a non-finite value inside the forward, {type(err).__name__}: {_first_line(err)}; {detail}"
    return part, value, what
