"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): start an MoE from a trained dense model.

Every routed expert of an upcycled layer starts as a copy of the dense FFN it replaces (optionally
plus a little independent noise, so the experts can drift apart faster); the gate starts from
scratch (the kit's small normal init, ``moe_lite.layers.GATE_INIT_STD``); every other weight is the
dense model's. Continued training then reaches the MoE's gains for a fraction of the from-scratch cost.

Output at initialisation (no noise): with identical experts the routed part is
``sum_e w_e FFN(x) = (sum_e w_e) FFN(x)``, so the upcycled model computes exactly the dense model's
function when every token's weights sum to one: ``TopK(k, renormalize=True)`` (the default here),
``BiasBalanced(scale=1)``, ``Hash``, ``NullExperts(..., renormalize=True)`` for tokens that keep a real
expert. It does NOT for routers whose weights do not sum to one (``TopK`` without ``renormalize``,
``Switch``, ``TopP``, ``ExpertChoice``, ``Race``, ``BalancedAssignment``), nor where tokens are
dropped (``Capacity``, ``Switch``): there each token's FFN output is scaled by its weight sum.

Shared experts (``num_shared``) are copies too; to keep the sum equal to the dense FFN, the output
projections (and output biases) of the routed experts and of each shared expert are scaled by
``1 / (num_shared + 1)`` (each of the ``num_shared + 1`` parts then adds ``FFN(x) / (num_shared + 1)``).

:func:`upcycle_ffn` / :func:`load_ffn_` work on one layer (any model); :func:`upcycle` turns a dense
:class:`~moe_lite.models.vit.ViT` into an MoE ViT built from :func:`upcycled_config`, so the result is
an ordinary ViT whose ``config`` describes it (``ViT(upcycled_config(...))`` is the same model trained
from scratch, the control of an upcycling study).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from .layers import FFN, MoE
from .models.vit import ViT, ViTConfig, resolve_placement

__all__ = ["upcycle", "upcycled_config", "upcycle_ffn", "load_ffn_", "UPCYCLE_ROUTER_KWARGS"]

#: router kwargs of :func:`upcycled_config`'s default router ``"topk"``: top-2, weights renormalised
#: over the two (they sum to one, so the upcycled model starts as the dense one).
UPCYCLE_ROUTER_KWARGS: Mapping[str, Any] = {"k": 2, "renormalize": True}


def _check_noise(noise_std: Any) -> float:
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) \
            or noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    return float(noise_std)


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _repeat_hidden(t: Tensor, times: int, chunks: int, dim: int) -> Tensor:
    """``times`` copies of the hidden units of ``t`` along ``dim``, chunk by chunk: SwiGLU's
    ``fc_in`` holds ``[gate | up]`` (2 chunks), and a wider SwiGLU must hold ``[gate x times | up x times]``."""
    return torch.cat([torch.cat([c] * times, dim=dim) for c in t.chunk(chunks, dim=dim)], dim=dim)


@torch.no_grad()
def load_ffn_(moe: MoE, ffn: FFN, noise_std: float = 0.0, generator: Optional[torch.Generator] = None) -> MoE:
    """Copy the dense ``ffn`` into every routed and shared expert of ``moe`` (in place); return ``moe``.

    ``moe`` must match ``ffn``: same ``dim``, expert ``hidden`` (and ``shared_hidden``) = the FFN's
    hidden width, same activation, biases in both or neither. Output projections and output biases
    are scaled by ``1 / (num_shared + 1)`` (see the module docstring). ``noise_std``: add
    independent ``N(0, noise_std²)`` noise to every routed expert's ``w_in`` and ``w_out`` after the
    copy (drawn with ``generator``, or torch's global generator). The gate and router are untouched.
    """
    noise_std = _check_noise(noise_std)
    if not isinstance(moe, MoE) or not isinstance(ffn, FFN):
        raise ValueError(f"load_ffn_ needs an MoE and an FFN, got {type(moe).__name__} and {type(ffn).__name__}")
    experts = moe.experts
    mismatch = {name: (a, b) for name, a, b in (
        ("dim", experts.dim, ffn.dim), ("hidden", experts.hidden, ffn.hidden),
        ("activation", experts.activation, ffn.activation),
        ("bias", experts.b_in is not None, ffn.fc_in.bias is not None),
        ("shared_hidden", moe.shared_hidden if moe.shared is not None else ffn.hidden, ffn.hidden)) if a != b}
    if mismatch:
        raise ValueError("load_ffn_: the MoE does not match the FFN (MoE value, FFN value): "
                         + ", ".join(f"{k}={v}" for k, v in mismatch.items()))
    share = 1.0 / (moe.num_shared + 1)
    w_in, b_in = ffn.fc_in.weight, ffn.fc_in.bias  # [H_in, D], [H_in]
    w_out = ffn.fc_out.weight * share  # [D, H]
    b_out = None if ffn.fc_out.bias is None else ffn.fc_out.bias * share
    experts.load_dense_(w_in, w_out, b_in, b_out)
    if noise_std > 0:
        for w in (experts.w_in, experts.w_out):
            w.add_(torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device) * noise_std)
    if moe.shared is not None:  # one FFN holding num_shared copies of the hidden units
        n, chunks = moe.num_shared, 2 if ffn.activation == "swiglu" else 1
        moe.shared.fc_in.weight.copy_(_repeat_hidden(w_in, n, chunks, dim=0))
        moe.shared.fc_out.weight.copy_(_repeat_hidden(w_out, n, 1, dim=1))
        if b_in is not None:
            moe.shared.fc_in.bias.copy_(_repeat_hidden(b_in, n, chunks, dim=0))
            moe.shared.fc_out.bias.copy_(b_out * n)  # added once for the n copies
    return moe


def upcycle_ffn(ffn: FFN, num_experts: int, router: nn.Module, *, num_shared: int = 0, noise_std: float = 0.0,
                generator: Optional[torch.Generator] = None, **moe_kwargs: Any) -> MoE:
    """A new :class:`~moe_lite.layers.MoE` whose experts are copies of ``ffn`` (see :func:`load_ffn_`).

    The MoE takes the FFN's width, hidden width, activation and bias, ``num_experts`` routed experts
    routed by ``router``, ``num_shared`` shared experts; ``moe_kwargs`` go to ``MoE`` (``gate``,
    ``losses``, ``dispatch``). It lives on the FFN's device and dtype.
    """
    if not isinstance(ffn, FFN):
        raise ValueError(f"upcycle_ffn needs a moe_lite.layers.FFN, got {type(ffn).__name__}")
    _check_count("num_experts", num_experts, 1)
    _check_count("num_shared", num_shared, 0)
    weight = ffn.fc_in.weight
    moe = MoE(ffn.dim, ffn.hidden, num_experts, router, num_shared, activation=ffn.activation,
              bias=ffn.fc_in.bias is not None, **moe_kwargs).to(device=weight.device, dtype=weight.dtype)
    return load_ffn_(moe, ffn, noise_std, generator)


def upcycled_config(config: Any, *, num_experts: int, router: Any = "topk",
                    router_kwargs: Optional[Mapping[str, Any]] = None, placement: Any = "all", num_shared: int = 0,
                    moe_losses: Optional[Mapping[str, float]] = None) -> Any:
    """The :class:`~moe_lite.models.vit.ViTConfig` of the dense ``config`` upcycled at ``placement``.

    Everything but the MoE fields is ``config``'s. Routed (and shared) experts take the hidden width
    of the dense FFNs they replace, which must be one width. ``router`` / ``router_kwargs``: as in
    ``ViTConfig`` (a name, or a zero-argument factory with no kwargs); ``"topk"`` without kwargs is
    :data:`UPCYCLE_ROUTER_KWARGS` (top-2, renormalised). ``placement``: as ``ViTConfig.moe_layers``
    (Komatsuzaki et al. upcycle a subset of the MLP layers, e.g. ``"every-2"``; ViMoE the last ones,
    ``"last-2"``). ``moe_losses``: None = ``{"load_balance": 1e-2}`` (as :func:`vimoe_config`).
    ``ValueError`` when ``config`` already has MoE blocks or the upcycled widths differ.
    """
    if not isinstance(config, ViTConfig):
        raise ValueError(f"upcycled_config needs a ViTConfig, got {type(config).__name__}")
    if config.moe_block_indices:
        raise ValueError(f"upcycle needs a dense ViT (moe_layers='none'), got moe_layers={config.moe_layers!r}")
    _check_count("num_experts", num_experts, 1)
    _check_count("num_shared", num_shared, 0)
    indices = resolve_placement(placement, config.depth)
    if not indices:
        raise ValueError(f"placement {placement!r} selects no block to upcycle")
    widths = sorted({config.dense_hidden(i) for i in indices})
    if len(widths) > 1:
        raise ValueError(f"the FFNs of blocks {indices} have different widths {widths}: experts share one width")
    if router_kwargs is None and router == "topk":
        router_kwargs = dict(UPCYCLE_ROUTER_KWARGS)
    return dataclasses.replace(
        config, moe_layers=placement, num_experts=num_experts, expert_hidden=widths[0], router=router,
        router_kwargs=None if router_kwargs is None else dict(router_kwargs), num_shared=num_shared,
        shared_hidden=None, moe_losses=dict({"load_balance": 1e-2} if moe_losses is None else moe_losses),
    )


def upcycle(model: nn.Module, *, num_experts: int, router: Any = "topk",
            router_kwargs: Optional[Mapping[str, Any]] = None, placement: Any = "all", noise_std: float = 0.0,
            num_shared: int = 0, moe_losses: Optional[Mapping[str, float]] = None,
            generator: Optional[torch.Generator] = None) -> nn.Module:
    """Sparse upcycling of a dense :class:`~moe_lite.models.vit.ViT`: a NEW ViT (``model`` is untouched).

    The new model is ``ViT(upcycled_config(model.config, ...))`` (arguments as there) carrying
    ``model``'s weights: every non-MoE weight copied, each upcycled block's experts copies of its
    dense FFN (:func:`load_ffn_`, with ``noise_std`` and ``generator``), gates and routers fresh. It
    has ``model``'s device, dtype and train / eval mode. With the default router (top-2, renormalised)
    and no noise its output equals ``model``'s (see the module docstring for which routers keep that).
    """
    if not isinstance(model, ViT):
        raise ValueError(f"upcycle needs a dense moe_lite ViT, got {type(model).__name__}")
    noise_std = _check_noise(noise_std)
    config = upcycled_config(model.config, num_experts=num_experts, router=router, router_kwargs=router_kwargs,
                             placement=placement, num_shared=num_shared, moe_losses=moe_losses)
    weight = next(model.parameters())
    new = ViT(config).to(device=weight.device, dtype=weight.dtype)
    upcycled = [f"blocks.{i}.mlp." for i in config.moe_block_indices]
    state: Dict[str, Tensor] = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(upcycled))}
    missing, unexpected = new.load_state_dict(state, strict=False)
    stray = [k for k in missing if not k.startswith(tuple(upcycled))] + list(unexpected)
    if stray:  # cannot happen for a ViT and its own config; a guard against silent partial copies
        raise ValueError(f"upcycle: weights that do not carry over: {stray}")
    for i in config.moe_block_indices:
        load_ffn_(new.blocks[i].mlp, model.blocks[i].mlp, noise_std, generator)
    return new.train(model.training)
