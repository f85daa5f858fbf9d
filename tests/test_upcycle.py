"""Spec of sparse upcycling (issue 11 item 3; Komatsuzaki et al. 2022): experts start as copies of the
dense FFN, so the upcycled model computes the dense function when each token's weights sum to one."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_lite.layers import FFN, MoE
from moe_lite.models.vit import ViT, ViTConfig
from moe_lite.routers import BiasBalanced, Hash, NullExperts, Switch, TopK, TopP
from moe_lite.upcycle import load_ffn_, upcycle, upcycle_ffn, upcycled_config

F64 = torch.float64


def dense(seed: int = 0, **changes) -> ViT:
    torch.manual_seed(seed)
    config = ViTConfig(dim=16, depth=3, heads=2, mlp_hidden=24, patch_size=7, **changes)
    return ViT(config).eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def ffn(activation: str = "gelu", bias: bool = False, seed: int = 0) -> FFN:
    torch.manual_seed(seed)
    layer = FFN(6, 10, activation, bias=bias).double()
    if bias:  # nn.Linear's bias init is small: make it matter
        with torch.no_grad():
            layer.fc_in.bias.normal_()
            layer.fc_out.bias.normal_()
    return layer


# ---- the dense function is kept ---------------------------------------------------------------
@pytest.mark.parametrize("num_shared", [0, 1, 2])
@pytest.mark.parametrize("placement", ["all", "last-2", [0]])
def test_upcycled_vit_equals_dense_at_init(placement, num_shared):
    model = dense()
    up = upcycle(model, num_experts=4, placement=placement, num_shared=num_shared)
    assert up.moe_block_indices and all(up.blocks[i].is_moe for i in up.moe_block_indices)
    with torch.no_grad():
        assert (up(images()) - model(images())).abs().max() < 1e-6


def test_upcycled_vit_equals_dense_swiglu_float64():
    model = dense(activation="swiglu").double()
    up = upcycle(model, num_experts=3, num_shared=2)
    x = images().double()
    with torch.no_grad():
        assert torch.allclose(up(x), model(x), atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_shared", [0, 1, 3])
def test_upcycle_ffn_equals_ffn(activation, bias, num_shared):
    base = ffn(activation, bias)
    moe = upcycle_ffn(base, 4, TopK(2, renormalize=True), num_shared=num_shared)
    assert moe.experts.w_in.dtype == F64
    x = torch.randn(2, 5, 6, dtype=F64)
    with torch.no_grad():
        assert torch.allclose(moe(x), base(x), atol=1e-12)


@pytest.mark.parametrize("router", [
    lambda: Hash(4), lambda: BiasBalanced(4, 2), lambda: NullExperts(TopK(3, renormalize=True), 1, renormalize=True),
])
def test_other_routers_whose_weights_sum_to_one(router):
    base = ffn()
    torch.manual_seed(0)
    moe = upcycle_ffn(base, 4, router())
    moe.double()
    x = torch.randn(2, 5, 6, dtype=F64)
    with torch.no_grad():
        y = moe(x)
    kept = moe.routing.experts_per_token.reshape(2, 5) > 0  # null experts: a token may keep none
    assert torch.allclose(y[kept], base(x)[kept], atol=1e-12)


@pytest.mark.parametrize("router", [lambda: TopK(2), lambda: Switch(1.0), lambda: TopP(0.5)])
def test_weights_not_summing_to_one_scale_the_ffn(router):
    """The documented exception: each token gets (its weight sum) x FFN(x), not FFN(x)."""
    base = ffn()
    moe = upcycle_ffn(base, 4, router()).double()
    x = torch.randn(2, 8, 6, dtype=F64)
    with torch.no_grad():
        y = moe(x)
    r = moe.routing
    weight_sum = torch.zeros(r.num_tokens, dtype=F64).index_add(0, r.token, r.weight).reshape(2, 8, 1)
    assert torch.allclose(y, weight_sum * base(x), atol=1e-12)
    assert not torch.allclose(y, base(x), atol=1e-3)


# ---- what is copied ---------------------------------------------------------------------------
def test_upcycle_copies_weights_and_keeps_the_dense_model():
    model = dense()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    up = upcycle(model, num_experts=4, placement="last-1")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the dense model changed at {k}"
    new = up.state_dict()
    for k, v in before.items():
        if not k.startswith("blocks.2.mlp."):
            assert torch.equal(new[k], v), k
    experts = up.blocks[2].mlp.experts
    for e in range(4):
        assert torch.equal(experts.w_in[e], model.blocks[2].mlp.fc_in.weight.t())
        assert torch.equal(experts.w_out[e], model.blocks[2].mlp.fc_out.weight.t())
    assert up.blocks[2].mlp.gate.proj.weight.std() < 0.1  # a fresh, small gate
    assert up.config == upcycled_config(model.config, num_experts=4, placement="last-1")
    assert not up.training
    assert upcycle(model.train(), num_experts=2).training


def test_upcycle_noise():
    model = dense()
    up = upcycle(model, num_experts=4, placement="last-1", noise_std=0.01,
                 generator=torch.Generator().manual_seed(0))
    w_in = up.blocks[2].mlp.experts.w_in  # [E, D, H]
    delta = w_in - model.blocks[2].mlp.fc_in.weight.t()
    assert delta.std().item() == pytest.approx(0.01, rel=0.1)
    assert not torch.equal(w_in[0], w_in[1])  # independent per expert
    again = upcycle(model, num_experts=4, placement="last-1", noise_std=0.01,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.blocks[2].mlp.experts.w_in, w_in)


def test_upcycled_config_fields():
    base = dense().config
    config = upcycled_config(base, num_experts=8, placement="last-2", num_shared=1)
    assert config.moe_block_indices == [1, 2] and config.num_experts == 8 and config.num_shared == 1
    assert config.router == "topk" and config.router_kwargs == {"k": 2, "renormalize": True}
    assert config.expert_width == config.shared_width == 24
    assert config.moe_losses == {"load_balance": 1e-2}
    assert (config.dim, config.depth, config.heads, config.patch_size) == (16, 3, 2, 7)
    other = upcycled_config(base, num_experts=4, router="topp", moe_losses={})
    assert other.router_kwargs is None and other.moe_losses == {}
    assert isinstance(ViT(other).blocks[0].mlp.router, TopP)
    # the same model from scratch has the same parameter names and shapes
    up = upcycle(dense(), num_experts=8, placement="last-2", num_shared=1)
    scratch = ViT(config)
    assert {k: v.shape for k, v in scratch.state_dict().items()} == {k: v.shape for k, v in up.state_dict().items()}


def test_upcycled_model_trains():
    up = upcycle(dense(), num_experts=4).train()
    loss = nn.functional.cross_entropy(up(images()), torch.tensor([0, 1, 2])) + 0.01 * sum(
        layer.aux_loss for layer in (b.mlp for b in up.blocks))
    loss.backward()
    assert up.blocks[0].mlp.gate.proj.weight.grad.abs().sum() > 0


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"num_experts": 0}, "num_experts"), ({"num_experts": True}, "num_experts"),
    ({"num_experts": 2, "noise_std": -0.1}, "noise_std"), ({"num_experts": 2, "noise_std": math.nan}, "noise_std"),
    ({"num_experts": 2, "num_shared": -1}, "num_shared"), ({"num_experts": 2, "placement": "none"}, "no block"),
    ({"num_experts": 2, "placement": "first-2"}, "moe_layers"),
])
def test_upcycle_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        upcycle(dense(), **kwargs)


def test_upcycle_needs_a_dense_vit():
    with pytest.raises(ValueError, match="dense moe_lite ViT"):
        upcycle(nn.Linear(2, 2), num_experts=2)
    moe_vit = ViT(ViTConfig(dim=16, depth=2, heads=2, mlp_hidden=24, patch_size=7, moe_layers="last-1",
                            num_experts=2))
    with pytest.raises(ValueError, match="dense ViT"):
        upcycle(moe_vit, num_experts=2)
    mixed = dense(block_hidden=[24, 32, 24])
    with pytest.raises(ValueError, match="different widths"):
        upcycle(mixed, num_experts=2)
    assert upcycle(mixed, num_experts=2, placement=[0, 2]).config.expert_width == 24


def test_load_ffn_mismatch():
    with pytest.raises(ValueError, match="hidden"):
        load_ffn_(MoE(6, 12, 2, TopK(1)), FFN(6, 10))
    with pytest.raises(ValueError, match="activation"):
        load_ffn_(MoE(6, 10, 2, TopK(1), activation="swiglu"), FFN(6, 10))
    with pytest.raises(ValueError, match="bias"):
        load_ffn_(MoE(6, 10, 2, TopK(1)), FFN(6, 10, bias=True))
    with pytest.raises(ValueError, match="shared_hidden"):
        load_ffn_(MoE(6, 10, 2, TopK(1), 1, shared_hidden=4), FFN(6, 10))
    with pytest.raises(ValueError, match="FFN"):
        upcycle_ffn(nn.Linear(6, 6), 2, TopK(1))
