"""FLOP and memory estimates of one training step: what a model costs before you train it.

    est = moe_lite.flops.estimate(model, images)      # one forward on a real batch
    print(est.summary())
    est.training_flops            # per step (this batch), ~3x the forward
    est.seconds_per_step(65e12)   # at a sustained 65 TFLOP/s (a T4's fp16 peak; real runs reach far less)

How the forward is counted (a multiply-add is 2 FLOPs; only matrix products, which dominate):

* every matrix product the forward runs: ``F.linear`` (``2 * rows * in * out``), convolutions
  (``2 * output elements * in_channels / groups * kernel size``), ``@`` / ``matmul`` / ``mm`` / ``bmm``
  / ``addmm`` / ``baddbmm`` (``2 * output elements * inner width``), and
  ``F.scaled_dot_product_attention`` (``2 * B * heads * L * S * (E + Ev)``: scores and weighted sum);
* :class:`~moe_lite.experts.Experts` analytically from the assignments they received:
  ``2 * A * (D * H_in + H * D)``. That is the useful work of the routed tokens; what a dispatch backend
  adds (padding rows of the ``"padded"`` layout) is not counted, so every backend gives one number.

Elementwise work (activations, norms, softmax, the router) is left out: a few percent for these models.
A training step costs ``3 x`` the forward: the backward of a product computes two products of the same
size (gradient of the input and of the weight). Per sample = per step / batch size.

Memory (bytes): parameters; their gradients (trainable ones); AdamW's two moments (``2 x`` trainable);
and the activations autograd saves for the backward, measured in that forward with saved-tensor hooks
(each storage once; parameters not counted again). Peak use during a step is about their sum, plus the
temporaries of the backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .experts import Experts

__all__ = ["Estimate", "estimate", "matmul_flops", "TRAINING_MULTIPLIER"]

#: training FLOPs per forward FLOP (forward 1 + backward 2)
TRAINING_MULTIPLIER = 3


def _product_flops(out: Tensor, inner: int) -> int:
    return 2 * out.numel() * inner


def _linear(args, kwargs, out) -> int:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return _product_flops(out, weight.shape[-1])  # out [..., out_features], weight [out, in]


def _conv(args, kwargs, out) -> int:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return _product_flops(out, math.prod(weight.shape[1:]))  # weight [C_out, C_in / groups, *kernel]


def _matmul(args, kwargs, out) -> int:
    a = args[-2] if len(args) >= 3 else args[0]  # addmm / baddbmm: (bias, a, b)
    return _product_flops(out, a.shape[-1])


def _sdpa(args, kwargs, out) -> int:
    q, k, v = (args + tuple(kwargs[n] for n in ("query", "key", "value")[len(args):]))[:3]
    batch = math.prod(q.shape[:-2])  # B * heads
    return 2 * batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


_RULES: Dict[Callable, Callable[[tuple, dict, Any], int]] = {
    F.linear: _linear,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    F.scaled_dot_product_attention: _sdpa,
}
for _f in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm,
           torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm):
    _RULES[_f] = _matmul


def matmul_flops(func: Callable, args: tuple, kwargs: Optional[dict], out: Any) -> int:
    """Forward FLOPs of one call ``out = func(*args, **kwargs)`` (0 for functions without a rule)."""
    rule = _RULES.get(func)
    return rule(args, kwargs or {}, out) if rule is not None and isinstance(out, Tensor) else 0


def _experts_flops(module: Experts, token: Tensor) -> int:
    """``2 * A * (D * H_in + H * D)``: the expert MLPs of ``A`` assignments."""
    return 2 * token.numel() * (module.dim * module.hidden_in + module.hidden * module.dim)


class _Counter(TorchFunctionMode):
    """Adds the FLOPs of every rule-matched call to the innermost module on ``stack``."""

    def __init__(self, stack: List[Tuple[str, nn.Module]], flops: Dict[Tuple[str, str], int]):
        super().__init__()
        self.stack, self.flops = stack, flops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack and isinstance(self.stack[-1][1], Experts):
            return out  # counted analytically by the Experts hook
        n = matmul_flops(func, args, kwargs, out)
        if n:
            name, module = self.stack[-1] if self.stack else ("", None)
            key = (name, type(module).__name__ if module is not None else "functional")
            self.flops[key] = self.flops.get(key, 0) + n
        return out


@dataclass
class Estimate:
    """FLOPs and memory of one training step on a given batch (see the module docstring).

    Attributes:
        forward_flops: matrix-product FLOPs of one forward on the batch.
        batch_size: samples in the batch (the first input's first dimension).
        by_module: forward FLOPs per module name (the innermost module that ran the product).
        by_type: forward FLOPs per module class (``Linear``, ``Attention``, ``Experts``, ...).
        params, trainable_params: parameter counts.
        param_bytes, grad_bytes, optimizer_bytes, activation_bytes: memory in bytes (optimizer: AdamW).
    """

    forward_flops: int
    batch_size: int
    by_module: Dict[str, int] = field(default_factory=dict)
    by_type: Dict[str, int] = field(default_factory=dict)
    params: int = 0
    trainable_params: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0

    @property
    def training_flops(self) -> int:
        """FLOPs of one training step (forward + backward) on the batch: ``3 x forward``."""
        return TRAINING_MULTIPLIER * self.forward_flops

    @property
    def training_flops_per_sample(self) -> float:
        return self.training_flops / self.batch_size

    @property
    def forward_flops_per_sample(self) -> float:
        return self.forward_flops / self.batch_size

    @property
    def training_bytes(self) -> int:
        """Parameters + gradients + optimizer state + saved activations of one step."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def seconds_per_step(self, flops_per_second: float) -> float:
        """Time of one training step at a sustained rate (small models reach a fraction of a peak)."""
        if not flops_per_second > 0:
            raise ValueError(f"flops_per_second must be positive, got {flops_per_second!r}")
        return self.training_flops / flops_per_second

    def summary(self) -> str:
        """A few readable lines: FLOPs per step and per sample, the largest parts, the memory."""
        lines = [
            f"training step (batch {self.batch_size}): {_si(self.training_flops)}FLOP "
            f"({_si(self.training_flops_per_sample)}FLOP per sample; forward {_si(self.forward_flops)}FLOP)",
            "forward by layer type: " + ", ".join(
                f"{k} {100 * v / max(self.forward_flops, 1):.0f}%"
                for k, v in sorted(self.by_type.items(), key=lambda kv: -kv[1])),
            f"memory: parameters {_si(self.param_bytes)}B ({self.params:,}), gradients {_si(self.grad_bytes)}B, "
            f"AdamW state {_si(self.optimizer_bytes)}B, saved activations {_si(self.activation_bytes)}B; "
            f"total {_si(self.training_bytes)}B",
        ]
        return "\n".join(lines)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def estimate(model: nn.Module, *inputs: Any, **kwargs: Any) -> Estimate:
    """Run one forward of ``model(*inputs, **kwargs)`` and estimate one training step on that batch.

    The forward runs with gradients on (to see what autograd saves) and no backward; the model's
    train/eval mode is left as it is (use ``model.train()`` for training figures: dropout, routers'
    training behaviour). Returns an :class:`Estimate`.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"estimate: model must be an nn.Module, got {type(model).__name__}")
    first = next((t for t in list(inputs) + list(kwargs.values()) if isinstance(t, Tensor)), None)
    if first is None or first.dim() == 0:
        raise ValueError("estimate: give at least one batched input tensor (its first dimension is the batch)")
    stack: List[Tuple[str, nn.Module]] = []
    flops: Dict[Tuple[str, str], int] = {}
    handles = []

    def push(name):
        def pre(module, args):
            stack.append((name, module))
            if isinstance(module, Experts) and len(args) >= 2:
                key = (name, "Experts")
                flops[key] = flops.get(key, 0) + _experts_flops(module, args[1])
        return pre

    def pop(module, args, out):
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(push(name)))
        handles.append(module.register_forward_hook(pop, always_call=True))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.device.type != "meta":
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with _Counter(stack, flops):
                model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    by_module: Dict[str, int] = {}
    by_type: Dict[str, int] = {}
    for (name, kind), n in flops.items():
        by_module[name] = by_module.get(name, 0) + n
        by_type[kind] = by_type.get(kind, 0) + n
    all_params = list(model.parameters())
    trainable = [p for p in all_params if p.requires_grad]
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return Estimate(
        forward_flops=sum(flops.values()),
        batch_size=int(first.shape[0]),
        by_module=by_module,
        by_type=by_type,
        params=sum(p.numel() for p in all_params),
        trainable_params=sum(p.numel() for p in trainable),
        param_bytes=nbytes(all_params),
        grad_bytes=nbytes(trainable),
        optimizer_bytes=2 * sum(p.numel() * 4 for p in trainable),  # AdamW moments, float32
        activation_bytes=sum(saved.values()),
    )
