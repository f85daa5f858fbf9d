"""The diffusion process of the kit's DiT: rectified flow (flow matching with a straight path).

Convention (used everywhere in this file, never the reverse):

    x_t = (1 - t) * x0 + t * noise        t in [0, 1]; t = 0 is data, t = 1 is pure noise
    v   = noise - x0                      the velocity the network regresses, d x_t / d t
    sampling integrates dx/dt = v(x, t) from t = 1 (noise) down to t = 0 (data)

Why this process and not DDPM / epsilon prediction:

* Few sampling steps matter on a 2-core CPU. The rectified-flow path is straight between a data
  point and its noise, so an ODE solver with 10-25 steps already gives clean samples, whereas an
  epsilon-prediction DDPM sampler wants hundreds of steps (or a DDIM/DPM-Solver layer on top).
* No noise schedule to choose or tune (betas, alpha-bar tables, v/eps parameterisation): the whole
  process is the two lines above; easy to read in a tutorial and to test on hand-made tensors.
* The regression target ``v`` has unit-order variance at every t, so one plain MSE trains all
  timesteps evenly, and the same target serves Expert Race's per-layer regularization (PLR),
  whose heads predict the patchified ``v`` token by token.
* ``t`` during training is logit-normal (mean 0, std 1, as in SD3, Esser et al. 2024): it puts more
  samples in the middle of the path, where the velocity is hardest to predict. ``"uniform"`` is
  available for comparison.
* The default sampler is Heun (2nd order; Euler on the last step, as in Karras et al. 2022) with 10
  steps = 19 network evaluations; ``method="euler"`` is there too (error O(1/steps) instead of
  O(1/steps^2)). Classifier-free guidance mixes the conditional and unconditional velocities,
  ``v = v_u + s * (v_c - v_u)`` (s = 1: conditional only, s = 0: unconditional only).

What is and is not in :func:`training_loss`:
    ``loss = diffusion_mse + per_layer_weight * per_layer_regression`` (the second term only when the
    model has PLR target heads). The MoE auxiliary losses (router similarity, load balance) live on
    the ``MoE`` layers (configured through their ``losses={name: weight}``) and are NOT added here: the
    trainer adds ``moe_lite.aux_loss(model)`` itself, so nothing is counted twice and every loss can be
    logged on its own. The trainer reaches this module through :class:`moe_lite.train.DiffusionTask`
    (in ``moe_lite/train/tasks.py``, beside the classification task).

The model interface this module relies on (met by :class:`moe_lite.models.dit.DiT`):
``model(x_t [B, C, H, W], t [B] float in [0, 1], y [B] long) -> v [B, C, H, W]`` and ``model.config``
with ``num_classes`` (the null class index used for guidance), ``class_dropout``, ``patch_size``,
``in_channels``, ``image_size``, ``per_layer_reg`` and ``per_layer_weight``; for ``unit_range=True``,
``model.pixel_scale`` (a :class:`PixelScale`: how the data was normalised, given by whoever loaded the
data; the model code knows no dataset).

Sampling always runs the model in eval mode: Expert Race then routes with its EMA threshold,
which does not depend on the batch, so batching the conditional and unconditional halves of
guidance together changes nothing for any sample.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import model_device, target_predictions
from ..losses import per_layer_regression

__all__ = [
    "interpolate",
    "velocity_target",
    "sample_timesteps",
    "patchify",
    "unpatchify",
    "drop_labels",
    "guided_velocity",
    "training_loss",
    "sample",
    "to_unit_range",
    "PixelScale",
    "eval_mode",
    "T_DISTRIBUTIONS",
    "SAMPLERS",
]

T_DISTRIBUTIONS = ("logit_normal", "uniform")
SAMPLERS = ("euler", "heun")


# ---- the process ------------------------------------------------------------------------------
def _expand_t(t: Tensor, x: Tensor) -> Tensor:
    """``t [B]`` -> ``[B, 1, 1, ...]`` broadcastable against ``x [B, ...]``."""
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be [B] with B={x.shape[0]}, got shape {tuple(t.shape)}")
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The point on the straight path: ``x_t = (1 - t) * x0 + t * noise``.

    Args:
        x0: data ``[B, C, H, W]`` (any ``[B, ...]``); noise: same shape; t: ``[B]`` in [0, 1].
    Returns:
        ``x_t``, same shape as ``x0``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    tt = _expand_t(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target ``v = noise - x0`` (= d x_t / d t), same shape as ``x0``."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    return noise - x0


def _rand(kind: str, shape: Sequence[int], generator: Optional[torch.Generator], device) -> Tensor:
    """``torch.rand``/``randn`` drawn on the generator's device (so a CPU generator gives the same
    numbers whatever ``device`` is), then moved to ``device``."""
    fn = torch.randn if kind == "normal" else torch.rand
    if generator is None:
        return fn(*shape, device=device)
    out = fn(*shape, generator=generator, device=generator.device)
    return out if device is None else out.to(device)


def sample_timesteps(
    batch_size: int,
    distribution: str = "logit_normal",
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Tensor:
    """Training timesteps ``[B]`` in (0, 1).

    ``"logit_normal"``: ``sigmoid(n)``, n ~ N(0, 1) (dense in the middle of the path);
    ``"uniform"``: U(0, 1).
    """
    if distribution not in T_DISTRIBUTIONS:
        raise ValueError(f"unknown t distribution {distribution!r}; choose from {T_DISTRIBUTIONS}")
    if distribution == "logit_normal":
        return torch.sigmoid(_rand("normal", (batch_size,), generator, device))
    return _rand("uniform", (batch_size,), generator, device)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Images to per-token patches: ``[B, C, H, W] -> [B, L, p*p*C]``, L = (H/p)*(W/p), row-major.

    Inside a patch the order is (row in patch, column in patch, channel); :func:`unpatchify` inverts it.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, H/p, W/p, p, p, C]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, patch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, L, p*p*C] -> [B, C, H, W]``."""
    p = patch_size
    b, l, d = tokens.shape
    gh, gw = height // p, width // p
    if l != gh * gw or d != p * p * channels:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} do not fit {channels}x{height}x{width} images with patch {p}"
        )
    x = tokens.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # [B, C, H/p, p, W/p, p]
    return x.reshape(b, channels, height, width)


def drop_labels(
    y: Tensor, prob: float, null_class: int, *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Classifier-free-guidance training: replace each label by ``null_class`` with probability ``prob``.

    Args:
        y: long ``[B]``. Returns long ``[B]``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"class dropout probability must be in [0, 1], got {prob}")
    if prob == 0.0:
        return y
    drop = _rand("uniform", (y.shape[0],), generator, y.device) < prob
    return torch.where(drop, torch.full_like(y, null_class), y)


# ---- training ---------------------------------------------------------------------------------
def training_loss(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    *,
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    t_distribution: str = "logit_normal",
    class_dropout: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Flow-matching loss of one batch (one forward of ``model``).

    ``loss = mse(model(x_t, t, y_dropped), noise - x0) + per_layer_weight * PLR``; PLR is the
    :func:`moe_lite.losses.per_layer_regression` of the model's target-head predictions
    (``moe_lite.target_predictions(model)``, each ``[B, L, p*p*C]``) against the patchified velocity,
    present only when ``model.config.per_layer_reg``. The MoE aux losses are not included: the
    trainer adds ``moe_lite.aux_loss(model)`` (see the module docstring).

    Args:
        model: a DiT-like model (see the module docstring).
        x0: data ``[B, C, H, W]`` in the data's normalised range; y: long ``[B]`` class labels.
        t: optional ``[B]`` timesteps (default: drawn from ``t_distribution``).
        noise: optional ``[B, C, H, W]`` (default: standard normal).
        class_dropout: label-dropout probability for guidance (default ``model.config.class_dropout``).
        generator: drives t, noise and the label dropout (default: the global RNG).
    Returns:
        ``(loss, parts)`` with ``parts = {"diffusion": mse}`` plus ``"per_layer": plr`` under PLR;
        all scalar tensors with gradient.
    """
    cfg = model.config
    if x0.dim() != 4 or y.shape != (x0.shape[0],):
        raise ValueError(f"expected x0 [B, C, H, W] and y [B], got {tuple(x0.shape)} and {tuple(y.shape)}")
    b = x0.shape[0]
    if t is None:
        t = sample_timesteps(b, t_distribution, generator=generator, device=x0.device)
    if noise is None:
        noise = _rand("normal", x0.shape, generator, x0.device).to(x0.dtype)
    p_drop = cfg.class_dropout if class_dropout is None else class_dropout
    y_in = drop_labels(y, p_drop, cfg.num_classes, generator=generator)

    x_t = interpolate(x0, noise, t)
    target = velocity_target(x0, noise)  # [B, C, H, W]
    pred = model(x_t, t, y_in)
    diffusion = F.mse_loss(pred.float(), target.float())
    parts: Dict[str, Tensor] = {"diffusion": diffusion}
    loss = diffusion
    if getattr(cfg, "per_layer_reg", False):
        plr = per_layer_regression(target_predictions(model), patchify(target, cfg.patch_size))
        parts["per_layer"] = plr
        loss = loss + cfg.per_layer_weight * plr
    return loss, parts


# ---- sampling ---------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model.eval()`` and ``torch.no_grad()``, then restore the previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def guided_velocity(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance: ``v_u + cfg_scale * (v_c - v_u)``.

    The conditional and unconditional halves go through ONE batched forward (``[2B]``); the model
    should be in eval mode so routing does not depend on the batch. ``cfg_scale == 1`` skips the
    unconditional half (it would cancel exactly).

    Args:
        x: ``[B, C, H, W]``; t: ``[B]``; y: long ``[B]`` (real labels, not the null class).
    Returns:
        the guided velocity ``[B, C, H, W]``.
    """
    if cfg_scale == 1.0:
        return model(x, t, y)
    null = torch.full_like(y, model.config.num_classes)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def sample(
    model: nn.Module,
    labels: Tensor,
    steps: int = 10,
    cfg_scale: float = 2.0,
    generator: Optional[torch.Generator] = None,
    device=None,
    *,
    method: str = "heun",
    noise: Optional[Tensor] = None,
    unit_range: Union[bool, "PixelScale"] = False,
) -> Tensor:
    """Generate images for ``labels`` by integrating the flow from t = 1 (noise) to t = 0 (data).

    Runs in eval mode under ``no_grad`` (the model's mode is restored afterwards). Deterministic
    given ``generator`` (the start noise is drawn from it, on the generator's device).

    Args:
        labels: long ``[B]`` class labels in ``[0, num_classes)``.
        steps: ODE steps on a uniform t grid. Heun uses ``2 * steps - 1`` network evaluations
            (Euler on the last step), Euler ``steps``; each doubles in batch size under guidance.
        cfg_scale: guidance scale (1 = conditional only, 0 = unconditional only).
        generator: a ``torch.Generator`` for the start noise (default: the global RNG).
        device: where to run (default: the model's device).
        method: ``"heun"`` or ``"euler"``.
        noise: optional start noise ``[B, C, H, W]`` (overrides ``generator``).
        unit_range: return pixels in [0, 1] (:func:`to_unit_range`) instead of the data range: a
            :class:`PixelScale`, or True for the model's own ``pixel_scale`` (set when it was built).
    Returns:
        images ``[B, C, image_size, image_size]``, in the data's normalised range (or [0, 1]).
    """
    cfg = model.config
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose from {SAMPLERS}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be [B], got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"labels must lie in [0, {cfg.num_classes})")
    device = torch.device(device) if device is not None else model_device(model)
    labels = labels.to(device=device, dtype=torch.long)
    shape = (labels.shape[0], cfg.in_channels, cfg.image_size, cfg.image_size)
    if noise is None:
        noise = _rand("normal", shape, generator, device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {shape}, got {tuple(noise.shape)}")

    grid = torch.linspace(1.0, 0.0, int(steps) + 1, device=device)  # t_0 = 1 ... t_steps = 0
    x = noise.to(device)
    with eval_mode(model):
        for i in range(int(steps)):
            t_cur, t_next = grid[i], grid[i + 1]
            t_b = t_cur.expand(x.shape[0])
            v = guided_velocity(model, x, t_b, labels, cfg_scale)
            x_euler = x + (t_next - t_cur) * v
            if method == "euler" or i == int(steps) - 1:
                x = x_euler
            else:
                v_next = guided_velocity(model, x_euler, t_next.expand(x.shape[0]), labels, cfg_scale)
                x = x + (t_next - t_cur) * 0.5 * (v + v_next)
    if unit_range is False:
        return x
    scale = getattr(model, "pixel_scale", None) if unit_range is True else unit_range
    if not isinstance(scale, PixelScale):
        raise ValueError("unit_range needs the data's normalisation: pass unit_range=PixelScale(mean, std), "
                         "or build the model with pixel_scale=...")
    return to_unit_range(x, scale)


@dataclass(frozen=True)
class PixelScale:
    """How images were normalised for the model: ``x = (pixel - mean) / std``, pixels in [0, 1]
    (for Fashion-MNIST, ``moe_lite.data.MEAN`` / ``STD``: the experiments pass them in)."""

    mean: float
    std: float


def to_unit_range(images: Tensor, scale: PixelScale) -> Tensor:
    """Data-range images to pixels in [0, 1]: ``images * scale.std + scale.mean``, clamped. Any shape."""
    return (images * scale.std + scale.mean).clamp(0.0, 1.0)
