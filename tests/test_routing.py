"""Spec of moe_lite.routing: the Routing record's views and the statistics derived from it.

Routings are built by hand from (token, expert, weight) triples; no router is involved.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from moe_lite.routing import (
    Routing,
    by_label,
    combination_usage,
    load_cv,
    max_violation,
    routing_summary,
)


def make_routing(b, l, e, triples, logits=None, dtype=torch.float32):
    """A Routing over B*L tokens from (token, expert, weight) triples."""
    if logits is None:
        logits = torch.zeros(b, l, e, dtype=dtype)
    token = torch.tensor([t for t, _, _ in triples], dtype=torch.long)
    expert = torch.tensor([x for _, x, _ in triples], dtype=torch.long)
    weight = torch.tensor([w for _, _, w in triples], dtype=dtype)
    return Routing(logits=logits, token=token, expert=expert, weight=weight, num_experts=e)


def mask_from_sets(sets, e):
    """bool [N, E] from one set of selected experts per token."""
    m = torch.zeros(len(sets), e, dtype=torch.bool)
    for n, s in enumerate(sets):
        for x in s:
            m[n, x] = True
    return m


def ref_combination_usage(mask, coverage=Fraction(95, 100)):
    """Exact loop reference of the paper's pseudocode (papers.md §1.2): count co-activations of every
    pair i < j, sort descending, normalise, and count the pairs whose cumulative share is still below
    95% (``100 * (c.cumsum() < 0.95).mean()``: the pair that reaches 95% is not counted)."""
    rows = mask.tolist()
    e = len(rows[0]) if rows else 0
    pairs = list(itertools.combinations(range(e), 2))
    if not pairs:
        return 0.0
    counts = sorted((sum(1 for r in rows if r[i] and r[j]) for i, j in pairs), reverse=True)
    total = sum(counts)
    if total == 0:
        return 0.0
    cum, below = 0, 0
    for c in counts:
        cum += c
        if Fraction(cum, total) < coverage:
            below += 1
    return 100.0 * below / len(pairs)


# ---- the record's views -----------------------------------------------------------------------
# B=1, L=3, E=3: token0 -> {0 (0.5), 2 (0.3)}, token1 -> {2 (0.9)}, token2 -> nothing
HAND = [(0, 0, 0.5), (0, 2, 0.3), (1, 2, 0.9)]


def test_shapes_and_counts():
    r = make_routing(1, 3, 3, HAND)
    assert (r.batch_size, r.seq_len, r.num_tokens, r.num_assignments) == (1, 3, 3, 3)
    assert r.tokens_per_expert.tolist() == [1, 0, 2]
    assert r.tokens_per_expert.dtype == torch.long
    assert r.experts_per_token.tolist() == [2, 1, 0]
    assert r.experts_per_token.dtype == torch.long


def test_mask_and_dense_weight():
    r = make_routing(1, 3, 3, HAND)
    assert r.mask.dtype == torch.bool
    assert r.mask.tolist() == [[True, False, True], [False, False, True], [False, False, False]]
    assert torch.allclose(r.dense_weight, torch.tensor([[0.5, 0.0, 0.3], [0.0, 0.0, 0.9], [0.0, 0.0, 0.0]]))


def test_counts_cover_trailing_empty_tokens_and_experts():
    # last token and last expert unused: bincount must still return full lengths
    r = make_routing(2, 2, 4, [(0, 1, 1.0)])
    assert r.tokens_per_expert.tolist() == [0, 1, 0, 0]
    assert r.experts_per_token.tolist() == [1, 0, 0, 0]
    assert r.mask.shape == (4, 4) and r.dense_weight.shape == (4, 4)
    empty = make_routing(2, 2, 4, [])
    assert empty.tokens_per_expert.tolist() == [0] * 4 and empty.experts_per_token.tolist() == [0] * 4
    assert not empty.mask.any()


def test_dense_weight_carries_gradient_to_weight():
    r = make_routing(1, 3, 3, HAND, dtype=torch.float64)
    w = r.weight.clone().requires_grad_()
    r = Routing(r.logits, r.token, r.expert, w, 3)
    coef = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    (g,) = torch.autograd.grad((r.dense_weight * coef).sum(), w)
    assert g.tolist() == [0.0, 2.0, 5.0]  # coef at (0,0), (0,2), (1,2)


def test_probs_softmax_and_dtype():
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0]]], dtype=torch.float64)
    r = make_routing(1, 2, 2, [(0, 0, 1.0)], logits=logits, dtype=torch.float64)
    assert r.probs.shape == (2, 2)
    assert r.probs.dtype == torch.float64  # float64 is kept (gradcheck-able)
    assert torch.allclose(r.probs, torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64))
    bf = make_routing(1, 2, 2, [(0, 0, 1.0)], logits=logits.to(torch.bfloat16))
    assert bf.probs.dtype == torch.float32  # low precision is upcast


# ---- scalar statistics ------------------------------------------------------------------------
def test_load_cv_and_max_violation_hand_values():
    # loads [1, 0, 2]: mean 1, population std sqrt(2/3); max_vio = (2 - 1) / 1
    assert load_cv(torch.tensor([1, 0, 2])) == pytest.approx(math.sqrt(2 / 3))
    assert max_violation(torch.tensor([1, 0, 2])) == pytest.approx(1.0)
    # loads [4, 2, 2, 0]: mean 2; max_vio = 1; std = sqrt((4 + 0 + 0 + 4) / 4) = sqrt 2
    assert max_violation(torch.tensor([4, 2, 2, 0])) == pytest.approx(1.0)
    assert load_cv(torch.tensor([4, 2, 2, 0])) == pytest.approx(math.sqrt(2) / 2)
    # balanced and empty
    assert load_cv(torch.tensor([3, 3, 3])) == 0.0 and max_violation(torch.tensor([3, 3, 3])) == 0.0
    assert load_cv(torch.tensor([0, 0])) == 0.0 and max_violation(torch.tensor([0, 0])) == 0.0


def test_routing_summary_hand_values():
    s = routing_summary(make_routing(1, 3, 3, HAND))
    assert s == make_routing(1, 3, 3, HAND).summary()
    assert s["experts_per_token"] == pytest.approx(1.0)  # (2 + 1 + 0) / 3
    assert s["experts_per_token_max"] == 2.0
    assert s["dropped_fraction"] == pytest.approx(1 / 3)  # token 2
    assert s["load_cv"] == pytest.approx(math.sqrt(2 / 3))  # loads [1, 0, 2]
    assert s["max_vio"] == pytest.approx(1.0)
    assert s["dead_experts"] == 1.0  # expert 1
    assert s["combination_usage"] == 0.0  # only pair (0, 2) is used: it alone reaches 95%
    assert s["tokens_per_expert_min"] == 0.0 and s["tokens_per_expert_max"] == 2.0
    assert s["router_entropy"] == pytest.approx(math.log(3))  # zero logits: uniform over 3 experts
    assert s["router_entropy_norm"] == pytest.approx(1.0)
    assert set(s) == {"experts_per_token", "experts_per_token_max", "dropped_fraction", "load_cv", "max_vio",
                      "dead_experts", "combination_usage", "tokens_per_expert_min", "tokens_per_expert_max",
                      "router_entropy", "router_entropy_norm"}
    assert all(isinstance(v, float) for v in s.values())


def test_router_entropy_hand_values():
    # token 0: p = [1/2, 1/2, 0-ish] -> log 2; token 1: one-hot -> 0; mean log(2) / 2 over the 2 tokens
    big = 1e4
    logits = torch.tensor([[[0.0, 0.0, -big], [big, 0.0, 0.0]]])
    s = make_routing(1, 2, 3, [(0, 0, 1.0), (1, 0, 1.0)], logits=logits).summary()
    assert s["router_entropy"] == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert s["router_entropy_norm"] == pytest.approx(math.log(2) / 2 / math.log(3), abs=1e-6)
    # one expert: entropy 0, normalised entropy 0 (not 0/0)
    s1 = make_routing(1, 2, 1, [(0, 0, 1.0)]).summary()
    assert s1["router_entropy"] == 0.0 and s1["router_entropy_norm"] == 0.0


def test_router_entropy_against_loop_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g) * 2
    s = make_routing(2, 3, 5, [(0, 1, 1.0)], logits=logits).summary()
    rows = logits.reshape(-1, 5).tolist()
    ref = 0.0
    for row in rows:
        z = sum(math.exp(v) for v in row)
        ref -= sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in row)
    ref /= len(rows)
    assert s["router_entropy"] == pytest.approx(ref, rel=1e-5)
    assert s["router_entropy_norm"] == pytest.approx(ref / math.log(5), rel=1e-5)


def test_routing_summary_against_loop_reference():
    g = torch.Generator().manual_seed(0)
    for b, l, e in [(2, 5, 4), (3, 7, 6), (1, 9, 3)]:
        mask = torch.rand(b * l, e, generator=g) < 0.35
        idx = mask.nonzero()
        r = Routing(torch.zeros(b, l, e), idx[:, 0], idx[:, 1], torch.ones(len(idx)), e)
        rows = mask.tolist()
        loads = [sum(row[x] for row in rows) for x in range(e)]
        ept = [sum(row) for row in rows]
        mean = sum(loads) / e
        std = math.sqrt(sum((v - mean) ** 2 for v in loads) / e)
        s = r.summary()
        assert s["experts_per_token"] == pytest.approx(sum(ept) / len(ept))
        assert s["experts_per_token_max"] == max(ept)
        assert s["dropped_fraction"] == pytest.approx(sum(1 for v in ept if v == 0) / len(ept))
        assert s["load_cv"] == pytest.approx(std / mean, rel=1e-5)
        assert s["max_vio"] == pytest.approx((max(loads) - mean) / mean, rel=1e-5)
        assert s["dead_experts"] == sum(1 for v in loads if v == 0)
        assert s["combination_usage"] == pytest.approx(ref_combination_usage(mask))
        assert (s["tokens_per_expert_min"], s["tokens_per_expert_max"]) == (min(loads), max(loads))


# ---- combination usage ------------------------------------------------------------------------
def test_combination_usage_single_pair_is_zero_as_in_the_paper():
    # E=3, every token picks {0, 1}: that pair alone holds 100% >= 95%, so no pair is counted (the
    # paper's pseudocode counts the pairs strictly below the 95% line, not the one that crosses it)
    assert combination_usage(mask_from_sets([{0, 1}] * 5, 3)) == 0.0


def test_combination_usage_uniform_and_no_pairs():
    # E=4, each of the 6 pairs once: cumulative 1/6 .. 5/6 stay below 0.95, the 6th reaches it -> 5 of 6
    pairs = list(itertools.combinations(range(4), 2))
    assert combination_usage(mask_from_sets(pairs, 4)) == pytest.approx(500 / 6)
    # top-1 routing has no co-activation at all; a single expert has no pair
    assert combination_usage(mask_from_sets([{0}, {1}, {2}], 3)) == 0.0
    assert combination_usage(mask_from_sets([{0}, {0}], 1)) == 0.0


def test_combination_usage_counts_the_pairs_below_95_percent():
    # E=4 pair counts sorted [10, 5, 3, 1, 1, 0] (total 20): cumulative 0.5, 0.75, 0.9, 0.95 -> the first
    # three are below 95%, the fourth reaches it -> 3 of 6 (the old rule also counted the fourth: 4 of 6)
    sets = [{0, 1}] * 10 + [{0, 2}] * 5 + [{0, 3}] * 3 + [{1, 2}] + [{1, 3}]
    m = mask_from_sets(sets, 4)
    assert ref_combination_usage(m) == pytest.approx(300 / 6)
    assert combination_usage(m) == pytest.approx(300 / 6)
    # one more {1, 3}: cumulative 10/21, 15/21, 18/21, 20/21 = 0.952 -> still 3 of 6
    m2 = mask_from_sets(sets + [{1, 3}], 4)
    assert combination_usage(m2) == pytest.approx(300 / 6)
    # a dominant pair (96%) reaches 95% on its own: 0 of 6
    m3 = mask_from_sets([{2, 3}] * 96 + [{0, 1}] * 4, 4)
    assert combination_usage(m3) == 0.0


@pytest.mark.parametrize("e", [16, 25, 41])
def test_combination_usage_exact_95_percent_boundary(e):
    # uniform co-selection over P pairs with 0.95 * P an integer: the (0.95 P)-th pair reaches exactly
    # 95% (float rounding must not count it), so 0.95 P - 1 pairs are below the line
    pairs = list(itertools.combinations(range(e), 2))
    assert combination_usage(mask_from_sets(pairs, e)) == pytest.approx(95.0 - 100.0 / len(pairs))


def test_combination_usage_against_loop_reference_random():
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        e = int(torch.randint(2, 9, (1,), generator=g))
        n = int(torch.randint(1, 40, (1,), generator=g))
        mask = torch.rand(n, e, generator=g) < (0.2 + 0.6 * torch.rand(1, generator=g))
        assert combination_usage(mask) == pytest.approx(ref_combination_usage(mask)), (trial, mask)


def test_combination_usage_against_loop_reference_on_boundaries():
    # pair-count histograms whose cumulative shares land exactly on 95%
    for counts in ([19, 1], [38, 1, 1], [10, 5, 3, 1, 1, 0], [7, 6, 3, 2, 1, 1], [1] * 20 + [0] * 8):
        e = next(x for x in range(2, 12) if x * (x - 1) // 2 >= len(counts))
        pairs = list(itertools.combinations(range(e), 2))
        sets = [set(p) for p, c in zip(pairs, counts) for _ in range(c)]
        m = mask_from_sets(sets, e)
        assert combination_usage(m) == pytest.approx(ref_combination_usage(m)), counts


# ---- by_label ---------------------------------------------------------------------------------
# B=2, L=3, E=2; flat tokens 0..5. token0 -> {0, 1}, token1 -> {0}, token3 -> {1}, token4 -> {1},
# tokens 2 and 5 -> nothing.
BL = [(0, 0, 1.0), (0, 1, 1.0), (1, 0, 1.0), (3, 1, 1.0), (4, 1, 1.0)]


def test_by_label_per_sample_labels():
    r = make_routing(2, 3, 2, BL)
    out = by_label(r, torch.tensor([1, 0]))  # sample 0 has label 1, sample 1 label 0
    # label 0 = tokens 3, 4, 5: counts [0, 2]; label 1 = tokens 0, 1, 2: counts [2, 1]
    assert out["counts"].tolist() == [[0.0, 2.0], [2.0, 1.0]]
    assert out["tokens"].tolist() == [3.0, 3.0]
    assert torch.allclose(out["fraction"], torch.tensor([[0.0, 2 / 3], [2 / 3, 1 / 3]]))
    assert torch.allclose(out["experts_per_token"], torch.tensor([2 / 3, 1.0]))
    assert torch.allclose(out["dropped_fraction"], torch.tensor([1 / 3, 1 / 3]))


def test_by_label_per_position_labels():
    r = make_routing(2, 3, 2, BL)
    out = by_label(r, torch.tensor([0, 1, 2]))  # position index
    # position 0 = tokens 0, 3; position 1 = tokens 1, 4; position 2 = tokens 2, 5
    assert out["counts"].tolist() == [[1.0, 2.0], [1.0, 1.0], [0.0, 0.0]]
    assert out["tokens"].tolist() == [2.0, 2.0, 2.0]
    assert torch.allclose(out["experts_per_token"], torch.tensor([1.5, 1.0, 0.0]))
    assert torch.allclose(out["dropped_fraction"], torch.tensor([0.0, 0.0, 1.0]))


def test_by_label_per_token_labels_and_flat():
    r = make_routing(2, 3, 2, BL)
    labels = torch.tensor([[0, 0, 1], [1, 1, 0]])
    out = by_label(r, labels)
    # label 0 = tokens 0, 1, 5: counts [2, 1]; label 1 = tokens 2, 3, 4: counts [0, 2]
    assert out["counts"].tolist() == [[2.0, 1.0], [0.0, 2.0]]
    assert torch.allclose(out["experts_per_token"], torch.tensor([1.0, 2 / 3]))
    assert torch.allclose(out["dropped_fraction"], torch.tensor([1 / 3, 1 / 3]))
    flat = by_label(r, labels.reshape(-1))
    for key in out:
        assert torch.equal(out[key], flat[key])


def test_by_label_against_loop_reference():
    g = torch.Generator().manual_seed(2)
    b, l, e, c = 3, 5, 4, 4
    mask = torch.rand(b * l, e, generator=g) < 0.4
    idx = mask.nonzero()
    r = Routing(torch.zeros(b, l, e), idx[:, 0], idx[:, 1], torch.ones(len(idx)), e)
    labels = torch.randint(0, c, (b, l), generator=g)
    out = by_label(r, labels, num_labels=c)
    flat, rows = labels.reshape(-1).tolist(), mask.tolist()
    for lab in range(c):
        toks = [n for n in range(b * l) if flat[n] == lab]
        for x in range(e):
            assert out["counts"][lab, x].item() == sum(rows[n][x] for n in toks)
        assert out["tokens"][lab].item() == len(toks)
        if toks:
            assert out["experts_per_token"][lab].item() == pytest.approx(sum(sum(rows[n]) for n in toks) / len(toks))
            assert out["dropped_fraction"][lab].item() == pytest.approx(sum(1 for n in toks if not any(rows[n])) / len(toks))
        else:
            assert math.isnan(out["experts_per_token"][lab].item())


def test_by_label_empty_label_is_nan():
    r = make_routing(2, 3, 2, BL)
    out = by_label(r, torch.tensor([0, 2]), num_labels=4)  # labels 1 and 3 have no token
    assert out["tokens"].tolist() == [3.0, 0.0, 3.0, 0.0]
    for key in ("experts_per_token", "dropped_fraction"):
        v = out[key]
        assert math.isnan(v[1].item()) and math.isnan(v[3].item())
        assert not math.isnan(v[0].item()) and not math.isnan(v[2].item())
    assert out["counts"][1].tolist() == [0.0, 0.0] and out["fraction"][3].tolist() == [0.0, 0.0]


def test_by_label_when_batch_equals_length_reads_1d_as_batch():
    # B == L == 2: a 1-D label tensor is ambiguous and is read as [B] (one label per sample)
    r = make_routing(2, 2, 2, [(0, 0, 1.0), (1, 0, 1.0), (2, 1, 1.0)])
    out = by_label(r, torch.tensor([0, 1]))
    assert out["counts"].tolist() == [[2.0, 0.0], [0.0, 1.0]]


def test_by_label_bad_shapes_raise():
    r = make_routing(2, 3, 2, BL)
    with pytest.raises(ValueError):
        by_label(r, torch.tensor([0, 1, 0, 1]))  # neither B=2, L=3 nor N=6
    with pytest.raises(ValueError):
        by_label(r, torch.zeros(3, 2, dtype=torch.long))  # [L, B] instead of [B, L]
    with pytest.raises(ValueError):
        by_label(r, torch.zeros(2, 3, 1, dtype=torch.long))  # extra axis
    with pytest.raises(ValueError):
        by_label(r, torch.tensor([0, -1]))  # negative label
    with pytest.raises(ValueError):
        by_label(r, torch.tensor([0, 3]), num_labels=2)  # label outside [0, num_labels)


# ---- validation on construction (issue 9) -------------------------------------------------------
def test_routing_rejects_a_malformed_record_naming_the_field():
    logits = torch.zeros(1, 3, 4)
    long = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    good = dict(logits=logits, token=long(0, 1, 2), expert=long(0, 3, 1), weight=torch.ones(3), num_experts=4)
    Routing(**good)
    cases = [
        ({"expert": long(0, 4, 1)}, r"expert indices must lie in \[0, 4\)"),  # E is out of range
        ({"expert": long(0, -1, 1)}, r"expert indices must lie in \[0, 4\)"),
        ({"token": long(0, 1, 3)}, r"token indices must lie in \[0, 3\)"),  # N = 3
        ({"token": long(0, 1)}, "same length"),
        ({"weight": torch.ones(2)}, "same length"),
        ({"token": torch.tensor([0.0, 1.0, 2.0])}, "token must be a long"),
        ({"expert": torch.tensor([0, 3, 1], dtype=torch.int32)}, "expert must be a long"),
        ({"token": long(0, 1, 2)[None]}, r"token must be a long tensor \[A\]"),
        ({"weight": torch.ones(3, dtype=torch.long)}, "weight must be a floating"),
        ({"weight": [1.0, 1.0, 1.0]}, "weight must be a floating"),
        ({"logits": torch.zeros(3, 4)}, r"logits must be .*\[B, L, E\]"),
        ({"logits": torch.zeros(1, 3, 4, dtype=torch.long)}, "logits must be .*floating"),
        ({"num_experts": 5}, "num_experts=5"),
        ({"num_experts": True}, "num_experts"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            Routing(**{**good, **change})


def test_routing_validation_reads_no_values_off_the_host():
    # meta tensors have no values: a range check there would raise. CUDA tensors are treated the
    # same way (checking there would sync the device on every forward).
    meta = dict(device="meta")
    r = Routing(torch.zeros(1, 3, 4, **meta), torch.full((3,), 7, dtype=torch.long, **meta),
                torch.full((3,), 9, dtype=torch.long, **meta), torch.ones(3, **meta), 4)
    assert r.num_assignments == 3
    with pytest.raises(ValueError, match="same length"):  # shapes are still checked
        Routing(torch.zeros(1, 3, 4, **meta), torch.zeros(3, dtype=torch.long, **meta),
                torch.zeros(2, dtype=torch.long, **meta), torch.ones(3, **meta), 4)


# ---- hand-made inputs (moe_lite.examples) -----------------------------------------------------
def test_pair_logits_send_each_token_to_its_pair():
    from moe_lite.examples import pair_logits
    from moe_lite.routers import TopK

    pairs = [(0, 1), (2, 3), (1, 3)]
    logits = pair_logits(pairs, num_experts=4, scale=3.0)
    assert logits.shape == (1, 3, 4) and logits.sum().item() == 3.0 * 6
    mask = TopK(2)(logits).mask
    assert [set(torch.nonzero(row).flatten().tolist()) for row in mask] == [set(p) for p in pairs]
    for bad in ([(1, 1)], [(0, 4)], [(-1, 2)]):
        with pytest.raises(ValueError, match="two different experts"):
            pair_logits(bad)
