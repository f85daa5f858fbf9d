"""Expert weights and dispatch backends, router-agnostic.

:class:`Experts` holds ``E`` MLP experts as stacked weights and applies them to a list of
assignments::

    y[n] = sum over assignments a with token[a] == n of  weight[a] * expert_{expert[a]}(x[n])

A token with no assignment gets 0. Nothing here knows about routers: a :class:`~moe_lite.routing.Routing`
supplies ``token``, ``expert`` and ``weight``.

Axis legend: n flat tokens, a assignments, r layout rows, e experts, c capacity (rows per expert in the
padded layout), d model width, h expert hidden width (``h_in = 2h`` for SwiGLU).

Backends (``dispatch=``):

``"loop"``
    The readable reference: a Python loop over experts with plain autograd. Each expert finds its
    assignments, gathers its tokens, runs its MLP, scales by the weights and index-adds into the output.
    Per-expert weights come from ``unbind`` on the stacked tensors, never ``W[e]`` inside the loop
    (``W[e]`` in a loop makes backward accumulate E full-size zero-padded gradients: ~10x slower).
``"sorted"``
    Sort assignments by expert once, gather the token rows, run one dense matmul per contiguous
    per-expert chunk, combine with one ``index_add``. Works for every dtype, device and width.
``"grouped_mm"``
    The same sorted layout, with ``torch.nn.functional.grouped_mm`` doing all E matmuls in one call.
    It needs float32/bf16/fp16, 16-byte-aligned inner widths (``d`` and ``h`` multiples of 4 in float32,
    8 in half precision) and ``A > 0``; otherwise the layer falls back to ``"sorted"``.
``"padded"``
    Every expert gets ``c = max tokens per expert`` rows (missing rows are padding with weight 0) so
    that the E matmuls become one ``bmm`` on ``[E, c, *]``. Costs ``E*c - A`` wasted rows, which is cheap
    when the load is balanced and very expensive when one expert takes most tokens.
``"auto"`` (default)
    Chooses per call from the shapes and ``torch.get_num_threads()`` (:func:`choose_dispatch`): on CPU
    ``"padded"`` while its waste ``E*c/A - 1`` is within :func:`padded_waste_limit` (5%; 25% with
    several threads and ``E >= 32``), else ``"grouped_mm"`` when valid, else ``"sorted"``; on CUDA
    ``"grouped_mm"`` when valid (no host sync), else the same rule.
    Measured with ``python -m moe_lite.bench`` on a quiet 2-core AMD EPYC (MKL), fp32, 3136 tokens, d=128,
    MoE/dense step-time ratios: with no waste (ExpertChoice) padded ~= grouped_mm at E=16 (1.23 vs 1.26)
    and 20% faster at E=64 with 2 threads (2.73 vs 3.41; ~equal on 1 thread), i.e. one ``bmm`` beats E
    small matmuls when the matmuls are small and threaded; with top-k's init waste (22% at E=16, 61% at
    E=64) padded loses (1.53 vs 1.34; 3.15 vs 2.89). ``grouped_mm`` and the ``sorted`` loop are within
    noise of each other (grouped_mm usually ahead). On a CPU shared with other jobs the picture changes:
    every parallel region waits for all threads to be scheduled, so E small threaded matmuls degrade far
    more than one ``bmm``; use one thread there (the rule then rarely pads).

The three fast backends share one fused autograd function (:class:`_ExpertMLP`): one gather of the
token rows, two grouped matmuls, the activation, one ``index_add``; its backward gathers the incoming
gradient with ``index_select`` (so a stride-0 gradient from a bare ``.sum().backward()`` is made
contiguous before any grouped matmul sees it) and computes only the gradients that are needed. When
a graph of the gradient is asked for (``create_graph=True``: gradient penalties, Hessian-vector
products), the backward instead re-runs the ``"loop"`` math with plain autograd on the saved inputs, so
second derivatives are exact (and slower). The ``"loop"`` backend is the plain-autograd reference that
tests compare it with.

Precision: every backend runs in one compute dtype, :meth:`Experts.compute_dtype`: autocast's dtype when
autocast is on for ``x``'s device (the rows, routing weights and expert weights are cast to it, with
gradients flowing back to the float32 parameters in float32), else ``x``'s dtype, which must then be the
weights' (a module converted with ``.to(torch.bfloat16)`` takes bf16 rows). The output has that dtype.

Fine-grained experts: :func:`x_in_y` gives the "x-in-y" configuration of the Expert Race paper.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Experts",
    "x_in_y",
    "FineGrained",
    "choose_dispatch",
    "grouped_mm_supported",
    "ACTIVATIONS",
    "DISPATCHES",
    "PADDED_MAX_WASTE",
    "MANY_EXPERTS",
    "padded_waste_limit",
]

ACTIVATIONS = ("gelu", "swiglu")
DISPATCHES = ("auto", "loop", "sorted", "grouped_mm", "padded")
#: Waste limits of the padded layout under ``"auto"`` (see :func:`padded_waste_limit`).
PADDED_MAX_WASTE = MappingProxyType({"single_thread": 0.05, "multi_thread": 0.05, "multi_thread_many_experts": 0.25})
#: From this many experts on, multi-threaded ``"auto"`` tolerates ``multi_thread_many_experts`` waste.
MANY_EXPERTS = 32


# ---- fine-grained configurations ------------------------------------------------------------------
class FineGrained(NamedTuple):
    """An "x-in-y" MoE configuration: ``num_experts`` experts of width ``hidden``, ``k`` active."""

    num_experts: int
    hidden: int
    k: int


def x_in_y(x: int, y: int, dense_hidden: int) -> FineGrained:
    """The Expert Race paper's "x-in-y" fine-grained configuration (Yuan et al. 2025, Table 5).

    ``y`` experts, each an MLP whose hidden width is the dense FFN's divided by ``x``, and ``k = x``
    active experts per token: the active FLOPs equal the dense FFN's, the total expert parameters are
    ``y / x`` times the dense FFN's. Example: ``x_in_y(2, 8, 512) == (8, 256, 2)``.

    Returns:
        ``FineGrained(num_experts=y, hidden=dense_hidden // x, k=x)`` (a tuple).
    Raises:
        ValueError: unless ``1 <= x <= y`` and ``dense_hidden`` is a positive multiple of ``x``.
    """
    for name, v in (("x", x), ("y", y), ("dense_hidden", dense_hidden)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"x_in_y: {name} must be a positive int, got {v!r}")
    if x > y:
        raise ValueError(f"x_in_y: x (active experts, {x}) cannot exceed y (experts, {y})")
    if dense_hidden % x:
        raise ValueError(f"x_in_y: dense_hidden={dense_hidden} is not divisible by x={x}")
    return FineGrained(num_experts=y, hidden=dense_hidden // x, k=x)


# ---- activations (shared by every backend) --------------------------------------------------------
def _act(h_in: Tensor, activation: str) -> Tensor:
    """``[*, h_in] -> [*, h]``: GELU, or SwiGLU ``silu(gate) * up`` with ``h_in = [gate | up]``."""
    if activation == "gelu":
        return F.gelu(h_in)
    gate, up = h_in.chunk(2, dim=-1)
    return F.silu(gate) * up


def _act_backward(grad: Tensor, h_in: Tensor, activation: str, inplace: bool = False) -> Tensor:
    """Gradient of :func:`_act` w.r.t. its input: ``grad [*, h]`` -> ``[*, h_in]``.

    ``inplace``: GELU may overwrite ``grad`` with the result (elementwise, same shape).
    """
    if activation == "gelu":
        if inplace:
            return torch.ops.aten.gelu_backward.grad_input(grad, h_in, grad_input=grad)
        return torch.ops.aten.gelu_backward(grad, h_in)
    gate, up = h_in.chunk(2, dim=-1)
    out = torch.empty_like(h_in)
    g_gate, g_up = out.chunk(2, dim=-1)
    torch.mul(grad, F.silu(gate), out=g_up)
    torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=g_gate)
    return out


def _loop_mlp(x, token, expert, weight, w_in, w_out, b_in, b_out, activation: str) -> Tensor:
    """The ``"loop"`` backend (plain autograd, one MLP per expert): ``x [N, D]`` -> ``[N, D]``.

    ``token``, ``expert``, ``weight``: ``[A]``; ``w_in [E, D, H_in]``, ``w_out [E, H, D]``, biases
    ``[E, *]`` or None. Per-expert weights come from ``unbind``, never ``W[e]`` (see the module docstring).
    Raises ValueError if an expert index lies outside ``[0, E)`` (found without an extra host sync: the
    assignments the experts took must add up to ``A``).
    """
    num_experts = w_in.shape[0]
    out = x.new_zeros(x.shape)
    b_in = b_in.unbind(0) if b_in is not None else [None] * num_experts
    b_out = b_out.unbind(0) if b_out is not None else [None] * num_experts
    taken = 0
    for e, (w1, w2, b1, b2) in enumerate(zip(w_in.unbind(0), w_out.unbind(0), b_in, b_out)):
        sel = (expert == e).nonzero().squeeze(1)  # assignments of expert e (possibly none)
        taken += sel.numel()
        rows = token[sel]
        h_in = x[rows] @ w1 if b1 is None else torch.addmm(b1, x[rows], w1)
        y = _act(h_in, activation) @ w2
        if b2 is not None:
            y = y + b2
        out = out.index_add(0, rows, y * weight[sel, None])
    if taken != expert.numel():
        raise ValueError(
            f"Experts: expert indices must lie in [0, {num_experts}), "
            f"{expert.numel() - taken} of {expert.numel()} assignments lie outside"
        )
    return out


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the autocast region active for ``device_type``, or None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _no_autocast(device_type: str):
    """A context that turns autocast off for ``device_type`` (a no-op when it is off already)."""
    if _autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


# ---- availability -----------------------------------------------------------------------------------
def grouped_mm_supported(x: Tensor, dim: int, hidden_in: int, hidden: int, num_assignments: int) -> bool:
    """Whether ``F.grouped_mm`` can run the expert MLP for these shapes on ``x``'s device and dtype.

    Needs: the op exists; float32/bf16/fp16 (on CUDA: bf16/fp16 on compute capability >= 8.0);
    every inner width (``dim``, ``hidden_in``, ``hidden``) a multiple of 16 bytes; ``A > 0``.
    """
    if not hasattr(F, "grouped_mm") or num_assignments == 0:
        return False
    if x.device.type == "cuda":
        if x.dtype not in (torch.bfloat16, torch.float16):
            return False
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
    else:
        return False
    per = 16 // x.element_size()
    return all(v % per == 0 for v in (dim, hidden_in, hidden))


def padded_waste_limit(num_experts: int, num_threads: int) -> float:
    """Largest padding waste ``E*c/A - 1`` for which ``"auto"`` picks the padded layout on CPU."""
    if num_threads <= 1:
        return PADDED_MAX_WASTE["single_thread"]
    if num_experts >= MANY_EXPERTS:
        return PADDED_MAX_WASTE["multi_thread_many_experts"]
    return PADDED_MAX_WASTE["multi_thread"]


def choose_dispatch(
    x: Tensor,
    dim: int,
    hidden_in: int,
    hidden: int,
    num_assignments: int,
    num_experts: int,
    max_load: Optional[int],
    num_threads: Optional[int] = None,
) -> str:
    """The ``"auto"`` rule (see the module docstring).

    Args:
        max_load: the largest number of assignments of one expert (``c``), or None if unknown.
        num_threads: CPU threads; default ``torch.get_num_threads()``.
    """
    gmm = grouped_mm_supported(x, dim, hidden_in, hidden, num_assignments)
    threads = torch.get_num_threads() if num_threads is None else num_threads
    limit = padded_waste_limit(num_experts, threads)
    pad_ok = max_load is not None and num_experts * max_load <= (1.0 + limit) * num_assignments
    if x.device.type == "cuda" and gmm:
        return "grouped_mm"
    if pad_ok or num_assignments == 0:
        return "padded"
    return "grouped_mm" if gmm else "sorted"


# ---- the dispatch plan --------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Where each assignment goes in the expert-major layout of ``R`` rows.

    Attributes:
        layout: ``"sorted"``, ``"grouped_mm"`` or ``"padded"``.
        row: long ``[A]``, the layout row of each assignment.
        src: long ``[R]``, the token of each layout row (padding rows point at token 0, weight 0).
        row_expert: long ``[R]``, the expert of each layout row.
        counts: rows of each expert, ``[E]`` python ints (sorted / grouped_mm layouts).
        offsets: int32 ``[E]``, cumulative ``counts`` (grouped_mm).
        capacity: rows per expert (padded layout).
    """

    layout: str
    row: Tensor
    src: Tensor
    row_expert: Tensor
    num_experts: int
    counts: Optional[List[int]] = None
    offsets: Optional[Tensor] = None
    capacity: int = 0

    @property
    def num_rows(self) -> int:
        return int(self.src.numel())


def _sort_by_expert(token: Tensor, expert: Tensor, num_experts: int):
    """``(sorted expert [A], order [A], counts [E])``: assignments ordered by expert (stable).

    On CPU the counts come from ``bincount`` (which also validates the range); elsewhere from an
    ``index_add`` that needs no host sync (``bincount`` on CUDA reads the max back to the host).
    """
    if expert.device.type == "cpu":
        try:
            counts = torch.bincount(expert, minlength=num_experts)
        except RuntimeError as err:  # negative indices
            raise ValueError(f"expert indices must lie in [0, {num_experts}): {err}") from None
        if counts.numel() != num_experts:
            raise ValueError(f"expert indices must lie in [0, {num_experts}), got max {int(expert.max())}")
    else:
        counts = torch.zeros(num_experts, dtype=torch.long, device=expert.device)
        counts.index_add_(0, expert, torch.ones_like(expert))
    expert_sorted, order = torch.sort(expert, stable=True)
    return expert_sorted, order, counts


def _make_plan(layout: str, token: Tensor, expert: Tensor, num_experts: int, sorted_info=None) -> _Plan:
    """Build the :class:`_Plan` for ``layout`` (``sorted_info`` from :func:`_sort_by_expert`, optional)."""
    num_assign = token.numel()
    expert_sorted, order, counts = sorted_info or _sort_by_expert(token, expert, num_experts)
    positions = torch.arange(num_assign, device=token.device)
    if layout == "padded":
        capacity = int(counts.max()) if num_assign else 0
        start = counts.cumsum(0) - counts  # [E] first sorted position of each expert
        slot_sorted = expert_sorted * capacity + (positions - start[expert_sorted])
        row = torch.empty_like(order).index_copy_(0, order, slot_sorted)
        src = torch.zeros(num_experts * capacity, dtype=torch.long, device=token.device)
        src.index_copy_(0, slot_sorted, token[order])
        row_expert = torch.arange(num_experts, device=token.device).repeat_interleave(capacity)
        return _Plan(layout, row, src, row_expert, num_experts, capacity=capacity)
    row = torch.empty_like(order).index_copy_(0, order, positions)
    offsets = counts.cumsum(0).to(torch.int32) if layout == "grouped_mm" else None
    count_list = counts.tolist() if layout == "sorted" else None
    return _Plan(layout, row, token[order], expert_sorted, num_experts, counts=count_list, offsets=offsets)


# ---- grouped matmuls on a plan ------------------------------------------------------------------------
def _mm_rows(plan: _Plan, a: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Per-expert product of layout rows: ``a [R, K]``, ``w [E, K, M]`` -> ``[R, M]``.

    ``out``: optional contiguous ``[R, M]`` buffer to write into (reusing a dead temporary keeps the
    peak memory, and with it the page faults of fresh allocations, down); grouped_mm ignores it.
    """
    rows, m = a.shape[0], w.shape[-1]
    if plan.layout == "grouped_mm":
        return F.grouped_mm(a, w, offs=plan.offsets)
    if out is None:
        out = a.new_empty(rows, m)
    if plan.layout == "padded":
        shape = (plan.num_experts, plan.capacity)
        torch.bmm(a.view(*shape, a.shape[1]), w, out=out.view(*shape, m))
        return out
    for a_e, w_e, out_e in zip(a.split(plan.counts), w.unbind(0), out.split(plan.counts)):
        torch.mm(a_e, w_e, out=out_e)
    return out


def _mm_weight_grad(plan: _Plan, a: Tensor, b: Tensor) -> Tensor:
    """Per-expert ``a_eᵀ b_e`` of layout rows: ``a [R, K]``, ``b [R, M]`` -> ``[E, K, M]``."""
    num_e = plan.num_experts
    if plan.layout == "padded":
        a_e = a.view(num_e, plan.capacity, a.shape[1])
        return torch.bmm(a_e.transpose(1, 2), b.view(num_e, plan.capacity, b.shape[1]))
    if plan.layout == "grouped_mm":
        return F.grouped_mm(a.t(), b, offs=plan.offsets)
    out = a.new_empty(num_e, a.shape[1], b.shape[1])
    for a_e, b_e, out_e in zip(a.split(plan.counts), b.split(plan.counts), out.unbind(0)):
        torch.mm(a_e.t(), b_e, out=out_e)
    return out


class _ExpertMLP(torch.autograd.Function):
    """Fused expert MLP over a :class:`_Plan` (layouts ``sorted``, ``grouped_mm``, ``padded``).

    Forward, for layout rows r (``xs = x[src]``, ``w_r`` = weight of the row's assignment, 0 for padding)::

        h_in = xs @ w_in[e_r] + b_in[e_r]                      [R, h_in]
        h    = act(h_in)                                        [R, h]
        y_r  = w_r * (h @ w_out[e_r] + b_out[e_r])              [R, d]
        out  = index_add of the rows into their tokens          [N, d]

    The routing weight multiplies the narrower of the two sides: ``(w_r * h) @ w_out`` when ``h <= d``
    (fine-grained experts), ``w_r * (h @ w_out)`` otherwise; the backward needs one more elementwise pass
    of that width for the weight's gradient.

    All tensor inputs share one dtype (:meth:`Experts.forward` casts them) and autocast is off inside,
    forward and backward: the ``out=`` matmuls must not see a second dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, w_in, w_out, b_in, b_out, plan: _Plan, activation: str):
        xs = x.index_select(0, plan.src)  # [R, D]
        w_rows = weight.new_zeros(plan.num_rows).index_copy_(0, plan.row, weight)  # [R], 0 on padding
        w_col = w_rows[:, None]
        h_in = _mm_rows(plan, xs, w_in)  # [R, H_in]
        if b_in is not None:
            h_in += b_in.index_select(0, plan.row_expert)
        h = _act(h_in, activation)  # [R, H]
        b_rows = b_out.index_select(0, plan.row_expert) if b_out is not None else None
        weight_on_hidden = h.shape[1] <= x.shape[1]
        if weight_on_hidden:
            hw = h * w_col
            y = _mm_rows(plan, hw, w_out)  # [R, D], already weighted
            if b_rows is not None:
                y.addcmul_(w_col, b_rows)
            saved = hw  # dL/dw_out = (w h)ᵀ g
        else:
            y_unweighted = _mm_rows(plan, h, w_out)
            if b_rows is not None:
                y_unweighted += b_rows
            y = y_unweighted * w_col
            saved = y_unweighted  # dL/dw_r = <g_r, y_r before weighting>
            h = None  # the widest activation: recomputed by the backward (lower peak memory)
        out = x.new_zeros(x.shape).index_add_(0, plan.src, y)
        # x, weight and b_in only serve a double backward (x and weight are inputs: no extra memory)
        ctx.save_for_backward(xs, w_rows, h_in, h, saved, w_in, w_out, b_out, x, weight, b_in)
        ctx.plan, ctx.activation, ctx.num_tokens = plan, activation, x.shape[0]
        ctx.weight_on_hidden = weight_on_hidden
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with _no_autocast(grad_out.device.type):
            if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
                return _ExpertMLP._differentiable_backward(ctx, grad_out)
            return _ExpertMLP._fused_backward(ctx, grad_out)

    @staticmethod
    def _differentiable_backward(ctx, grad_out):
        """Gradients with a graph (for double backward): the loop math re-run with plain autograd."""
        x, weight, b_in = ctx.saved_tensors[8:]
        w_in, w_out, b_out = ctx.saved_tensors[5:8]
        plan = ctx.plan
        token, expert = plan.src[plan.row], plan.row_expert[plan.row]  # [A] each
        # Fresh aliases: gradients w.r.t. them are partial derivatives (x may also reach the output through
        # weight, e.g. via the gate; grad w.r.t. x itself would count that path twice), and they stay
        # differentiable functions of the originals.
        inputs = [None if t is None else t.view_as(t) for t in (x, weight, w_in, w_out, b_in, b_out)]
        needed = [t for t, need in zip(inputs, ctx.needs_input_grad[:6]) if need]
        out = _loop_mlp(inputs[0], token, expert, *inputs[1:], ctx.activation)
        grads = iter(torch.autograd.grad(out, needed, grad_out, create_graph=True, allow_unused=True))
        return (*(next(grads) if need else None for need in ctx.needs_input_grad[:6]), None, None)

    @staticmethod
    def _fused_backward(ctx, grad_out):
        xs, w_rows, h_in, h, saved, w_in, w_out, b_out = ctx.saved_tensors[:8]
        plan = ctx.plan
        need_x, need_w, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
        g_x = g_weight = g_w_in = g_w_out = g_b_in = g_b_out = None
        w_col = w_rows[:, None]
        need_inner = need_x or need_w_in or need_b_in
        # index_select returns a contiguous [R, D] even for a stride-0 (expanded) grad_out
        g = grad_out.index_select(0, plan.src)  # dL/dy_r  [R, D]
        if ctx.weight_on_hidden:
            hw = saved
            if need_w_out:
                g_w_out = _mm_weight_grad(plan, hw, g)  # [E, H, D]
            if need_b_out:
                g_b_out = torch.zeros(plan.num_experts, g.shape[1], dtype=g.dtype, device=g.device)
                g_b_out.index_add_(0, plan.row_expert, g * w_col)
            g_h = None
            if need_w or need_inner:
                g_h = _mm_rows(plan, g, w_out.transpose(1, 2))  # dL/d(w_r h)  [R, H]
            if need_w:
                g_weight = torch.linalg.vecdot(g_h, h)
                if b_out is not None:
                    g_weight += torch.linalg.vecdot(g, b_out.index_select(0, plan.row_expert))
            if g_h is not None:
                g_h.mul_(w_col)  # dL/dh
        else:
            y_unweighted = saved
            if need_w:
                g_weight = torch.linalg.vecdot(g, y_unweighted)
            g_scaled = g.mul_(w_col)  # dL/d(h @ w_out + b_out)
            if need_w_out:
                g_w_out = _mm_weight_grad(plan, _act(h_in, ctx.activation), g_scaled)  # h recomputed
            if need_b_out:
                g_b_out = torch.zeros(plan.num_experts, g.shape[1], dtype=g.dtype, device=g.device)
                g_b_out.index_add_(0, plan.row_expert, g_scaled)
            g_h = _mm_rows(plan, g_scaled, w_out.transpose(1, 2)) if need_inner else None
        if g_weight is not None:
            g_weight = g_weight.index_select(0, plan.row)
        if not need_inner:
            return g_x, g_weight, g_w_in, g_w_out, g_b_in, g_b_out, None, None
        g_h_in = _act_backward(g_h, h_in, ctx.activation, inplace=True)  # [R, H_in]
        if need_b_in:
            g_b_in = torch.zeros(plan.num_experts, g_h_in.shape[1], dtype=g_h_in.dtype, device=g_h_in.device)
            g_b_in.index_add_(0, plan.row_expert, g_h_in)
        if need_w_in:
            g_w_in = _mm_weight_grad(plan, xs, g_h_in)  # [E, D, H_in]
        if need_x:
            g_xs = _mm_rows(plan, g_h_in, w_in.transpose(1, 2), out=g)  # [R, D], g is dead by now
            g_x = grad_out.new_zeros(ctx.num_tokens, g_xs.shape[1]).index_add_(0, plan.src, g_xs)
        return g_x, g_weight, g_w_in, g_w_out, g_b_in, g_b_out, None, None


# ---- the module -------------------------------------------------------------------------------------
class Experts(nn.Module):
    """``E`` MLP experts with stacked weights, applied to (token, expert, weight) assignments.

    Args:
        num_experts: ``E``.
        dim: model width ``D``.
        hidden: expert hidden width ``H``.
        activation: ``"gelu"`` (``w_out(gelu(w_in x))``) or ``"swiglu"``
            (``w_out(silu(x W_gate) * (x W_up))``, with ``w_in = [W_gate | W_up]`` of width ``2H``).
        bias: add per-expert biases ``b_in [E, H_in]`` and ``b_out [E, D]`` (default False).

    Parameters: ``w_in [E, D, H_in]`` (``H_in = H``, or ``2H`` for SwiGLU), ``w_out [E, H, D]``
    (stored input-major, so ``x @ w_in[e]``; ``w_in[e]`` is ``nn.Linear(D, H_in).weight.T``), initialised
    like ``nn.Linear``: uniform in ``±1/sqrt(fan_in)``.

    After a forward, ``last_dispatch`` names the backend that actually ran.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("dim", dim), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Experts: {name} must be a positive int, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Experts: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.dim, self.hidden, self.activation = num_experts, dim, hidden, activation
        self.hidden_in = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, self.hidden_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        if bias:
            self.b_in = nn.Parameter(torch.empty(num_experts, self.hidden_in))
            self.b_out = nn.Parameter(torch.empty(num_experts, dim))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        self.last_dispatch: Optional[str] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, per expert: uniform in ``±1/sqrt(fan_in)``."""
        for w, b, fan_in in ((self.w_in, self.b_in, self.dim), (self.w_out, self.b_out, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"activation={self.activation!r}, bias={self.b_in is not None}"
        )

    @torch.no_grad()
    def load_dense_(self, w_in: Tensor, w_out: Tensor, b_in=None, b_out=None, experts=None) -> "Experts":
        """Copy one dense MLP into experts (all by default): upcycling, or tests against a dense FFN.

        Args take ``nn.Linear`` layouts: ``w_in [H_in, D]``, ``w_out [D, H]``, ``b_in [H_in]``,
        ``b_out [D]``; ``experts`` is an index or list of expert indices.
        """
        idx = slice(None) if experts is None else experts
        self.w_in[idx] = w_in.t()
        self.w_out[idx] = w_out.t()
        if (b_in is not None or b_out is not None) and self.b_in is None:
            raise ValueError("load_dense_: these experts have no bias (Experts(..., bias=True))")
        if self.b_in is not None:
            self.b_in[idx] = 0.0 if b_in is None else b_in
            self.b_out[idx] = 0.0 if b_out is None else b_out
        return self

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, token: Tensor, expert: Tensor, weight: Tensor, dispatch: str = "auto") -> Tensor:
        """Apply the experts to assignments.

        Args:
            x: ``[N, D]`` token rows.
            token: integer ``[A]``, row of ``x`` of each assignment (repeats allowed).
            expert: integer ``[A]``, expert in ``[0, E)`` of each assignment.
            weight: float ``[A]``, multiplies the expert's output (gradient flows into it).
            dispatch: one of ``DISPATCHES`` (see the module docstring).
        Returns:
            ``[N, D]`` in :meth:`compute_dtype`: ``y[n] = sum_{a: token[a]=n} weight[a] *
            expert_{expert[a]}(x[n])``, 0 for tokens without assignment.
        """
        self._check(x, token, expert, weight, dispatch)
        token, expert = token.long(), expert.long()
        dtype = self.compute_dtype(x)
        x, weight = x.to(dtype), weight.to(dtype)  # .to is a no-op where the dtype already matches
        params = [None if p is None else p.to(dtype) for p in (self.w_in, self.w_out, self.b_in, self.b_out)]
        with _no_autocast(x.device.type):  # everything is in `dtype` now; see _ExpertMLP
            return self._dispatch(x, token, expert, weight, params, dispatch)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the experts run in for rows ``x``: autocast's when it is on for x's device (float64
        rows excepted: autocast leaves them alone), else ``x.dtype``, which must equal the weights'."""
        amp = _autocast_dtype(x.device.type)
        if amp is not None and x.dtype != torch.float64:
            return amp
        if x.dtype != self.w_in.dtype:
            raise ValueError(
                f"Experts: x is {x.dtype} but the expert weights are {self.w_in.dtype}; convert the module "
                f"(.to({x.dtype})) or run under torch.autocast"
            )
        return x.dtype

    def _dispatch(self, x: Tensor, token: Tensor, expert: Tensor, weight: Tensor, params, dispatch: str) -> Tensor:
        """Run backend ``dispatch`` (after :meth:`forward` cast everything to one dtype)."""
        if dispatch == "loop":
            self.last_dispatch = "loop"
            return _loop_mlp(x, token, expert, weight, *params, self.activation)
        num_assign = token.numel()
        sorted_info = _sort_by_expert(token, expert, self.num_experts)
        if dispatch == "auto":
            max_load = None  # needs a host sync on CUDA: only computed where the rule reads it
            if num_assign and (x.device.type == "cpu" or not grouped_mm_supported(
                x, self.dim, self.hidden_in, self.hidden, num_assign
            )):
                max_load = int(sorted_info[2].max())
            dispatch = choose_dispatch(
                x, self.dim, self.hidden_in, self.hidden, num_assign, self.num_experts, max_load
            )
        elif dispatch == "grouped_mm" and not grouped_mm_supported(
            x, self.dim, self.hidden_in, self.hidden, num_assign
        ):
            dispatch = "sorted"  # documented fallback: misaligned widths, float64, A == 0, no op
        self.last_dispatch = dispatch
        plan = _make_plan(dispatch, token, expert, self.num_experts, sorted_info)
        return _ExpertMLP.apply(x, weight, *params, plan, self.activation)

    def _check(self, x: Tensor, token: Tensor, expert: Tensor, weight: Tensor, dispatch: str) -> None:
        if dispatch not in DISPATCHES:
            raise ValueError(f"Experts: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Experts: x must be [N, {self.dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"Experts: x must be floating point, got {x.dtype}")
        for name, t in (("token", token), ("expert", expert), ("weight", weight)):
            if t.dim() != 1:
                raise ValueError(f"Experts: {name} must be 1-D [A], got shape {tuple(t.shape)}")
        if not (token.numel() == expert.numel() == weight.numel()):
            raise ValueError(
                f"Experts: token, expert and weight must have the same length A, got "
                f"{token.numel()}, {expert.numel()}, {weight.numel()}"
            )
        for name, t in (("token", token), ("expert", expert)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"Experts: {name} must be an integer tensor, got {t.dtype}")
        if token.numel() and token.device.type == "cpu":  # on CUDA this would cost a host sync
            lo, hi = int(token.min()), int(token.max())
            if lo < 0 or hi >= x.shape[0]:
                raise ValueError(f"Experts: token indices must lie in [0, {x.shape[0]}), got [{lo}, {hi}]")
