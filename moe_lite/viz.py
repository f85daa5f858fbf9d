"""Plotly figure builders for routing decisions, training runs and benchmarks.

Every builder is a pure function: it reads tensors, a :class:`~moe_lite.routing.Routing`, or plain
dicts, and returns a new :class:`plotly.graph_objects.Figure` with a title, axis labels and hover
text that says what each cell, bar or point is. Nothing is shown or saved here; the widgets in
:mod:`moe_lite.widgets` wrap these builders, and :func:`moe_lite.page.figures_to_html` writes them into
one self-contained HTML report. Routing computations (top experts, per-label counts) live in
:mod:`moe_lite.inspect`.

Axis legend: b batch, l tokens per sample, e experts, n = b*l flat tokens, c classes or labels.

Builders keep a fixed number of traces for a given input shape, so a live ``FigureWidget`` can be
updated in place trace by trace when a control changes.
"""
from __future__ import annotations

import html
import math
import re
from numbers import Real
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

from .analysis import coactivation as _coactivation, load_over_training, transition_predictability
from .losses import REGISTRY
from .routing import Routing, load_cv, max_violation

__all__ = [
    "assignment_heatmap",
    "tokens_per_expert_bar",
    "experts_per_token_hist",
    "label_expert_heatmap",
    "patch_expert_overlay",
    "image_grid",
    "training_curves",
    "stat_curves",
    "layer_stat_bars",
    "tradeoff_curve",
    "speed_bars",
    "expert_colors",
]

TEMPLATE = "plotly_white"
ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]
Records = Sequence[Mapping[str, Any]]


# ---- small helpers ------------------------------------------------------------------------------
def _to_numpy(x: Any, name: str, dtype: Any = float) -> np.ndarray:
    """A tensor, array or nested sequence as a numpy array of ``dtype`` (on the CPU, detached)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = x.float() if dtype is float else x
        x = x.numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from err


def _require_routing(routing: Any) -> Routing:
    """Raise a clear TypeError unless ``routing`` looks like a :class:`Routing`."""
    needed = ("logits", "token", "expert", "weight", "num_experts")
    if not all(hasattr(routing, a) for a in needed):
        raise TypeError(f"expected a moe_lite.Routing, got {type(routing).__name__}")
    return routing


def _style(fig: go.Figure, title: str, x_title: Optional[str] = None, y_title: Optional[str] = None,
           **layout: Any) -> go.Figure:
    """Apply the kit's common layout: template, title, axis titles, compact margins."""
    fig.update_layout(template=TEMPLATE, title=dict(text=title), margin=dict(l=60, r=20, t=70, b=50),
                      **layout)
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def _is_number(v: Any) -> bool:
    """True for finite real numbers (bools excluded) and 0-d tensors holding one."""
    if isinstance(v, Tensor):
        return v.numel() == 1 and bool(torch.isfinite(v.detach().float()).all())
    if isinstance(v, bool) or not isinstance(v, Real):
        return False
    return math.isfinite(float(v))


def _as_float(v: Any) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def _check_records(records: Any, name: str) -> List[Mapping[str, Any]]:
    """A list of dicts, or a ValueError saying which entry is not one."""
    if isinstance(records, Mapping) or isinstance(records, (str, bytes)):
        raise ValueError(f"{name} must be a list of dicts, got {type(records).__name__}")
    out = list(records)
    for i, r in enumerate(out):
        if not isinstance(r, Mapping):
            raise ValueError(f"{name}[{i}] must be a dict, got {type(r).__name__}")
    return out


def _series(records: Sequence[Mapping[str, Any]], key: str, x: str) -> Tuple[List[float], List[float]]:
    """(xs, ys) of the records that hold a finite number under ``key``; x falls back to the index."""
    xs, ys = [], []
    for i, r in enumerate(records):
        v = r.get(key)
        if _is_number(v):
            xv = r.get(x)
            xs.append(_as_float(xv) if _is_number(xv) else float(i))
            ys.append(_as_float(v))
    return xs, ys


def _pretty(key: str) -> str:
    """``"combination_usage"`` -> ``"combination usage"``."""
    return key.replace("_", " ")


def expert_colors(num_experts: int) -> List[str]:
    """One distinct colour per expert (qualitative palettes, cycled past 36 experts)."""
    palette = list(qualitative.Plotly) + list(qualitative.Dark24) + list(qualitative.Light24)
    if num_experts <= len(qualitative.Plotly):
        palette = list(qualitative.Plotly)
    return [palette[e % len(palette)] for e in range(num_experts)]


def _color_range(z: np.ndarray) -> Dict[str, float]:
    """``zmin``/``zmax`` that draw 0 in the colour of zero, whatever the data.

    Both are always set: plotly ignores a lone ``zmin`` (``zauto`` stays on), and an all-zero ``z``
    then spans [-0.5, 0.5] with 0 in the middle of the scale. Non-negative data: ``[0, max]``
    (``[0, 1]`` when everything is 0); signed data: symmetric ``[-a, a]``, 0 in the middle of a
    diverging scale.
    """
    finite = z[np.isfinite(z)] if z.size else z
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if lo < 0:
        a = max(-lo, hi)
        return {"zmin": -a, "zmax": a}
    return {"zmin": 0.0, "zmax": hi if hi > 0 else 1.0}


def _discrete_colorscale(colors: Sequence[str]) -> List[List[Any]]:
    """A stepped colorscale: value ``e`` (on ``[-0.5, E-0.5]``) maps to ``colors[e]``."""
    n = len(colors)
    scale: List[List[Any]] = []
    for e, c in enumerate(colors):
        scale.append([e / n, c])
        scale.append([(e + 1) / n, c])
    return scale


# ---- routing figures ----------------------------------------------------------------------------
def assignment_heatmap(routing: Routing, sample: Optional[int] = 0, max_tokens: Optional[int] = None,
                       title: Optional[str] = None) -> go.Figure:
    """Token x expert matrix of combine weights (0 where a token was not sent to the expert).

    Args:
        routing: the routing to draw.
        sample: which sample's ``L`` tokens to show; ``None`` shows all ``N = B*L`` flat tokens.
        max_tokens: show at most this many (leading) tokens.
        title: figure title; a default with experts per token and dropped share is built.

    Returns a figure with one ``Heatmap`` trace, ``z`` of shape ``[tokens, E]``; hover names the
    sample, position, expert, weight, and whether the pair was assigned.
    """
    routing = _require_routing(routing)
    b, l, e = routing.batch_size, routing.seq_len, routing.num_experts
    weight = _to_numpy(routing.dense_weight, "weight").reshape(b, l, e)
    mask = routing.mask.detach().cpu().numpy().reshape(b, l, e)
    if sample is None:
        weight, mask = weight.reshape(b * l, e), mask.reshape(b * l, e)
        samples, positions = np.repeat(np.arange(b), l), np.tile(np.arange(l), b)
        what = f"all {b} samples"
    else:
        if not isinstance(sample, (int, np.integer)) or not 0 <= sample < b:
            raise ValueError(f"sample must be an int in [0, {b}), got {sample!r}")
        weight, mask = weight[sample], mask[sample]
        samples, positions = np.full(l, sample), np.arange(l)
        what = f"sample {sample}"
    if max_tokens is not None:
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        weight, mask = weight[:max_tokens], mask[:max_tokens]
        samples, positions = samples[:max_tokens], positions[:max_tokens]
    t = weight.shape[0]
    state = np.where(mask, "assigned", "not assigned")
    custom = np.empty((t, e, 3), dtype=object)
    custom[..., 0] = samples[:, None]
    custom[..., 1] = positions[:, None]
    custom[..., 2] = state
    negative = bool((weight < 0).any())
    ept = mask.sum(1)
    heat = go.Heatmap(
        z=weight, x=np.arange(e), y=np.arange(t), customdata=custom,
        colorscale="RdBu" if negative else "Blues", **_color_range(weight),
        colorbar=dict(title=dict(text="weight")),
        hovertemplate=("sample %{customdata[0]}, token %{customdata[1]}<br>expert %{x}"
                       "<br>combine weight %{z:.3f} (%{customdata[2]})<extra></extra>"),
    )
    fig = go.Figure(heat)
    default = (f"Combine weights, {what}: {ept.mean() if t else 0:.2f} experts/token, "
               f"{(ept == 0).mean() if t else 0:.0%} tokens with no expert")
    _style(fig, title or default, "expert", "token" if sample is not None else "flat token (b*L + l)")
    fig.update_yaxes(autorange="reversed")
    if e <= 32:
        fig.update_xaxes(dtick=1)
    return fig


def tokens_per_expert_bar(routing: Union[Routing, ArrayLike], title: Optional[str] = None) -> go.Figure:
    """Bar of tokens per expert with a dashed mean line; MaxVio and load CV in the title.

    Args:
        routing: a :class:`Routing`, or the ``[E]`` counts themselves.

    Returns a figure with two traces: the ``Bar`` (one bar per expert) and the mean line.
    """
    dropped = None
    if isinstance(routing, Routing) or hasattr(routing, "tokens_per_expert"):
        routing = _require_routing(routing)
        counts = _to_numpy(routing.tokens_per_expert, "tokens_per_expert")
        ept = routing.experts_per_token
        dropped = float((ept == 0).float().mean()) if ept.numel() else 0.0
    else:
        counts = _to_numpy(routing, "tokens_per_expert")
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"tokens per expert must be a non-empty 1-D [E] array, got shape {counts.shape}")
    e = counts.size
    total = counts.sum()
    share = counts / total if total > 0 else np.zeros_like(counts)
    mean = float(counts.mean())
    load = torch.as_tensor(counts)
    bar = go.Bar(
        x=np.arange(e), y=counts, name="tokens", customdata=share,
        marker_color=["#d62728" if c == 0 else "#1f77b4" for c in counts],
        hovertemplate="expert %{x}<br>%{y:.0f} tokens<br>%{customdata:.1%} of assignments<extra></extra>",
    )
    line = go.Scatter(x=[-0.5, e - 0.5], y=[mean, mean], mode="lines", name=f"mean {mean:.1f}",
                      line=dict(dash="dash", color="#333"),
                      hovertemplate=f"mean load {mean:.2f} tokens<extra></extra>")
    parts = [f"MaxVio {max_violation(load):.2f}", f"load CV {load_cv(load):.2f}"]
    if dropped is not None:
        parts.append(f"dropped {dropped:.1%}")
    fig = go.Figure([bar, line])
    _style(fig, title or f"Tokens per expert ({', '.join(parts)})", "expert", "tokens", showlegend=True)
    if e <= 32:
        fig.update_xaxes(dtick=1)
    return fig


def experts_per_token_hist(routing: Union[Routing, ArrayLike], title: Optional[str] = None) -> go.Figure:
    """Histogram of how many experts each token was sent to (bar 0, in red, = dropped/skipped).

    Args:
        routing: a :class:`Routing`, or the ``[N]`` experts-per-token counts.

    Returns a figure with one ``Bar`` trace over ``0..max`` (``0..E`` for a Routing), as a share of tokens.
    """
    if isinstance(routing, Routing) or hasattr(routing, "experts_per_token"):
        routing = _require_routing(routing)
        ept = _to_numpy(routing.experts_per_token, "experts_per_token", dtype=np.int64)
        top = routing.num_experts
    else:
        ept = _to_numpy(routing, "experts_per_token", dtype=float)
        if ept.ndim != 1 or (ept.size and ((ept < 0).any() or (ept != np.round(ept)).any())):
            raise ValueError("experts per token must be a 1-D array of non-negative integers")
        ept = ept.astype(np.int64)
        top = int(ept.max()) if ept.size else 0
    counts = np.bincount(ept, minlength=top + 1) if ept.size else np.zeros(top + 1, dtype=np.int64)
    n = max(int(ept.size), 1)
    frac = counts / n
    bar = go.Bar(
        x=np.arange(counts.size), y=frac, customdata=counts, name="tokens",
        marker_color=["#d62728" if i == 0 else "#2ca02c" for i in range(counts.size)],
        hovertemplate="%{x} experts: %{customdata} tokens (%{y:.1%})<extra></extra>",
    )
    mean = float(ept.mean()) if ept.size else 0.0
    fig = go.Figure(bar)
    _style(fig, title or f"Experts per token (mean {mean:.2f}; {frac[0]:.1%} of tokens with none)",
           "experts per token", "share of tokens")
    fig.update_yaxes(tickformat=".0%")
    fig.update_xaxes(dtick=1)
    return fig


def label_expert_heatmap(by_label_result: Union[Mapping[str, Tensor], ArrayLike],
                         label_names: Optional[Sequence[str]] = None,
                         title: str = "Share of each class's tokens sent to each expert",
                         value: str = "fraction", label_title: str = "class") -> go.Figure:
    """Class (or timestep bucket, or patch position) x expert map from :func:`moe_lite.routing.by_label`.

    Args:
        by_label_result: the dict ``by_label`` returns, or a ``[C, E]`` matrix directly.
        label_names: ``C`` row names (default: the label index).
        value: which ``[C, E]`` entry to draw (``"fraction"`` or ``"counts"``).
        label_title: what a row is, for the axis title and hover (``"class"``, ``"timestep"``...).

    Returns a figure with one ``Heatmap`` trace of shape ``[C, E]``.
    """
    tokens = None
    if isinstance(by_label_result, Mapping):
        if value not in by_label_result:
            raise ValueError(f"by_label result has no {value!r}; keys: {sorted(by_label_result)}")
        z = _to_numpy(by_label_result[value], value)
        if "tokens" in by_label_result:
            tokens = _to_numpy(by_label_result["tokens"], "tokens")
    else:
        z = _to_numpy(by_label_result, "label x expert matrix")
    if z.ndim != 2:
        raise ValueError(f"{value} must be a 2-D [C, E] matrix, got shape {z.shape}")
    c, e = z.shape
    if label_names is None:
        names = [str(i) for i in range(c)]
    else:
        names = [str(s) for s in label_names]
        if len(names) != c:
            raise ValueError(f"label_names has {len(names)} names for {c} rows")
    if tokens is None or tokens.shape != (c,):
        tokens = np.full(c, np.nan)
    custom = np.repeat(tokens[:, None], e, axis=1)
    is_share = value == "fraction"
    fmt = ".1%" if is_share else ".0f"
    heat = go.Heatmap(
        z=z, x=np.arange(e), y=names, customdata=custom, colorscale="Viridis", **_color_range(z),
        texttemplate=f"%{{z:{'.0%' if is_share else '.0f'}}}" if c * e <= 160 else None,
        colorbar=dict(title=dict(text="share" if is_share else value)),
        hovertemplate=(f"{label_title} %{{y}}<br>expert %{{x}}<br>"
                       + ("%{z:.1%} of its tokens sent here" if is_share else f"%{{z:{fmt}}} {value}")
                       + "<br>%{customdata:.0f} tokens with this label<extra></extra>"),
    )
    fig = go.Figure(heat)
    _style(fig, title, "expert", label_title)
    fig.update_yaxes(autorange="reversed", type="category")
    if e <= 32:
        fig.update_xaxes(dtick=1)
    return fig


def _images_hw(images: Any, name: str = "images") -> np.ndarray:
    """``[B, 1, H, W]`` or ``[B, H, W]`` -> float ``[B, H, W]``."""
    arr = _to_numpy(images, name)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [B, 1, H, W] or [B, H, W], got shape {tuple(arr.shape)}")
    return arr


#: Font size (px) of the per-image captions of image grids.
_CAPTION_SIZE = 12


def _grid_shape(n: int, ncols: int) -> Tuple[int, int]:
    if not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    cols = min(int(ncols), max(n, 1))
    return max(1, math.ceil(n / cols)), cols


def _caption(i: int, labels: Optional[np.ndarray], label_names: Optional[Sequence[str]]) -> str:
    if labels is None:
        return f"#{i}"
    lab = int(labels[i])
    if label_names is not None and 0 <= lab < len(label_names):
        return str(label_names[lab])
    return str(lab)


def _check_labels(labels: Any, n: int) -> Optional[np.ndarray]:
    if labels is None:
        return None
    arr = _to_numpy(labels, "labels", dtype=np.int64).reshape(-1)
    if arr.size != n:
        raise ValueError(f"labels has {arr.size} entries for {n} images")
    return arr


def _image_axes(fig: go.Figure, n: int) -> None:
    """Hide ticks, keep pixels square and row 0 at the top in every image subplot."""
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    for i in range(1, n + 1):
        suffix = "" if i == 1 else str(i)
        fig.layout[f"yaxis{suffix}"].scaleanchor = f"x{suffix}"


def patch_expert_overlay(images: Any, patch_experts: Any, patch_size: int, num_experts: int,
                         ncols: int = 4, labels: Any = None, label_names: Optional[Sequence[str]] = None,
                         opacity: float = 0.5, title: Optional[str] = None) -> go.Figure:
    """Images with every patch tinted by the expert it went to, one subplot per image.

    Args:
        images: ``[B, 1, H, W]`` or ``[B, H, W]`` (values in [0, 1] are drawn on a fixed scale).
        patch_experts: long ``[B, L]`` expert per patch, row-major, ``-1`` = no expert (left clear);
            e.g. :func:`moe_lite.inspect.primary_expert` of a ViT layer's routing.
        patch_size: patch side in pixels; ``L`` must equal ``(H / patch_size) * (W / patch_size)``.
        num_experts: ``E``, for the discrete colour scale (one colour per expert, named on the colourbar).
        ncols: subplots per row. labels / label_names: optional per-image caption.
        opacity: tint opacity.

    Returns a figure with two traces per image: the grey image and the expert tint.
    """
    imgs = _images_hw(images)
    pe = _to_numpy(patch_experts, "patch_experts", dtype=np.int64)
    b, h, w = imgs.shape
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size!r} must be a positive int dividing the image size {h}x{w}")
    if not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    gh, gw = h // patch_size, w // patch_size
    if pe.ndim != 2 or pe.shape != (b, gh * gw):
        raise ValueError(f"patch_experts must be [B, L] = [{b}, {gh * gw}], got shape {tuple(pe.shape)}")
    if pe.size and (pe.min() < -1 or pe.max() >= num_experts):
        raise ValueError(f"patch_experts must be in [-1, {num_experts}), got [{pe.min()}, {pe.max()}]")
    labs = _check_labels(labels, b)
    rows, cols = _grid_shape(b, ncols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_caption(i, labs, label_names) for i in range(b)],
                        horizontal_spacing=0.02, vertical_spacing=0.08 if rows > 1 else 0.1)
    lo, hi = (0.0, 1.0) if imgs.min() >= 0 and imgs.max() <= 1 else (float(imgs.min()), float(imgs.max()))
    patch_idx = np.arange(gh * gw).reshape(gh, gw)
    for i in range(b):
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(go.Heatmap(z=imgs[i], colorscale="gray", zmin=lo, zmax=hi, showscale=False,
                                 hoverinfo="skip", name=f"image {i}"), row=r, col=c)
        grid = pe[i].reshape(gh, gw).astype(float)
        grid[grid < 0] = np.nan
        fig.add_trace(go.Heatmap(
            z=grid, x0=(patch_size - 1) / 2, dx=patch_size, y0=(patch_size - 1) / 2, dy=patch_size,
            coloraxis="coloraxis", opacity=opacity, hoverongaps=False, customdata=patch_idx,
            name=f"experts {i}",
            hovertemplate=f"image {i}, patch %{{customdata}}<br>expert %{{z:.0f}}<extra></extra>",
        ), row=r, col=c)
    fig.update_layout(coloraxis=dict(
        colorscale=_discrete_colorscale(expert_colors(num_experts)), cmin=-0.5, cmax=num_experts - 0.5,
        colorbar=dict(title=dict(text="expert"), tickvals=list(range(num_experts)),
                      ticktext=[f"expert {e}" for e in range(num_experts)])))
    dropped = float((pe < 0).mean()) if pe.size else 0.0
    _style(fig, title or f"Expert per patch ({patch_size}x{patch_size} patches; {dropped:.0%} with no expert, clear)",
           height=60 + 190 * rows, width=max(420, 170 * cols + 160))
    _image_axes(fig, b)
    return fig


def image_grid(images: Any, labels: Any = None, label_names: Optional[Sequence[str]] = None,
               ncols: int = 8, title: str = "Samples") -> go.Figure:
    """Grid of greyscale images (e.g. DiT samples), one subplot and one ``Heatmap`` per image.

    Args:
        images: ``[N, 1, H, W]`` or ``[N, H, W]``, values in [0, 1] (clipped to that range on screen).
        labels: optional ``[N]`` ints; label_names maps them to captions.
    """
    imgs = _images_hw(images)
    n = imgs.shape[0]
    if n == 0:
        raise ValueError("images is empty")
    labs = _check_labels(labels, n)
    rows, cols = _grid_shape(n, ncols)
    # Spacing in pixels, not as a share of the height: each row's captions need their own band
    # between rows, or they are drawn over the bottom of the row above.
    cell, gap, top, bottom = 110, 2 * _CAPTION_SIZE + 4, 70, 20
    inner = rows * cell + (rows - 1) * gap
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_caption(i, labs, label_names) for i in range(n)],
                        horizontal_spacing=0.01, vertical_spacing=gap / inner if rows > 1 else 0.0)
    fig.update_annotations(font_size=_CAPTION_SIZE)
    for i in range(n):
        fig.add_trace(go.Heatmap(z=imgs[i], colorscale="gray", zmin=0.0, zmax=1.0, showscale=False,
                                 name=_caption(i, labs, label_names),
                                 hovertemplate=f"{_caption(i, labs, label_names)}<br>row %{{y}}, col %{{x}}"
                                               "<br>value %{z:.2f}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    _style(fig, title, height=top + bottom + inner, width=max(300, 110 * cols + 60))
    fig.update_layout(margin=dict(t=top, b=bottom))
    _image_axes(fig, n)
    return fig


# ---- run figures --------------------------------------------------------------------------------
def _history_parts(history: Any) -> Tuple[List[Mapping[str, Any]], List[Mapping[str, Any]]]:
    """(steps, evals) from a History-like object, a {"steps", "evals"} dict or a plain list of dicts."""
    if hasattr(history, "steps"):
        return (_check_records(history.steps, "history.steps"),
                _check_records(getattr(history, "evals", None) or [], "history.evals"))
    if isinstance(history, Mapping):
        if "steps" not in history and "evals" not in history:
            raise ValueError("a history dict needs 'steps' and/or 'evals' lists")
        return (_check_records(history.get("steps") or [], "history['steps']"),
                _check_records(history.get("evals") or [], "history['evals']"))
    return _check_records(history, "history"), []


def _ordered_keys(records: Iterable[Mapping[str, Any]]) -> List[str]:
    seen: Dict[str, None] = {}
    for r in records:
        for k in r:
            seen.setdefault(str(k), None)
    return list(seen)


def _is_loss_key(key: str) -> bool:
    """Task or auxiliary loss: contains "loss", starts with "aux", or ends with a regularizer's name."""
    low = key.lower()
    return "loss" in low or low.startswith("aux") or re.split(r"[/.]", low)[-1] in REGISTRY


def training_curves(history: Any, x: str = "step", loss_keys: Optional[Sequence[str]] = None,
                    metric_keys: Optional[Sequence[str]] = None, title: str = "Training curves",
                    log_y: bool = False) -> go.Figure:
    """Task loss, auxiliary losses and accuracy over training.

    Args:
        history: an object with ``.steps`` / ``.evals`` (lists of dicts of floats with an ``x`` key),
            a dict with those keys, or one list of dicts.
        x: the x key (``"step"`` or ``"epoch"``); a record without it uses its index.
        loss_keys: keys for the top panel (default: keys containing "loss", starting with "aux",
            or ending with a ``moe_lite.losses.REGISTRY`` name, e.g. ``"block0/z_loss"``).
        metric_keys: keys for the bottom panel (default: keys containing "acc", "fid" or "frechet").
        log_y: log scale for the loss panel.

    Missing keys and non-finite values are skipped; one trace per (source, key) with data, step
    records as lines and eval records as lines with markers named ``eval <key>``.
    """
    steps, evals = _history_parts(history)
    keys = [k for k in _ordered_keys(list(steps) + list(evals)) if k != x]
    losses = list(loss_keys) if loss_keys is not None else [k for k in keys if _is_loss_key(k)]
    metrics = (list(metric_keys) if metric_keys is not None
               else [k for k in keys if re.search(r"acc|fid|frechet", k.lower()) and k not in losses])
    rows = 2 if metrics else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=["losses", "metrics"][:rows])
    colors = list(qualitative.Plotly) + list(qualitative.Dark24)
    for row, panel in enumerate([losses, metrics][:rows], start=1):
        for j, key in enumerate(panel):
            color = colors[(j + 3 * (row - 1)) % len(colors)]
            for source, name, mode in ((steps, key, "lines"), (evals, f"eval {key}", "lines+markers")):
                xs, ys = _series(source, key, x)
                if xs:
                    fig.add_trace(go.Scatter(x=xs, y=ys, mode=mode, name=name, line=dict(color=color),
                                             hovertemplate=f"{name}<br>{x} %{{x}}<br>%{{y:.4g}}<extra></extra>"),
                                  row=row, col=1)
    if not fig.data:
        title = f"{title} (no data)"
    _style(fig, title, height=320 * rows + 60)
    fig.update_xaxes(title_text=x, row=rows, col=1)
    fig.update_yaxes(title_text="loss", type="log" if log_y else None, row=1, col=1)
    if rows == 2:
        fig.update_yaxes(title_text="value", row=2, col=1)
    return fig


def _flatten(record: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as ``"outer/inner"`` keys, e.g. an eval's ``routing`` -> ``"routing/<layer>/load_cv"``."""
    flat: Dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "/"))
        else:
            flat[key] = v
    return flat


def _matching_keys(records: Sequence[Mapping[str, Any]], key: str) -> List[str]:
    """``key`` itself if present, else every ``"<prefix>/key"`` or ``"<prefix>.key"`` (per-layer stats)."""
    present = _ordered_keys(records)
    if key in present:
        return [key]
    return [k for k in present if k.endswith("/" + key) or k.endswith("." + key)]


def stat_curves(records: Union[Records, Mapping[str, Records]], x: str = "step",
                keys: Sequence[str] = ("load_cv", "max_vio", "combination_usage"),
                title: str = "Load-balance statistics") -> go.Figure:
    """Balance statistics over training: one panel per key, one trace per run (and per layer).

    Args:
        records: a list of dicts (one run) or a dict ``run name -> list of dicts``, e.g.
            ``history.evals``; nested dicts are read as ``"outer/inner"`` keys.
        x: the x key. keys: statistics to draw; a key not present verbatim also matches
            per-layer keys ``"<layer>/<key>"`` (such as ``"routing/<layer>/load_cv"`` of an eval
            record), each drawn as its own trace named after the layer.

    Runs keep one colour across panels and share one legend entry.
    """
    if isinstance(records, Mapping):
        runs = {str(k): _check_records(v, f"records[{k!r}]") for k, v in records.items()}
    else:
        runs = {"run": _check_records(records, "records")}
    runs = {name: [_flatten(r) for r in recs] for name, recs in runs.items()}
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("keys must name at least one statistic")
    fig = make_subplots(rows=len(keys), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[_pretty(k) for k in keys])
    colors = expert_colors(max(len(runs), 1))
    for r, (run, recs) in enumerate(runs.items()):
        shown = False
        for row, key in enumerate(keys, start=1):
            for full in _matching_keys(recs, key):
                xs, ys = _series(recs, full, x)
                if not xs:
                    continue
                layer = full[: -len(key) - 1]
                layer = layer[len("routing/"):] if layer.startswith("routing/") else layer
                name = run if full == key else f"{run} {layer}"
                fig.add_trace(go.Scatter(
                    x=xs, y=ys, mode="lines+markers" if len(xs) < 30 else "lines", name=name,
                    legendgroup=run, showlegend=not shown or full != key, line=dict(color=colors[r]),
                    hovertemplate=f"{name}<br>{x} %{{x}}<br>{_pretty(key)} %{{y:.4g}}<extra></extra>",
                ), row=row, col=1)
                shown = True
    _style(fig, title if fig.data else f"{title} (no data)", height=230 * len(keys) + 80)
    fig.update_xaxes(title_text=_pretty(x), row=len(keys), col=1)
    for row, key in enumerate(keys, start=1):
        fig.update_yaxes(title_text=_pretty(key), row=row, col=1)
    return fig


def layer_stat_bars(stats: Mapping[str, Mapping[str, Any]], keys: Union[str, Sequence[str]] = ("experts_per_token",),
                    title: Optional[str] = None, y_title: Optional[str] = None, x_title: str = "layer") -> go.Figure:
    """Grouped bars of per-layer statistics (e.g. ``moe_lite.routing_stats(model)``), or of any other
    categories (classes, timestep buckets: say which with ``x_title``).

    Args:
        stats: ``layer (category) name -> {statistic: value}``; bars keep this order.
        keys: statistics to draw, one ``Bar`` trace each (layers without a key get no bar).
        x_title: what a bar's category is (axis title and hover).
    """
    if not isinstance(stats, Mapping) or not stats:
        raise ValueError("stats must be a non-empty dict: layer name -> dict of statistics")
    for layer, d in stats.items():
        if not isinstance(d, Mapping):
            raise ValueError(f"stats[{layer!r}] must be a dict, got {type(d).__name__}")
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("keys must name at least one statistic")
    layers = [str(k) for k in stats]
    fig = go.Figure()
    for key in keys:
        ys = [_as_float(d[key]) if _is_number(d.get(key)) else None for d in stats.values()]
        fig.add_trace(go.Bar(x=layers, y=ys, name=_pretty(key),
                             hovertemplate=f"{html.escape(x_title)} %{{x}}<br>{_pretty(key)} %{{y:.4g}}<extra></extra>"))
    default = f"{_pretty(keys[0])} per {x_title}" if len(keys) == 1 else f"Statistics per {x_title}"
    _style(fig, title or default, x_title, y_title or (_pretty(keys[0]) if len(keys) == 1 else "value"),
           barmode="group", showlegend=len(keys) > 1)
    fig.update_xaxes(type="category")
    return fig


def tradeoff_curve(xs: ArrayLike, ys: ArrayLike, labels: Optional[Sequence[Any]] = None,
                   x_title: str = "x", y_title: str = "y", title: Optional[str] = None,
                   highlight: Optional[int] = None, mode: str = "lines+markers+text",
                   name: str = "sweep") -> go.Figure:
    """A trade-off curve, e.g. accuracy vs experts per token over a threshold sweep.

    Args:
        xs, ys: 1-D, same length, drawn in the given order.
        labels: per-point labels (e.g. ``"p=0.5"``), shown as text and in hover.
        highlight: index of a point to ring (the current setting of a slider).
        mode: plotly scatter mode of the curve.

    Returns a figure with exactly two traces: the curve and the highlighted point (empty if none).
    """
    x, y = _to_numpy(xs, "xs"), _to_numpy(ys, "ys")
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"xs and ys must be 1-D, got shapes {x.shape} and {y.shape}")
    if x.size != y.size:
        raise ValueError(f"xs has {x.size} points but ys has {y.size}")
    text = [str(s) for s in labels] if labels is not None else [""] * x.size
    if len(text) != x.size:
        raise ValueError(f"labels has {len(text)} entries for {x.size} points")
    if highlight is not None and not (isinstance(highlight, (int, np.integer)) and 0 <= highlight < x.size):
        raise ValueError(f"highlight must be an index in [0, {x.size}), got {highlight!r}")
    hover = f"%{{text}}<br>{x_title} %{{x:.4g}}<br>{y_title} %{{y:.4g}}<extra></extra>"
    # labels sit above their points: never clip them at the axes, and leave headroom above the top one
    curve = go.Scatter(x=x, y=y, text=text, mode=mode, name=name, textposition="top center",
                       hovertemplate=hover, cliponaxis=False)
    hx, hy, ht = ([x[highlight]], [y[highlight]], [text[highlight]]) if highlight is not None else ([], [], [])
    mark = go.Scatter(x=hx, y=hy, text=ht, mode="markers", name="current", cliponaxis=False,
                      marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(width=3, color="#d62728")),
                      hovertemplate="current: " + hover)
    fig = go.Figure([curve, mark])
    _style(fig, title or f"{y_title} vs {x_title}", x_title, y_title, showlegend=False)
    finite = y[np.isfinite(y)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.5
        fig.update_yaxes(range=[lo - 0.08 * span, hi + 0.18 * span])
    return fig


def _row_label(row: Mapping[str, Any], keys: Sequence[str], index: int) -> str:
    parts = [str(row[k]) for k in keys if k in row and row[k] is not None]
    return " | ".join(parts) if parts else f"row {index}"


def speed_bars(rows: Records, label_key: Union[str, Sequence[str]] = ("config", "router", "backend"),
               value_key: str = "ratio", group_key: Optional[str] = "backend",
               target: Union[float, str, None] = "target",
               title: str = "MoE / dense step time (lower is faster)",
               y_title: Optional[str] = None) -> go.Figure:
    """Benchmark bars, e.g. the rows of ``moe_lite.bench.run`` (MoE / dense time ratio per setting).

    Args:
        rows: list of dicts, each with a finite number under ``value_key``; every field shows in
            the hover.
        label_key: a key, or keys joined with ``" | "``, naming each bar (missing keys are left out).
        group_key: field that colours the bars, one ``Bar`` trace per value (``None``, or a key no
            row has: one trace).
        target: a number (one dashed horizontal line), a key holding each row's own target (a
            ``"target"`` marker trace, one tick per bar that has one), or ``None``.
    """
    rows = _check_records(rows, "rows")
    if not rows:
        raise ValueError("rows is empty")
    for i, r in enumerate(rows):
        if not _is_number(r.get(value_key)):
            raise ValueError(f"rows[{i}] needs a finite number under {value_key!r}: {dict(r)}")
    label_keys = [label_key] if isinstance(label_key, str) else list(label_key)
    labels = [_row_label(r, label_keys, i) for i, r in enumerate(rows)]
    use_groups = group_key is not None and any(group_key in r for r in rows)
    groups: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(str(r.get(group_key)) if use_groups else _pretty(value_key), []).append(i)
    fig = go.Figure()
    for g, idx in groups.items():
        details = ["<br>".join(f"{html.escape(str(k))}: {html.escape(_fmt(v))}" for k, v in rows[i].items())
                   for i in idx]
        fig.add_trace(go.Bar(x=[labels[i] for i in idx], y=[_as_float(rows[i][value_key]) for i in idx],
                             name=g, customdata=details,
                             hovertemplate="%{customdata}<extra>" + html.escape(g) + "</extra>"))
    if isinstance(target, str):
        marks = [(labels[i], _as_float(r[target])) for i, r in enumerate(rows) if _is_number(r.get(target))]
        if marks:
            fig.add_trace(go.Scatter(
                x=[m[0] for m in marks], y=[m[1] for m in marks], mode="markers", name="target",
                marker=dict(symbol="line-ew", size=28, line=dict(width=3, color="#d62728")),
                hovertemplate="%{x}<br>target %{y:.3g}<extra></extra>"))
    elif target is not None:
        fig.add_hline(y=float(target), line_dash="dash", line_color="#d62728",
                      annotation_text=f"target {float(target):g}", annotation_position="top left")
    # unique labels: colour by group without offsetting bars, so target ticks sit on their bar
    unique = len(set(labels)) == len(labels)
    _style(fig, title, None, y_title or _pretty(value_key), barmode="overlay" if unique else "group",
           showlegend=len(fig.data) > 1)
    fig.update_xaxes(tickangle=-30 if max(len(t) for t in labels) > 12 else 0)
    return fig


# ---- small formatting helper (hover text of speed_bars, widgets' read-outs) ------------------------
def _fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits, scalar tensors unwrapped."""
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---- analysis views (moe_lite.analysis) -----------------------------------------------------------
__all__ += ["coactivation_heatmap", "expert_load_heatmap", "expert_sankey"]


def coactivation_heatmap(coactivation: Union[Routing, ArrayLike], title: Optional[str] = None) -> go.Figure:
    """Expert x expert co-activation: the share of tokens that experts i and j serve together.

    Args:
        coactivation: a :class:`Routing`, or the ``[E, E]`` matrix of
            :func:`moe_lite.analysis.coactivation` (e.g. summed over a test set, then normalised).

    Returns a figure with one ``Heatmap`` trace of shape ``[E, E]``; the diagonal is each expert's
    load (share of tokens it serves), drawn on the same scale.
    """
    if isinstance(coactivation, Routing) or hasattr(coactivation, "mask"):
        coactivation = _coactivation(_require_routing(coactivation))
    z = _to_numpy(coactivation, "coactivation")
    if z.ndim != 2 or z.shape[0] != z.shape[1] or z.size == 0:
        raise ValueError(f"coactivation must be a non-empty square [E, E] matrix, got shape {z.shape}")
    e = z.shape[0]
    off = z[~np.eye(e, dtype=bool)]
    top_pair = float(off.max()) if off.size else 0.0
    heat = go.Heatmap(
        z=z, x=np.arange(e), y=np.arange(e), colorscale="Viridis", **_color_range(z),
        texttemplate="%{z:.0%}" if e <= 12 else None, colorbar=dict(title=dict(text="share of tokens")),
        hovertemplate="experts %{y} and %{x}<br>%{z:.1%} of tokens go to both"
                      "<br>(diagonal: the expert's own load)<extra></extra>",
    )
    fig = go.Figure(heat)
    _style(fig, title or f"Expert co-activation (diagonal = load; busiest pair {top_pair:.1%} of tokens)",
           "expert", "expert")
    fig.update_yaxes(autorange="reversed")
    if e <= 32:
        fig.update_xaxes(dtick=1)
        fig.update_yaxes(dtick=1)
    return fig


def expert_load_heatmap(records: Records, layers: Optional[Sequence[str]] = None, x: str = "step",
                        title: Optional[str] = None) -> go.Figure:
    """Per-expert load over training: one expert x step heatmap per MoE layer, side by side.

    Args:
        records: :class:`~moe_lite.experiments.common.StepStats` records (each layer's
            ``"<layer>/expert_load"``, see :func:`moe_lite.analysis.load_over_training`).
        layers: which layers to draw (default: every layer logged).

    Each ``Heatmap`` has ``z`` of shape ``[E, T]`` (experts down, logged steps across): the share of
    the layer's assignments each expert took, on one colour scale centred on the balanced share
    ``1/E`` (white), so a collapse onto few experts shows as a red band and recovery as it fading.
    Without logged loads the figure has no trace and says so in its title.
    """
    series = load_over_training(_check_records(records, "records"), x=x)
    if layers is not None:
        missing = [n for n in layers if n not in series]
        if missing:
            raise ValueError(f"no expert load logged for layer(s) {missing}; logged: {sorted(series)}")
        series = {n: series[n] for n in layers}
    base = title or "Expert load during training (share of assignments; white = balanced 1/E)"
    if not series:
        return _style(go.Figure(), f"{base} (no expert load logged)", x, "expert")
    fig = make_subplots(rows=1, cols=len(series), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=list(series))
    top = max(float(load.max()) for _, load in series.values())
    for col, (layer, (xs, load)) in enumerate(series.items(), start=1):
        e = load.shape[1]
        z = load.t().numpy()  # [E, T]
        fair = 1.0 / e
        fig.add_trace(go.Heatmap(
            z=z, x=xs, y=np.arange(e), colorscale="RdBu_r", zmin=0.0, zmid=fair, zmax=max(top, 2 * fair),
            showscale=col == 1, colorbar=dict(title=dict(text="share")),
            hovertemplate=f"{layer}<br>{x} %{{x}}<br>expert %{{y}}<br>%{{z:.1%}} of assignments"
                          f" (balanced {fair:.1%})<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text=x, row=1, col=col)
    _style(fig, base, height=240 + 22 * max(load.shape[1] for _, load in series.values()))
    fig.update_yaxes(title_text="expert", autorange="reversed", row=1, col=1)
    return fig


def expert_sankey(transitions: Union[Mapping[Tuple[str, str], ArrayLike], ArrayLike],
                  title: Optional[str] = None, min_share: float = 0.0) -> go.Figure:
    """Cross-layer expert paths: a Sankey from each token's top expert in one MoE layer to the next.

    Args:
        transitions: ``{(layer, next layer): [E1, E2] counts}`` as
            :func:`moe_lite.analysis.layer_transitions` gives them (pairs of a chain, e.g. 3 layers
            give 2 pairs), or one ``[E1, E2]`` count matrix.
        min_share: links carrying less than this share of a pair's tokens are left out (clutter).

    Returns a figure with one ``Sankey`` trace: a node per (layer, expert), a link per non-zero
    count. The title gives, per pair, how predictable the next expert is from this one
    (:func:`moe_lite.analysis.transition_predictability`: top-1 accuracy against always guessing
    the most frequent expert, and the normalised mutual information).
    """
    if isinstance(transitions, Mapping):
        pairs = [((str(a), str(b)), _to_numpy(c, f"transitions[{(a, b)!r}]")) for (a, b), c in transitions.items()]
    else:
        pairs = [(("layer l", "layer l+1"), _to_numpy(transitions, "transitions"))]
    if not pairs:
        raise ValueError("transitions must hold at least one (layer, next layer) count matrix")
    layers: List[str] = []
    sizes: Dict[str, int] = {}
    for (a, b), c in pairs:
        if c.ndim != 2 or (c < 0).any():
            raise ValueError(f"transitions {a} -> {b} must be a non-negative [E1, E2] matrix, got shape {c.shape}")
        for name, e in ((a, c.shape[0]), (b, c.shape[1])):
            if name not in sizes:
                layers.append(name)
                sizes[name] = e
            elif sizes[name] != e:
                raise ValueError(f"layer {name!r} has {sizes[name]} experts in one pair and {e} in another")
    offset, start = {}, 0
    for name in layers:
        offset[name], start = start, start + sizes[name]
    labels = [f"{name} e{e}" for name in layers for e in range(sizes[name])]
    colors = [c for name in layers for c in expert_colors(sizes[name])]
    src, dst, val, link_colors, parts = [], [], [], [], []
    for (a, b), c in pairs:
        total = float(c.sum())
        for i, j in zip(*np.nonzero(c)):
            if total > 0 and c[i, j] / total >= min_share:
                src.append(offset[a] + int(i))
                dst.append(offset[b] + int(j))
                val.append(float(c[i, j]))
                link_colors.append(colors[offset[a] + int(i)])
        p = transition_predictability(c)
        if p["tokens"] > 0:
            parts.append(f"{a}→{b}: top-1 {p['top1_accuracy']:.0%} (vs {p['baseline_accuracy']:.0%}), "
                         f"NMI {p['normalized_mi']:.2f}")
    sankey = go.Sankey(
        arrangement="snap",
        node=dict(label=labels, color=colors, pad=8, thickness=14,
                  hovertemplate="%{label}: %{value:.0f} tokens<extra></extra>"),
        link=dict(source=src, target=dst, value=val, color=[_fade(c) for c in link_colors],
                  hovertemplate="%{source.label} → %{target.label}: %{value:.0f} tokens<extra></extra>"),
    )
    fig = go.Figure(sankey)
    head = title or "Cross-layer expert paths (each token's top expert, layer to layer)"
    _style(fig, head + ("<br><sup>" + "; ".join(parts) + "</sup>" if parts else ""),
           height=max(360, 26 * max(sizes.values()) + 140))
    return fig


def _fade(color: str, alpha: float = 0.35) -> str:
    """``"#rrggbb"`` (or ``"rgb(r, g, b)"``) as a translucent ``"rgba(...)"`` for Sankey links."""
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    elif color.startswith("rgb(") and color.endswith(")"):
        r, g, b = (int(float(v)) for v in color[4:-1].split(","))
    else:
        return color
    return f"rgba({r},{g},{b},{alpha})"
