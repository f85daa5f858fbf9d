"""Figure builders in moe_lite.viz: trace counts and shapes on tiny hand-made inputs, and clear errors."""
from types import SimpleNamespace

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from moe_lite import inspect, viz
from moe_lite.page import figures_to_html
from moe_lite.routing import Routing, by_label


@pytest.fixture
def routing():
    """B=2, L=3, E=3. Token 0 -> experts 0 (0.6) and 1 (0.4); tokens 1..4 one expert each; token 5 dropped.

    tokens_per_expert = [3, 2, 1]; experts_per_token = [2, 1, 1, 1, 1, 0].
    """
    return Routing(
        logits=torch.zeros(2, 3, 3),
        token=torch.tensor([0, 0, 1, 2, 3, 4]),
        expert=torch.tensor([0, 1, 1, 2, 0, 0]),
        weight=torch.tensor([0.6, 0.4, 1.0, 1.0, 0.5, 0.7]),
        num_experts=3,
    )


# ---- routing figures ----------------------------------------------------------------------------
def test_assignment_heatmap_one_sample(routing):
    fig = viz.assignment_heatmap(routing, sample=0)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    z = np.asarray(fig.data[0].z)
    np.testing.assert_allclose(z, [[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert "expert" in fig.data[0].hovertemplate and "combine weight" in fig.data[0].hovertemplate
    assert fig.layout.xaxis.title.text == "expert"
    assert "1.33 experts/token" in fig.layout.title.text


def test_assignment_heatmap_marks_unassigned_and_flat_batch(routing):
    fig = viz.assignment_heatmap(routing, sample=1)
    custom = np.asarray(fig.data[0].customdata)
    assert custom[2, 0, 2] == "not assigned" and custom[1, 0, 2] == "assigned"
    assert "33% tokens with no expert" in fig.layout.title.text
    flat = viz.assignment_heatmap(routing, sample=None)
    assert np.asarray(flat.data[0].z).shape == (6, 3)
    assert np.asarray(viz.assignment_heatmap(routing, sample=None, max_tokens=4).data[0].z).shape == (4, 3)


def test_assignment_heatmap_errors(routing):
    with pytest.raises(ValueError, match="sample"):
        viz.assignment_heatmap(routing, sample=2)
    with pytest.raises(ValueError, match="max_tokens"):
        viz.assignment_heatmap(routing, max_tokens=0)
    with pytest.raises(TypeError, match="Routing"):
        viz.assignment_heatmap(torch.zeros(2, 3, 3))


def test_tokens_per_expert_bar(routing):
    fig = viz.tokens_per_expert_bar(routing)
    assert len(fig.data) == 2
    assert list(fig.data[0].y) == [3, 2, 1]
    assert list(fig.data[1].y) == [2, 2]  # the mean line
    assert "MaxVio 0.50" in fig.layout.title.text and "dropped 16.7%" in fig.layout.title.text
    from_counts = viz.tokens_per_expert_bar(torch.tensor([4, 0]))
    assert list(from_counts.data[0].y) == [4, 0] and "dropped" not in from_counts.layout.title.text
    with pytest.raises(ValueError, match="1-D"):
        viz.tokens_per_expert_bar(torch.ones(2, 2))


def test_experts_per_token_hist(routing):
    fig = viz.experts_per_token_hist(routing)
    assert len(fig.data) == 1
    np.testing.assert_allclose(fig.data[0].y, np.array([1, 4, 1, 0]) / 6)
    assert list(fig.data[0].customdata) == [1, 4, 1, 0]
    assert "16.7% of tokens with none" in fig.layout.title.text
    np.testing.assert_allclose(viz.experts_per_token_hist([1, 1, 2]).data[0].y, [0, 2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="non-negative integers"):
        viz.experts_per_token_hist([1.5, -1])


def test_label_expert_heatmap(routing):
    result = by_label(routing, torch.tensor([0, 1]))
    fig = viz.label_expert_heatmap(result, label_names=["shirt", "boot"], label_title="class")
    assert len(fig.data) == 1
    z = np.asarray(fig.data[0].z)
    np.testing.assert_allclose(z, [[1 / 3, 2 / 3, 1 / 3], [2 / 3, 0, 0]], atol=1e-6)
    assert list(fig.data[0].y) == ["shirt", "boot"]
    assert list(np.asarray(fig.data[0].customdata)[:, 0]) == [3, 3]
    counts = viz.label_expert_heatmap(result, value="counts")
    np.testing.assert_allclose(np.asarray(counts.data[0].z), [[1, 2, 1], [2, 0, 0]])
    assert np.asarray(viz.label_expert_heatmap(torch.rand(4, 3)).data[0].z).shape == (4, 3)


def test_label_expert_heatmap_errors(routing):
    result = by_label(routing, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label_names"):
        viz.label_expert_heatmap(result, label_names=["only one"])
    with pytest.raises(ValueError, match="2-D"):
        viz.label_expert_heatmap(torch.rand(3))
    with pytest.raises(ValueError, match="no 'share'"):
        viz.label_expert_heatmap(result, value="share")


def test_primary_expert_is_the_inspect_one(routing):
    # a routing computation: it lives in moe_lite.inspect; viz keeps the name for notebook 02
    assert not hasattr(viz, "primary_expert")  # a routing computation: it lives in moe_lite.inspect only
    assert inspect.primary_expert(routing).tolist() == [[0, 1, 2], [0, 0, -1]]
    assert "primary_expert" not in viz.__all__ and "figures_to_html" not in viz.__all__


# ---- images -------------------------------------------------------------------------------------
def test_patch_expert_overlay():
    images = torch.rand(3, 1, 4, 4)
    experts = torch.tensor([[0, 1, 2, -1], [1, 1, 1, 1], [-1, -1, 0, 0]])
    fig = viz.patch_expert_overlay(images, experts, patch_size=2, num_experts=3, ncols=2, labels=[0, 1, 2],
                                   label_names=["a", "b", "c"])
    assert len(fig.data) == 6  # image + tint per image
    tint = np.asarray(fig.data[1].z, dtype=float)
    assert tint.shape == (2, 2) and np.isnan(tint[1, 1]) and tint[0, 1] == 1
    assert fig.data[1].dx == 2 and fig.data[1].coloraxis == "coloraxis"
    assert list(fig.layout.coloraxis.colorbar.ticktext) == ["expert 0", "expert 1", "expert 2"]
    assert [a.text for a in fig.layout.annotations] == ["a", "b", "c"]
    assert fig.layout.yaxis3.scaleanchor == "x3"
    # [B, H, W] works too
    assert len(viz.patch_expert_overlay(images[:, 0], experts, 2, 3).data) == 6


def test_patch_expert_overlay_errors():
    images = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        viz.patch_expert_overlay(images, torch.zeros(2, 3, dtype=torch.long), 2, 3)
    with pytest.raises(ValueError, match="patch_size"):
        viz.patch_expert_overlay(images, torch.zeros(2, 4, dtype=torch.long), 3, 3)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        viz.patch_expert_overlay(images, torch.full((2, 4), 3), 2, 3)
    with pytest.raises(ValueError, match="images"):
        viz.patch_expert_overlay(torch.rand(2, 3, 4, 4), torch.zeros(2, 4, dtype=torch.long), 2, 3)


def test_image_grid():
    fig = viz.image_grid(torch.rand(5, 1, 4, 4), labels=torch.tensor([0, 1, 2, 0, 1]),
                         label_names=["x", "y", "z"], ncols=2)
    assert len(fig.data) == 5 and np.asarray(fig.data[0].z).shape == (4, 4)
    assert [a.text for a in fig.layout.annotations] == ["x", "y", "z", "x", "y"]
    assert fig.data[4].xaxis == "x5"
    with pytest.raises(ValueError, match="images"):
        viz.image_grid(torch.rand(5, 2, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        viz.image_grid(torch.rand(2, 4, 4), labels=[1])
    with pytest.raises(ValueError, match="ncols"):
        viz.image_grid(torch.rand(2, 4, 4), ncols=0)


# ---- runs ---------------------------------------------------------------------------------------
def test_training_curves_from_history_object():
    steps = [{"step": 0, "loss": 2.0, "aux/load_balance": 1.1, "lr": 0.1},
             {"step": 10, "loss": 1.0},  # aux missing here
             {"step": 20, "loss": float("nan"), "aux/load_balance": 1.0}]
    evals = [{"step": 10, "accuracy": 0.5, "loss": 1.2}, {"step": 20, "accuracy": 0.7}]
    fig = viz.training_curves(SimpleNamespace(steps=steps, evals=evals))
    names = [t.name for t in fig.data]
    assert names == ["loss", "eval loss", "aux/load_balance", "eval accuracy"]
    assert list(fig.data[0].x) == [0, 10] and list(fig.data[2].x) == [0, 20]  # nan and missing skipped
    assert fig.data[3].yaxis == "y2"
    same = viz.training_curves({"steps": steps, "evals": evals})
    assert len(same.data) == 4


def test_training_curves_robust_and_errors():
    fig = viz.training_curves([{"epoch": 1, "loss": 1.0}, {"loss": 0.5}], x="epoch")
    assert len(fig.data) == 1 and list(fig.data[0].x) == [1, 1]  # missing x -> the record's index
    empty = viz.training_curves([])
    assert len(empty.data) == 0 and "no data" in empty.layout.title.text
    chosen = viz.training_curves([{"step": 0, "lr": 0.1, "acc": 0.3}], loss_keys=["lr"], metric_keys=["acc"])
    assert [t.name for t in chosen.data] == ["lr", "acc"]
    with pytest.raises(ValueError, match="dict"):
        viz.training_curves([1, 2])


def test_stat_curves():
    run_a = [{"step": s, "load_cv": 0.5 / (s + 1), "max_vio": 1.0, "combination_usage": 40.0} for s in range(3)]
    run_b = [{"step": 0, "load_cv": 0.2}]
    fig = viz.stat_curves({"a": run_a, "b": run_b})
    assert len(fig.data) == 4  # a: 3 keys, b: 1 key
    assert [t.legendgroup for t in fig.data] == ["a", "a", "a", "b"]
    assert [t.showlegend for t in fig.data] == [True, False, False, True]
    single = viz.stat_curves(run_a, keys=["load_cv"])
    assert len(single.data) == 1 and single.data[0].name == "run"


def test_stat_curves_per_layer_keys_and_errors():
    recs = [{"step": 0, "l0/max_vio": 0.5, "l1/max_vio": 0.2}]
    fig = viz.stat_curves(recs, keys=["max_vio"])
    assert [t.name for t in fig.data] == ["run l0", "run l1"]
    evals = [{"step": 5, "accuracy": 0.5, "routing": {"blocks.0": {"load_cv": 0.3}, "blocks.1": {"load_cv": 0.1}}}]
    nested = viz.stat_curves({"vit": evals}, keys=["load_cv"])
    assert [t.name for t in nested.data] == ["vit blocks.0", "vit blocks.1"] and list(nested.data[1].y) == [0.1]
    with pytest.raises(ValueError, match="at least one"):
        viz.stat_curves(recs, keys=[])
    with pytest.raises(ValueError, match="dict"):
        viz.stat_curves({"a": [3]})


def test_layer_stat_bars():
    stats = {"block0": {"experts_per_token": 1.5, "load_cv": 0.1}, "block1": {"experts_per_token": 2.0}}
    fig = viz.layer_stat_bars(stats, keys=["experts_per_token", "load_cv"])
    assert len(fig.data) == 2 and list(fig.data[0].x) == ["block0", "block1"]
    assert list(fig.data[1].y) == [0.1, None]
    assert len(viz.layer_stat_bars(stats).data) == 1
    with pytest.raises(ValueError, match="non-empty"):
        viz.layer_stat_bars({})
    with pytest.raises(ValueError, match="dict"):
        viz.layer_stat_bars({"block0": 1.0})


def test_tradeoff_curve():
    fig = viz.tradeoff_curve([1.0, 1.5, 2.0], torch.tensor([0.6, 0.7, 0.72]), ["p=0.3", "p=0.5", "p=0.7"],
                             "experts per token", "accuracy", highlight=1)
    assert len(fig.data) == 2
    assert list(fig.data[1].x) == [1.5] and list(fig.data[1].text) == ["p=0.5"]
    assert fig.layout.xaxis.title.text == "experts per token"
    assert len(viz.tradeoff_curve([1], [2]).data[1].x) == 0
    with pytest.raises(ValueError, match="3 points"):
        viz.tradeoff_curve([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="highlight"):
        viz.tradeoff_curve([1, 2], [1, 2], highlight=2)
    with pytest.raises(ValueError, match="1-D"):
        viz.tradeoff_curve(np.zeros((2, 2)), np.zeros((2, 2)))


def test_speed_bars_bench_rows():
    rows = [{"config": "E16", "router": "topk", "backend": "loop", "ratio": 2.4, "target": 1.3},
            {"config": "E16", "router": "topk", "backend": "sorted", "ratio": 1.1, "target": 1.3},
            {"config": "E64", "router": "topk", "backend": "sorted", "ratio": 1.8, "target": None}]
    fig = viz.speed_bars(rows)
    assert [t.name for t in fig.data] == ["loop", "sorted", "target"]
    assert list(fig.data[1].x) == ["E16 | topk | sorted", "E64 | topk | sorted"]
    assert list(fig.data[1].y) == [1.1, 1.8]
    assert list(fig.data[2].y) == [1.3, 1.3] and len(fig.data[2].x) == 2  # no tick where target is None
    assert fig.layout.barmode == "overlay" and "ratio: 2.4" in fig.data[0].customdata[0]


def test_speed_bars_fixed_target_and_errors():
    rows = [{"name": "a", "speedup": 0.5}, {"name": "b", "speedup": 1.5}]
    fig = viz.speed_bars(rows, label_key="name", value_key="speedup", group_key=None, target=1.0)
    assert len(fig.data) == 1 and list(fig.data[0].x) == ["a", "b"]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == 1.0
    assert len(viz.speed_bars(rows, value_key="speedup", target=None).layout.shapes) == 0
    assert list(viz.speed_bars(rows, label_key="missing", value_key="speedup").data[0].x) == ["row 0", "row 1"]
    with pytest.raises(ValueError, match="rows\\[1\\]"):
        viz.speed_bars([{"name": "a", "ratio": 1.0}, {"name": "b"}])
    with pytest.raises(ValueError, match="empty"):
        viz.speed_bars([])


# ---- report -------------------------------------------------------------------------------------
def test_figures_to_html_writes_one_self_contained_page(tmp_path, routing):
    from plotly.offline import get_plotlyjs

    figs = {"Tokens per expert": viz.tokens_per_expert_bar(routing),
            "Assignments": go.FigureWidget(viz.assignment_heatmap(routing))}
    tables = {"summary": routing.summary(), "layers": {"block0": {"load_cv": 0.123456}},
              "runs <b>": [{"run": "a<script>", "acc": 0.5}]}
    path = tmp_path / "sub" / "report.html"
    page = figures_to_html(figs, "Report & co", tables=tables, path=path)
    assert path.read_text(encoding="utf-8") == page
    assert page.count(get_plotlyjs()[:500]) == 1  # plotly.js inlined exactly once
    assert "<script src=" not in page  # no CDN, nothing fetched
    assert 'id="fig-tokens-per-expert"' in page and 'id="fig-assignments"' in page
    assert "<title>Report &amp; co</title>" in page
    assert "0.1235" in page and "a&lt;script&gt;" in page and "runs &lt;b&gt;" in page
    from_list = figures_to_html([viz.tokens_per_expert_bar(routing)] * 2)
    assert from_list.count("<section>") == 2 and 'id="fig-tokens-per-expert-maxvio' in from_list
    with pytest.raises(TypeError, match="not a plotly figure"):
        figures_to_html({"x": 3})


# ---- what a learner sees: colour scales anchored, labels inside, titles clear of images ------------
def _zero_routing(b=1, l=3, e=3):
    """No token assigned to any expert (Race in eval above every score): all combine weights are 0."""
    empty = torch.zeros(0, dtype=torch.long)
    return Routing(torch.zeros(b, l, e), empty, empty, torch.zeros(0), e)


def test_all_zero_heatmaps_are_drawn_as_zero():
    # plotly ignores a lone zmin (zauto stays on): an all-zero z then spans [-0.5, 0.5] and 0 is mid-blue
    for trace in (viz.assignment_heatmap(_zero_routing()).data[0],
                  viz.label_expert_heatmap(np.zeros((2, 3))).data[0]):
        assert trace.zmin == 0 and trace.zmax > 0 and trace.zmid is None
        assert trace.zauto is not True


def test_signed_heatmap_is_symmetric_about_zero():
    logits = torch.zeros(1, 2, 2)
    routing = Routing(logits, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([-0.5, 0.25]), 2)
    heat = viz.assignment_heatmap(routing).data[0]
    assert (heat.zmin, heat.zmax) == (-0.5, 0.5) and heat.colorscale is not None
    positive = viz.assignment_heatmap(
        Routing(logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.8]), 2)).data[0]
    assert (positive.zmin, positive.zmax) == (0.0, pytest.approx(0.8))


def _row_gaps_px(fig, rows):
    """Pixels between the bottom of each subplot row and the top of the next one."""
    plot_h = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    tops = sorted({round(fig.layout[f"yaxis{'' if i == 1 else i}"].domain[1], 6)
                   for i in range(1, len(fig.data) + 1)}, reverse=True)
    bottoms = sorted({round(fig.layout[f"yaxis{'' if i == 1 else i}"].domain[0], 6)
                      for i in range(1, len(fig.data) + 1)}, reverse=True)
    assert len(tops) == rows
    return [(bottoms[r] - tops[r + 1]) * plot_h for r in range(rows - 1)]


def test_image_grid_titles_clear_the_row_above():
    fig = viz.image_grid(torch.rand(10, 1, 4, 4), labels=torch.arange(10) % 3, label_names=["a", "b", "c"],
                         ncols=5)
    font = fig.layout.annotations[0].font.size or 16  # plotly's subplot-title default
    assert all(gap >= 1.5 * font for gap in _row_gaps_px(fig, rows=2))
    assert fig.layout.margin.t >= 40  # the first row's titles sit below the figure title


def test_tradeoff_curve_labels_are_not_clipped():
    ys = [0.6, 0.7, 0.9]
    fig = viz.tradeoff_curve([1.0, 1.5, 2.0], ys, ["p=0.1", "p=0.5", "p=0.9"], highlight=2)
    assert fig.data[0].cliponaxis is False  # text may leave the axes instead of being cut off
    lo, hi = fig.layout.yaxis.range
    span = max(ys) - min(ys)
    assert hi >= max(ys) + 0.1 * span and lo <= min(ys) - 0.05 * span  # room for the top label
    flat = viz.tradeoff_curve([1.0, 2.0], [0.5, 0.5], ["a", "b"])
    lo, hi = flat.layout.yaxis.range
    assert lo < 0.5 < hi


# ---- figure fixes: axis titles say what the axis is --------------------------------------------------
def test_layer_stat_bars_names_its_categories():
    fig = viz.layer_stat_bars({"0.0-0.1": {"experts_per_token": 1.5}, "0.1-0.2": {"experts_per_token": 2.0}},
                              keys="experts_per_token", x_title="noise level t")
    assert fig.layout.xaxis.title.text == "noise level t" and fig.layout.xaxis.type == "category"
    assert "noise level t %{x}" in fig.data[0].hovertemplate
    assert viz.layer_stat_bars({"blocks.1.mlp": {"experts_per_token": 1.0}}).layout.xaxis.title.text == "layer"


def test_stat_curves_titles_every_axis():
    recs = [{"step": 0, "load_cv": 0.5, "max_vio": 1.0}, {"step": 10, "load_cv": 0.3, "max_vio": 0.8}]
    fig = viz.stat_curves(recs, keys=["load_cv", "max_vio"])
    assert fig.layout.yaxis.title.text == "load cv" and fig.layout.yaxis2.title.text == "max vio"
    assert fig.layout.xaxis2.title.text == "step"


def test_record_figures_title_axes_and_keep_zero_cost_off_log_axes():
    from moe_lite.experiments.figures import adapt_figures, compare_figures

    acc = {"mean": 0.8, "std": 0.01}
    record = {"name": "adapt", "config": {"methods": {"linear probe": {}, "LoRA": {}}},
              "metrics": {"linear probe": {"accuracy": acc, "trainable_params": 325, "adapter_flops_per_token": 0},
                          "LoRA": {"accuracy": acc, "trainable_params": 900, "adapter_flops_per_token": 512.0}}}
    fig = adapt_figures(record)["accuracy-vs-cost"]
    flops = fig.data[1]
    assert list(flops.x) == [512.0] and list(flops.text) == ["LoRA"]  # never placed at 1
    assert "not drawn" in fig.layout.annotations[1].text and "linear probe" in fig.layout.annotations[1].text
    assert list(fig.data[0].x) == [325, 900]
    assert fig.layout.xaxis.title.text and fig.layout.xaxis2.title.text and fig.layout.yaxis.title.text
    balance = {"name": "balance", "config": {"entries": ["a"]},
               "metrics": {"a": {"accuracy": acc, "routing_seeds": {"load_cv": acc, "max_vio": acc,
                                                                    "combination_usage": acc}}}}
    fig = compare_figures(balance)["balance"]
    assert fig.layout.xaxis.title.text == "method" and fig.layout.yaxis.title.text == "load CV"
