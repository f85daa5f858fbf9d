"""moe_lite.flops against hand counts on tiny models (a multiply-add = 2 FLOPs)."""
import pytest
import torch
from torch import nn

from moe_lite.flops import estimate
from moe_lite.layers import MoE
from moe_lite.models.vit import Attention
from moe_lite.routers import ExpertChoice, TopK


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))


def test_mlp_flops_and_memory_by_hand():
    est = estimate(_mlp(), torch.randn(5, 4))
    # 5 rows: 2*5*4*8 + 2*5*8*3
    assert est.forward_flops == 320 + 240
    assert est.training_flops == 3 * 560 and est.training_flops_per_sample == 3 * 560 / 5
    assert est.by_module == {"0": 320, "2": 240} and est.by_type == {"Linear": 560}
    assert est.params == est.trainable_params == 4 * 8 + 8 + 8 * 3 + 3
    assert est.param_bytes == est.grad_bytes == 67 * 4 and est.optimizer_bytes == 2 * 67 * 4
    # saved for backward: the input [5, 4] (weight grad of layer 0), GELU's input [5, 8], layer 2's input [5, 8]
    assert est.activation_bytes == 4 * (5 * 4 + 5 * 8 + 5 * 8)
    assert est.training_bytes == 268 + 268 + 536 + est.activation_bytes


@pytest.mark.parametrize("dispatch", ["loop", "sorted", "padded", "grouped_mm", "auto"])
def test_moe_counts_gate_and_routed_assignments_for_every_backend(dispatch):
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, TopK(2), dispatch=dispatch)
    est = estimate(moe, torch.randn(2, 3, 8))
    gate = 2 * 6 * 8 * 4  # 6 tokens x D=8 x E=4
    experts = 2 * 12 * (8 * 16 + 16 * 8)  # A = 6 tokens x k=2 assignments, each D->H->D
    assert est.by_type == {"Linear": gate, "Experts": experts}
    assert est.by_module == {"gate.proj": gate, "experts": experts}


def test_moe_counts_the_assignments_that_happened():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, ExpertChoice(1))  # capacity k*N/E = 1*6/4 -> rounded: A is what the router made
    x = torch.randn(2, 3, 8)
    est = estimate(moe, x)
    a = moe.routing.num_assignments
    assert est.by_type["Experts"] == 2 * a * (8 * 16 + 16 * 8)


def test_attention_counts_projections_and_sdpa():
    torch.manual_seed(0)
    est = estimate(Attention(8, 2), torch.randn(2, 5, 8))
    qkv, proj = 2 * 10 * 8 * 24, 2 * 10 * 8 * 8
    sdpa = 2 * (2 * 2) * 5 * 5 * (4 + 4)  # B*heads = 4, L = S = 5, head width 4: scores + weighted sum
    assert est.by_type == {"Linear": qkv + proj, "Attention": sdpa}


def test_conv_and_functional_matmul():
    est = estimate(nn.Conv2d(1, 2, 3), torch.randn(1, 1, 5, 5))
    assert est.forward_flops == 2 * (2 * 3 * 3) * (1 * 3 * 3)  # 18 outputs x 9 multiply-adds

    class Bmm(nn.Module):
        def forward(self, a, b):
            return torch.bmm(a, b) + a @ b

    est = estimate(Bmm(), torch.randn(3, 2, 4), torch.randn(3, 4, 5))
    assert est.forward_flops == 2 * 2 * (3 * 2 * 5) * 4 and est.by_type == {"Bmm": est.forward_flops}


def test_frozen_parameters_have_no_gradient_or_optimizer_state():
    model = _mlp()
    model[0].requires_grad_(False)
    est = estimate(model, torch.randn(5, 4))
    assert est.params == 67 and est.trainable_params == 8 * 3 + 3
    assert est.grad_bytes == 27 * 4 and est.optimizer_bytes == 2 * 27 * 4
    assert est.activation_bytes == 4 * (5 * 8)  # only layer 2 saves its input now


def test_seconds_summary_hooks_removed_and_errors():
    model = _mlp()
    est = estimate(model, torch.randn(5, 4))
    assert est.seconds_per_step(1680.0) == pytest.approx(1.0)
    assert "training step (batch 5)" in est.summary() and "Linear 100%" in est.summary()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="flops_per_second"):
        est.seconds_per_step(0)
    with pytest.raises(ValueError, match="nn.Module"):
        estimate(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="batched input"):
        estimate(model)
    with pytest.raises(RuntimeError):
        estimate(model, torch.randn(5, 7))  # shape error inside the forward: hooks still removed
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
