"""Spec of moe_lite.routers: hand-made cases, slow loop references, gradients, train/eval rules.

Each router gets (1) tiny hand-made logits with the expected (token, expert, weight) written out,
(2) a slow reference written with explicit Python loops from the paper's rule, compared on random
inputs over several seeds, including the gradient that reaches the logits through the weights.
"""
from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from moe_lite import routers as routers_module
from moe_lite.routers import (
    ROUTERS,
    BalancedAssignment,
    BiasBalanced,
    ExpertChoice,
    FixedThreshold,
    Hash,
    LearnedThreshold,
    Race,
    Router,
    Switch,
    TopK,
    TopP,
    balanced_assignment,
    make_router,
)
from moe_lite.routing import Routing

from routing_checks import assert_pairs as _assert_pairs, gate_row, logits_of, num, pairs

SEEDS = (0, 1, 2)
F64 = torch.float64




# ---- local helpers ----------------------------------------------------------------------------
def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def assert_pairs(r: Routing, expected: dict, atol: float = 1e-6) -> None:
    """:func:`routing_checks.assert_pairs` at this file's tolerance (float32 routers included)."""
    _assert_pairs(r, expected, atol)


def assert_same_routing(a: Routing, b: Routing) -> None:
    assert torch.equal(a.token, b.token) and torch.equal(a.expert, b.expert)
    assert torch.allclose(a.weight, b.weight, rtol=0, atol=1e-12)


def assert_matches_reference(r: Routing, ref: dict, atol: float = 1e-9) -> None:
    """Same pairs and weights as a reference dict ``{(token, expert): weight tensor}``."""
    assert_pairs(r, {k: num(v) for k, v in ref.items()}, atol=atol)


def check_wellformed(r: Routing, logits: torch.Tensor) -> None:
    b, l, e = logits.shape
    assert r.logits is logits
    assert r.token.dtype == torch.long and r.expert.dtype == torch.long
    assert r.token.shape == r.expert.shape == r.weight.shape and r.token.dim() == 1
    assert r.weight.dtype == logits.dtype
    assert r.num_experts == e
    if r.token.numel():
        assert 0 <= int(r.token.min()) and int(r.token.max()) < b * l
        assert 0 <= int(r.expert.min()) and int(r.expert.max()) < e
    flat = r.token * e + r.expert
    assert flat.unique().numel() == flat.numel(), "a (token, expert) pair appears twice"
    assert r.scores is not None and r.scores.shape == logits.shape


def weighted_loss_grad(fn, logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum(dense weight * c)`` w.r.t. the logits; ``fn(logits) -> {(t, e): weight}``."""
    lg = logits.detach().clone().requires_grad_(True)
    out = fn(lg)
    loss = sum(w * c[t, e] for (t, e), w in out.items())
    loss.backward()
    return lg.grad


def routing_as_dict(router):
    """Adapter: a router -> ``logits -> {(t, e): weight tensor}`` (for :func:`weighted_loss_grad`)."""
    def fn(lg):
        r = router(lg)
        return {(int(t), int(e)): w for t, e, w in zip(r.token, r.expert, r.weight)}
    return fn


def assert_grad_matches(router, ref_fn, logits: torch.Tensor, seed: int = 0) -> None:
    """Router and reference give the same gradient of a random weighted loss (float64)."""
    n, e = logits.shape[0] * logits.shape[1], logits.shape[2]
    c = torch.randn(n, e, dtype=F64, generator=torch.Generator().manual_seed(seed))
    g_router = weighted_loss_grad(routing_as_dict(router), logits, c)
    g_ref = weighted_loss_grad(ref_fn, logits, c)
    assert g_router.abs().sum() > 0, "no gradient reached the logits"
    assert torch.allclose(g_router, g_ref, atol=1e-10)


def rand_logits(seed: int, b: int = 2, l: int = 5, e: int = 4, dtype=F64) -> torch.Tensor:
    return torch.randn(b, l, e, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ---- slow references (explicit loops, the papers' rules) --------------------------------------
def ref_topk(logits, k, renormalize=False, gating="softmax"):
    b, l, e = logits.shape
    out = {}
    for bi in range(b):
        for li in range(l):
            s = gate_row(logits[bi, li], gating)
            chosen = sorted(range(e), key=lambda j: -num(s[j]))[:k]
            denom = sum(s[j] for j in chosen) if renormalize else 1.0
            for j in chosen:
                out[(bi * l + li, j)] = s[j] / denom
    return out


def ref_noisy_topk(h, k):
    """Shazeer et al. 2017 on noisy logits h: keep the top-k entries of h, softmax over them."""
    b, l, e = h.shape
    out = {}
    for bi in range(b):
        for li in range(l):
            row = h[bi, li]
            chosen = sorted(range(e), key=lambda j: -num(row[j]))[:k]
            z = sum(torch.exp(row[j]) for j in chosen)
            for j in chosen:
                out[(bi * l + li, j)] = torch.exp(row[j]) / z
    return out


def ref_switch(logits, capacity_factor):
    b, l, e = logits.shape
    n = b * l
    capacity = max(1, int(capacity_factor * n / e))
    load = [0] * e
    out = {}
    for t in range(n):
        p = gate_row(logits[t // l, t % l], "softmax")
        j = max(range(e), key=lambda i: (num(p[i]), -i))  # first maximum
        if load[j] < capacity:  # first come, first served
            out[(t, j)] = p[j]
            load[j] += 1
    return out


def ref_expert_choice(logits, k, gating="softmax"):
    b, l, e = logits.shape
    capacity = min(l, max(1, round(k * l / e)))
    out = {}
    for bi in range(b):
        s = [gate_row(logits[bi, li], gating) for li in range(l)]
        for j in range(e):
            for li in sorted(range(l), key=lambda i: -num(s[i][j]))[:capacity]:
                out[(bi * l + li, j)] = s[li][j]
    return out


def ref_topp(logits, p, max_k=None):
    b, l, e = logits.shape
    out = {}
    for bi in range(b):
        for li in range(l):
            probs = gate_row(logits[bi, li], "softmax")
            cum = 0.0
            for rank, j in enumerate(sorted(range(e), key=lambda i: -num(probs[i]))):
                if max_k is not None and rank >= max_k:
                    break
                out[(bi * l + li, j)] = probs[j]  # raw probability, not renormalised
                cum += num(probs[j])
                if cum > p:  # the expert that crosses p is kept, then stop
                    break
    return out


def ref_race(logits, k, candidates, gating="identity"):
    """Generalised top-K: every group = fixed values of the non-candidate axes."""
    shape = dict(zip("BLE", logits.shape))
    fixed = [a for a in "BLE" if a not in candidates]
    free = [a for a in "BLE" if a in candidates]
    size = math.prod(shape[a] for a in free)
    k_group = min(size, max(1, round(k * size / shape["E"])))
    scores = torch.stack([gate_row(logits[bi, li], gating)
                          for bi in range(shape["B"]) for li in range(shape["L"])])  # [N, E]
    out, kth = {}, []
    for fixed_values in itertools.product(*[range(shape[a]) for a in fixed]):
        members = []
        for free_values in itertools.product(*[range(shape[a]) for a in free]):
            idx = dict(zip(fixed, fixed_values)) | dict(zip(free, free_values))
            members.append((idx["B"] * shape["L"] + idx["L"], idx["E"]))
        members.sort(key=lambda te: -num(scores[te]))
        for te in members[:k_group]:
            out[te] = scores[te]
        kth.append(num(scores[members[k_group - 1]]))
    return out, kth, k_group


def ref_bias_balanced(logits, bias, k, scale=1.0):
    b, l, e = logits.shape
    out = {}
    for bi in range(b):
        for li in range(l):
            s = gate_row(logits[bi, li], "sigmoid")
            chosen = sorted(range(e), key=lambda j: -(num(s[j]) + num(bias[j])))[:k]
            z = sum(s[j] for j in chosen)
            for j in chosen:
                out[(bi * l + li, j)] = scale * s[j] / z
    return out


def ref_learned_threshold(logits, tau):
    """AdaMoLE: ``tau [B, L]`` per token; select p - tau >= 0, weights (p - tau) / their sum."""
    b, l, e = logits.shape
    out = {}
    for bi in range(b):
        for li in range(l):
            p = gate_row(logits[bi, li], "softmax")
            chosen = [j for j in range(e) if num(p[j] - tau[bi, li]) >= 0]
            z = sum(p[j] - tau[bi, li] for j in chosen)
            for j in chosen:
                out[(bi * l + li, j)] = (p[j] - tau[bi, li]) / (z if num(z) > 0 else 1.0)
    return out


def balanced_optimum(aff: torch.Tensor) -> float:
    """Brute force: the best total affinity over every assignment with loads in {N//E, N//E + 1}."""
    n, e = aff.shape
    q, r = divmod(n, e)
    best = -math.inf

    def rec(i, load, total):
        nonlocal best
        if i == n:
            if min(load) >= q:
                best = max(best, total)
            return
        full = sum(x == q + 1 for x in load)
        for j in range(e):
            if load[j] == q + 1 or (load[j] == q and full >= r):
                continue
            load[j] += 1
            rec(i + 1, load, total + float(aff[i, j]))
            load[j] -= 1

    rec(0, [0] * e, 0.0)
    return best


# every router, built fresh: (id, factory, x dim or None)
DIM = 6
ALL_ROUTERS = [
    ("topk", lambda: TopK(2), None),
    ("topk_renorm_sigmoid", lambda: TopK(2, renormalize=True, gating="sigmoid"), None),
    ("topk_jitter", lambda: TopK(2, noise="jitter"), None),
    ("topk_learned", lambda: TopK(2, noise="learned", dim=DIM, num_experts=4), DIM),
    ("switch", lambda: Switch(1.25), None),
    ("expert_choice", lambda: ExpertChoice(2), None),
    ("topp", lambda: TopP(0.5), None),
    ("race", lambda: Race(2), None),
    ("race_E", lambda: Race(1, candidates="E"), None),
    ("hash", lambda: Hash(4), None),
    ("balanced", lambda: BalancedAssignment(), None),
    ("bias_balanced", lambda: BiasBalanced(4, 2), None),
    ("learned_threshold", lambda: LearnedThreshold(DIM, 4), DIM),
]
ROUTER_IDS = [c[0] for c in ALL_ROUTERS]


def call(router, logits, dim):
    """``router(logits, x=...)`` with a random x ``[B, L, dim]`` for routers that read it."""
    if dim is None:
        return router(logits)
    dtype = logits.dtype if logits.is_floating_point() else torch.float32
    lead = tuple(logits.shape[:2]) if logits.dim() >= 2 else (1, 1)
    x = torch.randn(*lead, dim, dtype=dtype, generator=torch.Generator().manual_seed(7))
    return router(logits, x=x)


# ---- common contract --------------------------------------------------------------------------
@pytest.mark.parametrize("name,factory,dim", ALL_ROUTERS, ids=ROUTER_IDS)
def test_every_router_returns_a_wellformed_routing(name, factory, dim):
    router = factory().double()
    assert isinstance(router, Router)
    for training in (True, False):
        router.train(training)
        logits = rand_logits(3)
        r = call(router, logits, dim)
        assert isinstance(r, Routing)
        check_wellformed(r, logits)


@pytest.mark.parametrize("name,factory,dim", ALL_ROUTERS, ids=ROUTER_IDS)
@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(4, 3),  # 2-D
        torch.zeros(1, 2, 3, 4),  # 4-D
        torch.zeros(1, 2, 4, dtype=torch.long),  # not floating
        torch.tensor([[[0.0, float("nan"), 0.0, 0.0]]]),
        torch.tensor([[[0.0, float("inf"), 0.0, 0.0]]]),
        torch.tensor([[[0.0, -float("inf"), 0.0, 0.0]]]),
        torch.zeros(0, 3, 4),  # no tokens
    ],
    ids=["2d", "4d", "long", "nan", "inf", "-inf", "empty"],
)
def test_every_router_rejects_bad_logits(name, factory, dim, bad):
    router = factory()
    with pytest.raises(ValueError, match="logits"):
        call(router, bad, dim)


def test_bad_logits_message_names_the_shape():
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        TopK(1)(torch.zeros(4, 3))


@pytest.mark.parametrize(
    "name,factory,dim",
    [c for c in ALL_ROUTERS if c[0] not in ("topk_jitter", "topk_learned", "race", "balanced")],
    ids=[c[0] for c in ALL_ROUTERS if c[0] not in ("topk_jitter", "topk_learned", "race", "balanced")],
)
def test_train_and_eval_give_the_same_routing(name, factory, dim):
    """Routers without train-specific behaviour run one code path in both modes."""
    router = factory().double()
    for seed in SEEDS:
        logits = rand_logits(seed, b=2, l=6, e=4)
        a = call(router.train(), logits, dim)
        b = call(router.eval(), logits, dim)
        assert_same_routing(a, b)


@pytest.mark.parametrize(
    "name,factory,dim", [c for c in ALL_ROUTERS if c[0] != "hash"], ids=[c[0] for c in ALL_ROUTERS if c[0] != "hash"]
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_reaches_logits_through_weight(name, factory, dim, training):
    router = factory().double().train(training)
    logits = rand_logits(5, b=2, l=3, e=4)
    if name == "race" and not training:
        router.train()(rand_logits(6, b=2, l=3, e=4))  # eval uses the EMA threshold: fit it first
        router.eval()
    x = None if dim is None else torch.randn(2, 3, dim, dtype=F64)

    def dense(lg):
        torch.manual_seed(0)  # same noise on every call (jitter / learned noise)
        return router(lg, x=x).dense_weight

    lg = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(dense, (lg,))
    (dense(lg) * torch.randn(6, 4, dtype=F64)).sum().backward()
    assert lg.grad is not None and lg.grad.abs().sum() > 0


# ---- TopK -------------------------------------------------------------------------------------
def test_topk_hand_made():
    logits = logits_of([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
    assert_pairs(TopK(2)(logits), {(0, 0): 0.5, (0, 1): 0.3, (1, 1): 0.6, (1, 2): 0.3})
    assert_pairs(TopK(1)(logits), {(0, 0): 0.5, (1, 1): 0.6})
    assert_pairs(TopK(2, renormalize=True)(logits),
                 {(0, 0): 0.625, (0, 1): 0.375, (1, 1): 2 / 3, (1, 2): 1 / 3})


def test_topk_hand_made_sigmoid_and_identity():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]]], dtype=F64)
    assert_pairs(TopK(1, gating="sigmoid")(logits), {(0, 0): sig(2.0), (1, 1): sig(3.0)})
    assert_pairs(TopK(2, gating="sigmoid", renormalize=True)(logits),
                 {(0, 0): sig(2) / (sig(2) + sig(0.5)), (0, 2): sig(0.5) / (sig(2) + sig(0.5)),
                  (1, 1): sig(3) / (sig(3) + sig(1)), (1, 2): sig(1) / (sig(3) + sig(1))})
    r = TopK(2, gating="identity")(logits)
    assert_pairs(r, {(0, 0): 2.0, (0, 2): 0.5, (1, 1): 3.0, (1, 2): 1.0})
    assert torch.equal(r.scores, logits)


@pytest.mark.parametrize(
    "gating,renormalize",
    [("softmax", False), ("softmax", True), ("sigmoid", False), ("sigmoid", True), ("identity", False)],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_topk_matches_reference(gating, renormalize, seed):
    logits = rand_logits(seed, b=2, l=4, e=5)
    router = TopK(3, renormalize=renormalize, gating=gating)
    ref = lambda lg: ref_topk(lg, 3, renormalize, gating)  # noqa: E731
    assert_matches_reference(router(logits), ref(logits))
    assert_grad_matches(router, ref, logits, seed)


def test_topk_jitter_is_gaussian_noise_on_logits_in_training_only():
    logits = rand_logits(0, b=2, l=8, e=4)
    router = TopK(2, noise="jitter", noise_std=0.7)
    torch.manual_seed(11)
    r = router.train()(logits)
    torch.manual_seed(11)
    noisy = logits + 0.7 * torch.randn_like(logits)
    assert_matches_reference(r, ref_topk(noisy, 2))
    assert torch.equal(r.logits, logits)  # the clean logits are what losses see
    assert_same_routing(router.eval()(logits), TopK(2)(logits))
    # the noise really changes the decision somewhere at this scale
    torch.manual_seed(3)
    noisy_pairs = [set(pairs(TopK(1, noise="jitter", noise_std=5.0).train()(logits))) for _ in range(3)]
    assert any(p != set(pairs(TopK(1)(logits))) for p in noisy_pairs)


def test_topk_learned_noise_is_shazeer_noisy_topk():
    torch.manual_seed(0)
    router = TopK(2, noise="learned", dim=DIM, num_experts=4).double()
    assert torch.count_nonzero(router.noise_proj.weight) == 0  # zero-initialised
    with torch.no_grad():
        router.noise_proj.weight.normal_()
    logits = rand_logits(1, b=2, l=5, e=4)
    x = torch.randn(2, 5, DIM, dtype=F64)
    torch.manual_seed(4)
    r = router.train()(logits, x=x)
    torch.manual_seed(4)
    std = torch.nn.functional.softplus(x @ router.noise_proj.weight.T)
    h = logits + torch.randn_like(logits) * std
    assert_matches_reference(r, ref_noisy_topk(h, 2))
    # eval: no noise, and keep-top-k-then-softmax is the renormalised softmax over the kept k
    assert_matches_reference(router.eval()(logits, x=x), ref_topk(logits, 2, renormalize=True))
    # the noise projection learns through the weights in training
    router.train()
    (router(logits, x=x).weight * torch.randn(20, dtype=F64)).sum().backward()
    assert router.noise_proj.weight.grad.abs().sum() > 0


def test_topk_learned_noise_needs_x_in_training():
    router = TopK(1, noise="learned", dim=3, num_experts=4).train()
    with pytest.raises(ValueError, match="x"):
        router(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="x"):
        router(torch.zeros(1, 2, 4), x=torch.zeros(1, 2, 5))
    router.eval()(torch.zeros(1, 2, 4))  # no noise in eval: x not needed


def test_topk_constructor_errors():
    for k in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="k"):
            TopK(k)
    with pytest.raises(ValueError, match="gating"):
        TopK(1, gating="relu")
    with pytest.raises(ValueError, match="noise"):
        TopK(1, noise="gaussian")
    with pytest.raises(ValueError, match="noise_std"):
        TopK(1, noise="jitter", noise_std=-1.0)
    with pytest.raises(ValueError, match="num_experts"):
        TopK(1, noise="learned", dim=4)
    with pytest.raises(ValueError, match="dim"):
        TopK(1, noise="learned", num_experts=4)
    with pytest.raises(ValueError, match="softmax"):
        TopK(1, noise="learned", dim=4, num_experts=4, gating="sigmoid")
    with pytest.raises(ValueError, match="renormalize"):
        TopK(1, renormalize=True, gating="identity")


def test_topk_k_larger_than_experts():
    with pytest.raises(ValueError, match=r"k=5 exceeds .* E=4"):
        TopK(5)(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="num_experts"):
        TopK(1, noise="learned", dim=2, num_experts=3)(torch.zeros(1, 2, 4), x=torch.zeros(1, 2, 2))


# ---- Switch -----------------------------------------------------------------------------------
def test_switch_hand_made_capacity_and_first_come_first_served():
    logits = logits_of([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.95, 0.05]]])
    r = Switch(1.0)(logits)  # capacity int(1.0 * 4 / 2) = 2
    # token 3 is the most confident but arrives last: expert 0 is already full
    assert_pairs(r, {(0, 0): 0.9, (1, 0): 0.8, (2, 1): 0.7})
    assert r.info["capacity"] == 2 and int(r.info["dropped"]) == 1
    r = Switch(0.5)(logits)  # capacity 1: the first token per expert wins
    assert_pairs(r, {(0, 0): 0.9, (2, 1): 0.7})
    assert r.info["capacity"] == 1 and int(r.info["dropped"]) == 2
    assert r.experts_per_token.tolist() == [1, 0, 1, 0]


def test_switch_capacity_uses_int_of_the_product():
    logits = torch.zeros(2, 5, 4)
    assert Switch(1.25)(logits).info["capacity"] == int(1.25 * 10 / 4)  # 3
    # int(0.3 * 10 / 4) = 0 would drop every token: the capacity is at least 1
    assert Switch(0.3)(logits).info["capacity"] == 1
    assert Switch(0.3)(logits).num_assignments == 1  # every token wants expert 0: the first one keeps it


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_switch_matches_reference(capacity_factor, seed):
    logits = rand_logits(seed, b=2, l=6, e=4) * 2
    router = Switch(capacity_factor)
    r = router(logits)
    ref = ref_switch(logits, capacity_factor)
    assert_matches_reference(r, ref)
    assert int(r.info["dropped"]) == 12 - len(ref)
    assert int(r.tokens_per_expert.max()) <= max(1, int(capacity_factor * 12 / 4))
    assert_grad_matches(router, lambda lg: ref_switch(lg, capacity_factor), logits, seed)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("inf"), float("nan"), "1"])
def test_switch_rejects_bad_capacity_factor(bad):
    with pytest.raises(ValueError, match="capacity_factor"):
        Switch(bad)


# ---- ExpertChoice -----------------------------------------------------------------------------
def test_expert_choice_hand_made_per_sample_groups():
    sample = [[0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]
    logits = logits_of([sample, sample])  # B=2, L=4, E=3, k=1: capacity round(4/3) = 1 per sample
    r = ExpertChoice(1)(logits)
    one = {(0, 0): 0.5, (0, 1): 0.4, (1, 2): 0.8}  # token 0 gets two experts, tokens 2 and 3 none
    assert_pairs(r, one | {(t + 4, e): w for (t, e), w in one.items()})
    assert r.info["capacity"] == 1
    assert r.experts_per_token.tolist() == [2, 1, 0, 0, 2, 1, 0, 0]


def test_expert_choice_capacity_rounding_bounds():
    assert ExpertChoice(1)(torch.zeros(1, 2, 4)).info["capacity"] == 1  # round(0.5) = 0 -> at least 1
    assert ExpertChoice(4)(torch.zeros(1, 3, 4)).info["capacity"] == 3  # k = E: every token, capped at L
    assert ExpertChoice(2)(torch.zeros(1, 10, 4)).info["capacity"] == 5


@pytest.mark.parametrize("k", [1, 2, 1.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_expert_choice_matches_reference_and_per_sample_counts(k, seed):
    logits = rand_logits(seed, b=3, l=8, e=4)
    router = ExpertChoice(k)
    r = router(logits)
    assert_matches_reference(r, ref_expert_choice(logits, k))
    capacity = max(1, round(k * 8 / 4))
    per_sample = r.mask.reshape(3, 8, 4).sum(1)  # [B, E]
    assert (per_sample == capacity).all()
    assert_grad_matches(router, lambda lg: ref_expert_choice(lg, k), logits, seed)


def test_expert_choice_errors():
    with pytest.raises(ValueError, match="k"):
        ExpertChoice(0)
    with pytest.raises(ValueError, match="gating"):
        ExpertChoice(1, gating="tanh")
    with pytest.raises(ValueError, match="exceeds"):
        ExpertChoice(5)(torch.zeros(1, 4, 4))


# ---- TopP -------------------------------------------------------------------------------------
def test_topp_hand_made_keeps_the_crossing_expert():
    logits = logits_of([[[0.5, 0.3, 0.15, 0.05], [0.25, 0.35, 0.3, 0.1]]])
    # p=0.6: token 0 needs 0.5 + 0.3 (crosses), token 1 needs 0.35 + 0.3 (crosses)
    r = TopP(0.6)(logits)
    assert_pairs(r, {(0, 0): 0.5, (0, 1): 0.3, (1, 1): 0.35, (1, 2): 0.3})
    # not renormalised: the weights of token 0 sum to 0.8
    assert float(r.weight[r.token == 0].sum()) == pytest.approx(0.8)
    # p=0.4: token 0's top expert alone exceeds p
    assert_pairs(TopP(0.4)(logits), {(0, 0): 0.5, (1, 1): 0.35, (1, 2): 0.3})
    # max_k caps the prefix
    assert_pairs(TopP(0.6, max_k=1)(logits), {(0, 0): 0.5, (1, 1): 0.35})
    # p = 1 keeps every expert
    r = TopP(1.0)(logits)
    assert r.experts_per_token.tolist() == [4, 4]


def test_topp_p_one_keeps_all_even_when_float_cumsum_stays_below_one():
    logits = torch.randn(4, 16, 64) * 3
    assert (TopP(1.0)(logits).experts_per_token == 64).all()
    assert (TopP(1.0, max_k=5)(logits).experts_per_token == 5).all()


@pytest.mark.parametrize("p,max_k", [(0.2, None), (0.5, None), (0.8, None), (0.9, 2), (0.95, None)])
@pytest.mark.parametrize("seed", SEEDS)
def test_topp_matches_reference(p, max_k, seed):
    logits = rand_logits(seed, b=2, l=6, e=5)
    router = TopP(p, max_k=max_k)
    r = router(logits)
    assert_matches_reference(r, ref_topp(logits, p, max_k))
    assert (r.experts_per_token >= 1).all()
    assert_grad_matches(router, lambda lg: ref_topp(lg, p, max_k), logits, seed)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan")])
def test_topp_rejects_p_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="p must be in"):
        TopP(bad)


def test_topp_max_k_errors():
    with pytest.raises(ValueError, match="max_k"):
        TopP(0.5, max_k=0)
    with pytest.raises(ValueError, match="max_k=5 exceeds"):
        TopP(0.5, max_k=5)(torch.zeros(1, 2, 4))


# ---- Race -------------------------------------------------------------------------------------
RACE_LOGITS = [[[1.0, 0.2, -0.5], [0.9, 1.5, 0.1]]]  # B=1, L=2, E=3


def test_race_hand_made_train_then_ema_then_eval_threshold():
    router = Race(1, ema_decay=0.95)
    logits = torch.tensor(RACE_LOGITS, dtype=F64)
    r = router.train()(logits)  # K = round(1 * 2) = 2 of the 6 scores
    assert_pairs(r, {(0, 0): 1.0, (1, 1): 1.5})  # weights are the raw logits (identity gating)
    assert r.info["K"] == 2
    assert float(router.threshold) == pytest.approx(1.0)  # first batch: the K-th largest itself
    router(torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]], dtype=F64))  # K-th largest = 2.0
    assert float(router.threshold) == pytest.approx(0.95 * 1.0 + 0.05 * 2.0)
    r = router.eval()(logits)  # eval: every score >= 1.05
    assert_pairs(r, {(1, 1): 1.5})
    assert float(router.threshold) == pytest.approx(1.05)  # eval does not move the EMA


def test_race_hand_made_token_and_expert_choice_groupings():
    logits = torch.tensor(RACE_LOGITS, dtype=F64)
    assert_pairs(Race(1, candidates="E")(logits), {(0, 0): 1.0, (1, 1): 1.5})  # token choice top-1
    # expert choice: K = max(1, round(1 * 2 / 3)) = 1 token per (sample, expert)
    assert_pairs(Race(1, candidates="L")(logits), {(0, 0): 1.0, (1, 1): 1.5, (1, 2): 0.1})


def test_race_softmax_gating_weights_are_probabilities():
    logits = logits_of([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
    assert_pairs(Race(1, gating="softmax")(logits), {(0, 0): 0.5, (1, 1): 0.6})


def test_race_train_selects_exactly_K():
    for seed in SEEDS:
        logits = rand_logits(seed, b=3, l=7, e=8)
        r = Race(2)(logits)
        assert r.num_assignments == round(3 * 7 * 2) == r.info["K"]


# expected K per group for B=2, L=6, E=4, k=2
GROUPINGS = {"E": 2, "L": 3, "BL": 6, "BE": 4, "LE": 12, "BLE": 24}
GROUP_SUM_DIMS = {"E": (2,), "L": (1,), "BL": (0, 1), "BE": (0, 2), "LE": (1, 2), "BLE": (0, 1, 2)}


@pytest.mark.parametrize("candidates", list(GROUPINGS))
def test_race_grouping_per_group_counts(candidates):
    logits = rand_logits(4, b=2, l=6, e=4)
    r = Race(2, candidates=candidates)(logits)
    assert r.info["K"] == GROUPINGS[candidates]
    counts = r.mask.reshape(2, 6, 4).sum(GROUP_SUM_DIMS[candidates])
    assert (counts == GROUPINGS[candidates]).all()


@pytest.mark.parametrize("candidates", list(GROUPINGS))
@pytest.mark.parametrize("seed", SEEDS)
def test_race_grouping_matches_reference_and_threshold_is_mean_kth(candidates, seed):
    logits = rand_logits(seed, b=2, l=5, e=4)
    router = Race(1.5, candidates=candidates, ema_decay=0.9)
    r = router(logits)
    ref, kth, k_group = ref_race(logits, 1.5, candidates)
    assert r.info["K"] == k_group
    assert_matches_reference(r, ref)
    assert float(router.threshold) == pytest.approx(sum(kth) / len(kth))
    logits2 = rand_logits(seed + 10, b=2, l=5, e=4)
    router(logits2)
    _, kth2, _ = ref_race(logits2, 1.5, candidates)
    expected = 0.9 * sum(kth) / len(kth) + 0.1 * sum(kth2) / len(kth2)
    assert float(router.threshold) == pytest.approx(expected, abs=1e-6)
    assert_grad_matches(router, lambda lg: ref_race(lg, 1.5, candidates)[0], logits, seed)


def test_race_candidates_in_any_order():
    assert Race(1, candidates="ELB").candidates == "BLE"
    assert Race(1, candidates="lb").candidates == "BL"
    logits = rand_logits(0, b=2, l=4, e=4)
    assert_same_routing(Race(2, candidates="EB")(logits), Race(2, candidates="BE")(logits))


def test_race_eval_threshold_default_only_for_the_race():
    assert Race(1).eval_threshold is True
    for c in ("E", "L", "BL", "BE", "LE"):
        assert Race(1, candidates=c).eval_threshold is False
    assert Race(1, candidates="E", eval_threshold=True).eval_threshold is True


def test_race_eval_without_threshold_equals_training_topk():
    router = Race(2, candidates="L")
    for seed in SEEDS:
        logits = rand_logits(seed, b=2, l=6, e=4)
        a = router.train()(logits)
        thr = router.threshold.clone()
        b = router.eval()(logits)
        assert_same_routing(a, b)
        assert torch.equal(router.threshold, thr)  # eval never updates the EMA


def test_race_eval_is_a_batch_independent_threshold():
    router = Race(2)
    for seed in SEEDS:
        router.train()(rand_logits(seed, b=4, l=6, e=4))
    router.eval()
    logits = rand_logits(9, b=3, l=6, e=4)
    r = router(logits)
    assert torch.equal(r.mask.reshape(3, 6, 4), logits >= router.threshold.to(F64))
    batch = pairs(r)
    for i in range(3):  # each sample alone gets exactly what it got inside the batch
        alone = pairs(router(logits[i : i + 1]))
        inside = {(t - 6 * i, e): w for (t, e), w in batch.items() if 6 * i <= t < 6 * (i + 1)}
        assert alone == inside


def test_race_eval_before_training_raises_and_set_threshold_fixes_it():
    router = Race(1).eval()
    with pytest.raises(RuntimeError, match="training batch"):
        router(torch.zeros(1, 2, 4))
    router.set_inference_threshold(0.5)
    r = router(torch.tensor([[[0.7, 0.1, 0.5, 0.2]]]))
    assert_pairs(r, {(0, 0): 0.7, (0, 2): 0.5})


def test_race_threshold_survives_state_dict_round_trip():
    router = Race(2, ema_decay=0.8)
    for seed in SEEDS:
        router(rand_logits(seed, b=2, l=6, e=4))
    state = router.state_dict()
    assert {"threshold", "initialized"} <= set(state)
    fresh = Race(2, ema_decay=0.8)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized) and float(fresh.threshold) == float(router.threshold)
    logits = rand_logits(8, b=2, l=6, e=4)
    assert_same_routing(fresh.eval()(logits), router.eval()(logits))


def test_race_errors():
    for k in (0, 0.5):
        with pytest.raises(ValueError, match="k"):
            Race(k)
    with pytest.raises(ValueError, match="exceeds"):
        Race(5)(torch.zeros(1, 2, 4))
    for bad in ("X", "BB", "", "BLX", None):
        with pytest.raises(ValueError, match="candidates"):
            Race(1, candidates=bad)
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="ema_decay"):
            Race(1, ema_decay=bad)
    with pytest.raises(ValueError, match="gating"):
        Race(1, gating="relu")


# ---- Hash -------------------------------------------------------------------------------------
def test_hash_table_is_a_seeded_balanced_permutation():
    router = Hash(3, seed=0, num_keys=6)
    expected = torch.randperm(6, generator=torch.Generator().manual_seed(0)) % 3
    assert torch.equal(router.table, expected)
    assert torch.bincount(router.table, minlength=3).tolist() == [2, 2, 2]  # balanced
    r = router(torch.zeros(1, 6, 3), key=torch.arange(6))
    assert_pairs(r, {(t, int(expected[t])): 1.0 for t in range(6)})


def test_hash_is_deterministic_and_seeded():
    logits = rand_logits(0, b=2, l=8, e=4)
    key = torch.randint(0, 4096, (2, 8), generator=torch.Generator().manual_seed(0))
    a, b = Hash(4, seed=3)(logits, key=key), Hash(4, seed=3)(logits, key=key)
    assert_same_routing(a, b)
    assert not torch.equal(Hash(4, seed=3).table, Hash(4, seed=4).table)


def test_hash_default_key_is_the_position_and_1d_keys_broadcast():
    router = Hash(4, seed=1)
    logits = rand_logits(0, b=3, l=5, e=4)
    r = router(logits)
    experts = r.expert.reshape(3, 5)
    assert (experts == router.table[:5]).all()  # position l -> table[l], same in every sample
    assert_same_routing(router(logits, key=torch.arange(5)), r)
    assert_same_routing(router(logits, key=torch.arange(5).expand(3, 5)), r)


def test_hash_weights_are_one_and_carry_no_gradient():
    logits = rand_logits(0).requires_grad_(True)
    r = Hash(4)(logits)
    assert (r.weight == 1).all() and not r.weight.requires_grad
    assert r.logits is logits and (r.experts_per_token == 1).all()


def test_hash_errors():
    with pytest.raises(ValueError, match="num_experts"):
        Hash(0)
    router = Hash(4, num_keys=10)
    with pytest.raises(ValueError, match="num_experts=4"):
        router(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="shape"):
        router(torch.zeros(2, 3, 4), key=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        router(torch.zeros(1, 3, 4), key=torch.zeros(3))
    with pytest.raises(ValueError, match="num_keys"):
        router(torch.zeros(1, 3, 4), key=torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="num_keys"):
        router(torch.zeros(1, 3, 4), key=torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="num_keys"):
        router(torch.zeros(1, 11, 4))  # default position keys beyond the table


# ---- BalancedAssignment -----------------------------------------------------------------------
def test_balanced_hand_made_train_vs_eval():
    logits = torch.tensor([[[5.0, 4.0], [3.0, 0.0]]], dtype=F64)
    router = BalancedAssignment()
    # train: one token each; 4 + 3 beats 5 + 0
    assert_pairs(router.train()(logits), {(0, 1): sig(4.0), (1, 0): sig(3.0)})
    # eval: greedy argmax, both to expert 0
    assert_pairs(router.eval()(logits), {(0, 0): sig(5.0), (1, 0): sig(3.0)})


def test_balanced_hand_made_four_tokens():
    # greedy argmax would send tokens 0, 1, 2 to expert 0
    logits = torch.tensor([[[3.0, 2.9], [2.0, 0.0], [1.0, 0.5], [0.0, 1.0]]], dtype=F64)
    r = BalancedAssignment()(logits)  # optimum 2.9 + 2.0 + 1.0 + 1.0 (tokens 1, 2 to expert 0)
    assert_pairs(r, {(0, 1): sig(2.9), (1, 0): sig(2.0), (2, 0): sig(1.0), (3, 1): sig(1.0)})


@pytest.mark.parametrize("b,l,e", [(2, 32, 8), (1, 30, 4), (3, 7, 5), (1, 3, 5), (1, 1, 3), (4, 9, 1)])
def test_balanced_is_exactly_balanced(b, l, e):
    n = b * l
    q, r = divmod(n, e)
    router = BalancedAssignment().train()
    for seed in SEEDS:
        logits = rand_logits(seed, b=b, l=l, e=e) * 3
        logits[..., 0] += 5  # everyone prefers expert 0
        out = router(logits)
        assert (out.experts_per_token == 1).all()
        load = out.tokens_per_expert
        assert int(load.sum()) == n
        assert int(load.min()) >= q and int(load.max()) <= q + (1 if r else 0)
        assert int((load == q + 1).sum()) == r if r else (load == q).all()


@pytest.mark.parametrize("n,e", [(6, 3), (8, 4), (8, 2), (7, 3), (5, 4), (7, 4)])
def test_balanced_total_affinity_matches_brute_force(n, e):
    exact = 0
    for seed in range(6):
        aff = torch.randn(n, e, dtype=F64, generator=torch.Generator().manual_seed(seed))
        best = balanced_optimum(aff)
        owner = balanced_assignment(aff)
        total = float(aff.gather(1, owner[:, None]).sum())
        assert total <= best + 1e-9
        assert total >= best - 0.05 * n * float(aff.std())  # never far from the optimum
        exact += total >= best - 1e-9
    assert exact >= 5  # and almost always exactly optimal


def test_balanced_is_near_a_dual_upper_bound_on_larger_inputs():
    aff = torch.randn(512, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    owner = balanced_assignment(aff)
    ours = float(aff.gather(1, owner[:, None]).sum())
    # a Lagrangian (dual) upper bound with the prices from a long, cold Sinkhorn
    log_plan, price = routers_module._sinkhorn(aff, 500, 0.01 * float(aff.std()))
    upper = float((aff - price).max(1).values.sum() + price.sum() * (512 / 8))
    assert ours <= upper + 1e-6
    assert ours >= upper - 0.01 * 512 * float(aff.std())  # within 1% of a std per token


def test_balanced_is_fast_enough():
    """N=4096, E=64 well under 50 ms (CPU time of this process, one thread: robust to shared cores)."""
    aff = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    balanced_assignment(aff)  # warm-up
    best = math.inf
    for _ in range(5):
        start = time.process_time()
        balanced_assignment(aff)
        best = min(best, time.process_time() - start)
    assert best < 0.05, f"balanced_assignment took {best * 1e3:.1f} ms of CPU for N=4096, E=64"


def test_balanced_eval_is_argmax_and_weights_are_sigmoid():
    logits = rand_logits(0, b=2, l=6, e=4)
    r = BalancedAssignment().eval()(logits)
    flat = logits.reshape(12, 4)
    assert torch.equal(r.expert, flat.argmax(-1)) and torch.equal(r.token, torch.arange(12))
    assert torch.allclose(r.weight, torch.sigmoid(flat.max(-1).values))
    r = BalancedAssignment().train()(logits)
    assert torch.allclose(r.weight, torch.sigmoid(flat[r.token, r.expert]))


def test_balanced_errors():
    with pytest.raises(ValueError, match="num_iters"):
        BalancedAssignment(num_iters=0)
    with pytest.raises(ValueError, match="temperature"):
        BalancedAssignment(temperature=0.0)
    with pytest.raises(ValueError, match="refine_iters"):
        BalancedAssignment(refine_iters=-1)


# ---- BiasBalanced -----------------------------------------------------------------------------
BIAS_LOGITS = [[[2.0, 1.0, 0.0], [0.5, 1.5, -1.0]]]  # B=1, L=2, E=3


def test_bias_balanced_hand_made():
    logits = torch.tensor(BIAS_LOGITS, dtype=F64)
    router = BiasBalanced(3, 2)
    assert_pairs(router(logits), {
        (0, 0): sig(2) / (sig(2) + sig(1)), (0, 1): sig(1) / (sig(2) + sig(1)),
        (1, 1): sig(1.5) / (sig(1.5) + sig(0.5)), (1, 0): sig(0.5) / (sig(1.5) + sig(0.5)),
    })
    router.bias.copy_(torch.tensor([-0.5, 0.0, 0.3]))
    # token 0: sigmoid + bias = [0.381, 0.731, 0.8] -> experts 2, 1; weights ignore the bias
    # token 1: [0.122, 0.818, 0.569] -> experts 1, 2
    assert_pairs(router(logits), {
        (0, 2): sig(0) / (sig(1) + sig(0)), (0, 1): sig(1) / (sig(1) + sig(0)),
        (1, 1): sig(1.5) / (sig(1.5) + sig(-1)), (1, 2): sig(-1) / (sig(1.5) + sig(-1)),
    })
    assert_pairs(BiasBalanced(3, 1, scale=2.5)(logits), {(0, 0): 2.5, (1, 1): 2.5})


@pytest.mark.parametrize("seed", SEEDS)
def test_bias_balanced_matches_reference_and_bias_stays_out_of_the_gradient(seed):
    logits = rand_logits(seed, b=2, l=6, e=5)
    bias = torch.randn(5, generator=torch.Generator().manual_seed(seed + 100)) * 0.5
    router = BiasBalanced(5, 2, scale=1.5).double()
    router.bias.copy_(bias)
    assert not router.bias.requires_grad
    assert_matches_reference(router(logits), ref_bias_balanced(logits, bias, 2, 1.5))
    # gradient = that of the normalised sigmoid at the chosen experts: bias plays no part
    assert_grad_matches(router, lambda lg: ref_bias_balanced(lg, bias, 2, 1.5), logits, seed)


def test_bias_changes_selection_but_not_weights_of_a_fixed_selection():
    logits = rand_logits(0, b=2, l=6, e=4)
    router = BiasBalanced(4, 2)
    plain = router(logits)
    router.bias.fill_(0.25)  # a uniform shift selects the same experts ...
    assert_same_routing(router(logits), plain)
    router.bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))  # ... a large bias forces experts 0, 1
    forced = router(logits)
    assert (forced.expert < 2).all()
    s = torch.sigmoid(logits.reshape(12, 4))
    assert torch.allclose(forced.weight.reshape(12, 2), s[:, :2] / s[:, :2].sum(-1, keepdim=True))


def test_bias_balanced_update_direction_and_load_reset():
    router = BiasBalanced(3, 1, update_rate=0.01)
    logits = torch.tensor([[[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    router.train()(logits)
    router(logits)
    assert router.load.tolist() == [6.0, 2.0, 0.0]
    used = router.update_bias()
    assert used.tolist() == [6.0, 2.0, 0.0]
    # mean load 8/3: expert 0 is overloaded (bias down), experts 1 and 2 underloaded (bias up)
    assert router.bias.tolist() == pytest.approx([-0.01, 0.01, 0.01])
    assert router.load.tolist() == [0.0, 0.0, 0.0]
    router.eval()(logits)  # eval forwards do not count
    assert router.load.tolist() == [0.0, 0.0, 0.0]
    router.load.copy_(torch.tensor([2.0, 2.0, 2.0]))
    router.update_bias()  # balanced: sign(0) = 0, no change
    assert router.bias.tolist() == pytest.approx([-0.01, 0.01, 0.01])


def test_bias_balanced_bias_updates_balance_the_load():
    torch.manual_seed(0)
    logits = torch.randn(4, 32, 4)
    logits[..., 0] += 2.0  # expert 0 hogs the tokens
    router = BiasBalanced(4, 1, update_rate=0.05).train()
    first = router(logits).tokens_per_expert.float()
    for _ in range(60):
        router(logits)
        router.update_bias()
    last = router(logits).tokens_per_expert.float()
    assert last.std() < 0.5 * first.std()
    assert router.bias[0] < 0


def test_bias_balanced_errors():
    with pytest.raises(ValueError, match="exceeds"):
        BiasBalanced(3, 4)
    with pytest.raises(ValueError, match="k"):
        BiasBalanced(3, 0)
    with pytest.raises(ValueError, match="num_experts"):
        BiasBalanced(0, 1)
    with pytest.raises(ValueError, match="update_rate"):
        BiasBalanced(3, 1, update_rate=-1.0)
    with pytest.raises(ValueError, match="scale"):
        BiasBalanced(3, 1, scale=0.0)
    with pytest.raises(ValueError, match="num_experts=3"):
        BiasBalanced(3, 1)(torch.zeros(1, 2, 4))


# ---- LearnedThreshold -------------------------------------------------------------------------
def _threshold_router(bias: float, max_threshold=None) -> LearnedThreshold:
    router = LearnedThreshold(2, 4, max_threshold=max_threshold).double()
    with torch.no_grad():
        router.threshold_proj.weight.zero_()
        router.threshold_proj.bias.fill_(bias)
    return router


def test_learned_threshold_hand_made():
    logits = logits_of([[[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]])
    x = torch.randn(1, 2, 2, dtype=F64)
    # tau = sigmoid(0) * 1/4 = 0.125: token 0 keeps p - tau = 0.375, 0.175, 0.025 (sum 0.575)
    r = _threshold_router(0.0)(logits, x=x)
    assert_pairs(r, {(0, 0): 0.375 / 0.575, (0, 1): 0.175 / 0.575, (0, 2): 0.025 / 0.575,
                     (1, 0): 0.25, (1, 1): 0.25, (1, 2): 0.25, (1, 3): 0.25})
    assert r.info["threshold"].shape == (1, 2)
    assert r.info["threshold"].flatten().tolist() == pytest.approx([0.125, 0.125])
    # tau ~ 0.4: token 0 keeps only expert 0 (weight 1), token 1 gets no expert at all
    r = _threshold_router(30.0, max_threshold=0.4)(logits, x=x)
    assert_pairs(r, {(0, 0): 1.0})
    assert r.experts_per_token.tolist() == [1, 0]


@pytest.mark.parametrize("seed", SEEDS)
def test_learned_threshold_matches_reference(seed):
    torch.manual_seed(seed)
    router = LearnedThreshold(DIM, 4, max_threshold=0.4).double()
    logits = rand_logits(seed, b=2, l=6, e=4)
    x = torch.randn(2, 6, DIM, dtype=F64)
    tau = torch.sigmoid(x @ router.threshold_proj.weight.T + router.threshold_proj.bias).squeeze(-1) * 0.4
    ref = lambda lg: ref_learned_threshold(lg, tau)  # noqa: E731
    r = router(logits, x=x)
    assert_matches_reference(r, ref(logits))
    assert_grad_matches(lambda lg: router(lg, x=x), ref, logits, seed)
    # the threshold head learns through the weights too
    (r.weight * torch.randn(r.num_assignments, dtype=F64)).sum().backward()
    assert router.threshold_proj.weight.grad.abs().sum() > 0


def test_learned_threshold_errors():
    router = LearnedThreshold(3, 4)
    with pytest.raises(ValueError, match="x"):
        router(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="x"):
        router(torch.zeros(1, 2, 4), x=torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="num_experts=4"):
        router(torch.zeros(1, 2, 5), x=torch.zeros(1, 2, 3))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="max_threshold"):
            LearnedThreshold(3, 4, max_threshold=bad)
    with pytest.raises(ValueError, match="dim"):
        LearnedThreshold(0, 4)
    assert LearnedThreshold(3, 8).max_threshold == pytest.approx(1 / 8)


# ---- factory ----------------------------------------------------------------------------------
def test_make_router_builds_every_router_by_name():
    cases = {
        "topk": ({"k": 2}, TopK),
        "switch": ({"capacity_factor": 1.0}, Switch),
        "expert_choice": ({"k": 2}, ExpertChoice),
        "topp": ({"p": 0.5}, TopP),
        "race": ({"k": 2}, Race),
        "hash": ({"num_experts": 4}, Hash),
        "balanced": ({}, BalancedAssignment),
        "bias_balanced": ({"num_experts": 4, "k": 2}, BiasBalanced),
        "learned_threshold": ({"dim": 3, "num_experts": 4}, LearnedThreshold),
        "fixed_threshold": ({"threshold": 0.3}, FixedThreshold),
    }
    assert set(cases) == set(ROUTERS)
    for name, (kwargs, cls) in cases.items():
        assert type(make_router(name, **kwargs)) is cls
    assert make_router("topk", k=3).k == 3


def test_make_router_errors():
    with pytest.raises(ValueError, match="unknown router 'TopK'"):
        make_router("TopK", k=2)
    with pytest.raises(ValueError, match="takes no keyword 'kk'"):
        make_router("topk", kk=2)
    with pytest.raises(TypeError):
        ROUTERS["mine"] = TopK  # read-only


def test_public_names_exist():
    for name in routers_module.__all__:
        assert hasattr(routers_module, name), name


# ---- issue 9: thresholds in validated buffers, no silent drops, no 0/0 ------------------------
def test_switch_capacity_is_at_least_one():
    one = Switch(1.0)(torch.tensor([[[0.1, 0.9, 0.0, 0.2]]]))  # 1 token, 4 experts: int(0.25) = 0
    assert one.info["capacity"] == 1 and int(one.info["dropped"]) == 0
    assert_pairs(one, {(0, 1): num(torch.tensor([0.1, 0.9, 0.0, 0.2]).softmax(0)[1])})
    logits = torch.full((1, 4, 8), -1.0)
    for t, e in enumerate((0, 3, 5, 7)):
        logits[0, t, e] = 2.0  # 4 tokens on 4 different experts of 8: int(0.5) = 0
    r = Switch(1.0)(logits)
    assert r.info["capacity"] == 1 and int(r.info["dropped"]) == 0
    assert r.expert.tolist() == [0, 3, 5, 7]
    logits[0, 1, 0] = 3.0  # token 1 now wants expert 0 too: it arrives second and is dropped
    r = Switch(1.0)(logits)
    assert r.expert.tolist() == [0, 5, 7] and int(r.info["dropped"]) == 1


def test_topp_p_is_a_validated_buffer_moved_by_set_inference_threshold():
    router = TopP(0.4)
    assert "threshold" in dict(router.named_buffers()) and router.p == 0.4 == router.inference_threshold
    router.set_inference_threshold(0.9)
    assert router.p == 0.9 and float(router.state_dict()["threshold"]) == 0.9
    router.p = 0.7  # the old attribute still works, through the same check
    assert router.p == 0.7
    for bad in (-1, 0, 0.0, 1.5, float("nan"), float("inf"), "0.5", True, None):
        with pytest.raises(ValueError, match="p must be in"):
            router.set_inference_threshold(bad)
        with pytest.raises(ValueError, match="p must be in"):
            router.p = bad
    assert router.p == 0.7  # a rejected value changes nothing
    logits = torch.tensor([[[0.5, 0.3, 0.2]]], dtype=F64).log()
    assert router(logits).expert.tolist() == [0, 1]
    router.set_inference_threshold(0.4)
    assert router(logits).expert.tolist() == [0]


def test_topp_threshold_survives_state_dict_and_old_state_dicts_load():
    router = TopP(0.3)
    router.set_inference_threshold(0.8)
    fresh = TopP(0.3)
    fresh.load_state_dict(router.state_dict())
    assert fresh.p == 0.8
    logits = rand_logits(3, b=2, l=6, e=5)
    assert_same_routing(fresh(logits), router(logits))
    old = TopP(0.6)
    old.load_state_dict({})  # a state_dict from before p was a buffer: keeps the constructor's p
    assert old.p == 0.6
    with pytest.raises(RuntimeError, match="p must be in"):
        old.load_state_dict({"threshold": torch.tensor(-1.0, dtype=F64)})


def test_race_threshold_is_validated_on_every_set():
    router = Race(1)
    assert router.inference_threshold is None  # nothing trained yet
    for bad in (float("nan"), float("inf"), -float("inf"), "0.5", None, True):
        with pytest.raises(ValueError, match="threshold"):
            router.set_inference_threshold(bad)
    assert not bool(router.initialized)
    router.set_inference_threshold(0.5)
    assert router.inference_threshold == 0.5 and bool(router.initialized)
    router.set_inference_threshold(-2)
    assert router.inference_threshold == -2.0
    state = router.state_dict()
    state["threshold"] = torch.tensor(float("nan"))
    with pytest.raises(RuntimeError, match="threshold"):
        Race(1).load_state_dict(state)


def test_bias_balanced_weights_stay_finite_when_every_sigmoid_underflows():
    logits = torch.full((1, 1, 4), -89.0)  # sigmoid(-89) is 0 in float32
    r = BiasBalanced(4, 2)(logits)
    assert torch.equal(r.weight, torch.tensor([0.5, 0.5]))
    logits = torch.tensor([[[-89.0, -90.0]]], requires_grad=True)  # k = E: the selection is not a tie-break
    r = BiasBalanced(2, 2, scale=2.0)(logits)
    # sigmoid(a) / (sigmoid(a) + sigmoid(b)) -> softmax over the chosen as both go to -inf
    want = 2.0 * torch.tensor([-89.0, -90.0], dtype=F64).softmax(0)
    assert torch.allclose(r.weight.double(), want, atol=1e-6)
    (r.weight[0]).backward()
    grad = logits.grad[0, 0].double()
    assert torch.isfinite(grad).all()
    s0, s1 = want[0] / 2, want[1] / 2  # d w0 / d l = scale * (s0 s1, -s0 s1) in this limit
    assert torch.allclose(grad[:2], torch.stack([2 * s0 * s1, -2 * s0 * s1]), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_topk_renormalized_sigmoid_weights_stay_finite_when_every_sigmoid_underflows(dtype):
    low = -89.0 if dtype == torch.float32 else -800.0  # sigmoid is exactly 0 there
    logits = torch.tensor([[[low, low - 1], [low, low]]], dtype=dtype, requires_grad=True)
    assert torch.sigmoid(logits).eq(0).all()
    r = TopK(2, renormalize=True, gating="sigmoid")(logits)
    # sigmoid(a) / (sigmoid(a) + sigmoid(b)) -> softmax([a, b]) as both go to -inf
    want = torch.tensor([[0.0, -1.0], [0.0, 0.0]], dtype=F64).softmax(-1).reshape(-1)
    assert r.expert.tolist() == [0, 1, 0, 1]
    assert torch.allclose(r.weight.double(), want, atol=1e-6)
    r.weight[0].backward()
    w0, w1 = want[0], want[1]
    assert torch.allclose(logits.grad[0, 0].double(), torch.stack([w0 * w1, -w0 * w1]), atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_renormalized_sigmoid_still_matches_reference_after_the_safe_normalisation(seed):
    logits = rand_logits(seed) * 3
    router = TopK(2, renormalize=True, gating="sigmoid")
    assert_matches_reference(router(logits), ref_topk(logits, 2, True, "sigmoid"))
    assert_grad_matches(router, lambda lg: ref_topk(lg, 2, True, "sigmoid"), logits, seed)


def test_learned_inputs_name_x_when_it_has_the_wrong_type():
    logits = torch.zeros(1, 2, 4)
    noisy = TopK(2, noise="learned", dim=3, num_experts=4)
    threshold = LearnedThreshold(3, 4)
    for who, call in (("noise", noisy), ("LearnedThreshold", threshold)):
        for bad in (torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.bool),
                    torch.zeros(1, 2, 3, dtype=F64), [[[0.0] * 3] * 2]):
            with pytest.raises(ValueError, match=r"\bx\b"):
                call(logits, x=bad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed float dtypes are autocast's business
        threshold(logits, x=torch.zeros(1, 2, 3, dtype=torch.bfloat16))
