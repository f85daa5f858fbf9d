"""Spec of moe_lite.analysis (co-activation, expert load over training, cross-layer paths) and of the
viz builders that draw them; hand-made routings with the answers written out, and loop references."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from moe_lite import viz
from moe_lite.analysis import (coactivation, expert_load, expert_transitions, layer_transitions,
                               load_over_training, top_expert, transition_predictability)
from moe_lite.experiments.common import StepStats
from moe_lite.layers import MoE
from moe_lite.routers import TopK
from moe_lite.routing import Routing
from moe_lite.train import History


def make_routing(n, e, triples):
    """A Routing over n tokens (B=1, L=n) from (token, expert, weight) triples."""
    return Routing(torch.zeros(1, n, e), torch.tensor([t for t, _, _ in triples], dtype=torch.long),
                   torch.tensor([x for _, x, _ in triples], dtype=torch.long),
                   torch.tensor([w for _, _, w in triples], dtype=torch.float), e)


#: 4 tokens, 3 experts: token 0 -> {0: .3, 1: .7}, token 1 -> {0: .5, 1: .5} (tie), token 2 -> {2}, token 3 none
FIRST = make_routing(4, 3, [(0, 0, 0.3), (0, 1, 0.7), (1, 0, 0.5), (1, 1, 0.5), (2, 2, 1.0)])
#: the same 4 tokens in the next layer, 2 experts: top experts [0, 0, 1, 1]
SECOND = make_routing(4, 2, [(0, 0, 0.9), (0, 1, 0.1), (1, 0, 1.0), (2, 1, 1.0), (3, 1, 1.0)])


def random_routing(g, n, e, p=0.4):
    mask = torch.rand(n, e, generator=g) < p
    idx = mask.nonzero()
    return Routing(torch.zeros(1, n, e), idx[:, 0], idx[:, 1], torch.rand(len(idx), generator=g), e)


# ---- co-activation ------------------------------------------------------------------------------
def test_coactivation_hand_values():
    # tokens 0 and 1 both use experts 0 and 1; token 2 uses 2; token 3 none
    np.testing.assert_allclose(coactivation(FIRST, normalize=False), [[2, 2, 0], [2, 2, 0], [0, 0, 1]])
    np.testing.assert_allclose(coactivation(FIRST), np.array([[2, 2, 0], [2, 2, 0], [0, 0, 1]]) / 4)
    # top-1 routing: no pair at all, the diagonal is the load
    top1 = make_routing(3, 2, [(0, 0, 1.0), (1, 0, 1.0), (2, 1, 1.0)])
    np.testing.assert_allclose(coactivation(top1), [[2 / 3, 0], [0, 1 / 3]])


def test_coactivation_against_loop_reference():
    g = torch.Generator().manual_seed(0)
    for n, e in [(7, 4), (12, 6), (5, 2)]:
        r = random_routing(g, n, e)
        sets = [set() for _ in range(n)]
        for t, x in zip(r.token.tolist(), r.expert.tolist()):
            sets[t].add(x)
        ref = [[sum(1 for s in sets if i in s and j in s) / n for j in range(e)] for i in range(e)]
        np.testing.assert_allclose(coactivation(r), ref, rtol=1e-6)
        assert torch.allclose(coactivation(r).diagonal(), r.tokens_per_expert.float() / n)


def test_expert_load_hand_values():
    np.testing.assert_allclose(expert_load(FIRST), [2 / 5, 2 / 5, 1 / 5])  # 5 assignments
    empty = make_routing(2, 3, [])
    assert expert_load(empty).tolist() == [0.0, 0.0, 0.0]


# ---- cross-layer paths --------------------------------------------------------------------------
def test_top_expert_hand_values():
    assert top_expert(FIRST).tolist() == [1, 0, 2, -1]  # token 1: a tie -> the lower index; token 3: none
    assert top_expert(SECOND).tolist() == [0, 0, 1, 1]


def test_expert_transitions_hand_values():
    # token 0: 1 -> 0, token 1: 0 -> 0, token 2: 2 -> 1; token 3 has no expert in FIRST (left out)
    counts = expert_transitions(FIRST, SECOND)
    np.testing.assert_allclose(counts, [[1, 0], [1, 0], [0, 1]])
    pairs = layer_transitions({"a": FIRST, "b": SECOND, "c": SECOND})
    assert list(pairs) == [("a", "b"), ("b", "c")]
    np.testing.assert_allclose(pairs[("b", "c")], [[2, 0], [0, 2]])
    with pytest.raises(ValueError, match="same tokens"):
        expert_transitions(FIRST, make_routing(3, 2, [(0, 0, 1.0)]))


def test_expert_transitions_against_loop_reference():
    g = torch.Generator().manual_seed(1)
    a, b = random_routing(g, 20, 4, 0.5), random_routing(g, 20, 3, 0.5)

    def top(r):  # slow: per token, the highest weight, lowest expert on a tie
        best = {}
        for t, x, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()):
            if t not in best or w > best[t][1] or (w == best[t][1] and x < best[t][0]):
                best[t] = (x, w)
        return {t: x for t, (x, _) in best.items()}

    ta, tb = top(a), top(b)
    ref = np.zeros((4, 3))
    for t in range(20):
        if t in ta and t in tb:
            ref[ta[t], tb[t]] += 1
    np.testing.assert_allclose(expert_transitions(a, b), ref)


def test_transition_predictability_hand_values():
    # a permutation: the next expert is determined
    p = transition_predictability([[2, 0], [0, 2]])
    assert p["tokens"] == 4 and p["top1_accuracy"] == 1.0 and p["baseline_accuracy"] == 0.5
    assert p["mutual_information"] == pytest.approx(math.log(2)) and p["normalized_mi"] == pytest.approx(1.0)
    assert p["conditional_entropy"] == pytest.approx(0.0, abs=1e-12)
    # independent layers: nothing learned from this layer's expert
    q = transition_predictability([[1, 1], [1, 1]])
    assert q["mutual_information"] == pytest.approx(0.0, abs=1e-12) and q["normalized_mi"] == pytest.approx(0.0)
    assert q["conditional_entropy"] == pytest.approx(math.log(2)) and q["top1_accuracy"] == 0.5
    # the hand routings: every A predicts its B exactly; B is 0 for 2 of 3 tokens
    r = transition_predictability(expert_transitions(FIRST, SECOND))
    assert r["top1_accuracy"] == 1.0 and r["baseline_accuracy"] == pytest.approx(2 / 3)
    assert r["normalized_mi"] == pytest.approx(1.0)
    # a single next expert: nothing to predict; no token: nan
    assert transition_predictability([[3], [1]])["normalized_mi"] == 1.0
    assert math.isnan(transition_predictability([[0, 0]])["top1_accuracy"])
    with pytest.raises(ValueError, match="non-negative"):
        transition_predictability([[1, -1]])


def test_transition_predictability_against_loop_reference():
    g = torch.Generator().manual_seed(2)
    counts = torch.randint(0, 6, (4, 3), generator=g).float()
    c = counts.tolist()
    total = sum(map(sum, c))
    pb = [sum(row[j] for row in c) / total for j in range(3)]
    h_b = -sum(p * math.log(p) for p in pb if p > 0)
    # H(B | A) = sum_a p(a) H(B | A = a)
    h_ba = 0.0
    for row in c:
        ra = sum(row)
        if ra:
            h_ba += ra / total * -sum(v / ra * math.log(v / ra) for v in row if v)
    p = transition_predictability(counts)
    assert p["conditional_entropy"] == pytest.approx(h_ba)
    assert p["mutual_information"] == pytest.approx(h_b - h_ba)
    assert p["normalized_mi"] == pytest.approx((h_b - h_ba) / h_b)
    assert p["top1_accuracy"] == pytest.approx(sum(max(row) for row in c) / total)
    assert p["baseline_accuracy"] == pytest.approx(max(pb))


# ---- expert load over training ----------------------------------------------------------------
RECORDS = [
    {"step": 5, "load_cv": 0.1, "l0/expert_load": [0.5, 0.5], "l1/expert_load": [1.0, 0.0, 0.0]},
    {"step": 10, "load_cv": 0.2},  # an older record without loads: skipped
    {"step": 15, "l0/expert_load": [0.9, 0.1], "l1/expert_load": [0.4, 0.3, 0.3]},
]


def test_load_over_training_hand_values():
    series = load_over_training(RECORDS)
    assert list(series) == ["l0", "l1"]
    xs, load = series["l0"]
    assert xs == [5.0, 15.0]
    np.testing.assert_allclose(load, [[0.5, 0.5], [0.9, 0.1]])
    assert series["l1"][1].shape == (2, 3)
    assert list(load_over_training(RECORDS, layer="l1")) == ["l1"]
    with pytest.raises(ValueError, match="logged layers"):
        load_over_training(RECORDS, layer="nope")
    with pytest.raises(ValueError, match="experts"):
        load_over_training([{"step": 1, "a/expert_load": [1.0]}, {"step": 2, "a/expert_load": [0.5, 0.5]}])


def test_step_stats_records_expert_load_of_the_training_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoE(8, 16, 4, TopK(2)))
    model(torch.randn(2, 5, 8))
    tracker = StepStats(every=1)
    tracker("step", {"step": 3, "model": model, "history": History()})
    record = tracker.records[0]
    load = record["0/expert_load"]
    assert load == pytest.approx(expert_load(model[0].routing).tolist())
    assert sum(load) == pytest.approx(1.0) and len(load) == 4
    assert "0/router_entropy_norm" in record and "router_entropy_norm" in record
    off = StepStats(every=1, expert_load=False)
    off("step", {"step": 3, "model": model, "history": History()})
    assert "0/expert_load" not in off.records[0]
    # the flag travels with the state (checkpoints)
    again = StepStats(every=7)
    again.load_state_dict(off.state_dict())
    assert again.expert_load is False and again.every == 1


# ---- builders -----------------------------------------------------------------------------------
def test_coactivation_heatmap_shape_and_values():
    fig = viz.coactivation_heatmap(FIRST)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    np.testing.assert_allclose(np.asarray(fig.data[0].z), coactivation(FIRST))
    assert fig.layout.xaxis.title.text == "expert" and fig.layout.yaxis.title.text == "expert"
    assert "50.0% of tokens" in fig.layout.title.text  # busiest pair (0, 1): 2 of 4 tokens
    np.testing.assert_allclose(np.asarray(viz.coactivation_heatmap(np.eye(2)).data[0].z), np.eye(2))
    with pytest.raises(ValueError, match="square"):
        viz.coactivation_heatmap(np.zeros((2, 3)))


def test_expert_load_heatmap_one_panel_per_layer():
    fig = viz.expert_load_heatmap(RECORDS)
    assert len(fig.data) == 2 and all(isinstance(t, go.Heatmap) for t in fig.data)
    z0 = np.asarray(fig.data[0].z)
    assert z0.shape == (2, 2)  # [E, T]
    np.testing.assert_allclose(z0, [[0.5, 0.9], [0.5, 0.1]])
    assert np.asarray(fig.data[1].z).shape == (3, 2)
    assert list(fig.data[0].x) == [5.0, 15.0] and fig.data[0].zmid == 0.5 and fig.data[1].zmid == pytest.approx(1 / 3)
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "expert"
    assert len(viz.expert_load_heatmap(RECORDS, layers=["l1"]).data) == 1
    empty = viz.expert_load_heatmap([{"step": 1, "load_cv": 0.0}])
    assert len(empty.data) == 0 and "no expert load" in empty.layout.title.text


def test_expert_sankey_nodes_links_and_predictability():
    pairs = layer_transitions({"a": FIRST, "b": SECOND})
    fig = viz.expert_sankey(pairs)
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Sankey)
    sankey = fig.data[0]
    assert len(sankey.node.label) == 3 + 2
    links = sorted(zip(sankey.link.source, sankey.link.target, sankey.link.value))
    assert links == [(0, 3, 1.0), (1, 3, 1.0), (2, 4, 1.0)]  # a e0 -> b e0, a e1 -> b e0, a e2 -> b e1
    assert "top-1 100% (vs 67%)" in fig.layout.title.text
    # a chain of three layers shares the middle nodes
    chain = viz.expert_sankey(layer_transitions({"a": FIRST, "b": SECOND, "c": SECOND}))
    assert len(chain.data[0].node.label) == 3 + 2 + 2 and len(chain.data[0].link.value) == 3 + 2
    # a bare matrix
    assert len(viz.expert_sankey(np.array([[1, 0], [2, 3]])).data[0].link.value) == 3
    with pytest.raises(ValueError, match="experts in one pair"):
        viz.expert_sankey({("a", "b"): np.ones((2, 2)), ("b", "c"): np.ones((3, 2))})
