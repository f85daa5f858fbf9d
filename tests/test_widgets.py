"""moe_lite.widgets: both display modes, callbacks driven from code, in-place updates and the static fallback."""
import json
import math
import sys
import types

import plotly.graph_objects as go
import pytest
import torch
from torch import nn

from moe_lite import widgets as W
from moe_lite.routing import Routing

pytest.importorskip("ipywidgets")
HAS_FIGUREWIDGET = W._figurewidget_works()
needs_figurewidget = pytest.mark.skipif(not HAS_FIGUREWIDGET, reason="go.FigureWidget needs anywidget")
MODES = [pytest.param("widget", marks=needs_figurewidget), "static"]


class TinyTopK(nn.Module):
    """A hand-written top-k router, so the explorer's mechanics are tested apart from routers.py."""

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.k = k

    def forward(self, logits, x=None):
        b, l, e = logits.shape
        w, idx = logits.softmax(-1).reshape(-1, e).topk(self.k, -1)
        return Routing(logits, torch.arange(b * l).repeat_interleave(self.k), idx.reshape(-1), w.reshape(-1), e)


def tiny_factory(name, **kw):
    if name == "broken":
        raise RuntimeError("this router is broken")
    return TinyTopK(kw.get("k", 1))


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(2, 6, 4)


@pytest.fixture
def no_anywidget(monkeypatch):
    """Make ``import anywidget`` fail, as where the FigureWidget cannot be created."""
    monkeypatch.setitem(sys.modules, "anywidget", None)


# ---- mode selection -----------------------------------------------------------------------------
def test_settings_force_static(monkeypatch):
    """``static`` is ``Settings.static_figures``; the environment is not read here."""
    assert not W.can_use_figurewidget(static=True)
    assert W.resolve_mode(static=True) == "static"
    assert W.resolve_mode("widget", static=True) == "widget"  # an explicit argument wins
    assert W.can_use_figurewidget(static=False) == HAS_FIGUREWIDGET
    monkeypatch.setenv(W.STATIC_ENV, "1")
    assert W.can_use_figurewidget() == HAS_FIGUREWIDGET


def test_fallback_without_anywidget(no_anywidget):
    assert not W.can_use_figurewidget()
    assert W.resolve_mode() == "static"
    assert W.LiveFigure(go.Figure(go.Bar(y=[1]))).mode == "static"
    ex = W.ThresholdExplorer(lambda v: {"experts_per_token": v, "accuracy": v}, [1.0, 2.0])
    assert ex.mode == "static" and ex.set(threshold=1.0)["accuracy"] == 1.0
    assert isinstance(ex.figure, go.Figure) and len(ex.figures["tradeoff"].output.outputs) == 1
    with pytest.raises(RuntimeError, match="FigureWidget"):
        W.resolve_mode("widget")


def test_colab_defaults_to_static(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert not W.can_use_figurewidget()
    # custom widget manager enabled by the user: MOE_LITE_STATIC_FIGURES=0, i.e. static_figures=False
    assert W.can_use_figurewidget(static=False) == HAS_FIGUREWIDGET


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        W.resolve_mode("svg")


# ---- LiveFigure ---------------------------------------------------------------------------------
@needs_figurewidget
def test_live_figure_widget_updates_in_place():
    live = W.LiveFigure(go.Figure([go.Bar(y=[1, 2], name="a"), go.Scatter(y=[1, 1], text=["x", "y"])]),
                        mode="widget")
    fw = live.figure
    assert isinstance(fw, go.FigureWidget) and live.view is fw and live.output is None
    live.update(go.Figure([go.Bar(y=[5, 6], name="b"), go.Scatter(y=[2, 2])], layout=dict(title="new")))
    assert live.figure is fw and live.updates == 1
    assert list(fw.data[0].y) == [5, 6] and fw.data[0].name == "b"
    assert fw.data[1].text is None  # a property the new figure lacks is cleared, not kept stale
    assert fw.layout.title.text == "new"
    live.update({"data": [{"type": "heatmap", "z": [[1, 2]]}], "layout": {}})  # structural change
    assert live.figure is fw and [t.type for t in fw.data] == ["heatmap"] and fw.layout.title.text is None


def test_live_figure_static_redraws():
    first = go.Figure(go.Bar(y=[1, 2]), layout=dict(title="one"))
    live = W.LiveFigure(first, mode="static")
    assert live.view is live.output and len(live.output.outputs) == 1
    live.update(go.Figure(go.Bar(y=[3, 4]), layout=dict(title="two")))
    assert live.figure is not first and list(live.figure.data[0].y) == [3, 4]
    outputs = live.output.outputs
    assert len(outputs) == 1  # replaced, not appended
    plotted = outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert plotted["data"][0]["y"] == [3, 4] and plotted["layout"]["title"]["text"] == "two"
    with pytest.raises(TypeError, match="plotly figure"):
        live.update([1, 2])


# ---- generic Explorer ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_explorer_pattern(mode):
    import ipywidgets as widgets

    grad_seen = []

    def compute(a, b):
        grad_seen.append(torch.is_grad_enabled())
        return {"total": a + b}

    ex = W.Explorer({"a": widgets.IntSlider(value=1, min=0, max=5), "b": widgets.IntSlider(value=1, min=0, max=5)},
                    compute, figures={"bar": lambda r: go.Figure(go.Bar(y=[r["total"]]))}, mode=mode, title="t")
    assert ex.last_result == {"total": 2} and ex.calls == 1
    fig0 = ex.figure
    assert ex.set(a=3, b=4) == {"total": 7}
    assert ex.calls == 2  # several controls, one recompute
    assert list(ex.figure.data[0].y) == [7] and (ex.figure is fig0) == (mode == "widget")
    ex.controls["a"].value = 0  # what a user's drag does
    assert ex.last_result == {"total": 4} and "total" in ex.status.value
    assert grad_seen == [False, False, False]  # callbacks cannot train
    box = ex.display()
    assert isinstance(box, widgets.VBox) and box.children[-1] is ex.figures["bar"].view
    with pytest.raises(ValueError, match="unknown control"):
        ex.set(c=1)
    with pytest.raises(ValueError, match="outside the slider range"):
        ex.set(a=9)


def test_explorer_callback_error_keeps_figures():
    import ipywidgets as widgets

    ex = W.Explorer({"a": widgets.IntSlider(value=1, min=0, max=5)}, lambda a: {"inv": 1 / a},
                    figures={"f": lambda r: go.Figure(go.Bar(y=[r["inv"]]))}, mode="static")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        ex.set(a=0)
    assert "error" in ex.last_result and "ZeroDivisionError" in ex.status.value
    assert list(ex.figure.data[0].y) == [1.0]
    assert ex.set(a=2) == {"inv": 0.5}


# ---- RouterExplorer -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_router_explorer_mechanics(logits, mode):
    ex = W.RouterExplorer(logits, routers=("topk", "switch"), k=1, mode=mode, make_router=tiny_factory)
    assert ex.mode == mode and set(ex.controls) >= {"router", "k", "p", "capacity_factor", "threshold", "sample"}
    assert ex.last_result["experts_per_token"] == 1.0 and ex.last_result["router"] == "topk"
    heat0 = ex.figure
    z0 = [list(r) for r in heat0.data[0].z]
    result = ex.set(k=3)
    assert result["experts_per_token"] == 3.0 and result["params"] == {"k": 3}
    assert sum(result["tokens_per_expert"]) == 3 * 12 and result["num_assignments"] == 36
    load = ex.figures["load"].figure
    assert list(load.data[0].y) == result["tokens_per_expert"]
    assert [list(r) for r in ex.figure.data[0].z] != z0
    if mode == "widget":
        assert ex.figure is heat0  # the same FigureWidget, patched in place
    else:
        assert ex.figure is not heat0  # redrawn
        assert len(ex.figures["assignment"].output.outputs) == 1 and ex.figures["load"].updates == 1
    ex.set(sample=1)
    assert "sample 1" in ex.figure.layout.title.text
    ex.set(router="switch", capacity_factor=1.0)
    assert ex.controls["k"].disabled and not ex.controls["capacity_factor"].disabled
    assert ex.last_result["params"] == {"capacity_factor": 1.0}
    assert "switch" in ex.status.value


def test_router_explorer_errors(logits):
    with pytest.raises(ValueError, match=r"\[B, L, E\]"):
        W.RouterExplorer(logits[0], mode="static", make_router=tiny_factory)
    with pytest.raises(ValueError, match="unknown router"):
        W.RouterExplorer(logits, routers=("nope",), mode="static", make_router=tiny_factory)
    with pytest.raises(ValueError, match="x must be"):
        W.RouterExplorer(logits, x=torch.zeros(2, 5, 8), mode="static", make_router=tiny_factory)
    ex = W.RouterExplorer(logits, routers=("topk",), mode="static", make_router=tiny_factory)
    with pytest.raises(ValueError, match="options"):
        ex.set(router="race")
    with pytest.raises(ValueError, match="slider range"):
        ex.set(k=5)


@pytest.mark.parametrize("name", W.ROUTER_NAMES)
def test_router_explorer_every_router(logits, name):
    ex = W.RouterExplorer(logits, router=name, mode="static")
    summary = ex.last_result
    assert summary["router"] == name and "error" not in summary
    assert ex.routing.num_experts == 4
    assert summary["num_assignments"] == ex.routing.num_assignments
    ex.set(phase="eval")
    assert "error" not in ex.last_result


def test_router_explorer_real_routers(logits):
    ex = W.RouterExplorer(logits, router="topk")
    heat = ex.figure
    assert ex.set(k=3)["experts_per_token"] == 3.0
    assert (ex.figure is heat) == (ex.mode == "widget")  # auto mode: widget unless forced static
    ex.set(router="topp", p=0.05)
    assert ex.last_result["experts_per_token"] == 1.0  # the first expert always crosses p
    assert ex.controls["k"].disabled and not ex.controls["p"].disabled
    spent = [ex.set(p=p)["experts_per_token"] for p in (0.3, 0.6, 0.9)]
    assert 1.0 <= spent[0] <= spent[1] <= spent[2] <= 4.0 and spent[2] > 1.0  # more mass, more experts
    ex.set(router="switch", capacity_factor=0.25)
    assert ex.last_result["dropped_fraction"] > 0
    ex.set(router="race", phase="eval", threshold=ex.controls["threshold"].max, capacity_factor=0.0)
    few = ex.last_result["num_assignments"]
    ex.set(threshold=ex.controls["threshold"].min)
    assert ex.last_result["num_assignments"] == logits.numel() > few


def _kwargs_factory(built):
    """A factory that records the constructor kwargs and builds a TinyTopK."""
    def factory(name, **kw):
        built.append((name, kw))
        return TinyTopK(kw.get("k", 1))

    return factory


def test_router_explorer_group_knobs_offer_only_valid_pairs(logits):
    built = []
    ex = W.RouterExplorer(logits, routers=("topk", "topp"), k=2, mode="static", make_router=_kwargs_factory(built))
    assert W._option_values(ex.controls["groups"]) == [1, 2, 4]  # divisors of E=4 only
    assert built[-1] == ("topk", {"k": 2}) and ex.controls["top_groups"].disabled  # groups=1: no limit
    with pytest.raises(ValueError, match="options"):
        ex.set(groups=3)
    ex.set(groups=4, top_groups=2)  # one call: groups moves first, then top_groups is checked
    assert built[-1] == ("topk", {"k": 2, "groups": 4, "top_groups": 2})
    assert not ex.controls["top_groups"].disabled and ex.last_result["params"]["top_groups"] == 2
    assert "groups/token" in ex.status.value and 1 <= ex.last_result["groups_per_token"] <= 2
    # k=2 with one expert per group needs 2 kept groups: top_groups=1 cannot be picked
    assert ex.controls["top_groups"].min == 2
    with pytest.raises(ValueError, match="slider range"):
        ex.set(top_groups=1)
    ex.set(k=4)  # now all four groups are needed: top_groups follows
    assert ex.values["top_groups"] == 4 and built[-1][1]["top_groups"] == 4
    ex.set(k=1, groups=2)
    assert (ex.controls["top_groups"].min, ex.controls["top_groups"].max) == (1, 2)
    assert ex.values["top_groups"] == 2
    with pytest.raises(ValueError, match="slider range"):
        ex.set(top_groups=3)
    ex.set(router="topp")  # TopP takes no groups: disabled, and not passed
    assert ex.controls["groups"].disabled and ex.controls["top_groups"].disabled
    assert "groups" not in built[-1][1] and "groups_per_token" not in ex.last_result
    with pytest.raises(ValueError, match="top_groups"):
        W.RouterExplorer(logits, k=3, groups=4, top_groups=2, mode="static", make_router=tiny_factory)
    with pytest.raises(ValueError, match="divide"):
        W.RouterExplorer(logits, groups=3, top_groups=1, mode="static", make_router=tiny_factory)


def test_router_explorer_failed_set_puts_every_control_back(logits):
    ex = W.RouterExplorer(logits, routers=("topk",), mode="static", make_router=tiny_factory)
    start = ex.values
    with pytest.raises(ValueError, match="slider range"):
        ex.set(groups=2, top_groups=3)
    assert ex.values == start and ex.last_result["params"] == {"k": 2}


def test_router_explorer_group_limit_caps_cross_group_traffic():
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 8)
    ex = W.RouterExplorer(logits, router="topk", k=2, groups=4, top_groups=4, mode="static")
    free = ex.last_result
    load0 = list(ex.figures["load"].figure.data[0].y)
    limited = ex.set(top_groups=1)
    assert limited["groups_per_token"] == 1.0 < free["groups_per_token"]  # 2 experts, one group
    assert limited["experts_per_token"] == 2.0
    assert ex.routing.info["groups"] == 4 and ex.routing.info["top_groups"] == 1
    assert list(ex.figures["load"].figure.data[0].y) != load0  # the load figure follows
    pairs = ex.routing.expert.reshape(-1, 2) // 2
    assert (pairs[:, 0] == pairs[:, 1]).all()  # each token's two experts share a group
    bias = ex.set(router="bias_balanced")
    assert bias["groups_per_token"] == 1.0 and ex.routing.info["top_groups"] == 1


def _knobs(ex):
    """The explorer's knob values (what build_router takes besides the router and phase)."""
    return {k: v for k, v in ex.values.items() if k not in ("router", "phase", "sample")}


@pytest.mark.parametrize("name", [n for n in W.ROUTER_NAMES if n != "switch"])
def test_router_explorer_capacity_wraps_any_router(logits, name):
    from moe_lite.routers import Capacity

    ex = W.RouterExplorer(logits, router=name, mode="static")
    assert not ex.controls["capacity_factor"].disabled
    assert not isinstance(ex.build_router(name, "train", **{**_knobs(ex), "capacity_factor": 0.0}), Capacity)
    before = ex.last_result["num_assignments"]
    result = ex.set(capacity_factor=0.25)
    assert isinstance(ex.build_router(name, "train", **_knobs(ex)), Capacity)
    assert result["params"]["capacity_factor"] == 0.25
    info = ex.routing.info
    assert info["capacity"] == math.ceil(0.25 * before / 4)
    assert int(info["dropped"]) == before - result["num_assignments"]
    assert max(result["tokens_per_expert"]) <= info["capacity"]
    ex.set(phase="eval")
    assert "error" not in ex.last_result and ex.routing.info["capacity_factor"] == 0.25


def test_router_explorer_capacity_off_means_no_limit(logits):
    ex = W.RouterExplorer(logits, router="switch", mode="static")
    assert ex.last_result["dropped_fraction"] == 0.0 and "capacity_factor" not in ex.last_result["params"]
    assert ex.build_router("switch", "train", **_knobs(ex)).capacity_factor == 4.0  # E: nothing can drop
    load0 = list(ex.figures["load"].figure.data[0].y)
    ex.set(capacity_factor=0.25)
    assert ex.last_result["dropped_fraction"] > 0 and list(ex.figures["load"].figure.data[0].y) != load0
    ex.set(router="topk", capacity_factor=0.0)
    assert ex.last_result["dropped_fraction"] == 0.0 and ex.last_result["experts_per_token"] == 2.0


# ---- ThresholdExplorer --------------------------------------------------------------------------
def _evaluator(calls):
    def evaluate(p):
        calls.append(p)
        assert not torch.is_grad_enabled()
        return {"experts_per_token": 1 + 2 * p, "accuracy": torch.tensor(0.5 + p / 4)}

    return evaluate


@pytest.mark.parametrize("mode", MODES)
def test_threshold_explorer(mode):
    calls = []
    ex = W.ThresholdExplorer(_evaluator(calls), [0.9, 0.1, 0.5], name="p", mode=mode)
    assert ex.last_result["p"] == 0.5 and calls == [0.5] and ex.last_result["cached"] is False
    fig0 = ex.figure
    ex.set(p=0.9)
    assert ex.last_result["accuracy"] == pytest.approx(0.725) and ex.last_result["evaluated"] == 2
    assert list(ex.figure.data[0].x) == [2.0, 2.8] and list(ex.figure.data[1].x) == [2.8]
    assert (ex.figure is fig0) == (mode == "widget")
    ex.set(p=0.1 + 0.4)  # float rounding snaps to the 0.5 option; cached, no new evaluation
    assert ex.last_result["cached"] is True and calls == [0.5, 0.9]
    assert list(ex.figure.data[1].x) == [2.0]
    if mode == "static":
        assert len(ex.figures["tradeoff"].output.outputs) == 1
    with pytest.raises(ValueError, match="options"):
        ex.set(p=0.3)


def test_threshold_explorer_evaluate_all_and_errors():
    calls = []
    ex = W.ThresholdExplorer(_evaluator(calls), [0.1, 0.5, 0.9], name="p", evaluate_all=True, initial=0.1,
                             mode="static")
    assert sorted(calls) == [0.1, 0.5, 0.9] and len(ex.figure.data[0].x) == 3
    assert ex.last_result["cached"] is True
    bad = W.ThresholdExplorer(lambda v: {"accuracy": 1.0, "experts_per_token": 1.0} if v < 1 else {"accuracy": 1},
                              [0.5, 2.0], initial=0.5, mode="static")
    with pytest.raises(RuntimeError, match="experts_per_token"):
        bad.set(threshold=2.0)
    with pytest.raises(ValueError, match="non-empty"):
        W.ThresholdExplorer(_evaluator([]), [], mode="static")
    with pytest.raises(ValueError, match="options"):
        W.ThresholdExplorer(_evaluator([]), [0.1], initial=0.2, mode="static")


# ---- knobs that apply, and putting an explorer back -------------------------------------------------
class TinyThreshold(TinyTopK):
    """Top-k in training; in eval every (token, expert) whose logit is >= the threshold."""

    threshold = 0.0

    def set_inference_threshold(self, value):  # the interface the explorer moves Race's threshold with
        self.threshold = value

    def forward(self, logits, x=None):
        if self.training:
            return super().forward(logits, x)
        token, expert = (logits.reshape(-1, logits.shape[-1]) >= self.threshold).nonzero(as_tuple=True)
        return Routing(logits, token, expert, torch.ones(token.numel()), logits.shape[-1])


def threshold_factory(name, **kw):
    return TinyThreshold(kw.get("k", 1)) if name == "race" else TinyTopK(kw.get("k", 1))


def test_router_explorer_disables_knobs_the_router_and_phase_ignore(logits):
    ex = W.RouterExplorer(logits, routers=("topk", "race"), mode="static", make_router=threshold_factory)
    ex.set(router="race")
    assert not ex.controls["k"].disabled and ex.controls["threshold"].disabled  # train: batch top-K
    ex.set(phase="eval")  # eval: a fixed threshold, k is not read
    assert ex.controls["k"].disabled and not ex.controls["threshold"].disabled
    assert W.applicable_knobs("race", "eval") == ("threshold", "capacity_factor")
    assert W.applicable_knobs("race", "train") == ("k", "capacity_factor")
    assert W.applicable_knobs("topk", "eval") == ("k", "groups", "top_groups", "capacity_factor")
    with pytest.raises(ValueError, match="router"):
        W.applicable_knobs("nope", "train")


def test_router_explorer_readout_names_only_the_knobs_in_use(logits):
    ex = W.RouterExplorer(logits, routers=("race",), mode="static", make_router=threshold_factory)
    assert ex.last_result["params"] == {"k": 2}
    ex.set(phase="eval", threshold=float(logits.max()))
    assert ex.last_result["num_assignments"] == 1 and set(ex.last_result["params"]) == {"threshold"}
    assert "k=" not in ex.status.value
    heat = ex.figures["assignment"].figure.data[0]
    assert heat.zmin == 0 and heat.zmax > 0  # a sample with no expert assigned is drawn as zeros


@pytest.mark.parametrize("mode", MODES)
def test_explorer_reset_restores_what_the_learner_found(logits, mode):
    ex = W.RouterExplorer(logits, routers=("topk", "switch"), k=1, mode=mode, make_router=tiny_factory)
    start, first = ex.values, ex.last_result
    heat = ex.figure
    ex.set(router="switch", k=3, sample=1)
    assert ex.values != start and ex.controls["k"].disabled
    assert ex.reset() is None and ex.last_result == first and ex.values == start
    assert not ex.controls["k"].disabled  # the greying follows the restored router
    assert (ex.figure is heat) == (mode == "widget")
    calls = ex.calls
    ex.reset()  # already at the start: nothing recomputed
    assert ex.calls == calls


# ---- plotly renders offline ---------------------------------------------------------------------------
@pytest.fixture
def plotly_default():
    import plotly.io as pio

    before = pio.renderers.default
    yield pio
    pio.renderers.default = before


def _bundle(pio, fig):
    """What a notebook cell stores when it shows ``fig`` with the default renderer."""
    return pio.renderers._build_mime_bundle(fig.to_dict(), pio.renderers.default)


def test_figures_render_offline_and_store_no_plotly_js(plotly_default, monkeypatch):
    from moe_lite.notebook import INLINE_ENV, configure_plotly

    monkeypatch.setenv(INLINE_ENV, "1")  # read by Settings.resolve only: configure_plotly takes inline=
    pio, fig = plotly_default, go.Figure(go.Bar(y=[1, 2]))
    configure_plotly(colab=False)
    bundle = _bundle(pio, fig)
    assert set(bundle) == {"application/vnd.plotly.v1+json"}  # drawn by JupyterLab's own plotly.js
    assert "http" not in json.dumps(bundle) and len(json.dumps(bundle)) < 20_000
    # where a front end cannot draw the JSON: plotly.js inlined once per session, each figure small
    assert configure_plotly(colab=False, inline=True) == "plotly_mimetype+moe_lite_inline"
    inline = pio.renderers["moe_lite_inline"]
    assert not inline.connected  # activation embeds plotly.js itself, no CDN
    html = inline.to_mimebundle(fig.to_dict())["text/html"]
    assert "http" not in html and "<script src" not in html and len(html) < 20_000
    assert configure_plotly(colab=False) == "plotly_mimetype"
    assert configure_plotly(colab=True) == "colab"
