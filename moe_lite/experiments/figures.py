"""Summary figures of the results page, drawn from the JSON that ``python -m moe_lite run`` writes.

Each experiment's JSON holds every seed's numbers, so the figures (means with one-std error bars
over seeds) can be redrawn at any time without training: ``python -m moe_lite report <folder>
--figures <dir>`` writes them as SVG (needs ``kaleido``) and links them from the page.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

Record = Dict[str, Any]


def _mean(value: Any) -> Optional[float]:
    return value.get("mean") if isinstance(value, dict) else value


def _std(value: Any) -> float:
    return value.get("std", 0.0) if isinstance(value, dict) else 0.0


def _bars(names: Sequence[str], panels: Dict[str, List[Any]], title: str, x_title: str = "variant") -> go.Figure:
    """One bar subplot per panel (``{panel title: [mean_std per name]}``), error bars = std; each
    panel's y axis is titled by its statistic, its x axis by ``x_title``."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels))
    for col, (panel, values) in enumerate(panels.items(), start=1):
        fig.add_trace(go.Bar(x=list(names), y=[_mean(v) for v in values],
                             error_y={"type": "data", "array": [_std(v) for v in values]},
                             marker_color="#4c78a8", showlegend=False), row=1, col=col)
        fig.update_yaxes(title_text=panel.split(" (")[0], row=1, col=col)
        fig.update_xaxes(title_text=x_title, row=1, col=col)
    fig.update_layout(title=title, height=420, width=max(520, 340 * len(panels)), margin={"b": 140})
    fig.update_annotations(font_size=12)
    fig.update_xaxes(tickangle=-35)
    return fig


def diffusion_figures(record: Record) -> Dict[str, go.Figure]:
    """dit / race: per study table, bars of the classifier-feature FD and conditional accuracy
    (Table 2: MaxVio and combination usage too)."""
    from .diffusion import STUDY_TABLES  # here, not at the top: diffusion.py imports this module

    metrics, figs = record["metrics"], {}
    # a table whose variants the run has, all or nearly (a run made before a row was added to a table
    # draws the others; a run that has only a few of a table's rows does not draw it)
    tables = [(t, [n for n in names if n in metrics], len(names)) for t, names in STUDY_TABLES]
    tables = [(t, names) for t, names, full in tables if len(names) >= 2 and len(names) >= 0.8 * full]
    if not tables:  # a run of other variants: one figure of all of them
        names = [n for n in metrics if isinstance(metrics[n], dict) and "fd_fmnist_classifier" in metrics[n]]
        tables = [("generation", names)]
    for title, names in tables:
        panels = {"FD on classifier features (lower is better)": [metrics[n]["fd_fmnist_classifier"] for n in names],
                  "conditional accuracy (higher is better)": [metrics[n]["conditional_accuracy"] for n in names]}
        if title.startswith("Table 2"):
            panels["MaxVio (lower is better)"] = [metrics[n].get("max_vio") for n in names]
            panels["combination usage % (higher is better)"] = [metrics[n].get("combination_usage") for n in names]
        figs[title.split(":")[0].lower().replace(" ", "-")] = _bars(names, panels, f"{record['name']}: {title}")
    return figs


def grid_figures(record: Record) -> Dict[str, go.Figure]:
    """vimoe-grid: accuracy per variant, one bar group per training-set size."""
    cells = record["metrics"]["cells"]
    variants = record["config"]["variants"]
    fig = go.Figure()
    for cell in cells.values():
        fig.add_trace(go.Bar(name=f"{cell['train_images']} training images", x=variants,
                             y=[cell[v]["accuracy"]["mean"] for v in variants],
                             error_y={"type": "data", "array": [cell[v]["accuracy"]["std"] for v in variants]}))
    low = min(cell[v]["accuracy"]["mean"] for cell in cells.values() for v in variants)
    fig.update_layout(barmode="group", title="ViMoE: placement x shared expert x training-set size "
                      "(mean ± std over seeds)",
                      xaxis={"title": "variant"},
                      yaxis={"title": "test accuracy", "range": [max(0.0, low - 0.08), None]},
                      height=440, width=900, margin={"b": 140})
    return {"accuracy": fig}


def dynamic_figures(record: Record) -> Dict[str, go.Figure]:
    """dynamic: experts per token by layer (mean ± std over seeds), and the threshold sweep."""
    metrics, figs = record["metrics"], {}
    models = [m for m in record["config"].get("models", ["top-p", "top-2"]) if m in metrics]
    fig = go.Figure()
    for name in models:
        layers = metrics[name].get("experts_per_layer_seeds") or {
            k: {"mean": v, "std": 0.0} for k, v in metrics[name]["experts_per_layer"].items()}
        fig.add_trace(go.Bar(name=name, x=list(layers), y=[v["mean"] for v in layers.values()],
                             error_y={"type": "data", "array": [v["std"] for v in layers.values()]}))
    fig.update_layout(barmode="group", title="experts per token in each MoE layer (mean ± std over seeds)",
                      xaxis={"title": "MoE layer"}, yaxis={"title": "experts per token"}, height=400, width=720)
    figs["experts-per-layer"] = fig
    sweep = metrics.get("threshold_sweep")
    if sweep:
        seeded = isinstance(sweep[0]["accuracy"], dict)  # mean_std over seeds (older records: one seed)
        fig = go.Figure(go.Scatter(x=[_mean(p["experts_per_token"]) for p in sweep],
                                   y=[_mean(p["accuracy"]) for p in sweep],
                                   error_y={"type": "data", "array": [_std(p["accuracy"]) for p in sweep]},
                                   mode="lines+markers+text", text=[f"p={p['p']}" for p in sweep],
                                   textposition="bottom right"))
        fig.update_layout(title="top-p threshold moved at inference "
                                + ("(mean ± std over seeds)" if seeded else "(first seed)"),
                          xaxis={"title": "mean experts per token"}, yaxis={"title": "test accuracy"},
                          height=400, width=720)
        figs["threshold-sweep"] = fig
    return figs


def compare_figures(record: Record) -> Dict[str, go.Figure]:
    """zoo: accuracy against experts per token; balance: balance statistics per method."""
    metrics = record["metrics"]
    names = [n for n in record["config"]["entries"] if n in metrics]
    if record["name"] == "zoo":
        fig = go.Figure(go.Scatter(
            x=[metrics[n]["routing_mean"].get("experts_per_token", metrics[n].get("expert_forwards_per_token"))
               for n in names],  # soft MoE has no routing: its compute is slots / tokens expert forwards
            y=[metrics[n]["accuracy"]["mean"] for n in names],
            error_y={"type": "data", "array": [metrics[n]["accuracy"]["std"] for n in names]},
            mode="markers+text", text=names, textposition="top center"))
        fig.update_layout(title="every router on the same ViMoE: accuracy (mean ± std over seeds) against compute",
                          xaxis={"title": "mean experts per token at eval"}, yaxis={"title": "test accuracy"},
                          height=480, width=900)
        return {"accuracy-vs-compute": fig}
    seeds = {n: metrics[n].get("routing_seeds") or {} for n in names}
    panels = {"load CV": [seeds[n].get("load_cv") for n in names],
              "MaxVio": [seeds[n].get("max_vio") for n in names],
              "combination usage %": [seeds[n].get("combination_usage") for n in names],
              "accuracy": [metrics[n]["accuracy"] for n in names]}
    return {"balance": _bars(names, panels, "balancing methods on top-2 (mean ± std over seeds)", x_title="method")}


def adapt_figures(record: Record) -> Dict[str, go.Figure]:
    """adapt: accuracy against trainable parameters and against adapter FLOPs per token."""
    metrics = record["metrics"]
    names = [n for n in record["config"]["methods"] if n in metrics]
    panels = {"trainable_params": "trainable parameters", "adapter_flops_per_token": "adapter FLOPs per token"}
    # a log axis has no 0: a method that costs nothing on an axis (a linear probe has no adapter) is
    # left out of that panel, and its title says so, rather than drawn at a made-up 1
    shown = {key: [n for n in names if metrics[n][key] > 0] for key in panels}
    titles = [label + (f"<br><sup>not drawn (0 on this log axis): {', '.join(n for n in names if n not in shown[key])}"
                       f"</sup>" if len(shown[key]) < len(names) else "") for key, label in panels.items()]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for col, (key, label) in enumerate(panels.items(), start=1):
        kept = shown[key]
        fig.add_trace(go.Scatter(x=[metrics[n][key] for n in kept],
                                 y=[metrics[n]["accuracy"]["mean"] for n in kept],
                                 error_y={"type": "data", "array": [metrics[n]["accuracy"]["std"] for n in kept]},
                                 mode="markers+text", text=kept, textposition="top center", showlegend=False),
                      row=1, col=col)
        fig.update_xaxes(type="log", title_text=f"{label} (log scale)", row=1, col=col)
        fig.update_yaxes(title_text="test accuracy", row=1, col=col)
    fig.update_layout(title="adapting a frozen ViT to new classes (mean ± std over seeds)",
                      yaxis={"title": "test accuracy"}, height=460, width=1000)
    return {"accuracy-vs-cost": fig}
