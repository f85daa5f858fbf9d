"""Where training runs and in what precision: the device, batches moved to it, autocast.

:func:`pick_device` (cuda, then mps, then cpu; an unavailable device asked for by name is an error);
:func:`to_device` moves any nesting of tensors; ``amp="auto"`` is bf16 autocast on CUDA (fp16, with a
grad scaler in the loop, on GPUs without bf16) and float32 on CPU and MPS.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

__all__ = ["AMP_CHOICES", "pick_device", "to_device"]

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def pick_device(pref: Union[str, torch.device, None] = "auto") -> torch.device:
    """The device to train on: ``"auto"`` picks cuda, then mps, then cpu.

    Any other value is passed to ``torch.device``; asking for an unavailable cuda or mps is an error
    (rather than a silent fall-back to a 100x slower CPU run).
    """
    if pref is None or pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={pref!r} but CUDA is not available here; use device='auto'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError(f"device={pref!r} but MPS is not available here; use device='auto'")
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tensors, tuples, lists, namedtuples, dicts)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: None (float32) off CUDA or when ``amp="off"``."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"amp={amp!r} needs a CUDA device, got {device}; use amp='auto' or 'off'")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``; a no-op context when ``dtype`` is None (float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
