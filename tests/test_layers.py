"""Layers: MoE against the dense FFN, shared experts, aux losses, collectors, gates, SoftMoE."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_lite
from moe_lite import losses
from moe_lite.layers import (
    FFN,
    GATE_INIT_STD,
    LinearGate,
    MLPGate,
    MoE,
    SoftMoE,
    aux_loss,
    aux_losses,
    moe_layers,
    routing_stats,
    target_predictions,
    update_biases,
)
from moe_lite.routers import BiasBalanced, TopK

from precision_checks import DEVICES, HALF, rel_err

class DropTokens(TopK):
    """Real softmax top-k, after which the flat tokens in ``drop`` lose every assignment (as a
    capacity limit drops tokens), so a layer sees tokens with no routed expert at known places."""

    def __init__(self, k, drop):
        super().__init__(k)
        self.drop = list(drop)

    def forward(self, logits, x=None, key=None):
        r = super().forward(logits, x=x, key=key)
        keep = ~torch.isin(r.token, torch.tensor(self.drop, dtype=torch.long, device=r.token.device))
        return dataclasses.replace(r, token=r.token[keep], expert=r.expert[keep], weight=r.weight[keep])


# ---- MoE ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dispatch", ["auto", "loop", "sorted", "padded"])
def test_single_expert_equals_dense_ffn(activation, dispatch):
    torch.manual_seed(0)
    dim, hidden = 16, 32
    ffn = FFN(dim, hidden, activation)
    moe = MoE(dim, hidden, 1, TopK(1, renormalize=True), activation=activation, dispatch=dispatch)
    moe.experts.load_dense_(ffn.fc_in.weight, ffn.fc_out.weight)
    x = torch.randn(3, 5, dim)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-5, atol=1e-6)
    assert moe.routing.num_assignments == 15


def test_single_expert_equals_dense_ffn_with_bias_and_grads():
    torch.manual_seed(1)
    ffn = FFN(8, 12, "gelu", bias=True)
    moe = MoE(8, 12, 1, TopK(1, renormalize=True), bias=True)
    moe.experts.load_dense_(ffn.fc_in.weight, ffn.fc_out.weight, ffn.fc_in.bias, ffn.fc_out.bias)
    x1 = torch.randn(2, 4, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    coef = torch.randn(2, 4, 8)
    (moe(x1) * coef).sum().backward()
    (ffn(x2) * coef).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.experts.w_in.grad[0], ffn.fc_in.weight.grad.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.experts.b_out.grad[0], ffn.fc_out.bias.grad, rtol=1e-5, atol=1e-6)


def test_shared_experts_add_an_ffn_output():
    torch.manual_seed(2)
    moe = MoE(16, 8, 4, TopK(2), num_shared=2, shared_hidden=12)
    assert isinstance(moe.shared, FFN) and moe.shared.hidden == 24
    x = torch.randn(2, 6, 16)
    y = moe(x)
    r = moe.routing
    routed = moe.experts(x.reshape(12, 16), r.token, r.expert, r.weight).view(2, 6, 16)
    torch.testing.assert_close(y, routed + moe.shared(x))
    # the single FFN of width 2*12 is exactly the sum of two FFNs of width 12
    f1, f2 = FFN(16, 12), FFN(16, 12)
    with torch.no_grad():
        f1.fc_in.weight.copy_(moe.shared.fc_in.weight[:12]); f1.fc_out.weight.copy_(moe.shared.fc_out.weight[:, :12])
        f2.fc_in.weight.copy_(moe.shared.fc_in.weight[12:]); f2.fc_out.weight.copy_(moe.shared.fc_out.weight[:, 12:])
    torch.testing.assert_close(moe.shared(x), f1(x) + f2(x), rtol=1e-5, atol=1e-6)
    assert MoE(16, 8, 4, TopK(2), num_shared=1).shared.hidden == 8  # shared_hidden defaults to hidden
    assert MoE(16, 8, 4, TopK(2)).shared is None


def test_unassigned_token_gets_zero_from_routed_experts():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8)
    plain = MoE(8, 16, 4, DropTokens(2, drop=[0, 4]))
    y = plain(x)
    assert torch.equal(y[0, 0], torch.zeros(8)) and torch.equal(y[1, 1], torch.zeros(8))
    assert y[0, 1].abs().sum() > 0
    shared = MoE(8, 16, 4, DropTokens(2, drop=[0]), num_shared=1)
    torch.testing.assert_close(shared(x)[0, 0], shared.shared(x)[0, 0])


def test_aux_losses_match_the_loss_functions():
    torch.manual_seed(4)
    weights = {"load_balance": 0.01, "z_loss": 1e-3, "entropy": 0.5}
    moe = MoE(8, 16, 4, TopK(2), losses=weights)
    assert moe.loss_weights == weights
    x = torch.randn(2, 5, 8)
    moe(x)
    assert set(moe.aux_losses) == set(weights)
    total = 0.0
    for name, w in weights.items():
        expected = losses.REGISTRY[name](moe.routing)
        torch.testing.assert_close(moe.aux_losses[name], expected)
        total = total + w * expected
    torch.testing.assert_close(moe.aux_loss, total)
    moe.aux_loss.backward()  # differentiable into the gate
    assert moe.gate.proj.weight.grad is not None
    bare = MoE(8, 16, 4, TopK(2))
    bare(x)
    assert bare.aux_losses == {} and torch.equal(bare.aux_loss, torch.zeros(())) and bare.aux_loss.device == x.device


def test_unknown_loss_name_lists_valid_ones():
    with pytest.raises(ValueError, match="load_balance") as info:
        MoE(8, 16, 4, TopK(2), losses={"balance": 1.0})
    assert "balance" in str(info.value)
    with pytest.raises(ValueError, match="dict"):
        MoE(8, 16, 4, TopK(2), losses=["load_balance"])
    with pytest.raises(ValueError, match="finite"):
        MoE(8, 16, 4, TopK(2), losses={"z_loss": float("nan")})


def test_moe_validation_and_repr():
    moe = MoE(8, 16, 4, TopK(2), num_shared=1)
    with pytest.raises(ValueError, match=r"\[B, L, 8\]"):
        moe(torch.randn(5, 8))
    with pytest.raises(ValueError, match="num_shared"):
        MoE(8, 16, 4, TopK(2), num_shared=-1)
    with pytest.raises(ValueError, match="dispatch"):
        MoE(8, 16, 4, TopK(2), dispatch="fast")
    with pytest.raises(ValueError, match="activation"):
        MoE(8, 16, 4, TopK(2), activation="relu")
    text = repr(moe)
    for part in ["num_experts=4", "hidden=16", "router=TopK", "shared=1x16"]:
        assert part in text


def test_dispatch_backends_agree_inside_the_layer():
    torch.manual_seed(5)
    x = torch.randn(4, 7, 16)
    outs = []
    for dispatch in ["loop", "auto"]:
        torch.manual_seed(6)
        moe = MoE(16, 32, 6, TopK(2), activation="swiglu", dispatch=dispatch)
        outs.append(moe(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_real_routers_run_through_the_layer():
    from moe_lite import routers

    torch.manual_seed(7)
    x = torch.randn(2, 8, 16, requires_grad=True)
    for router in [routers.TopK(2), routers.ExpertChoice(2), routers.TopP(0.5), routers.Race(2)]:
        moe = MoE(16, 32, 4, router)
        y = moe(x)
        assert y.shape == x.shape and moe.routing is not None
        y.square().mean().backward()


# ---- gates ------------------------------------------------------------------------------------------
def test_linear_gate_init_is_small_but_not_degenerate():
    torch.manual_seed(8)
    gate = LinearGate(64, 8)
    assert abs(gate.proj.weight.std().item() - GATE_INIT_STD) < 0.005
    logits = gate(torch.randn(4, 32, 64))
    assert logits.shape == (4, 32, 8) and logits.abs().max() < 2.0
    assert logits.argmax(-1).unique().numel() > 1  # tokens do not all pick the same expert


def test_mlp_gate_target_head():
    torch.manual_seed(9)
    gate = MLPGate(16, 4, target_dim=6)
    x = torch.randn(2, 5, 16)
    assert gate(x).shape == (2, 5, 4)
    assert gate.target_prediction.shape == (2, 5, 6)
    plain = MLPGate(16, 4)
    plain(x)
    assert plain.target_prediction is None


# ---- collectors ---------------------------------------------------------------------------------------
def test_collectors_on_a_two_layer_model():
    torch.manual_seed(10)
    model = nn.Sequential(
        MoE(8, 16, 4, BiasBalanced(4, 2, update_rate=0.5), gate=MLPGate(8, 4, target_dim=3),
            losses={"load_balance": 0.1}),
        nn.LayerNorm(8),
        MoE(8, 16, 4, TopK(1), gate=MLPGate(8, 4), losses={"z_loss": 0.01, "entropy": 1.0}),
        SoftMoE(8, 16, 2),
    )
    assert [name for name, _ in moe_layers(model)] == ["0", "2", "3"]
    assert torch.equal(aux_loss(model), torch.zeros(()))  # nothing has run yet
    assert aux_losses(model) == {} and routing_stats(model) == {} and target_predictions(model) == []
    model(torch.randn(2, 5, 8))
    l0, l2 = model[0], model[2]
    torch.testing.assert_close(aux_loss(model), l0.aux_loss + l2.aux_loss)
    logged = aux_losses(model)
    assert set(logged) == {"0/load_balance", "2/z_loss", "2/entropy"}
    torch.testing.assert_close(logged["2/entropy"], losses.entropy(l2.routing))
    stats = routing_stats(model)
    assert set(stats) == {"0", "2"}  # the SoftMoE has no routing
    assert stats["0"]["experts_per_token"] == 2.0 and stats["2"]["experts_per_token"] == 1.0
    preds = target_predictions(model)
    assert len(preds) == 1 and preds[0].shape == (2, 5, 3)
    assert update_biases(model) == 1  # only the BiasBalanced router has a bias to update
    bias = model[0].router.bias
    assert bias.abs().sum() > 0 and set(bias.abs().unique().tolist()) <= {0.0, 0.5}
    assert moe_lite.aux_loss is aux_loss and moe_lite.moe_layers is moe_layers


def test_update_biases_with_bias_balanced_routers():
    from moe_lite.routers import BiasBalanced, TopK

    torch.manual_seed(12)
    model = nn.Sequential(
        MoE(8, 16, 4, BiasBalanced(4, 2, update_rate=0.1)),
        MoE(8, 16, 4, TopK(2)),
        MoE(8, 16, 4, BiasBalanced(4, 1, update_rate=0.1)),
    )
    model(torch.randn(2, 16, 8))
    assert update_biases(model) == 2
    for i in (0, 2):
        bias = model[i].router.bias
        assert bias.abs().sum() > 0 and torch.all(bias.abs() <= 0.1 + 1e-6)


# ---- SoftMoE ------------------------------------------------------------------------------------------
def soft_moe_reference(layer: SoftMoE, x):
    """Slow float64 loops over samples, slots and tokens."""
    x = x.double()
    phi = F.normalize(layer.phi.double(), dim=-1)
    w_in, w_out = layer.experts.w_in.double(), layer.experts.w_out.double()
    b, l, d = x.shape
    num_slots = phi.shape[0]
    y = torch.zeros(b, l, d, dtype=torch.float64)
    for i in range(b):
        logits = layer.scale.double() * F.normalize(x[i], dim=-1) @ phi.t()  # [L, S]
        outs = []
        for s in range(num_slots):
            dispatch = torch.exp(logits[:, s]) / torch.exp(logits[:, s]).sum()
            slot_in = sum(dispatch[t] * x[i, t] for t in range(l))
            e = s // layer.slots_per_expert
            outs.append(F.gelu(slot_in @ w_in[e]) @ w_out[e])
        for t in range(l):
            combine = torch.exp(logits[t]) / torch.exp(logits[t]).sum()
            y[i, t] = sum(combine[s] * outs[s] for s in range(num_slots))
    return y


def test_soft_moe_weights_shape_grads_and_reference():
    torch.manual_seed(11)
    layer = SoftMoE(8, 16, num_experts=3, slots_per_expert=2)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 5, 8)
    dispatch, combine = layer.dispatch_weights, layer.combine_weights
    assert dispatch.shape == combine.shape == (2, 5, 6)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(2, 6))  # over tokens, per slot
    torch.testing.assert_close(combine.sum(2), torch.ones(2, 5))  # over slots, per token
    assert layer.routing is None and layer.aux_losses == {} and torch.equal(layer.aux_loss, torch.zeros(()))
    torch.testing.assert_close(y.double(), soft_moe_reference(layer, x.detach()), rtol=1e-5, atol=1e-6)
    (y * torch.randn_like(y)).sum().backward()
    for t in [x, layer.phi, layer.scale, layer.experts.w_in, layer.experts.w_out]:
        assert t.grad is not None and t.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(8, 16, 3, slots_per_expert=0)


# ---- bad inputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: MoE(8, 16, 4, TopK(2)), lambda: SoftMoE(8, 16, 4)], ids=["MoE", "SoftMoE"])
def test_x_of_the_wrong_type_is_named(make):
    layer = make()
    owner = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{owner}: x must be a floating.*torch.int64"):
        layer(torch.randint(0, 5, (2, 3, 8)))
    with pytest.raises(ValueError, match=rf"{owner}: x must be a torch.Tensor.*list"):
        layer([[[1.0] * 8]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_soft_moe_rejects_non_finite_input_like_moe(bad):
    """MoE's router raises NonFiniteError on NaN input; SoftMoE used to return NaN silently."""
    from moe_lite.routing import NonFiniteError

    x = torch.randn(2, 3, 8)
    x[1, 2, 0] = bad
    with pytest.raises(NonFiniteError, match="SoftMoE"):
        SoftMoE(8, 16, 4)(x)
    layer = SoftMoE(8, 16, 4)
    with torch.no_grad():
        layer.phi[0, 0] = bad  # a diverged parameter: the trainer must see it too
    with pytest.raises(NonFiniteError, match="SoftMoE"):
        layer(torch.randn(2, 3, 8))


# ---- low precision ---------------------------------------------------------------------------------------
def out_and_grads(layer, x, autocast_dtype=None):
    """Output and gradients w.r.t. x and every parameter, optionally under autocast on x's device."""
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = layer(x)
    coef = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device)
    grads = torch.autograd.grad((y.float() * coef).sum(), [x, *layer.parameters()], allow_unused=True)
    return y, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm", "padded", "auto"])
def test_moe_under_autocast(device, dtype, dispatch):
    """The issue's reproducer: half rows from an nn.Linear under autocast used to crash every fast backend."""
    torch.manual_seed(20)
    proj = nn.Linear(32, 32).to(device)
    layer = MoE(32, 64, 8, TopK(2), num_shared=1, bias=True, dispatch=dispatch).to(device)
    x = torch.randn(4, 10, 32, device=device)
    with torch.autocast(device, dtype=dtype):
        h = proj(x)
    assert h.dtype == dtype
    layer.dispatch = "loop"
    y_ref, g_ref = out_and_grads(layer, h, dtype)
    expert_ref = layer.routing.expert
    layer.dispatch = dispatch
    y, grads = out_and_grads(layer, h, dtype)
    assert torch.equal(layer.routing.expert, expert_ref)  # same gate, same routing
    assert y.dtype == dtype and rel_err(y, y_ref) < 2e-2
    for (name, p), g, g_r in zip([("x", h), *layer.named_parameters()], grads, g_ref):
        assert g.dtype == p.dtype and rel_err(g, g_r) < 3e-2, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("x_dtype", ["float32", "half"])
def test_soft_moe_under_autocast_matches_float32(device, dtype, x_dtype):
    torch.manual_seed(21)
    layer = SoftMoE(32, 64, 4, slots_per_expert=2).to(device)
    x = torch.randn(4, 10, 32, device=device)
    y_ref, g_ref = out_and_grads(layer, x)
    x = x if x_dtype == "float32" else x.to(dtype)
    y, grads = out_and_grads(layer, x, dtype)
    assert y.dtype == dtype and rel_err(y, y_ref) < 2e-2
    for (name, p), g, g_r in zip([("x", x), *layer.named_parameters()], grads, g_ref):
        assert g.dtype == p.dtype and rel_err(g, g_r) < 3e-2, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_layers(device, dtype):
    """Modules converted with ``.to(dtype)`` and inputs of that dtype, no autocast."""
    torch.manual_seed(22)
    x = torch.randn(4, 10, 32, device=device)
    soft = SoftMoE(32, 64, 4, slots_per_expert=2).to(device)
    y_ref = soft(x)
    y = soft.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and rel_err(y, y_ref) < 2e-2
    moe = MoE(32, 64, 8, TopK(2), dispatch="loop").to(device).to(dtype)
    y_ref = moe(x.to(dtype))
    for dispatch in ["sorted", "grouped_mm", "padded", "auto"]:
        moe.dispatch = dispatch
        y = moe(x.to(dtype))
        assert y.dtype == dtype and rel_err(y, y_ref) < 2e-2, dispatch


# ---- bench smoke test ---------------------------------------------------------------------------------
def test_bench_runs_on_a_tiny_config():
    import io

    from moe_lite.bench import Config, run

    out = io.StringIO()
    tiny = Config("tiny", num_experts=4, hidden=8, dim=16, batch=2, seq_len=8, target=99.0)
    rows = run(repeats=2, warmup=0, routers=["TopK"], backends=["auto", "loop"], configs=[tiny], out=out)
    assert [r["backend"] for r in rows] == ["auto", "loop"]
    assert all(r["ratio"] > 0 and r["pass"] is True and r["experts_per_token"] == 2.0 for r in rows)
    assert "tiny" in out.getvalue() and "PASS" in out.getvalue()
