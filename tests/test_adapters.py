"""LoRA / LoRA experts on a frozen ViT: equivalence at init, freezing, parameter and FLOP counts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_lite
from moe_lite.models.adapters import (
    LoRAExperts,
    LoRALinear,
    adapt,
    adapter_cost,
    ffn_linears,
    matched_lora_rank,
    split_classes,
    threshold_routing,
)
from moe_lite.models.vit import ViT, ViTConfig, vimoe_config
from moe_lite.routers import LearnedThreshold, TopK, TopP

# dim 8, 2 blocks, FFN 8 -> 16 -> 8 (no biases), patch 7 -> 16 tokens; new task with 3 classes.
D, H, DEPTH, L, C = 8, 16, 2, 16, 3
HEAD = D * C + C  # the new head: 27




def pretrained(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(ViTConfig(dim=D, depth=DEPTH, heads=2, mlp_hidden=H, patch_size=7, num_classes=5))


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- LoRALinear ----------------------------------------------------------------------------------------
def test_lora_linear_equals_base_at_init_and_only_a_b_train():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    lora = LoRALinear(base, rank=3, alpha=6)
    x = torch.randn(2, 7, 8)
    assert torch.equal(lora(x), base(x))
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert lora.lora_A.shape == (3, 8) and lora.lora_B.shape == (5, 3) and lora.scaling == 2.0
    lora(x).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert lora.lora_B.grad.abs().sum() > 0
    with torch.no_grad():
        lora.lora_B.normal_()
    assert torch.allclose(lora(x), base(x) + x @ lora.delta_weight().T, atol=1e-6)


def test_lora_bad_arguments():
    with pytest.raises(ValueError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(1, 1, 1), rank=2)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0)


# ---- LoRAExperts ---------------------------------------------------------------------------------------
ROUTERS = {
    "topk": lambda: TopK(2, renormalize=True),
    "topp": lambda: TopP(0.5),
    "learned_threshold": lambda: LearnedThreshold(8, 4),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_lora_experts_forward_backward_routing(name):
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoRAExperts(base, 4, 2, ROUTERS[name](), losses={"load_balance": 0.01})
    x = torch.randn(2, 5, 8)
    y = layer(x)
    assert y.shape == (2, 5, 6)
    assert torch.allclose(y, base(x))  # B = 0 at init
    assert layer.routing.logits.shape == (2, 5, 4)
    assert layer.routing.experts_per_token.shape == (10,)
    assert set(layer.aux_losses) == {"load_balance"}
    assert layer.aux_loss.item() == pytest.approx(0.01 * layer.aux_losses["load_balance"].item())
    # found by the model-wide collectors like any MoE layer
    wrapper = nn.Sequential(layer)
    assert [n for n, _ in moe_lite.moe_layers(wrapper)] == ["0"]
    assert "0" in moe_lite.routing_stats(wrapper)
    with torch.no_grad():
        layer.lora_B.normal_()
    (layer(x).square().mean() + moe_lite.aux_loss(wrapper)).backward()
    assert base.weight.grad is None
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.gate.weight.grad.abs().sum() > 0  # through the weights and / or the balance loss


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_lora_experts_matches_per_token_brute_force(name):
    torch.manual_seed(1)
    base = nn.Linear(8, 6)
    loop = LoRAExperts(base, 4, 2, ROUTERS[name](), alpha=4.0)
    with torch.no_grad():
        loop.lora_B.normal_()
    dense = LoRAExperts(base, 4, 2, ROUTERS[name](), alpha=4.0, dispatch="dense")
    dense.load_state_dict(loop.state_dict())
    x = torch.randn(2, 5, 8)
    y = loop(x)
    r = loop.routing
    want = base(x).reshape(10, 6).clone()
    flat = x.reshape(10, 8)
    for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()):
        want[t] += 2.0 * w * (loop.lora_B[e] @ (loop.lora_A[e] @ flat[t]))
    assert torch.allclose(y.reshape(10, 6), want, atol=1e-5)
    assert torch.allclose(dense(x), y, atol=1e-5)


def test_inference_threshold_in_eval_only():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoRAExperts(base, 4, 2, TopK(2, renormalize=True), inference_threshold=0.3)
    with torch.no_grad():  # logits of each token: [2, 1.5, 0, -inf-ish] -> probs ~ [.53, .32, .07, .07]
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0], layer.gate.weight[1, 0] = 2.0, 1.5
        layer.lora_B.normal_()
    x = torch.zeros(1, 3, 8)
    x[..., 0] = 1.0
    probs = torch.tensor([2.0, 1.5, 0.0, 0.0]).softmax(0)
    layer.train()
    layer(x)
    assert layer.routing.experts_per_token.tolist() == [2, 2, 2]  # the router: top-2
    layer.eval()
    y = layer(x)
    assert layer.routing.info["threshold"] == 0.3
    assert layer.routing.expert.tolist() == [0, 1] * 3  # probs >= 0.3: experts 0 and 1
    kept = probs[:2] / probs[:2].sum()
    assert torch.allclose(layer.routing.weight, kept.repeat(3))
    delta = sum(kept[e] * (layer.lora_B[e] @ layer.lora_A[e] @ x[0, 0]) for e in range(2))
    assert torch.allclose(y[0, 0], base(x[0, 0]) + delta, atol=1e-6)
    layer.inference_threshold = 0.9  # nobody reaches it: the top expert alone, weight 1
    layer(x)
    assert layer.routing.expert.tolist() == [0, 0, 0]
    assert torch.allclose(layer.routing.weight, torch.ones(3))


def test_threshold_routing_validates():
    with pytest.raises(ValueError):
        threshold_routing(torch.zeros(3, 4), 0.5)
    with pytest.raises(ValueError):
        threshold_routing(torch.zeros(1, 3, 4), 1.5)


def test_lora_experts_bad_arguments():
    with pytest.raises(ValueError, match="num_experts"):
        LoRAExperts(nn.Linear(4, 4), 0, 2, TopK(1))
    with pytest.raises(ValueError, match="loss"):
        LoRAExperts(nn.Linear(4, 4), 2, 2, TopK(1), losses={"nope": 1.0})
    with pytest.raises(ValueError, match="dispatch"):
        LoRAExperts(nn.Linear(4, 4), 2, 2, TopK(1), dispatch="fast")
    with pytest.raises(ValueError, match="x must be"):
        LoRAExperts(nn.Linear(4, 4), 2, 2, TopK(1))(torch.zeros(2, 3, 5))


# ---- adapt -------------------------------------------------------------------------------------------
def test_ffn_linears_are_fc_in_and_fc_out_of_each_block():
    names = [name for name, *_ in ffn_linears(pretrained())]
    assert names == ["blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out", "blocks.1.mlp.fc_in", "blocks.1.mlp.fc_out"]
    with pytest.raises(ValueError, match="MoE"):
        ffn_linears(ViT(vimoe_config(ViTConfig(dim=D, depth=DEPTH, heads=2, mlp_hidden=H, patch_size=7))))


def test_trainable_parameter_counts_per_method():
    model = pretrained()
    # per block: fc_in 8 -> 16 and fc_out 16 -> 8, so sum(i + o) = 48 per block, 96 in all
    assert trainable(adapt(model, "linear_probe", C)) == HEAD
    assert trainable(adapt(model, "lora", C, lora_rank=3)) == 3 * 96 + HEAD
    experts = adapt(model, "lora_experts", C, num_experts=4, rank=2)
    gates = 4 * (8 + 16) * DEPTH  # Linear(i, E) on fc_in (i=8) and fc_out (i=16)
    assert trainable(experts) == 4 * 2 * 96 + gates + HEAD
    full = adapt(model, "full", C)
    assert trainable(full) == sum(p.numel() for p in model.parameters()) - (D * 5 + 5) + HEAD
    assert all(p.requires_grad for p in model.parameters())  # the original is untouched
    assert model.head.out_features == 5 and full.config.num_classes == C


def test_matched_lora_rank():
    model = pretrained()
    # experts: E*r*96 + 24*E*DEPTH = 96 * (E*r + E/2); one LoRA: 96 * R
    assert matched_lora_rank(model, num_experts=4, rank=2) == 10
    assert matched_lora_rank(model, num_experts=8, rank=4) == 36
    assert matched_lora_rank(model, num_experts=3, rank=1) == 4  # 4.5: a tie goes to the smaller rank
    lora = adapt(model, "lora", C, num_experts=4, rank=2)
    assert trainable(lora) == 10 * 96 + HEAD
    assert trainable(lora) == trainable(adapt(model, "lora_experts", C, num_experts=4, rank=2))
    # a router with parameters (a threshold projection per layer) raises the matched rank
    with_router = matched_lora_rank(model, num_experts=4, rank=2, router=lambda i, e: LearnedThreshold(i, e))
    assert with_router >= 10


@pytest.mark.parametrize("method", ["linear_probe", "lora", "lora_experts", "full"])
def test_frozen_parameters_unchanged_after_a_step(method):
    model = pretrained()
    adapted = adapt(model, method, C, rank=2, num_experts=4)
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    train = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
    assert (len(frozen) == 0) == (method == "full")
    opt = torch.optim.AdamW(adapted.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = images(), torch.tensor([0, 1, 2, 0])
    for _ in range(2):  # two steps: B leaves zero first, then A moves
        loss = F.cross_entropy(adapted(x), y) + moe_lite.aux_loss(adapted)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in adapted.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    changed = [n for n, p in adapted.named_parameters() if n in train and not torch.equal(p, train[n])]
    assert "head.weight" in changed
    if method in ("lora", "lora_experts"):
        assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_adapt_routers_and_errors():
    model = pretrained()
    for router, cls in (("topk", TopK), ("topp", TopP)):
        adapted = adapt(model, "lora_experts", C, router=router)
        layers = [m for m in adapted.modules() if isinstance(m, LoRAExperts)]
        assert len(layers) == 4 and all(isinstance(m.router, cls) for m in layers)
        assert len({id(m.router) for m in layers}) == 4
        assert layers[0].loss_weights == {"load_balance": 0.01}
    adapted = adapt(model, "lora_experts", C, router=lambda i, e: LearnedThreshold(i, e), losses={})
    adapted(images())
    assert moe_lite.aux_loss(adapted) == 0
    assert len(moe_lite.routing_stats(adapted)) == 4
    # by name: the input width of each wrapped linear and E are filled in
    adapted = adapt(model, "lora_experts", C, router="learned_threshold", num_experts=3)
    dims = [m.router.dim for m in adapted.modules() if isinstance(m, LoRAExperts)]
    assert dims == [D, H, D, H]
    adapted(images())
    with pytest.raises(ValueError, match="method"):
        adapt(model, "prefix", C)
    with pytest.raises(ValueError, match="num_classes"):
        adapt(model, "lora", 0)


# ---- cost ---------------------------------------------------------------------------------------------
def test_adapter_cost_hand_count():
    model = pretrained()
    x = images()
    experts = adapt(model, "lora_experts", C, num_experts=4, rank=2, router="topk")  # top-2
    with pytest.raises(ValueError, match="forward"):
        adapter_cost(experts)
    experts(x)
    # per block: fc_in gate 2*8*4 = 64, experts 2 * 2*2*(8+16) = 192; fc_out gate 2*16*4 = 128, experts 192
    per_token = DEPTH * (64 + 192 + 128 + 192)
    cost = adapter_cost(experts, tokens_per_image=L)
    assert cost == {
        "trainable_params": trainable(experts),
        "adapter_flops_per_token": per_token,
        "adapter_flops_per_image": per_token * L,
    }
    assert adapter_cost(experts)["adapter_flops_per_image"] == per_token * L  # L from the config

    lora = adapt(model, "lora", C, lora_rank=3)
    assert adapter_cost(lora, L)["adapter_flops_per_token"] == 2 * 3 * 96
    assert adapter_cost(adapt(model, "linear_probe", C), L)["adapter_flops_per_token"] == 0
    assert adapter_cost(adapt(model, "full", C), L)["adapter_flops_per_token"] == 0

    # top-p: the realised mean experts per token of each layer
    topp = adapt(model, "lora_experts", C, num_experts=4, rank=2, router="topp", router_kwargs={"p": 0.6})
    topp(x)
    want = 0.0
    for m in topp.modules():
        if isinstance(m, LoRAExperts):
            k = m.routing.experts_per_token.float().mean().item()
            want += 2 * m.in_features * 4 + k * 2 * 2 * (m.in_features + m.out_features)
    assert adapter_cost(topp, L)["adapter_flops_per_token"] == pytest.approx(want)


# ---- data -------------------------------------------------------------------------------------------
def test_split_classes():
    imgs = torch.arange(8).float().reshape(8, 1, 1, 1)
    labels = torch.tensor([0, 5, 9, 5, 1, 7, 9, 2])
    x, y = split_classes(imgs, labels, [5, 7, 9])
    assert x.flatten().tolist() == [1, 2, 3, 5, 6]
    assert y.tolist() == [0, 2, 0, 1, 2]
    with pytest.raises(ValueError):
        split_classes(imgs, labels, [5, 5])
    with pytest.raises(ValueError):
        split_classes(imgs, labels[:3], [5])


# ---- the inference threshold is state (issue 9) -----------------------------------------------------
def test_inference_threshold_is_a_validated_buffer_that_survives_state_dict():
    torch.manual_seed(0)
    layer = LoRAExperts(nn.Linear(8, 8), 4, 2, TopK(2, renormalize=True), inference_threshold=0.3)
    assert layer.inference_threshold == 0.3 and float(layer.state_dict()["threshold"]) == 0.3
    layer.set_inference_threshold(0.2)
    assert layer.inference_threshold == 0.2
    for bad in (-0.1, 1.5, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="inference_threshold"):
            layer.set_inference_threshold(bad)
        with pytest.raises(ValueError, match="inference_threshold"):
            layer.inference_threshold = bad
        with pytest.raises(ValueError, match="inference_threshold"):
            LoRAExperts(nn.Linear(8, 8), 4, 2, TopK(2), inference_threshold=bad)
    assert layer.inference_threshold == 0.2
    torch.manual_seed(1)
    fresh = LoRAExperts(nn.Linear(8, 8), 4, 2, TopK(2, renormalize=True))  # no threshold
    assert fresh.inference_threshold is None
    fresh.load_state_dict(layer.state_dict())
    assert fresh.inference_threshold == 0.2
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    layer.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x))
    assert layer.routing.info["threshold"] == 0.2
    layer.inference_threshold = None  # off again: eval uses the router, and that travels too
    fresh.load_state_dict(layer.state_dict())
    assert fresh.inference_threshold is None
    fresh(x)
    assert fresh.routing.experts_per_token.tolist() == [2] * 10
    # a state dict from before the buffer still loads, keeping the layer's own threshold
    old = {k: v for k, v in layer.state_dict().items() if k != "threshold"}
    kept = LoRAExperts(nn.Linear(8, 8), 4, 2, TopK(2), inference_threshold=0.5)
    kept.load_state_dict(old)
    assert kept.inference_threshold == 0.5
