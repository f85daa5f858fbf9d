"""Spec of issue 11 item 6: expert choice with a capacity factor and batch groups, the cosine gate
(X-MoE) and null experts (AdaMoE).

Hand-made logits with the expected (token, expert, weight) written out, slow per-token Python
references compared on random inputs (outputs and the gradient reaching the logits), and errors.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_lite import MoE
from moe_lite.layers import CosineGate
from moe_lite.routers import Capacity, ExpertChoice, NullExperts, Race, TopK

from routing_checks import F64, SEEDS, assert_matches, assert_pairs, logits_of, num, pairs


def softmax_row(row: torch.Tensor) -> torch.Tensor:
    ex = torch.exp(row - row.max())
    return ex / ex.sum()


def rand_logits(seed: int, b: int = 2, l: int = 5, e: int = 4) -> torch.Tensor:
    return torch.randn(b, l, e, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ---- slow references --------------------------------------------------------------------------
def ref_expert_choice(logits, c, group="sample"):
    """Zhou et al.: in each group of n tokens every expert takes its max(1, round(c n / E)) best."""
    b, l, e = logits.shape
    probs = {(bi * l + li): softmax_row(logits[bi, li]) for bi in range(b) for li in range(l)}
    groups = [list(range(bi * l, (bi + 1) * l)) for bi in range(b)] if group == "sample" else [list(range(b * l))]
    out = {}
    for tokens in groups:
        capacity = min(len(tokens), max(1, round(c * len(tokens) / e)))
        for j in range(e):
            best = sorted(tokens, key=lambda t: -num(probs[t][j]))[:capacity]
            for t in best:
                out[(t, j)] = probs[t][j]
    return out


def ref_null_topk(logits, k, num_null, renormalize=False):
    """AdaMoE: softmax and top-k over real + null experts (null last); null picks are dropped."""
    b, l, total = logits.shape
    e = total - num_null
    out = {}
    for bi in range(b):
        for li in range(l):
            p = softmax_row(logits[bi, li])
            chosen = sorted(range(total), key=lambda j: -num(p[j]))[:k]
            real = [j for j in chosen if j < e]
            denom = sum(p[j] for j in real) if renormalize else 1.0
            for j in real:
                out[(bi * l + li, j)] = p[j] / denom
    return out


def ref_cosine(x, w, emb, temperature):
    """One token at a time: cos(W x, emb_e) / temperature from dot products and norms."""
    b, l, _ = x.shape
    rows = []
    for bi in range(b):
        for li in range(l):
            p = w @ x[bi, li]
            rows.append(torch.stack([(p @ emb[j]) / (p.norm() * emb[j].norm()) for j in range(emb.shape[0])]))
    return torch.stack(rows).reshape(b, l, -1) / temperature


# ---- expert choice: capacity factor, batch groups ---------------------------------------------
def test_expert_choice_default_is_per_sample_top_capacity():
    # B=1, L=4, E=2, k=1: capacity round(1 * 4 / 2) = 2 tokens per expert
    probs = [[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]]
    r = ExpertChoice(1)(logits_of(probs))
    assert_pairs(r, {(0, 0): 0.9, (1, 0): 0.6, (3, 1): 0.8, (2, 1): 0.7})
    assert r.info == {"capacity": 2, "k": 1}


def test_expert_choice_default_unchanged_against_race_per_sample():
    """``ExpertChoice(k)`` is exactly Race's per-sample expert choice (L candidates), bit for bit."""
    for seed in SEEDS:
        logits = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(seed))
        for k in (1, 1.5, 2, 4):
            a = ExpertChoice(k)(logits)
            b = Race(k, candidates="L", gating="softmax", eval_threshold=False).eval()(logits)
            assert torch.equal(a.token, b.token) and torch.equal(a.expert, b.expert)
            assert torch.equal(a.weight, b.weight)


def test_expert_choice_capacity_factor_below_one():
    # capacity_factor 0.5, L=4, E=2: max(1, round(0.5 * 4 / 2)) = 1 token per expert
    probs = [[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]]
    router = ExpertChoice(capacity_factor=0.5)
    r = router(logits_of(probs))
    assert_pairs(r, {(0, 0): 0.9, (3, 1): 0.8})
    assert r.info["capacity"] == 1
    assert router.k == 0.5 and router.capacity_factor == 0.5


def test_expert_choice_capacity_factor_is_k():
    logits = rand_logits(0)
    a, b = ExpertChoice(2), ExpertChoice(capacity_factor=2.0)
    assert pairs(a(logits)) == pairs(b(logits))
    assert a.capacity_factor == b.capacity_factor == 2.0


def test_expert_choice_batch_group():
    # B=2, L=2, E=2, k=1. Per sample: 1 token per expert in each sample. Per batch (Zhou et al.):
    # round(1 * 4 / 2) = 2 tokens per expert over all 4, so expert 0 takes both tokens of sample 0.
    probs = [[[0.9, 0.1], [0.8, 0.2]], [[0.45, 0.55], [0.3, 0.7]]]
    logits = logits_of(probs)
    per_sample = ExpertChoice(1)(logits)
    assert_pairs(per_sample, {(0, 0): 0.9, (1, 1): 0.2, (2, 0): 0.45, (3, 1): 0.7})
    batch = ExpertChoice(1, group="batch")(logits)
    assert_pairs(batch, {(0, 0): 0.9, (1, 0): 0.8, (3, 1): 0.7, (2, 1): 0.55})
    assert batch.info["group"] == "batch" and batch.info["capacity"] == 2


@pytest.mark.parametrize("group", ["sample", "batch"])
@pytest.mark.parametrize("c", [0.5, 1, 2.5])
def test_expert_choice_matches_reference(group, c):
    for seed in SEEDS:
        logits = rand_logits(seed)
        assert_matches(ExpertChoice(capacity_factor=c, group=group), lambda lg: ref_expert_choice(lg, c, group),
                       logits, seed)


@pytest.mark.parametrize("kwargs", [
    {}, {"k": 2, "capacity_factor": 2}, {"capacity_factor": 0}, {"capacity_factor": -1.0},
    {"capacity_factor": float("nan")}, {"capacity_factor": True}, {"capacity_factor": "2"},
    {"k": 0.5}, {"k": 2, "group": "token"}, {"k": 2, "group": None},
])
def test_expert_choice_bad_values(kwargs):
    with pytest.raises(ValueError):
        ExpertChoice(**kwargs)


def test_expert_choice_capacity_factor_above_experts():
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        ExpertChoice(capacity_factor=5)(rand_logits(0))


# ---- null experts (AdaMoE) --------------------------------------------------------------------
NULL_PROBS = [[[0.5, 0.3, 0.2],   # picks 0, 1: two real experts
               [0.6, 0.1, 0.3],   # picks 0 and the null expert: one real expert
               [0.1, 0.2, 0.7]]]  # picks the null expert and 1: one real expert


def test_null_experts_drop_null_assignments():
    r = NullExperts(TopK(2), num_null=1)(logits_of(NULL_PROBS))
    assert r.num_experts == 2 and r.logits.shape == (1, 3, 2) and r.scores.shape == (1, 3, 2)
    assert_pairs(r, {(0, 0): 0.5, (0, 1): 0.3, (1, 0): 0.6, (2, 1): 0.2})
    assert num(r.info["null_fraction"]) == pytest.approx(2 / 6)
    assert r.info["num_null"] == 1 and r.info["k"] == 2
    assert r.experts_per_token.tolist() == [2, 1, 1]


def test_null_experts_renormalize():
    r = NullExperts(TopK(2), num_null=1, renormalize=True)(logits_of(NULL_PROBS))
    assert_pairs(r, {(0, 0): 0.5 / 0.8, (0, 1): 0.3 / 0.8, (1, 0): 1.0, (2, 1): 1.0})


def test_null_experts_token_with_only_null_gets_nothing():
    # E = 1 real + 2 null, top-2: token 1 takes both null experts, so no real expert
    probs = [[[0.5, 0.3, 0.2], [0.1, 0.5, 0.4]]]
    r = NullExperts(TopK(2), num_null=2)(logits_of(probs))
    assert_pairs(r, {(0, 0): 0.5})
    assert r.experts_per_token.tolist() == [1, 0]
    assert num(r.info["null_fraction"]) == pytest.approx(3 / 4)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k,num_null", [(1, 1), (2, 2), (3, 4)])
def test_null_experts_match_reference(k, num_null, renormalize):
    for seed in SEEDS:
        logits = rand_logits(seed, e=4 + num_null)
        router = NullExperts(TopK(k), num_null, renormalize=renormalize)
        assert_matches(router, lambda lg: ref_null_topk(lg, k, num_null, renormalize), logits, seed,
                       constant=renormalize and k == 1)


def test_null_experts_wrap_any_router_and_pass_train_eval():
    router = NullExperts(Capacity(TopK(2), 1.0), num_null=2)
    r = router(rand_logits(0, e=6))
    assert r.num_experts == 4 and "capacity" in r.info
    router.eval()
    assert not router.router.training and not router.router.router.training


class FixedGate(nn.Module):
    """A gate that returns fixed logits ``[B, L, E]`` (whatever the input)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.to(x.dtype)


def test_moe_with_null_experts_outputs_zero_for_a_null_token():
    torch.manual_seed(0)
    probs = [[[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.1, 0.7]]]  # token 1 and 2: null + one real
    layer = MoE(4, 8, 2, NullExperts(TopK(1), num_null=1), gate=FixedGate(logits_of(probs)))
    x = torch.randn(1, 3, 4, dtype=F64)
    layer.double()
    y = layer(x)
    assert torch.equal(y[0, 1], torch.zeros(4, dtype=F64)) and torch.equal(y[0, 2], torch.zeros(4, dtype=F64))
    one = MoE(4, 8, 2, TopK(1), gate=FixedGate(logits_of([[[0.5, 0.3]]]))).double()
    one.experts.load_state_dict(layer.experts.state_dict())
    assert torch.allclose(y[0, 0], 0.5 * one.experts(x[0, :1], torch.tensor([0]), torch.tensor([0]),
                                                     torch.ones(1, dtype=F64))[0])


def test_moe_sizes_its_gate_for_null_experts():
    torch.manual_seed(0)
    layer = MoE(4, 8, 3, NullExperts(TopK(2), num_null=2))
    assert layer.gate.proj.out_features == 5
    x = torch.randn(2, 6, 4)
    layer(x).sum().backward()
    assert layer.routing.num_experts == 3 and layer.routing.logits.shape == (2, 6, 3)
    assert layer.gate.proj.weight.grad[3:].abs().sum() > 0  # the null rows learn too
    with pytest.raises(ValueError, match="gate returned"):
        MoE(4, 8, 3, NullExperts(TopK(2), num_null=2), gate=nn.Linear(4, 3))(x)


@pytest.mark.parametrize("num_null", [0, -1, True, 1.5, None])
def test_null_experts_bad_num_null(num_null):
    with pytest.raises(ValueError, match="num_null"):
        NullExperts(TopK(1), num_null)


def test_null_experts_bad_router_and_logits():
    with pytest.raises(ValueError, match="router"):
        NullExperts("topk", 1)
    with pytest.raises(ValueError, match="E >= 1 real experts"):
        NullExperts(TopK(1), 3)(rand_logits(0, e=3))
    with pytest.raises(ValueError, match="logits"):
        NullExperts(TopK(1), 1)([[1.0, 2.0]])  # the inner router validates the logits


# ---- cosine gate (X-MoE) ----------------------------------------------------------------------
def hand_gate() -> CosineGate:
    gate = CosineGate(2, 2, proj_dim=2, temperature=0.5, learn_temperature=False)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.eye(2))
        gate.expert_embedding.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    return gate


def test_cosine_gate_hand_made():
    x = torch.tensor([[[3.0, 0.0], [0.0, -1.0]]])
    logits = hand_gate()(x)
    # cos with e0 = (1, 0), e1 = (1, 1)/sqrt 2; divided by the temperature 0.5
    expected = torch.tensor([[[2.0, math.sqrt(2)], [0.0, -math.sqrt(2)]]])
    assert torch.allclose(logits, expected, atol=1e-6)


def test_cosine_gate_matches_reference_and_gradcheck():
    torch.manual_seed(0)
    gate = CosineGate(5, 3, proj_dim=4, temperature=0.3).double()
    x = torch.randn(2, 3, 5, dtype=F64)
    params = {name: p.detach().clone().requires_grad_() for name, p in gate.named_parameters()}

    def fn(x_, w, emb, s):
        return torch.func.functional_call(gate, {"proj.weight": w, "expert_embedding": emb, "log_scale": s}, (x_,))

    inputs = (x.clone().requires_grad_(), params["proj.weight"], params["expert_embedding"], params["log_scale"])
    out = fn(*inputs)
    ref = ref_cosine(inputs[0], inputs[1], inputs[2], 1 / inputs[3].exp())
    assert torch.allclose(out, ref, atol=1e-12)
    c = torch.randn(2, 3, 3, dtype=F64)
    g_gate = torch.autograd.grad((out * c).sum(), inputs)
    g_ref = torch.autograd.grad((ref * c).sum(), inputs)
    for a, b in zip(g_gate, g_ref):
        assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(fn, inputs)


def test_cosine_gate_ignores_norms():
    gate = hand_gate()
    x = torch.tensor([[[3.0, 1.0]]])
    assert torch.allclose(gate(x), gate(10 * x), atol=1e-6)
    with torch.no_grad():
        gate.expert_embedding[1] *= 100.0  # a big embedding does not make expert 1 win
    assert torch.allclose(gate(x), hand_gate()(x), atol=1e-6)


def test_cosine_gate_temperature_learned_or_fixed():
    learned = CosineGate(4, 3)
    assert isinstance(learned.log_scale, nn.Parameter) and learned.temperature == pytest.approx(0.5)
    x = torch.randn(2, 3, 4)
    learned(x).pow(2).sum().backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad != 0
    fixed = CosineGate(4, 3, temperature=0.2, learn_temperature=False)
    assert "log_scale" not in dict(fixed.named_parameters()) and "log_scale" in fixed.state_dict()
    assert fixed.temperature == pytest.approx(0.2)
    with torch.no_grad():
        learned.log_scale.fill_(50.0)  # far past the cap
    assert learned.temperature == pytest.approx(0.01)
    assert learned(x).abs().max() <= 100.0 + 1e-4


@pytest.mark.parametrize("router", [TopK(2, renormalize=True), ExpertChoice(2), NullExperts(TopK(2), 1)])
def test_cosine_gate_with_any_router_in_moe(router):
    torch.manual_seed(0)
    width = 4 + getattr(router, "num_null", 0)
    layer = MoE(8, 16, 4, router, gate=CosineGate(8, width, proj_dim=4))
    x = torch.randn(2, 5, 8)
    layer(x).sum().backward()
    assert layer.routing.num_experts == 4
    assert layer.gate.expert_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0}, {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": True},
    {"proj_dim": 0}, {"proj_dim": 2.0}, {"dim": 0}, {"num_experts": 0},
    {"min_temperature": 0}, {"temperature": 0.005},
])
def test_cosine_gate_bad_values(kwargs):
    args = {"dim": 4, "num_experts": 3, **kwargs}
    with pytest.raises(ValueError):
        CosineGate(**args)
