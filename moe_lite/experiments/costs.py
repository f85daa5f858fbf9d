"""What one model of each experiment costs to train at a size: the FLOP and memory estimates the sizes
are calibrated from (``python -m moe_lite costs --size gpu``).

Each row is one representative model (the dense baseline and the main MoE variant of the ViT, DiT and
sequence experiments) at the size's batch and fixed step count: training FLOPs per step (3x the forward's
matrix products, :mod:`moe_lite.flops`), the total over the planned steps, the memory of one step, and
the time that total takes at a stated sustained rate. Sizes that train by epochs count them over
their images (``full``: the 60k-image training split).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch

from ..flops import estimate
from ..models.dit import DiT
from ..models.lm import CausalLM
from ..models.vit import ViT, ViTConfig
from . import diffusion, sequence, vimoe
from .core import resolve_size

#: a free Colab T4's fp16 tensor-core peak, FLOP/s; small models sustain a fraction of it
T4_PEAK = 65e12
#: the share of that peak assumed for the time column (an assumption, not a measurement)
ASSUMED_UTILISATION = 0.1
#: training images of a full Fashion-MNIST epoch (sizes that train by epochs)
FULL_TRAIN_IMAGES = 60_000


def _steps(spec: Any) -> int:
    """The planned optimizer steps of a size: its fixed ``max_steps``, else its epochs over its images."""
    if spec.max_steps is not None:
        return spec.max_steps
    images = 10 * spec.n_per_class if spec.n_per_class is not None else FULL_TRAIN_IMAGES
    return spec.epochs * -(-images // spec.batch_size)


def _row(experiment: str, model_name: str, model: torch.nn.Module, batch_input: Any, steps: int,
         extra: Any = None) -> Dict[str, Any]:
    model.train()
    est = estimate(model, *([batch_input] if extra is None else [batch_input, *extra]))
    total = est.training_flops * steps
    return {"experiment": experiment, "model": model_name, "params": est.params, "batch": est.batch_size,
            "steps": steps, "GFLOP/step": round(est.training_flops / 1e9, 3),
            "PFLOP total": round(total / 1e15, 4), "step memory (MB)": round(est.training_bytes / 1e6, 1),
            f"minutes at {ASSUMED_UTILISATION:.0%} of a T4": round(total / (T4_PEAK * ASSUMED_UTILISATION) / 60, 2)}


def size_costs(size: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per representative model at ``size`` (see the module docstring)."""
    size = resolve_size(size)
    rows = []
    spec = vimoe.SIZES[size]
    base = dataclasses.replace(ViTConfig(), **spec.model)
    images = torch.randn(spec.batch_size, 1, 28, 28)
    for name in ("dense", "vimoe"):
        with torch.random.fork_rng(devices=[]):
            model = ViT(vimoe.vimoe_variant(name, base))
        rows.append(_row("vimoe", name, model, images, _steps(spec)))
    dspec = diffusion.SIZES[size]
    x = torch.randn(dspec.batch_size, 1, 28, 28)
    t = torch.rand(dspec.batch_size)
    y = torch.randint(0, 10, (dspec.batch_size,))
    for name in ("dense", "expert race"):
        with torch.random.fork_rng(devices=[]):
            model = DiT(diffusion.training_config(diffusion.variant_config(name, size)))
        rows.append(_row("dit", name, model, x, _steps(dspec), (t, y)))
    sspec = sequence.SIZES[size]
    with torch.random.fork_rng(devices=[]):
        model = CausalLM(sequence.variant_config("top-2", size))
    tokens = torch.randint(0, model.config.vocab_size, (sspec.batch_size, model.config.max_len))
    rows.append(_row("sequence", "top-2", model, tokens, sspec.max_steps))
    return rows
