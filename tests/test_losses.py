"""Spec of moe_lite.losses: hand-computed values, slow loop references, gradients, directions.

Routings are built by hand here (no routers): a list of (token, expert) pairs, or a bool mask.
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_lite import losses
from moe_lite.losses import (
    REGISTRY,
    entropy,
    importance,
    load_balance,
    per_layer_regression,
    router_similarity,
    sequence_balance,
    z_loss,
)
from moe_lite.routing import Routing

LN = math.log


# ---- local helpers ----------------------------------------------------------------------------
def routing_from_pairs(logits, pairs, weights=None, scores=None, num_experts=None):
    """A Routing from logits ``[B, L, E]`` (nested lists or tensor) and (token, expert) pairs.

    Weights default to softmax(logits) at the selected pairs (so they carry gradient to logits).
    """
    logits = torch.as_tensor(logits, dtype=torch.float64) if not torch.is_tensor(logits) else logits
    e = logits.shape[-1] if num_experts is None else num_experts
    token = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    expert = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    if weights is None:
        weights = logits.reshape(-1, logits.shape[-1]).softmax(-1)[token, expert]
    elif not torch.is_tensor(weights):
        weights = torch.tensor(weights, dtype=logits.dtype)
    return Routing(logits=logits, token=token, expert=expert, weight=weights, num_experts=e, scores=scores)


def routing_from_mask(logits, mask, scores=None):
    """A Routing from logits ``[B, L, E]`` and a bool mask ``[N, E]``; weights = selected probs."""
    idx = mask.nonzero()  # [A, 2]
    token, expert = idx[:, 0], idx[:, 1]
    weight = logits.reshape(-1, logits.shape[-1]).softmax(-1)[token, expert]
    return Routing(logits=logits, token=token, expert=expert, weight=weight,
                   num_experts=logits.shape[-1], scores=scores)


def topk_mask(logits, k):
    """bool ``[N, E]``: each token's k largest logits (a local stand-in for a top-k router)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(k, dim=-1).indices, True)
    return mask


def random_routings(seed=0, dtype=torch.float64):
    """A few random routings of different kinds: top-1, top-2, random mask (top-p/race-like)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, l, e, kind in [(2, 5, 4, "top1"), (3, 4, 6, "top2"), (2, 6, 5, "random"), (1, 7, 3, "random")]:
        logits = torch.randn(b, l, e, generator=g, dtype=dtype) * 1.5
        if kind == "top1":
            mask = topk_mask(logits, 1)
        elif kind == "top2":
            mask = topk_mask(logits, 2)
        else:
            mask = torch.rand(b * l, e, generator=g) < 0.4
            mask[0] = True  # at least some assignments
        out.append(routing_from_mask(logits, mask))
    return out


def probs_list(routing):
    """Python lists: softmax probabilities per flat token, computed with math.exp."""
    rows = routing.logits.detach().double().reshape(-1, routing.num_experts).tolist()
    out = []
    for row in rows:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        out.append([v / s for v in ex])
    return out


def pairs_list(routing):
    return list(zip(routing.token.tolist(), routing.expert.tolist()))


# ---- slow loop references ---------------------------------------------------------------------
def ref_load_balance(routing):
    e, probs, pairs = routing.num_experts, probs_list(routing), pairs_list(routing)
    count = [0] * e
    for _, ex in pairs:
        count[ex] += 1
    total = 0.0
    for ex in range(e):
        f = count[ex] / len(pairs)
        p = sum(row[ex] for row in probs) / len(probs)
        total += f * p
    return e * total


def ref_importance(routing):
    e = routing.num_experts
    imp = [0.0] * e
    for (_, ex), w in zip(pairs_list(routing), routing.weight.detach().double().tolist()):
        imp[ex] += w
    mean = sum(imp) / e
    var = sum((v - mean) ** 2 for v in imp) / e
    return var / mean ** 2


def ref_z_loss(routing):
    rows = routing.logits.detach().double().reshape(-1, routing.num_experts).tolist()
    total = 0.0
    for row in rows:
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse ** 2
    return total / len(rows)


def ref_entropy(routing):
    total = 0.0
    probs = probs_list(routing)
    for row in probs:
        total += -sum(p * math.log(p) for p in row if p > 0)
    return total / len(probs)


def ref_router_similarity(routing):
    e, probs = routing.num_experts, probs_list(routing)
    n = len(probs)
    sel = [[False] * e for _ in range(n)]
    for t, ex in pairs_list(routing):
        sel[t][ex] = True
    co = [[sum(1 for t in range(n) if sel[t][i] and sel[t][j]) for j in range(e)] for i in range(e)]
    diag_sum = sum(co[i][i] for i in range(e))
    off_sum = sum(co[i][j] for i in range(e) for j in range(e) if i != j)
    total = 0.0
    for i in range(e):
        for j in range(e):
            if i == j:
                w = co[i][i] / diag_sum * e if diag_sum else 0.0
            else:
                w = co[i][j] / off_sum * (e * e - e) if off_sum else 0.0
            pij = sum(probs[t][i] * probs[t][j] for t in range(n))
            total += w * pij
    return total / n


def ref_sequence_balance(routing):
    b, l, e = routing.logits.shape
    if routing.scores is None:
        s = probs_list(routing)
    else:
        s = []
        for row in routing.scores.detach().double().reshape(-1, e).tolist():
            row = [max(v, 0.0) for v in row]
            tot = sum(row)
            s.append([v / tot for v in row] if tot > 0 else [1.0 / e] * e)
    pairs = pairs_list(routing)
    k = len(pairs) / (b * l)
    total = 0.0
    for seq in range(b):
        toks = range(seq * l, (seq + 1) * l)
        seq_sum = 0.0
        for i in range(e):
            hits = sum(1 for t, ex in pairs if ex == i and t in toks)
            f = e / (k * l) * hits
            p = sum(s[t][i] for t in toks) / l
            seq_sum += f * p
        total += seq_sum
    return total / b


REFERENCES = {
    "load_balance": ref_load_balance,
    "importance": ref_importance,
    "z_loss": ref_z_loss,
    "entropy": ref_entropy,
    "router_similarity": ref_router_similarity,
    "sequence_balance": ref_sequence_balance,
}


# ---- registry and common behaviour ------------------------------------------------------------
def test_registry_names_and_all():
    assert set(REGISTRY) == {"load_balance", "importance", "z_loss", "entropy",
                             "router_similarity", "sequence_balance"}
    for name, fn in REGISTRY.items():
        assert fn is getattr(losses, name)
        assert name in losses.__all__
    assert "per_layer_regression" in losses.__all__ and "REGISTRY" in losses.__all__
    assert "per_layer_regression" not in REGISTRY


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_loop_reference(name):
    for routing in random_routings(seed=1):
        got = REGISTRY[name](routing)
        assert got.dim() == 0 and got.dtype == torch.float64
        assert got.item() == pytest.approx(REFERENCES[name](routing), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_dtype_device(name, dtype):
    for routing in random_routings(seed=2, dtype=dtype):
        out = REGISTRY[name](routing)
        assert out.shape == () and out.dtype == dtype and out.device == routing.logits.device
        assert torch.isfinite(out)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_bf16_logits_computed_in_float32(name):
    for r64 in random_routings(seed=3):
        bf = r64.logits.to(torch.bfloat16)
        r_bf = Routing(bf, r64.token, r64.expert, r64.weight.to(torch.bfloat16), r64.num_experts)
        r_32 = Routing(bf.float(), r64.token, r64.expert, r64.weight.to(torch.bfloat16).float(), r64.num_experts)
        out = REGISTRY[name](r_bf)
        assert out.dtype == torch.float32
        # same result as upcasting by hand: nothing was computed in bf16
        assert out.item() == pytest.approx(REGISTRY[name](r_32).item(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_bad_logits_shape_raises(name):
    good = random_routings(seed=4)[0]
    # Routing itself rejects these on construction (issue 9); the losses keep their own check for
    # records mutated after construction
    with pytest.raises(ValueError, match=r"\[B, L, E\]"):
        Routing(good.logits.reshape(-1, good.num_experts), good.token, good.expert, good.weight,
                good.num_experts)
    with pytest.raises(ValueError, match="num_experts"):
        Routing(good.logits, good.token, good.expert, good.weight, good.num_experts + 1)
    flat = Routing(good.logits, good.token, good.expert, good.weight, good.num_experts)
    flat.logits = good.logits.reshape(-1, good.num_experts)
    with pytest.raises(ValueError, match=r"\[B, L, E\]"):
        REGISTRY[name](flat)
    wrong_e = Routing(good.logits, good.token, good.expert, good.weight, good.num_experts)
    wrong_e.num_experts += 1
    with pytest.raises(ValueError, match="num_experts"):
        REGISTRY[name](wrong_e)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_no_assignment_is_finite_with_finite_grad(name):
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    r = Routing(logits, empty, empty, torch.zeros(0, dtype=torch.float64, requires_grad=True), 4)
    out = REGISTRY[name](r)
    assert torch.isfinite(out)
    if out.requires_grad:
        (g,) = torch.autograd.grad(out, logits, allow_unused=True)
        assert g is None or torch.isfinite(g).all()


@pytest.mark.parametrize("name", ["load_balance", "z_loss", "entropy", "router_similarity", "sequence_balance"])
def test_gradcheck_wrt_logits(name):
    torch.manual_seed(5)
    logits = torch.randn(2, 2, 3, dtype=torch.float64)
    mask = topk_mask(logits, 2)
    mask[0] = True  # one token with every expert (a top-p-like token)
    mask[3] = False
    mask[3, 1] = True  # one token with a single expert

    def fn(lg):
        return REGISTRY[name](routing_from_mask(lg, mask))

    assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),))


# ---- load_balance -----------------------------------------------------------------------------
def test_load_balance_hand_values():
    # E=2, N=2 tokens. token0 logits [ln3, 0] -> p = [0.75, 0.25]; token1 [0, 0] -> [0.5, 0.5].
    # P = [0.625, 0.375].
    logits = [[[LN(3), 0.0], [0.0, 0.0]]]
    # both tokens -> expert 0: f = [1, 0]; loss = 2 * (1 * 0.625) = 1.25
    assert load_balance(routing_from_pairs(logits, [(0, 0), (1, 0)])).item() == pytest.approx(1.25)
    # one each: f = [0.5, 0.5]; loss = 2 * (0.5 * 0.625 + 0.5 * 0.375) = 1.0
    assert load_balance(routing_from_pairs(logits, [(0, 0), (1, 1)])).item() == pytest.approx(1.0)
    # token0 -> {0, 1}, token1 -> {0}: A = 3 assignments, f = [2/3, 1/3] (counted per assignment)
    # loss = 2 * (2/3 * 0.625 + 1/3 * 0.375) = 2 * 1.625 / 3
    got = load_balance(routing_from_pairs(logits, [(0, 0), (0, 1), (1, 0)])).item()
    assert got == pytest.approx(2 * 1.625 / 3)


def test_load_balance_exactly_one_at_perfect_balance():
    # E=4, N=8 tokens with equal logits, every expert gets 2 tokens: f = P = 1/4 -> exactly 1.0
    for dtype in (torch.float32, torch.float64):
        logits = torch.zeros(2, 4, 4, dtype=dtype)
        pairs = [(t, t % 4) for t in range(8)]
        assert load_balance(routing_from_pairs(logits, pairs)).item() == 1.0
    # top-2 with balanced load (each expert 4 of the 16 assignments), E=4
    logits = torch.zeros(1, 8, 4, dtype=torch.float64)
    pairs = [(t, t % 4) for t in range(8)] + [(t, (t + 1) % 4) for t in range(8)]
    assert load_balance(routing_from_pairs(logits, pairs)).item() == 1.0
    # E=3: balanced up to rounding
    logits = torch.zeros(1, 6, 3, dtype=torch.float64)
    assert load_balance(routing_from_pairs(logits, [(t, t % 3) for t in range(6)])).item() == pytest.approx(1.0, abs=1e-15)


def test_load_balance_collapse_is_e():
    # all probability and all assignments on expert 0: loss = E * 1 * 1 = E (up to exp(-40))
    logits = torch.tensor([[[40.0, 0.0, 0.0, 0.0]] * 3], dtype=torch.float64)
    r = routing_from_pairs(logits, [(t, 0) for t in range(3)])
    assert load_balance(r).item() == pytest.approx(4.0, rel=1e-12)


def test_load_balance_ignores_weights_and_f_has_no_grad():
    logits = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    pairs = [(0, 0), (1, 0), (2, 1), (3, 2)]
    a = load_balance(routing_from_pairs(logits, pairs, weights=[1.0, 1.0, 1.0, 1.0]))
    b = load_balance(routing_from_pairs(logits, pairs, weights=[0.1, 5.0, 2.0, 0.3]))
    assert a.item() == b.item()
    (g,) = torch.autograd.grad(a, logits)
    # analytic gradient with f constant: dL/dz_ne = E/N * p_ne * (f_e - sum_j f_j p_nj)
    p = logits.detach().softmax(-1).reshape(4, 3)
    f = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    expected = 3 / 4 * p * (f - (p * f).sum(-1, keepdim=True))
    assert torch.allclose(g.reshape(4, 3), expected, atol=1e-14)


def test_load_balance_gradient_pushes_away_from_overloaded_expert():
    # expert 0 receives every assignment; gradient descent must lower its logit, raise the others
    logits = torch.zeros(1, 4, 3, dtype=torch.float64, requires_grad=True)
    r = routing_from_pairs(logits, [(t, 0) for t in range(4)])
    (g,) = torch.autograd.grad(load_balance(r), logits)
    assert (g[..., 0] > 0).all() and (g[..., 1:] < 0).all()
    # a step of descent lowers P_0 and the loss
    with torch.no_grad():
        stepped = logits - 1.0 * g
    r2 = routing_from_pairs(stepped, [(t, 0) for t in range(4)])
    assert stepped.softmax(-1)[..., 0].mean() < 1 / 3
    assert load_balance(r2) < load_balance(r)


# ---- importance -------------------------------------------------------------------------------
def test_importance_hand_values():
    logits = torch.zeros(1, 3, 2, dtype=torch.float64)
    # importance = [3, 1]: mean 2, population var ((1)^2 + (1)^2) / 2 = 1 -> CV^2 = 1/4
    r = routing_from_pairs(logits, [(0, 0), (1, 0), (2, 1)], weights=[2.0, 1.0, 1.0])
    assert importance(r).item() == pytest.approx(0.25)
    # E=3, importance = [1, 2, 3]: mean 2, var (1 + 0 + 1) / 3 = 2/3 -> CV^2 = (2/3) / 4 = 1/6
    logits = torch.zeros(1, 3, 3, dtype=torch.float64)
    r = routing_from_pairs(logits, [(0, 0), (1, 1), (2, 2), (0, 2), (1, 2)], weights=[1.0, 2.0, 1.0, 1.0, 1.0])
    assert importance(r).item() == pytest.approx(1 / 6)


def test_importance_zero_at_balance_and_e_minus_one_at_collapse():
    logits = torch.zeros(1, 4, 4, dtype=torch.float64)
    balanced = routing_from_pairs(logits, [(t, t) for t in range(4)], weights=[0.5] * 4)
    assert importance(balanced).item() == 0.0
    collapsed = routing_from_pairs(logits, [(t, 0) for t in range(4)], weights=[0.5] * 4)
    assert importance(collapsed).item() == pytest.approx(3.0)  # E - 1


def test_importance_uses_combine_weights_not_counts():
    # same counts (1 token per expert) but unequal weights -> non-zero; equal weights -> zero
    logits = torch.zeros(1, 2, 2, dtype=torch.float64)
    assert importance(routing_from_pairs(logits, [(0, 0), (1, 1)], weights=[0.9, 0.9])).item() == 0.0
    # importance [0.9, 0.3]: mean 0.6, var 0.09 -> 0.09 / 0.36 = 0.25
    got = importance(routing_from_pairs(logits, [(0, 0), (1, 1)], weights=[0.9, 0.3])).item()
    assert got == pytest.approx(0.25)


def test_importance_gradcheck_wrt_weight():
    torch.manual_seed(6)
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = topk_mask(logits, 2)
    r = routing_from_mask(logits, mask)
    w0 = torch.rand(r.num_assignments, dtype=torch.float64) + 0.1

    def fn(w):
        return importance(Routing(logits, r.token, r.expert, w, 4))

    assert torch.autograd.gradcheck(fn, (w0.requires_grad_(),))


def test_importance_gradient_direction_and_through_logits():
    logits = torch.zeros(1, 3, 2, dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    r = routing_from_pairs(logits, [(0, 0), (1, 0), (2, 1)], weights=w)
    (g,) = torch.autograd.grad(importance(r), w)
    assert (g[:2] > 0).all() and g[2] < 0  # shrink overloaded expert 0's weights, grow expert 1's
    # through logits when weights are softmax probabilities
    lg = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    r = routing_from_pairs(lg, [(0, 0), (1, 0), (2, 1)])
    (g,) = torch.autograd.grad(importance(r), lg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ---- z_loss -----------------------------------------------------------------------------------
def test_z_loss_hand_values():
    # token0 [0, 0]: lse = ln2; token1 [ln1, ln3]: lse = ln4 = 2 ln2
    # mean of squares = ((ln2)^2 + 4 (ln2)^2) / 2 = 2.5 (ln2)^2
    logits = [[[0.0, 0.0], [0.0, LN(3)]]]
    assert z_loss(routing_from_pairs(logits, [(0, 0)])).item() == pytest.approx(2.5 * LN(2) ** 2)
    # uniform router with zero logits: (ln E)^2
    assert z_loss(routing_from_pairs(torch.zeros(2, 3, 8, dtype=torch.float64), [(0, 0)])).item() == pytest.approx(LN(8) ** 2)


def test_z_loss_stable_for_large_logits_and_pulls_them_down():
    logits = torch.tensor([[[1000.0, 999.0, -5.0]]], dtype=torch.float64, requires_grad=True)
    out = z_loss(routing_from_pairs(logits, [(0, 0)]))
    assert out.item() == pytest.approx((1000 + LN(1 + math.exp(-1) + math.exp(-1005))) ** 2)
    (g,) = torch.autograd.grad(out, logits)
    assert (g >= 0).all() and g[..., 0] > g[..., 1]  # descent lowers the big logits first


# ---- entropy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("e", [2, 3, 4, 8])
def test_entropy_uniform_is_log_e(e):
    logits = torch.full((2, 3, e), 0.7, dtype=torch.float64)
    assert entropy(routing_from_pairs(logits, [(0, 0)])).item() == pytest.approx(LN(e), rel=1e-14)


def test_entropy_hand_and_one_hot():
    # p = [0.75, 0.25]: H = -(0.75 ln 0.75 + 0.25 ln 0.25); second token one-hot-ish (~0)
    logits = [[[LN(3), 0.0], [0.0, -1e4]]]
    expected = -(0.75 * LN(0.75) + 0.25 * LN(0.25)) / 2
    assert entropy(routing_from_pairs(logits, [(0, 0)])).item() == pytest.approx(expected, rel=1e-12)
    # exact one-hot through -inf logits: 0, not NaN, and a finite gradient
    lg = torch.tensor([[[0.0, -math.inf, -math.inf]]], dtype=torch.float64, requires_grad=True)
    out = entropy(routing_from_pairs(lg, [(0, 0)]))
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, lg)
    assert not torch.isnan(g).any()


def test_entropy_gradient_sharpens():
    logits = torch.tensor([[[1.0, 0.0, 0.0, -0.5]]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(entropy(routing_from_pairs(logits, [(0, 0)])), logits)
    assert g[..., 0] < 0  # raising the top logit lowers the entropy
    assert g.sum().abs() < 1e-12  # softmax is shift-invariant


# ---- router_similarity ------------------------------------------------------------------------
def test_router_similarity_one_when_coselection_uniform():
    # E=4, 6 tokens, each one of the 6 pairs: M' diag = 3, off = 1 -> W is all ones, and then
    # sum_ij P'_ij / N = mean_n (sum_e P_ne)^2 = 1 for ANY probabilities.
    pairs6 = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    pairs = [(t, e) for t, pr in enumerate(pairs6) for e in pr]
    balanced = routing_from_pairs(torch.zeros(1, 6, 4, dtype=torch.float64), pairs)
    assert router_similarity(balanced).item() == pytest.approx(1.0, abs=1e-15)
    random_logits = torch.randn(1, 6, 4, dtype=torch.float64) * 3
    assert router_similarity(routing_from_pairs(random_logits, pairs)).item() == pytest.approx(1.0, abs=1e-14)


def test_router_similarity_hand_value_e3():
    # mask: {0,1}, {0,1}, {0,2}. M' diag = [3, 2, 1] (sum 6) -> W diag = [1.5, 1, 0.5] (sums to E=3);
    # off: M'01 = 2, M'02 = 1, M'12 = 0, both triangles sum 6 -> scaled to E^2-E = 6: W01 = 2, W02 = 1.
    # every token p = [0.5, 0.25, 0.25]:
    #   diag: 1.5*0.25 + 1*0.0625 + 0.5*0.0625 = 0.46875
    #   off:  2*W01*p0*p1 + 2*W02*p0*p2 = 2*2*0.125 + 2*1*0.125 = 0.75
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)).expand(1, 3, 3)
    r = routing_from_pairs(logits, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 2)])
    assert router_similarity(r).item() == pytest.approx(0.46875 + 0.75, rel=1e-12)


def test_router_similarity_top1_has_no_nan():
    # k=1: off-diagonal of M' is all zero and contributes 0 (documented), diag = [2, 1] -> W = diag(4/3, 2/3)
    # p = [0.75, 0.25] for each token: 4/3 * 0.5625 + 2/3 * 0.0625
    logits = torch.tensor([[[LN(3), 0.0]] * 3], dtype=torch.float64, requires_grad=True)
    r = routing_from_pairs(logits, [(0, 0), (1, 0), (2, 1)])
    out = router_similarity(r)
    assert out.item() == pytest.approx(4 / 3 * 0.5625 + 2 / 3 * 0.0625, rel=1e-12)
    (g,) = torch.autograd.grad(out, logits)
    assert torch.isfinite(g).all()


def test_router_similarity_penalises_coselected_pairs():
    # experts {0,1} always co-fire, {2,3} always co-fire ("2-in-4 collapses into 1-in-2"):
    # M' diag = 2 each -> W diag = 1; off M'01 = M'23 = 2 (sum 8) -> W01 = W23 = 3, other pairs 0.
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3)]

    def loss_for(p):
        lg = torch.log(torch.tensor(p, dtype=torch.float64)).expand(1, 4, 4)
        return router_similarity(routing_from_pairs(lg, pairs)).item()

    # probability on a co-selected pair: diag 0.34 + off 3*(2*0.16 + 2*0.01) = 1.36
    assert loss_for([0.4, 0.4, 0.1, 0.1]) == pytest.approx(1.36, rel=1e-12)
    # same marginal shape, on a never co-selected pair: diag 0.34 + off 3*(2*0.04 + 2*0.04) = 0.82
    assert loss_for([0.4, 0.1, 0.4, 0.1]) == pytest.approx(0.82, rel=1e-12)
    # gradient: with expert 0 favoured, raising its co-selected partner 1 costs more than raising 2
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0]] * 4], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(router_similarity(routing_from_pairs(logits, pairs)), logits)
    assert (g[..., 1] > g[..., 2]).all()


def test_router_similarity_weight_is_detached():
    # the mask never carries gradient; W is built from it, so the gradient is exactly that of
    # sum(W * P'P) / N with W a constant
    torch.manual_seed(7)
    logits = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = topk_mask(logits, 2)
    (g,) = torch.autograd.grad(router_similarity(routing_from_mask(logits, mask)), logits)
    m = mask.double()
    co = m.T @ m
    d = torch.diag(torch.diag(co))
    w = d / d.sum() * 3 + (co - d) / (co - d).sum() * 6
    lg = logits.detach().clone().requires_grad_()
    p = lg.reshape(5, 3).softmax(-1)
    (g_ref,) = torch.autograd.grad((w * (p.T @ p)).sum() / 5, lg)
    assert torch.allclose(g, g_ref, atol=1e-14)


# ---- sequence_balance -------------------------------------------------------------------------
def test_sequence_balance_one_at_perfect_balance():
    # B=2, L=4, E=4, top-1: each expert once per sequence, K = 1 -> f_i = 4/(1*4)*1 = 1, P_i = 1/4
    logits = torch.zeros(2, 4, 4, dtype=torch.float64)
    r = routing_from_pairs(logits, [(t, t % 4) for t in range(8)])
    assert sequence_balance(r).item() == 1.0
    # top-2: each expert twice per sequence, K = 2 -> f_i = 4/(2*4)*2 = 1
    pairs = [(t, t % 4) for t in range(8)] + [(t, (t + 1) % 4) for t in range(8)]
    assert sequence_balance(routing_from_pairs(logits, pairs)).item() == 1.0
    # sigmoid scores, all equal: normalised to 1/E -> 1.0
    r = routing_from_pairs(logits, pairs, scores=torch.sigmoid(logits))
    assert sequence_balance(r).item() == 1.0


def test_sequence_balance_hand_value():
    # B=2, L=2, E=2, K = A/N = 4/4 = 1.
    # seq0: tokens 0, 1 -> expert 0; p = [0.75, 0.25], [0.5, 0.5]
    #   f = 2/(1*2) * [2, 0] = [2, 0]; P = [0.625, 0.375]; sum f P = 1.25
    # seq1: token 2 -> 0, token 3 -> 1; p = [0.25, 0.75] twice
    #   f = [1, 1]; P = [0.25, 0.75]; sum = 1.0            -> mean over sequences = 1.125
    logits = [[[LN(3), 0.0], [0.0, 0.0]], [[0.0, LN(3)], [0.0, LN(3)]]]
    r = routing_from_pairs(logits, [(0, 0), (1, 0), (2, 0), (3, 1)])
    assert sequence_balance(r).item() == pytest.approx(1.125, rel=1e-12)


def test_sequence_balance_sees_per_sequence_imbalance_load_balance_does_not():
    # seq0 all -> expert 0 with p = [0.75, 0.25], seq1 all -> expert 1 with p = [0.25, 0.75]
    # globally f = [0.5, 0.5] -> load_balance = 1.0; per sequence f = [2, 0]: 2*0.75 = 1.5 each
    logits = [[[LN(3), 0.0]] * 2, [[0.0, LN(3)]] * 2]
    r = routing_from_pairs(logits, [(0, 0), (1, 0), (2, 1), (3, 1)])
    assert load_balance(r).item() == pytest.approx(1.0)
    assert sequence_balance(r).item() == pytest.approx(1.5, rel=1e-12)


def test_sequence_balance_uses_scores_normalised():
    # B=1, L=2, E=2, sigmoid-like scores [0.6, 0.2] -> s' = [0.75, 0.25]; [0.3, 0.3] -> [0.5, 0.5]
    # both tokens -> expert 0, K = 1: f = 2/(1*2) * [2, 0] = [2, 0]; P_0 = 0.625 -> 1.25
    logits = torch.zeros(1, 2, 2, dtype=torch.float64)
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.3]]], dtype=torch.float64)
    r = routing_from_pairs(logits, [(0, 0), (1, 0)], scores=scores)
    assert sequence_balance(r).item() == pytest.approx(1.25, rel=1e-12)
    # identity scores: clamped at 0 -> [2, -1] becomes [1, 0]; an all-negative token becomes uniform
    scores = torch.tensor([[[2.0, -1.0], [-1.0, -3.0]]], dtype=torch.float64)
    r = routing_from_pairs(logits, [(0, 0), (1, 0)], scores=scores)
    # P_0 = (1 + 0.5) / 2 = 0.75; f_0 = 2 -> 1.5
    assert sequence_balance(r).item() == pytest.approx(1.5, rel=1e-12)


def test_sequence_balance_with_scores_matches_reference_and_gradcheck():
    torch.manual_seed(8)
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = topk_mask(logits, 2)
    for scores in (torch.sigmoid(logits), logits):  # sigmoid gating, identity gating
        r = routing_from_mask(logits, mask, scores=scores)
        assert sequence_balance(r).item() == pytest.approx(ref_sequence_balance(r), rel=1e-10)

    small = logits[:2, :2, :3].contiguous()
    small_mask = topk_mask(small, 2)

    def fn(lg):
        return sequence_balance(routing_from_mask(lg, small_mask, scores=torch.sigmoid(lg)))

    assert torch.autograd.gradcheck(fn, (small.clone().requires_grad_(),))


def test_sequence_balance_scores_shape_checked():
    logits = torch.zeros(1, 2, 2)
    r = routing_from_pairs(logits, [(0, 0)], scores=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="scores"):
        sequence_balance(r)


# ---- per_layer_regression ---------------------------------------------------------------------
def test_per_layer_regression_hand_value_and_sum_over_layers():
    target = torch.zeros(1, 1, 2)
    p1 = torch.tensor([[[1.0, 1.0]]])  # mse = (1 + 1) / 2 = 1
    p2 = torch.tensor([[[2.0, 0.0]]])  # mse = (4 + 0) / 2 = 2
    assert per_layer_regression([p1, p2], target).item() == pytest.approx(3.0)
    assert per_layer_regression((p1,), target).item() == pytest.approx(1.0)
    assert per_layer_regression([target.clone()] * 3, target).item() == 0.0


def test_per_layer_regression_matches_mse_and_grad():
    torch.manual_seed(9)
    target = torch.randn(2, 3, 4, dtype=torch.float64)
    preds = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out = per_layer_regression(preds, target)
    expected = sum(torch.nn.functional.mse_loss(p, target) for p in preds)
    assert out.item() == pytest.approx(expected.item(), rel=1e-12)
    grads = torch.autograd.grad(out, preds)
    for p, g in zip(preds, grads):
        assert torch.allclose(g, 2 * (p - target) / p.numel())
    assert torch.autograd.gradcheck(lambda a, b: per_layer_regression([a, b], target), tuple(preds[:2]))


def test_per_layer_regression_low_precision_in_float32():
    target = torch.randn(2, 3, 4)
    preds = [target.to(torch.bfloat16) + 1]
    out = per_layer_regression(preds, target)
    assert out.dtype == torch.float32


def test_per_layer_regression_errors():
    target = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="empty"):
        per_layer_regression([], target)
    with pytest.raises(ValueError, match="shape"):
        per_layer_regression([torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)], target)
    with pytest.raises(ValueError, match=r"\[B, L, P\]"):
        per_layer_regression([torch.zeros(6, 4)], torch.zeros(6, 4))
    with pytest.raises(ValueError, match="sequence"):
        per_layer_regression(torch.zeros(2, 3, 4), target)


# ---- loss weights: one rule for every layer and config ------------------------------------------------
def test_check_loss_weights_one_rule():
    from moe_lite.losses import REGISTRY, check_loss_weights

    assert check_loss_weights(None, "X") == {}
    assert check_loss_weights({"z_loss": 1, "load_balance": 0.0}, "X") == {"z_loss": 1.0, "load_balance": 0.0}
    assert all(type(w) is float for w in check_loss_weights({n: 1 for n in REGISTRY}, "X").values())
    with pytest.raises(ValueError, match=r"X: unknown loss name\(s\) \['balance'\].*load_balance"):
        check_loss_weights({"balance": 1.0}, "X")
    with pytest.raises(ValueError, match="X: losses must be a dict"):
        check_loss_weights(["z_loss"], "X")
    for bad in (-0.1, float("nan"), float("inf"), True, "1", None):
        with pytest.raises(ValueError, match=r"X: weight of loss 'z_loss' must be a finite number >= 0"):
            check_loss_weights({"z_loss": bad}, "X")


def test_every_layer_and_config_applies_the_same_rule():
    """The MoE layer, ViTConfig (and LMConfig through the same check) and DiTConfig refuse the same
    weights: before, the layer took negative weights and ViTConfig took nan."""
    from moe_lite.layers import MoE
    from moe_lite.models.dit import DiTConfig
    from moe_lite.models.vit import ViTConfig
    from moe_lite.routers import TopK

    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            MoE(8, 16, 4, TopK(2), losses={"load_balance": bad})
        with pytest.raises(ValueError, match="finite number >= 0"):
            ViTConfig(moe_layers="all", moe_losses={"load_balance": bad})
        with pytest.raises(ValueError, match="finite number >= 0"):
            DiTConfig(balance_weight=bad)
