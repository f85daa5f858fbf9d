"""Spec of group-limited routing (``TopK`` / ``BiasBalanced`` with ``groups``, ``top_groups``), the
``Capacity`` wrapper, and ``routing.groups_per_token``.

Hand-made logits with the expected (token, expert, weight) written out, slow per-token Python
references compared on random inputs (outputs and the gradient reaching the logits), and errors.
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_lite import MoE
from moe_lite.routers import BiasBalanced, Capacity, ExpertChoice, Race, Router, Switch, TopK, TopP
from moe_lite.routing import Routing, groups_per_token, routing_summary

from routing_checks import (F64, SEEDS, as_dict, assert_matches, assert_pairs, assert_pairs_tensors, gate_row,
                            logits_of, loss_grad, num, pairs)


def rand_logits(seed: int, b: int = 2, l: int = 5, e: int = 8) -> torch.Tensor:
    return torch.randn(b, l, e, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ---- slow references --------------------------------------------------------------------------
def ref_allowed(sel: list, groups: int, top_groups: int) -> list:
    """Experts a token may pick: those of its ``top_groups`` groups ranked by the sum of each group's
    two highest selection scores (the single score for one-expert groups)."""
    e = len(sel)
    size = e // groups
    group_score = [sum(sorted(sel[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(groups)]
    kept = sorted(range(groups), key=lambda g: -group_score[g])[:top_groups]
    return [j for g in kept for j in range(g * size, (g + 1) * size)]


def ref_group_topk(logits, k, groups, top_groups, renormalize=False, gating="softmax"):
    b, l, e = logits.shape
    out = {}
    for bi in range(b):
        for li in range(l):
            s = gate_row(logits[bi, li], gating)
            sel = [num(s[j]) for j in range(e)]
            allowed = ref_allowed(sel, groups, top_groups) if groups else list(range(e))
            chosen = sorted(allowed, key=lambda j: -sel[j])[:k]
            denom = sum(s[j] for j in chosen) if renormalize else 1.0
            for j in chosen:
                out[(bi * l + li, j)] = s[j] / denom
    return out


def ref_group_noisy_topk_eval(logits, k, groups, top_groups):
    """Shazeer noisy top-k without noise (eval), group-limited: softmax over the kept k logits."""
    b, l, e = logits.shape
    out = {}
    for bi in range(b):
        for li in range(l):
            row = logits[bi, li]
            p = gate_row(row, "softmax")
            sel = [num(p[j]) for j in range(e)]
            chosen = sorted(ref_allowed(sel, groups, top_groups), key=lambda j: -sel[j])[:k]
            z = sum(torch.exp(row[j]) for j in chosen)
            for j in chosen:
                out[(bi * l + li, j)] = torch.exp(row[j]) / z
    return out


def ref_group_bias_balanced(logits, bias, k, groups, top_groups, scale=1.0):
    b, l, e = logits.shape
    out = {}
    for bi in range(b):
        for li in range(l):
            s = gate_row(logits[bi, li], "sigmoid")
            sel = [num(s[j]) + num(bias[j]) for j in range(e)]  # the bias: selection only
            chosen = sorted(ref_allowed(sel, groups, top_groups), key=lambda j: -sel[j])[:k]
            z = sum(s[j] for j in chosen)
            for j in chosen:
                out[(bi * l + li, j)] = scale * s[j] / z
    return out


def ref_capacity(inner: dict, num_experts: int, capacity_factor: float, policy: str) -> dict:
    """Drop per expert beyond ``ceil(capacity_factor * A / E)``: keep the highest weights ("probs",
    ties by token) or the lowest tokens ("position")."""
    capacity = math.ceil(capacity_factor * len(inner) / num_experts)
    out = {}
    for j in range(num_experts):
        mine = [t for (t, e) in inner if e == j]
        if policy == "probs":
            mine.sort(key=lambda t: (-num(inner[(t, j)]), t))
        else:
            mine.sort()
        for t in mine[:capacity]:
            out[(t, j)] = inner[(t, j)]
    return out


# ---- group-limited TopK: hand-made ------------------------------------------------------------
# E = 6 in three groups of two: {0, 1}, {2, 3}, {4, 5}
HAND6 = [[
    [0.30, 0.02, 0.20, 0.18, 0.15, 0.15],  # group sums 0.32 / 0.38 / 0.30: the top expert's group loses
    [0.05, 0.05, 0.27, 0.03, 0.35, 0.25],  # group sums 0.10 / 0.30 / 0.60
]]


def test_group_topk_hand_made_one_group():
    logits = logits_of(HAND6)
    r = TopK(2, groups=3, top_groups=1)(logits)
    assert_pairs(r, {(0, 2): 0.20, (0, 3): 0.18, (1, 4): 0.35, (1, 5): 0.25})
    assert r.info["groups"] == 3 and r.info["top_groups"] == 1 and r.info["k"] == 2
    # without the limit: the plain top-2
    assert_pairs(TopK(2)(logits), {(0, 0): 0.30, (0, 2): 0.20, (1, 4): 0.35, (1, 2): 0.27})


def test_group_topk_hand_made_two_groups_and_renormalize():
    logits = logits_of(HAND6)
    # token 0 keeps groups {2,3} and {0,1}; token 1 keeps {4,5} and {2,3}
    r = TopK(3, groups=3, top_groups=2)(logits)
    assert_pairs(r, {(0, 0): 0.30, (0, 2): 0.20, (0, 3): 0.18, (1, 4): 0.35, (1, 2): 0.27, (1, 5): 0.25})
    r = TopK(2, renormalize=True, groups=3, top_groups=1)(logits)
    assert_pairs(r, {(0, 2): 0.20 / 0.38, (0, 3): 0.18 / 0.38, (1, 4): 0.35 / 0.60, (1, 5): 0.25 / 0.60})


def test_group_score_is_the_sum_of_the_two_highest_not_the_max_nor_the_total():
    # two groups of three: top-2 sums 0.45 vs 0.37 pick group 0; the totals (0.46 vs 0.54) would pick group 1
    logits = logits_of([[[0.40, 0.05, 0.01, 0.19, 0.18, 0.17]]])
    assert_pairs(TopK(2, groups=2, top_groups=1)(logits), {(0, 0): 0.40, (0, 1): 0.05})
    # the max alone would pick group 1 here (0.30 > 0.26), the top-2 sum picks group 0 (0.50 > 0.39)
    logits = logits_of([[[0.26, 0.24, 0.10, 0.30, 0.09, 0.01]]])
    assert_pairs(TopK(1, groups=2, top_groups=1)(logits), {(0, 0): 0.26})
    assert_pairs(TopK(1)(logits), {(0, 3): 0.30})


def test_group_topk_one_expert_groups_use_that_score():
    logits = rand_logits(0, e=6)
    for k in (1, 2, 3):
        for top_groups in range(k, 7):
            r = TopK(k, groups=6, top_groups=top_groups)(logits)
            assert set(pairs(r)) == set(pairs(TopK(k)(logits)))


def test_group_topk_identity_and_sigmoid_gating_hand_made():
    logits = torch.tensor([[[3.0, -5.0, 1.0, 1.5]]], dtype=F64)  # group sums: -2.0 vs 2.5
    assert_pairs(TopK(1, gating="identity", groups=2, top_groups=1)(logits), {(0, 3): 1.5})
    s = [1 / (1 + math.exp(-v)) for v in (3.0, -5.0, 1.0, 1.5)]  # group sums 0.959 vs 1.549
    assert_pairs(TopK(1, gating="sigmoid", groups=2, top_groups=1)(logits), {(0, 3): s[3]})
    assert_pairs(TopK(1, gating="sigmoid")(logits), {(0, 0): s[0]})


# ---- group-limited TopK: reference on random inputs -------------------------------------------
@pytest.mark.parametrize("gating,renormalize", [("softmax", False), ("softmax", True), ("sigmoid", True), ("identity", False)])
@pytest.mark.parametrize("k,groups,top_groups", [(1, 4, 1), (2, 4, 1), (3, 4, 2), (4, 2, 1), (2, 8, 3), (6, 4, 4)])
@pytest.mark.parametrize("seed", SEEDS)
def test_group_topk_matches_reference(gating, renormalize, k, groups, top_groups, seed):
    router = TopK(k, renormalize=renormalize, gating=gating, groups=groups, top_groups=top_groups)
    logits = rand_logits(seed)
    ref = lambda lg: ref_group_topk(lg, k, groups, top_groups, renormalize, gating)
    assert_matches(router, ref, logits, seed, constant=renormalize and k == 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_topk_learned_noise_eval_matches_reference(seed):
    router = TopK(3, noise="learned", dim=4, num_experts=8, groups=4, top_groups=2).double().eval()
    x = torch.randn(2, 5, 4, dtype=F64)
    logits = rand_logits(seed)

    def fn(lg):
        r = router(lg, x=x)
        return {(int(t), int(e)): w for t, e, w in zip(r.token, r.expert, r.weight)}

    ref = lambda lg: ref_group_noisy_topk_eval(lg, 3, 4, 2)
    assert_pairs_tensors(fn(logits), ref(logits))
    c = torch.randn(10, 8, dtype=F64, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(loss_grad(fn, logits, c), loss_grad(ref, logits, c), atol=1e-10)
    # training (with noise) still keeps every token inside its top_groups groups
    router.train()
    r = router(logits, x=x)
    assert (groups_per_token(r) <= 2).all() and (r.experts_per_token == 3).all()


def test_group_topk_gradcheck():
    router = TopK(2, renormalize=True, groups=4, top_groups=2)
    lg = rand_logits(5, b=1, l=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: router(t).dense_weight, (lg,))


def test_groups_none_is_bit_identical_to_plain_topk():
    """``groups=None`` is the old code path; keeping every group selects exactly the same."""
    for seed in SEEDS:
        logits = rand_logits(seed, e=8).float()
        for renormalize in (False, True):
            plain = TopK(2, renormalize=renormalize)(logits)
            probs = logits.softmax(-1).reshape(-1, 8)
            idx = probs.topk(2, dim=-1).indices.sort(-1).values  # [N, 2], the pre-groups rule
            w = probs.gather(1, idx)
            if renormalize:
                w = w / w.sum(-1, keepdim=True)
            assert torch.equal(plain.expert, idx.reshape(-1)) and torch.equal(plain.weight, w.reshape(-1))
            explicit = TopK(2, renormalize=renormalize, groups=None, top_groups=None)(logits)
            every = TopK(2, renormalize=renormalize, groups=4, top_groups=4)(logits)
            for r in (explicit, every):
                assert torch.equal(r.token, plain.token) and torch.equal(r.expert, plain.expert)
                assert torch.equal(r.weight, plain.weight)
            assert "groups" not in plain.info and "groups" not in explicit.info


# ---- group-limited BiasBalanced ---------------------------------------------------------------
def test_group_bias_balanced_hand_made_bias_enters_group_selection():
    logits = torch.tensor([[[2.0, -3.0, 1.0, 0.9]]], dtype=F64)  # sigmoid group sums 0.928 vs 1.442
    router = BiasBalanced(4, 1, groups=2, top_groups=1)
    assert_pairs(router(logits), {(0, 2): 1.0})
    assert_pairs(BiasBalanced(4, 1)(logits), {(0, 0): 1.0})  # without groups: the top expert
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.6, 0.0, 0.0, 0.0]))  # group 0's sum becomes 1.528 > 1.442
    r = router(logits)
    assert_pairs(r, {(0, 0): 1.0})
    assert r.info["groups"] == 2 and r.info["top_groups"] == 1


def test_group_bias_balanced_hand_made_weights_ignore_the_bias():
    logits = torch.zeros(1, 1, 4, dtype=F64)  # every sigmoid is 0.5
    router = BiasBalanced(4, 1, groups=2, top_groups=1)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.05, 0.0, 0.1, -0.2]))  # group sums 1.05 vs 0.9; plain top-1: expert 2
    assert_pairs(router(logits), {(0, 0): 1.0})
    router2 = BiasBalanced(4, 2, groups=2, top_groups=1, scale=2.0)
    router2.bias.copy_(router.bias)
    assert_pairs(router2(logits), {(0, 0): 1.0, (0, 1): 1.0})  # 2.0 * 0.5 / (0.5 + 0.5)


@pytest.mark.parametrize("k,groups,top_groups", [(1, 4, 1), (2, 4, 2), (3, 2, 1), (2, 8, 2)])
@pytest.mark.parametrize("seed", SEEDS)
def test_group_bias_balanced_matches_reference(k, groups, top_groups, seed):
    router = BiasBalanced(8, k, scale=1.5, groups=groups, top_groups=top_groups).double()
    with torch.no_grad():
        router.bias.copy_(0.3 * torch.randn(8, dtype=F64, generator=torch.Generator().manual_seed(50 + seed)))
    logits = rand_logits(seed)
    ref = lambda lg: ref_group_bias_balanced(lg, router.bias, k, groups, top_groups, 1.5)
    assert_matches(router, ref, logits, seed, constant=k == 1)


def test_group_bias_balanced_counts_load_of_the_limited_selection():
    router = BiasBalanced(8, 2, groups=4, top_groups=1).train()
    r = router(rand_logits(1))
    assert torch.equal(router.load, r.tokens_per_expert.to(router.load.dtype))
    assert (groups_per_token(r) == 1).all()


def test_groups_none_bias_balanced_is_unchanged():
    for seed in SEEDS:
        logits = rand_logits(seed)
        a = BiasBalanced(8, 2)(logits)
        b = BiasBalanced(8, 2, groups=None, top_groups=None)(logits)
        c = BiasBalanced(8, 2, groups=2, top_groups=2)(logits)
        for r in (b, c):
            assert torch.equal(a.token, r.token) and torch.equal(a.expert, r.expert) and torch.equal(a.weight, r.weight)


# ---- group-limited errors ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"groups": 2, "top_groups": 3}, "top_groups"),
    ({"groups": 0, "top_groups": 1}, "groups"),
    ({"groups": 2.0, "top_groups": 1}, "groups"),
    ({"groups": True, "top_groups": 1}, "groups"),
    ({"groups": 2, "top_groups": 0}, "top_groups"),
    ({"groups": 2}, "top_groups"),
    ({"top_groups": 1}, "groups"),
])
def test_group_arguments_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopK(1, **kwargs)
    with pytest.raises(ValueError, match=match):
        BiasBalanced(4, 1, **kwargs)


def test_group_errors_known_only_at_forward():
    with pytest.raises(ValueError, match="groups=3"):
        TopK(1, groups=3, top_groups=1)(rand_logits(0, e=8))  # 8 experts do not split into 3 groups
    with pytest.raises(ValueError, match="k=3"):
        TopK(3, groups=4, top_groups=1)(rand_logits(0, e=8))  # only 2 experts in the kept group
    TopK(2, groups=4, top_groups=1)(rand_logits(0, e=8))  # exactly fits


def test_group_errors_at_construction_when_experts_are_known():
    with pytest.raises(ValueError, match="groups=4"):
        BiasBalanced(6, 1, groups=4, top_groups=1)
    with pytest.raises(ValueError, match="k=3"):
        BiasBalanced(8, 3, groups=4, top_groups=1)
    with pytest.raises(ValueError, match="k=3"):
        TopK(3, noise="learned", dim=2, num_experts=8, groups=4, top_groups=1)


# ---- groups_per_token -------------------------------------------------------------------------
def test_groups_per_token_hand_made():
    # 3 tokens, E = 4 in 2 groups: token 0 -> experts 0, 1 (group 0); token 1 -> 1, 2; token 2 -> none
    r = Routing(logits=torch.zeros(1, 3, 4), token=torch.tensor([0, 0, 1, 1]), expert=torch.tensor([0, 1, 1, 2]),
                weight=torch.ones(4), num_experts=4)
    assert groups_per_token(r, 2).tolist() == [1, 2, 0]
    assert groups_per_token(r, 4).tolist() == [2, 2, 0]
    assert groups_per_token(r, 1).tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="groups"):
        groups_per_token(r)  # no groups given and none in routing.info
    with pytest.raises(ValueError, match="groups=3"):
        groups_per_token(r, 3)
    with pytest.raises(ValueError, match="groups"):
        groups_per_token(r, 0)


def test_groups_per_token_reads_the_routers_groups_and_limits_traffic():
    logits = rand_logits(2, b=4, l=16, e=8)
    limited = TopK(4, groups=4, top_groups=2)(logits)
    assert (groups_per_token(limited) <= 2).all() and (groups_per_token(limited) == 2).any()
    plain = TopK(4)(logits)
    assert (groups_per_token(plain, 4) > 2).any()  # without the limit tokens spread over more groups


# ---- Capacity: hand-made ----------------------------------------------------------------------
# TopK(1), 4 tokens, 2 experts: expert 0 wanted by tokens 0 (0.9), 1 (0.6), 2 (0.8); expert 1 by token 3
HAND_CAP = [[[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]]]


def test_capacity_hand_made_both_policies():
    logits = logits_of(HAND_CAP)
    r = Capacity(TopK(1), 1.0)(logits)  # capacity = ceil(1.0 * 4 / 2) = 2
    assert_pairs(r, {(0, 0): 0.9, (2, 0): 0.8, (3, 1): 0.7})  # the weakest (token 1) is dropped
    assert r.info["capacity"] == 2 and int(r.info["dropped"]) == 1
    r = Capacity(TopK(1), 1.0, policy="position")(logits)
    assert_pairs(r, {(0, 0): 0.9, (1, 0): 0.6, (3, 1): 0.7})  # first come first served
    assert r.info["capacity"] == 2 and int(r.info["dropped"]) == 1
    r = Capacity(TopK(1), 0.5)(logits)  # capacity 1
    assert_pairs(r, {(0, 0): 0.9, (3, 1): 0.7})
    assert int(r.info["dropped"]) == 2


def test_capacity_is_the_ceiling_of_the_product():
    logits = logits_of(HAND_CAP)
    r = Capacity(TopK(1), 1.25)(logits)  # 1.25 * 4 / 2 = 2.5 -> 3
    assert r.info["capacity"] == 3 and int(r.info["dropped"]) == 0
    assert_pairs(r, {(0, 0): 0.9, (1, 0): 0.6, (2, 0): 0.8, (3, 1): 0.7})
    r = Capacity(TopK(2), 0.3)(logits)  # A = 8: 0.3 * 8 / 2 = 1.2 -> 2
    assert r.info["capacity"] == 2
    assert_pairs(r, {(0, 0): 0.9, (2, 0): 0.8, (1, 1): 0.4, (3, 1): 0.7})
    assert int(r.info["dropped"]) == 4


def test_capacity_train_and_eval_factors():
    logits = logits_of(HAND_CAP)
    cap = Capacity(TopK(1), 0.5, eval_capacity_factor=2.0)
    r = cap.train()(logits)
    assert r.info["capacity"] == 1 and int(r.info["dropped"]) == 2
    r = cap.eval()(logits)
    assert r.info["capacity"] == 4 and int(r.info["dropped"]) == 0 and r.num_assignments == 4
    same = Capacity(TopK(1), 0.5).eval()  # eval_capacity_factor=None: the training factor
    assert same(logits).info["capacity"] == 1


def test_capacity_keeps_the_inner_info_and_scores():
    logits = logits_of(HAND_CAP)
    r = Capacity(Switch(2.0), 0.5)(logits)  # Switch's own capacity int(2 * 4 / 2) = 4 keeps everything
    assert r.info["capacity"] == 1 and r.info["inner_capacity"] == 4 and int(r.info["inner_dropped"]) == 0
    assert int(r.info["dropped"]) == 2 and r.scores is not None and r.logits is logits
    r = Capacity(TopK(2), 1.0)(logits)
    assert r.info["k"] == 2


def test_capacity_dropped_tokens_show_in_the_statistics():
    logits = logits_of(HAND_CAP)
    r = Capacity(TopK(1), 0.5)(logits)
    assert routing_summary(r)["dropped_fraction"] == pytest.approx(0.5)
    assert r.experts_per_token.tolist() == [1, 0, 0, 1]


# ---- Capacity: composing, reference on random inputs ------------------------------------------
INNER = [
    ("topk2", lambda: TopK(2)),
    ("topk_groups", lambda: TopK(2, renormalize=True, groups=4, top_groups=2)),
    ("topp", lambda: TopP(0.6)),
    ("race", lambda: Race(2)),
    ("race_E", lambda: Race(2, candidates="E", gating="softmax")),
    ("expert_choice", lambda: ExpertChoice(2)),
    ("bias_balanced", lambda: BiasBalanced(8, 2)),
]


@pytest.mark.parametrize("name,factory", INNER, ids=[c[0] for c in INNER])
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.3])
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_capacity_matches_reference(name, factory, policy, capacity_factor, seed):
    inner = factory().double()
    cap = Capacity(inner, capacity_factor, policy=policy)
    logits = rand_logits(seed, b=2, l=6)

    def ref(lg):  # the inner router's pairs (same module, same mode), then the slow drop rule
        return ref_capacity(as_dict(inner)(lg), 8, capacity_factor, policy)

    r = cap(logits)
    assert r.info["capacity"] == math.ceil(capacity_factor * len(as_dict(inner)(logits)) / 8)
    assert int(r.info["dropped"]) == len(as_dict(inner)(logits)) - r.num_assignments
    assert (r.tokens_per_expert <= r.info["capacity"]).all()
    assert_matches(cap, ref, logits, seed)


def test_capacity_probs_ties_go_to_the_earlier_token():
    logits = torch.zeros(1, 4, 2, dtype=F64)  # every probability 0.5: TopK(1) picks expert 0 for all
    r = Capacity(TopK(1), 1.0)(logits)  # capacity 2
    assert_pairs(r, {(0, 0): 0.5, (1, 0): 0.5})


def test_capacity_probs_orders_negative_weights():
    # identity gating: the weights are the raw logits; all 4 tokens pick expert 0, capacity 2
    logits = torch.tensor([[[-0.5, -9.0], [-2.0, -9.0], [-0.25, -9.0], [-1e-30, -9.0]]], dtype=F64)
    r = Capacity(TopK(1, gating="identity"), 1.0)(logits)
    assert_pairs(r, {(3, 0): -1e-30, (2, 0): -0.25}, atol=0)
    r = Capacity(TopK(1, gating="identity"), 1.0)(logits.float())
    assert set(pairs(r)) == {(3, 0), (2, 0)}


def test_capacity_gradcheck_and_in_a_layer():
    cap = Capacity(TopK(2, renormalize=True), 0.75)
    lg = rand_logits(3, b=1, l=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: cap(t).dense_weight, (lg,))
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router=Capacity(TopK(2), 1.0, policy="position"))
    x = torch.randn(2, 5, 8)
    y = layer(x)
    assert y.shape == x.shape and layer.routing.info["capacity"] == 5
    y.sum().backward()


# ---- Capacity: module behaviour and errors ----------------------------------------------------
def test_capacity_is_a_module_that_propagates_mode_and_state():
    inner = BiasBalanced(4, 2)
    cap = Capacity(inner, 1.0)
    assert isinstance(cap, Router) and isinstance(cap, torch.nn.Module)
    assert cap.router is inner
    assert {"router.bias", "router.load"} <= set(cap.state_dict())
    cap.eval()
    assert not inner.training
    cap.train()
    assert inner.training
    race = Race(2)
    cap = Capacity(race, 1.0)
    cap.train()(rand_logits(0, e=4))
    assert bool(race.initialized)
    cap.eval()(rand_logits(1, e=4))  # the eval threshold path runs through the wrapper
    assert "capacity_factor=1.0" in repr(cap) and "Race" in repr(cap)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True, None])
def test_capacity_rejects_bad_factors(bad):
    with pytest.raises(ValueError, match="capacity_factor"):
        Capacity(TopK(1), bad)
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        Capacity(TopK(1), 1.0, eval_capacity_factor=bad if bad is not None else 0)


def test_capacity_rejects_bad_policy_and_router():
    with pytest.raises(ValueError, match="policy"):
        Capacity(TopK(1), 1.0, policy="random")
    with pytest.raises(ValueError, match="router"):
        Capacity(lambda lg: None, 1.0)


def test_capacity_inner_router_still_validates_logits():
    with pytest.raises(ValueError, match="logits"):
        Capacity(TopK(1), 1.0)(torch.zeros(4, 3))
