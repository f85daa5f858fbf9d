"""ipywidgets controls around the :mod:`moe_lite.viz` figures.

Two display modes, same API:

* ``"widget"``: a plotly ``go.FigureWidget`` (needs ``anywidget``) updated in place inside
  ``fig.batch_update()``: the plot is patched trace by trace, never re-rendered, so no flicker.
* ``"static"``: where a ``FigureWidget`` cannot render (no anywidget; Colab without its custom widget
  manager), an ``ipywidgets.Output`` into which a plain ``go.Figure`` is redrawn on every change.

The mode is picked by, in order: a ``mode=`` constructor argument (a notebook passes
``mode=nb.figure_mode``, which ``notebook.setup()`` resolved from ``Settings.static_figures``, i.e. the
environment variable ``MOE_LITE_STATIC_FIGURES``: ``1`` forces static, ``0`` forces the widget, e.g. in
Colab after ``google.colab.output.enable_custom_widget_manager()``); else :func:`can_use_figurewidget`.

Every explorer exposes ``.controls`` (name -> widget), ``.set(**values)`` (sets widget values from
code, firing the same observers a user would), ``.reset()`` (back to the values it was built with),
``.last_result`` (what the last callback computed), ``.figures`` (name -> :class:`LiveFigure`) and
``.display()``. A notebook follows each widget cell with a cell such as ``explorer.set(k=3); assert
explorer.last_result["experts_per_token"] == 3`` ending in ``explorer.reset()``, so headless runs
exercise the callbacks and the learner still finds the explorer as it was first shown.

Callbacks only run inference on cached inputs (under ``torch.no_grad()``); they never train.
"""
from __future__ import annotations

import html
import json
import math
import sys
from contextlib import contextmanager
from numbers import Real
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence

import plotly.graph_objects as go
import torch
from plotly.basedatatypes import BaseFigure
from torch import Tensor

from . import viz
from .routers import CAPACITY_KNOB, ROUTERS, Capacity, Knob, RouterSpec, make_router
from .routing import groups_per_token, routing_summary
from .settings import ENV_STATIC_FIGURES

try:  # ipywidgets is an optional (notebook) dependency; the module still imports without it
    import ipywidgets as widgets
except ImportError:  # pragma: no cover - exercised only where ipywidgets is missing
    widgets = None

__all__ = [
    "STATIC_ENV",
    "ROUTER_NAMES",
    "applicable_knobs",
    "can_use_figurewidget",
    "resolve_mode",
    "LiveFigure",
    "Explorer",
    "RouterExplorer",
    "ThresholdExplorer",
]

STATIC_ENV = ENV_STATIC_FIGURES  # read by moe_lite.settings (Settings.static_figures), never here
MODES = ("widget", "static")

# What the router explorer offers is read off the router classes' declarations
# (:class:`moe_lite.routers.Router`: ``needs``, ``knobs``, ``explorable``), so a router registered in
# :data:`moe_lite.routers.ROUTERS` shows up here with its sliders.
#: the explorer's own controls for these knobs (a groups dropdown of E's divisors, a top_groups slider
#: kept in its valid range, a threshold slider over the logits' range); any other knob gets a slider
#: built from its declaration
_BUILT_IN_KNOBS = ("k", "p", "capacity_factor", "groups", "top_groups", "threshold")
_GROUP_KNOBS = ("groups", "top_groups")


def router_names() -> tuple:
    """The routers the :class:`RouterExplorer` offers: every registered router it can build from logits
    alone (``explorable``, not needing the layer width), in registry order. (``ROUTER_NAMES`` reads it.)"""
    return tuple(name for name, cls in ROUTERS.items() if cls.explorable and "dim" not in cls.needs)


def __getattr__(name: str) -> Any:  # ROUTER_NAMES stays importable, and follows the registry
    if name == "ROUTER_NAMES":
        return router_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def router_knobs(router: str) -> tuple:
    """The :class:`~moe_lite.routers.Knob` s the explorer shows for ``router``: its declared knobs, then
    the capacity factor unless it takes one itself (any other router is wrapped in
    :class:`~moe_lite.routers.Capacity`; 0 = no limit)."""
    if router not in router_names():
        raise ValueError(f"unknown router {router!r}; choose from {router_names()}")
    knobs = tuple(ROUTERS[router].knobs)
    if not _takes_capacity(router):
        knobs += (CAPACITY_KNOB,)
    return knobs


def _takes_capacity(router: str) -> bool:
    """Whether ``router`` declares the capacity factor itself (Switch), instead of a Capacity wrapper."""
    return any(knob.name == CAPACITY_KNOB.name for knob in ROUTERS[router].knobs)


def applicable_knobs(router: str, phase: str) -> tuple:
    """The sliders ``router`` reads in ``phase`` (``"train"``/``"eval"``); the explorer disables the rest.
    A knob declared for one phase (Race: ``k`` in training, its ``threshold`` in eval) applies there only."""
    knobs = router_knobs(router)
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    return tuple(knob.name for knob in knobs if knob.applies(phase))


# ---- mode selection -----------------------------------------------------------------------------
def _require_ipywidgets() -> None:
    if widgets is None:
        raise ImportError("moe_lite.widgets needs ipywidgets: pip install 'moe_lite[notebooks]'")


def _forced_mode(static: Optional[bool]) -> Optional[str]:
    """``"static"`` / ``"widget"`` when ``static`` (``Settings.static_figures``) forces one, else None."""
    return None if static is None else "static" if static else "widget"


def _figurewidget_works() -> bool:
    """True when a ``go.FigureWidget`` can be created here (anywidget and ipywidgets importable)."""
    try:
        import anywidget  # noqa: F401

        _require_ipywidgets()
        go.FigureWidget().close()  # a probe: close its comm so no hidden model is left behind
    except Exception:  # any failure means: fall back to static figures
        return False
    return True


def can_use_figurewidget(static: Optional[bool] = None) -> bool:
    """Whether live ``FigureWidget`` plots should be used here.

    ``static``: ``Settings.static_figures`` (``MOE_LITE_STATIC_FIGURES``). False when ``static`` is
    True; in Colab unless ``static`` is False (Colab renders a FigureWidget only with its custom widget
    manager enabled); and wherever creating a ``go.FigureWidget`` fails (anywidget or ipywidgets missing).
    """
    forced = _forced_mode(static)
    if forced == "static":
        return False
    if forced is None and "google.colab" in sys.modules:
        return False
    return _figurewidget_works()


def resolve_mode(mode: Optional[str] = None, static: Optional[bool] = None) -> str:
    """The display mode to use: an explicit ``mode`` wins, else :func:`can_use_figurewidget` (given
    ``static``, ``Settings.static_figures``).

    Raises ValueError for an unknown mode and RuntimeError when ``"widget"`` is asked for but a
    ``FigureWidget`` cannot be created.
    """
    if mode is None:
        return "widget" if can_use_figurewidget(static) else "static"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    if mode == "widget" and not _figurewidget_works():
        raise RuntimeError("mode='widget' needs plotly's FigureWidget (pip install anywidget ipywidgets)")
    return mode


# ---- one live figure ----------------------------------------------------------------------------
def _as_figure(fig: Any) -> go.Figure:
    """A fresh ``go.Figure`` from a Figure, a FigureWidget, or a figure dict ``{"data", "layout"}``."""
    if fig is None:
        return go.Figure()
    if isinstance(fig, (BaseFigure, Mapping)):
        return go.Figure(fig)
    raise TypeError(f"expected a plotly figure or figure dict, got {type(fig).__name__}")


def _replace_props(obj: Any, new: Mapping[str, Any], keep: Sequence[str]) -> None:
    """Make ``obj`` (a trace or layout) hold exactly ``new``'s properties, except the ``keep`` keys."""
    for key in obj.to_plotly_json():
        if key not in new and key not in keep:
            obj[key] = None
    obj.update({k: v for k, v in new.items() if k not in keep}, overwrite=True)


def _update_in_place(target: go.FigureWidget, new: go.Figure) -> None:
    """Patch ``target`` to show ``new``: same traces are restyled, the layout relaid out, in one batch.

    When the trace count or types differ (a rare structural change) the traces are replaced first.
    """
    same = len(target.data) == len(new.data) and all(a.type == b.type for a, b in zip(target.data, new.data))
    if not same:
        target.data = ()
        target.add_traces(list(new.data))
    with target.batch_update():
        if same:
            for old, trace in zip(target.data, new.data):
                _replace_props(old, trace.to_plotly_json(), keep=("type", "uid"))
        _replace_props(target.layout, new.layout.to_plotly_json(), keep=("template",))


def _in_kernel() -> bool:
    """True inside a running Jupyter kernel (where ``Output`` captures ``display`` calls)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


class LiveFigure:
    """A plot that can be updated from a callback, as a ``FigureWidget`` or as a redrawn static figure.

    Attributes:
        mode: ``"widget"`` or ``"static"``.
        figure: the current figure: the same ``go.FigureWidget`` for its whole life in widget mode
            (patched in place), a new ``go.Figure`` after each update in static mode.
        output: the ``ipywidgets.Output`` the static figure is drawn into (None in widget mode).
        view: the widget to put in a layout (the FigureWidget or the Output).
        updates: how many times :meth:`update` ran.
    """

    def __init__(self, figure: Any = None, mode: Optional[str] = None) -> None:
        _require_ipywidgets()
        self.mode = resolve_mode(mode)
        self.updates = 0
        fig = _as_figure(figure)
        if self.mode == "widget":
            self.figure: Any = go.FigureWidget(fig)
            self.output = None
            self.view = self.figure
        else:
            self.figure = fig
            self.output = widgets.Output()
            self.view = self.output
            self._draw()

    def update(self, new: Any) -> None:
        """Show ``new`` (a Figure, FigureWidget or figure dict): in place in widget mode, redrawn otherwise."""
        fig = _as_figure(new)
        if self.mode == "widget":
            _update_in_place(self.figure, fig)
        else:
            self.figure = fig
            self._draw()
        self.updates += 1

    def _draw(self) -> None:
        """Redraw the static figure into the Output by replacing its ``outputs`` (one state update,
        no blank flash).

        In a kernel: the figure's mime bundle as the current plotly renderer makes it (its
        ``_repr_mimebundle_``: IPython's display would call plotly's ``_ipython_display_``, which
        shows the figure at once). Not ``with output: display(...)``: ipywidgets 7 (Colab's) leaves
        routing those messages into the Output to the front end, so a kernel without one (nbval, a
        script driving the notebook) gets the figure in whichever cell moved the slider. Headless
        (scripts, tests): the figure's plotly mime bundle, so the redraw can be checked without a
        front end.
        """
        if _in_kernel():
            bundle = self.figure._repr_mimebundle_()
            self.output.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)
        else:
            bundle = {
                "application/vnd.plotly.v1+json": json.loads(self.figure.to_json()),
                "text/plain": f"<plotly Figure: {self.figure.layout.title.text or ''}>",
            }
            self.output.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.view)


# ---- explorers ----------------------------------------------------------------------------------
def _option_values(widget: Any) -> Optional[list]:
    """The values a selection widget accepts (None for widgets without options)."""
    options = getattr(widget, "options", None)
    if options is None:
        return None
    return [o[1] if isinstance(o, tuple) and len(o) == 2 else o for o in options]


def _match_option(name: str, allowed: Sequence[Any], value: Any) -> Any:
    """The option equal to ``value`` (floats matched up to rounding), else ValueError."""
    if value in allowed:
        return allowed[list(allowed).index(value)]
    if isinstance(value, Real):
        for a in allowed:
            if isinstance(a, Real) and math.isclose(a, value, rel_tol=1e-9, abs_tol=1e-12):
                return a
    raise ValueError(f"{name}={value!r} is not one of the options {list(allowed)}")


def _coerce(name: str, widget: Any, value: Any) -> Any:
    """Check ``value`` against the widget's range or options; snap floats to a matching option."""
    allowed = _option_values(widget)
    if allowed is not None:
        return _match_option(name, allowed, value)
    lo, hi = getattr(widget, "min", None), getattr(widget, "max", None)
    if lo is not None and hi is not None and isinstance(value, Real) and not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is outside the slider range [{lo}, {hi}]")
    return value


def _default_readout(result: Mapping[str, Any]) -> str:
    """An HTML line of the scalar entries of a result."""
    items = [f"<b>{html.escape(str(k))}</b> {html.escape(viz._fmt(v))}" for k, v in result.items()
             if isinstance(v, (Real, str)) and not isinstance(v, bool)]
    return " &middot; ".join(items)


class Explorer:
    """Controls + a compute callback + live figures; the pattern every explorer follows.

    Args:
        controls: ``name -> ipywidgets value widget``; their current values are passed to ``compute``
            as keyword arguments.
        compute: ``compute(**values) -> dict``, cheap inference only (run under ``torch.no_grad()``).
        figures: ``name -> builder(result) -> go.Figure``, each shown as a :class:`LiveFigure`.
        readout: ``readout(result) -> HTML str`` for the status line (default: the scalar entries).
        mode: ``"widget"``, ``"static"`` or None (see :func:`resolve_mode`).
        title: optional heading above the controls.

    On any control change the explorer recomputes, updates every figure and the readout, and
    stores the result in ``last_result``. A failing callback leaves the figures as they were,
    shows the error in the readout and stores ``{"error": ...}``; :meth:`set` then raises.
    """

    def __init__(self, controls: Mapping[str, Any], compute: Callable[..., Mapping[str, Any]],
                 figures: Optional[Mapping[str, Callable[[Mapping[str, Any]], go.Figure]]] = None,
                 readout: Optional[Callable[[Mapping[str, Any]], str]] = None,
                 mode: Optional[str] = None, title: Optional[str] = None) -> None:
        _require_ipywidgets()
        if not controls:
            raise ValueError("an explorer needs at least one control")
        self.controls: Dict[str, Any] = dict(controls)
        self.mode = resolve_mode(mode)
        self.title = title
        self.calls = 0
        self.last_error: Optional[BaseException] = None
        self._compute = compute
        self._builders = dict(figures or {})
        self._readout = readout or _default_readout
        self._holding = False
        self._dirty = False
        self.status = widgets.HTML()
        self.last_result: Dict[str, Any] = self._run_compute()
        self.figures: Dict[str, LiveFigure] = {
            name: LiveFigure(build(self.last_result), mode=self.mode) for name, build in self._builders.items()
        }
        self.status.value = self._readout(self.last_result)
        self._box = None
        self._start = self.values  # what the learner finds; reset() returns here
        for widget in self.controls.values():
            widget.observe(self._on_change, names="value")

    # -- state --------------------------------------------------------------------------------
    @property
    def values(self) -> Dict[str, Any]:
        """Current control values, ``name -> value``."""
        return {name: w.value for name, w in self.controls.items()}

    @property
    def figure(self) -> Any:
        """The first live figure's current figure (see :attr:`LiveFigure.figure`)."""
        if not self.figures:
            raise AttributeError("this explorer has no figures")
        return next(iter(self.figures.values())).figure

    def _run_compute(self) -> Dict[str, Any]:
        with torch.no_grad():
            result = self._compute(**self.values)
        if not isinstance(result, Mapping):
            raise TypeError(f"compute must return a dict, got {type(result).__name__}")
        self.calls += 1
        return dict(result)

    # -- callbacks -----------------------------------------------------------------------------
    def _on_change(self, change: Any) -> None:
        if self._holding:
            self._dirty = True
        else:
            self.refresh()

    def refresh(self) -> Dict[str, Any]:
        """Recompute from the current control values and update figures and readout."""
        try:
            result = self._run_compute()
            new_figs = {name: build(result) for name, build in self._builders.items()}
        except Exception as err:  # keep the UI alive; set() re-raises for code-driven checks
            self.last_error = err
            self.last_result = {"error": f"{type(err).__name__}: {err}", **self.values}
            self.status.value = f'<span style="color:#c00">{html.escape(self.last_result["error"])}</span>'
            return self.last_result
        for name, fig in new_figs.items():
            self.figures[name].update(fig)
        self.last_error = None
        self.last_result = result
        self.status.value = self._readout(result)
        return result

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Change several controls and recompute once at the end."""
        self._holding, self._dirty = True, False
        try:
            yield
        finally:
            self._holding = False
            if self._dirty:
                self.refresh()

    def set(self, **values: Any) -> Dict[str, Any]:
        """Set controls from code, e.g. ``explorer.set(k=3)``; observers fire as for a user.

        All values are checked first (unknown names, out-of-range or unknown options raise
        ValueError); the callback then runs once. Returns :attr:`last_result`; raises RuntimeError
        if the callback failed.
        """
        unknown = sorted(set(values) - set(self.controls))
        if unknown:
            raise ValueError(f"unknown control(s) {unknown}; controls: {sorted(self.controls)}")
        before = self.values
        with self.hold():
            try:
                self._assign(values)
            except ValueError:  # put back what was already assigned; the hold then recomputes once
                for name, v in before.items():
                    self.controls[name].value = v
                raise
        if "error" in self.last_result:
            raise RuntimeError(f"callback failed for {self.values}: {self.last_result['error']}") from self.last_error
        return self.last_result

    def _assign(self, values: Mapping[str, Any]) -> None:
        """Check every value against its control, then assign them (inside :meth:`set`'s hold)."""
        checked = {name: _coerce(name, self.controls[name], v) for name, v in values.items()}
        for name, v in checked.items():
            self.controls[name].value = v

    def reset(self) -> None:
        """Put every control back to its value when the explorer was built; recompute only if one moved.

        A notebook cell that drives the explorer from code ends with ``explorer.reset()``, so the
        learner finds it as it was first shown. Returns None (nothing to echo as the cell's result).
        """
        moved = {name: v for name, v in self._start.items() if self.controls[name].value != v}
        if moved:
            self.set(**moved)

    # -- display -------------------------------------------------------------------------------
    def display(self) -> Any:
        """The explorer as one ``ipywidgets.VBox``: controls, readout line, figures."""
        if self._box is None:
            head = [widgets.HTML(f"<h3>{html.escape(self.title)}</h3>")] if self.title else []
            row = widgets.Box(list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
            self._box = widgets.VBox(head + [row, self.status] + [f.view for f in self.figures.values()])
        return self._box

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.display())


# ---- router explorer ----------------------------------------------------------------------------
def _describe_routing(result: Mapping[str, Any]) -> str:
    """Readout line of a RouterExplorer result."""
    params = ", ".join(f"{k}={viz._fmt(v)}" for k, v in result.get("params", {}).items())
    return (f"<b>{html.escape(result['router'])}</b> ({html.escape(params)}, {result['phase']}): "
            f"{result['experts_per_token']:.2f} experts/token &middot; "
            f"dropped {result['dropped_fraction']:.1%} &middot; load CV {result['load_cv']:.2f} &middot; "
            f"MaxVio {result['max_vio']:.2f} &middot; dead experts {result['dead_experts']:.0f} &middot; "
            f"combination usage {result['combination_usage']:.0f}%"
            + (f" &middot; groups/token {result['groups_per_token']:.2f}" if "groups_per_token" in result else ""))


def _set_inference_knob(router: Any, knob: Knob, value: Any) -> None:
    """Move a knob that is not a constructor keyword (Race's eval threshold) on a built router,
    through ``set_inference_threshold``."""
    setter = getattr(router, "set_inference_threshold", None)
    if not callable(setter):
        raise AttributeError(f"{type(router).__name__} has no set_inference_threshold(value) for its {knob.name}")
    setter(value)


def _knob_slider(knob: Knob, e: int, lo: float, hi: float, style: Mapping[str, str]) -> Any:
    """A slider from a knob's declaration: ``"E"`` is the number of experts, None the logits' range."""
    def bound(value: Any, data: float) -> Any:
        if value is None:
            return data
        if value == "E":
            return e
        if isinstance(value, str):
            raise ValueError(f"knob {knob.name!r}: the explorer knows the bounds 'E' and None, got {value!r}")
        return value

    low, high = bound(knob.low, lo), bound(knob.high, hi)
    value = knob.default if knob.default is not None else low
    integral = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, value, knob.step or 1))
    step = {} if knob.step is None else {"step": knob.step}
    slider = widgets.IntSlider if integral else widgets.FloatSlider
    return slider(value=value, min=low, max=high, description=knob.title, style=style, **step)


class RouterExplorer(Explorer):
    """Route the SAME logits with any router and see where every token goes.

    Args:
        logits: float ``[B, L, E]``, e.g. a trained gate's output on a cached batch.
        x: optional ``[B, L, D]`` layer input, passed to routers that use it.
        routers: router names to offer (default :func:`router_names`: every registered router the
            explorer can build from logits).
        router: initial router; k, p, capacity_factor, groups, top_groups: initial control values
            (``capacity_factor=0``: no capacity limit; ``groups=1``: no group limit).
        max_tokens: rows shown in the heatmap.
        mode: display mode, see :func:`resolve_mode`.
        make_router: router factory ``(name, **kwargs) -> Router`` (default
            ``moe_lite.routers.make_router``).

    Controls: ``router`` (dropdown), ``phase`` (``"train"``/``"eval"``), ``k``, ``p``,
    ``capacity_factor``, ``groups``, ``top_groups``, ``threshold``, a slider for any other knob an
    offered router declares (:class:`~moe_lite.routers.Knob`), and ``sample``. Ranges and labels come
    from the routers' knob declarations. Each router reads only its own controls in the chosen phase
    (:func:`applicable_knobs`; the others are disabled); a knob that is not a constructor keyword
    (Race's eval threshold) is set on the built router with ``set_inference_threshold``.
    Routers are built fresh on every change with ``moe_lite.routers.make_router`` and put in the
    chosen phase. ``race`` in ``"train"`` picks the batch-level top ``K = round(B*L*k)`` (so it
    needs no history); in ``"eval"`` its threshold is the ``threshold`` slider.

    ``capacity_factor`` (0 = off) caps every router: Switch takes it as its own factor (at 0 it
    gets ``E``, so no token can be dropped), any other router is wrapped in
    ``moe_lite.routers.Capacity(router, capacity_factor)``. ``groups`` offers only the divisors
    of E (1 = no limit); ``top_groups`` is kept within ``[ceil(k / (E / groups)), groups]`` as
    ``k`` and ``groups`` move, so the kept groups always hold at least k experts.

    Figures: ``"assignment"`` (token x expert weights of one sample) and ``"load"`` (tokens per
    expert). ``last_result`` holds the router, phase, params (the knobs in use), every
    :func:`~moe_lite.routing.routing_summary` entry, ``tokens_per_expert`` (list), and with a
    group-limited router and ``groups > 1`` ``groups_per_token`` (mean distinct groups per token,
    :func:`~moe_lite.routing.groups_per_token`).
    """

    def __init__(self, logits: Tensor, x: Optional[Tensor] = None, routers: Optional[Sequence[str]] = None,
                 router: Optional[str] = None, k: int = 2, p: float = 0.5, capacity_factor: float = 0.0,
                 groups: int = 1, top_groups: int = 1, phase: str = "train", max_tokens: Optional[int] = 64, mode: Optional[str] = None,
                 title: Optional[str] = "Router explorer",
                 make_router: Optional[Callable[..., Any]] = None) -> None:
        _require_ipywidgets()
        if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
            raise ValueError(f"logits must be a float [B, L, E] tensor, got {getattr(logits, 'shape', type(logits))}")
        if not torch.isfinite(logits).all():
            raise ValueError("logits must be finite")
        if x is not None and (not isinstance(x, Tensor) or x.dim() != 3 or x.shape[:2] != logits.shape[:2]):
            raise ValueError(f"x must be a [B, L, D] tensor matching logits {tuple(logits.shape[:2])}")
        routers = router_names() if routers is None else tuple(routers)
        unknown = [r for r in routers if r not in router_names()]
        if unknown or not routers:
            raise ValueError(f"unknown router(s) {unknown}; choose from {router_names()}")
        if phase not in ("train", "eval"):
            raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
        self.logits = logits.detach()
        self.x = None if x is None else x.detach()
        self.max_tokens = max_tokens
        self.make_router = make_router
        self.routing = None
        b, _, e = logits.shape
        lo, hi = float(self.logits.min()), float(self.logits.max())
        flat = self.logits.reshape(-1).sort(descending=True).values
        divisors = [g for g in range(1, e + 1) if e % g == 0]
        if groups not in divisors:
            raise ValueError(f"groups={groups!r} must divide the E={e} experts; choose from {divisors}")
        k = int(min(max(k, 1), e))
        lowest = -(-k * groups // e)  # ceil(k / (E / groups)): fewer kept groups hold < k experts
        if not (isinstance(top_groups, int) and lowest <= top_groups <= groups):
            raise ValueError(f"top_groups={top_groups!r} must be in [{lowest}, {groups}] for groups={groups}, "
                             f"k={k}, E={e} (the kept groups must hold at least k experts)")
        default_thr = float(flat[min(flat.numel() - 1, max(0, round(flat.numel() * min(k, e) / e) - 1))])
        step = max((hi - lo) / 200, 1e-6)
        style = {"description_width": "initial"}
        # each knob name's declaration: the offered routers' first, then any explorable router's
        knob = {}
        for name in routers + tuple(r for r in router_names() if r not in routers):
            for declared in router_knobs(name):
                knob.setdefault(declared.name, declared)
        k_knob, p_knob, cap = knob["k"], knob["p"], knob["capacity_factor"]
        controls = {
            "router": widgets.Dropdown(options=list(routers), value=router or routers[0], description="router"),
            "phase": widgets.ToggleButtons(options=["train", "eval"], value=phase, description="phase"),
            "k": widgets.IntSlider(value=k, min=k_knob.low, max=e if k_knob.high == "E" else k_knob.high,
                                   description=k_knob.title, style=style),
            "p": widgets.FloatSlider(value=p, min=p_knob.low, max=p_knob.high, step=p_knob.step,
                                     description=p_knob.title, style=style),
            "capacity_factor": widgets.FloatSlider(value=capacity_factor, min=cap.low, max=cap.high, step=cap.step,
                                                   description=cap.title, style=style),
            "groups": widgets.Dropdown(options=[("1 (no limit)" if g == 1 else str(g), g) for g in divisors],
                                       value=groups, description=knob["groups"].title, style=style),
            "top_groups": widgets.IntSlider(value=top_groups, min=lowest, max=groups,
                                            description=knob["top_groups"].title, style=style),
            "threshold": widgets.FloatSlider(value=min(max(default_thr, lo), hi), min=lo, max=hi, step=step,
                                             readout_format=".3f", description=knob["threshold"].title, style=style),
        }
        offered = {declared.name for name in routers for declared in router_knobs(name)}
        for name, declared in knob.items():  # the other knobs of the offered routers
            if name not in controls and name in offered:
                controls[name] = _knob_slider(declared, e, lo, hi, style)
        self.knob_names = tuple(name for name in controls if name not in ("router", "phase"))
        controls["sample"] = widgets.IntSlider(value=0, min=0, max=b - 1, description="sample", disabled=b == 1)
        # before the explorer's own observers, so top_groups is in range when the router is rebuilt
        for name in ("k", "groups"):
            controls[name].observe(lambda change: self._fit_top_groups(controls), names="value")
        super().__init__(controls, self._route,
                         figures={"assignment": self._assignment_figure,
                                  "load": lambda r: viz.tokens_per_expert_bar(self.routing)},
                         readout=_describe_routing, mode=mode, title=title)
        self._grey_out()

    def _fit_top_groups(self, controls: Mapping[str, Any]) -> None:
        """Keep top_groups within ``[ceil(k / (E / groups)), groups]``: only valid pairs can be picked."""
        e = self.logits.shape[-1]
        groups, top = controls["groups"].value, controls["top_groups"]
        top.min = 1  # widen first: min may never exceed max on the way (out-of-range values clamp)
        top.max = groups
        top.min = -(-controls["k"].value * groups // e)

    def _assign(self, values: Mapping[str, Any]) -> None:
        """k and groups first: they set the range a new top_groups is checked against."""
        first = {name: values[name] for name in ("k", "groups") if name in values}
        super()._assign(first)
        super()._assign({name: v for name, v in values.items() if name not in first})

    def _knobs_in_use(self, router: str, phase: str, values: Mapping[str, Any]) -> Dict[str, Any]:
        """The knob values the routing used: applicable ones, less those at their ``off`` value
        (capacity 0; groups 1, which takes top_groups with it)."""
        knobs = [knob for knob in router_knobs(router) if knob.applies(phase)]
        used = {knob.name: values[knob.name] for knob in knobs}
        for knob in knobs:
            if knob.off is not None and used.get(knob.name) == knob.off:
                del used[knob.name]
                if knob.name == "groups":
                    used.pop("top_groups", None)
        return used

    def _grey_out(self, change: Any = None) -> None:
        """Disable the controls the selected router does not read in the selected phase."""
        knobs = applicable_knobs(self.controls["router"].value, self.controls["phase"].value)
        for name in self.knob_names:
            self.controls[name].disabled = name not in knobs
        if self.controls["groups"].value == 1:  # one group: nothing to keep or drop
            self.controls["top_groups"].disabled = True

    def router_kwargs(self, name: str, **values: Any) -> Dict[str, Any]:
        """Constructor keyword arguments of router ``name`` given the control ``values``.

        Switch gets ``capacity_factor`` (0 = off: ``E``, where no token can be dropped); the other
        routers get it through :meth:`build_router`'s ``Capacity`` wrapper. ``groups`` / ``top_groups``
        are passed only when ``groups > 1``, so ``groups=1`` builds exactly the unlimited router.
        """
        e = self.logits.shape[-1]
        spec = RouterSpec(name)
        kw: Dict[str, Any] = {}
        for knob in ROUTERS[name].knobs:
            if not spec.accepts(knob.name) or knob.name in _GROUP_KNOBS:
                continue  # set after building (set_inference_threshold), or the groups pair below
            if knob.name == CAPACITY_KNOB.name:
                kw[knob.name] = values[knob.name] or float(e)  # off: E, where nothing can drop
            elif knob.off is None or values[knob.name] != knob.off:
                kw[knob.name] = values[knob.name]
        groups = [knob for knob in ROUTERS[name].knobs if knob.name == "groups"]
        if groups and values["groups"] != groups[0].off:
            kw.update(groups=values["groups"], top_groups=values["top_groups"])
        facts = {"num_experts": e, "dim": None if self.x is None else self.x.shape[-1]}
        for need in ROUTERS[name].needs_for(kw):
            if facts[need] is not None:
                kw[need] = facts[need]
        return kw

    def build_router(self, name: str, phase: str, **values: Any) -> Any:
        """A fresh router ``name`` in ``phase``; Race in eval gets the threshold slider's value;
        with ``capacity_factor > 0`` any router but Switch comes wrapped in ``Capacity``."""
        factory = self.make_router or make_router
        router = factory(name, **self.router_kwargs(name, **values))
        router.train(phase == "train")
        spec = RouterSpec(name)
        for knob in ROUTERS[name].knobs:  # knobs that move on a built router (Race's eval threshold)
            if knob.applies(phase) and not spec.accepts(knob.name):
                _set_inference_knob(router, knob, float(values[knob.name]))
        if not _takes_capacity(name) and values.get("capacity_factor", 0) > 0:
            router = Capacity(router, float(values["capacity_factor"])).train(phase == "train")
        return router

    def _route(self, router: str, phase: str, sample: int, **values: Any) -> Dict[str, Any]:
        """The callback: route the cached logits, keep the Routing, summarise it."""
        module = self.build_router(router, phase, **values)
        kwargs = {"x": self.x} if self.x is not None else {}
        routing = module(self.logits, **kwargs)
        self.routing = routing
        self._grey_out()
        params = self._knobs_in_use(router, phase, values)  # what the routing used
        if "threshold" in params:
            params["threshold"] = float(params["threshold"])
        extra = {}
        if "groups" in params:
            extra["groups_per_token"] = float(groups_per_token(routing, params["groups"]).float().mean())
        return {
            "router": router,
            "phase": phase,
            "sample": sample,
            "params": params,
            **routing_summary(routing),
            "tokens_per_expert": [int(t) for t in routing.tokens_per_expert],
            "num_assignments": routing.num_assignments,
            **extra,
        }

    def _assignment_figure(self, result: Mapping[str, Any]) -> go.Figure:
        title = f"{result['router']}: combine weights of sample {result['sample']}"
        return viz.assignment_heatmap(self.routing, sample=result["sample"], max_tokens=self.max_tokens,
                                      title=title)


# ---- threshold explorer -------------------------------------------------------------------------
class ThresholdExplorer(Explorer):
    """A slider over a threshold (top-p, Race's threshold...) and the trade-off it buys.

    Args:
        evaluate_fn: ``evaluate_fn(value) -> dict`` of floats; cheap, inference only (e.g. set the
            model's top-p, then accuracy and experts per token on a cached batch). Never trains.
        values: the threshold values the slider offers (sorted ascending).
        name: the control's name (``explorer.set(p=0.7)`` when ``name="p"``).
        x_key, y_key: the result keys drawn as the trade-off's x and y.
        initial: the starting value (default: the middle one).
        evaluate_all: evaluate every value at once, so the full curve shows from the start.
        figures: extra live figures, ``name -> builder(result) -> go.Figure``, drawn after the
            trade-off from the current ``last_result`` (e.g. the samples generated at this value).

    Results are cached per value (``.cache``), so moving the slider back costs nothing.
    ``last_result`` is the evaluated dict plus ``name: value``, ``cached`` and ``evaluated`` (the
    number of values evaluated so far). Figure ``"tradeoff"``: y vs x over evaluated values,
    the current one ringed; then the ``figures`` given.
    """

    def __init__(self, evaluate_fn: Callable[[float], Mapping[str, Any]], values: Sequence[float],
                 name: str = "threshold", x_key: str = "experts_per_token", y_key: str = "accuracy",
                 x_title: Optional[str] = None, y_title: Optional[str] = None, initial: Optional[float] = None,
                 evaluate_all: bool = False, mode: Optional[str] = None, title: Optional[str] = None,
                 figures: Optional[Mapping[str, Callable[[Mapping[str, Any]], go.Figure]]] = None) -> None:
        _require_ipywidgets()
        if not callable(evaluate_fn):
            raise TypeError("evaluate_fn must be callable: value -> dict")
        vals = [float(v.item() if isinstance(v, Tensor) else v) for v in values]
        if not vals or not all(math.isfinite(v) for v in vals):
            raise ValueError("values must be a non-empty sequence of finite numbers")
        vals = sorted(set(vals))
        if not name.isidentifier():
            raise ValueError(f"name must be a Python identifier, got {name!r}")
        self.evaluate_fn = evaluate_fn
        self.name, self.x_key, self.y_key = name, x_key, y_key
        self.x_title, self.y_title = x_title or viz._pretty(x_key), y_title or viz._pretty(y_key)
        self.cache: Dict[float, Dict[str, Any]] = {}
        if evaluate_all:
            for v in vals:
                self._evaluate(v)
        start = vals[len(vals) // 2] if initial is None else _match_option(name, vals, initial)
        slider = widgets.SelectionSlider(options=[(f"{v:g}", v) for v in vals], value=start, description=name,
                                         continuous_update=False)
        if figures and "tradeoff" in figures:
            raise ValueError("figures must not replace the built-in 'tradeoff' figure")
        super().__init__({name: slider}, self._lookup,
                         figures={"tradeoff": self._tradeoff_figure, **(figures or {})}, mode=mode, title=title)

    def _evaluate(self, value: float) -> Dict[str, Any]:
        """Call ``evaluate_fn`` once for ``value`` (no grad) and cache its checked result."""
        with torch.no_grad():
            result = self.evaluate_fn(value)
        if not isinstance(result, Mapping):
            raise TypeError(f"evaluate_fn must return a dict, got {type(result).__name__}")
        for key in (self.x_key, self.y_key):
            if not viz._is_number(result.get(key)):
                raise ValueError(f"evaluate_fn({value:g}) must return a finite number under {key!r}: {dict(result)}")
        clean = {k: viz._as_float(v) if isinstance(v, Tensor) and v.numel() == 1 else v for k, v in result.items()}
        self.cache[value] = clean
        return clean

    def _lookup(self, **values: Any) -> Dict[str, Any]:
        """The callback: a cached result, or one fresh evaluation."""
        value = values[self.name]
        cached = value in self.cache
        result = self.cache[value] if cached else self._evaluate(value)
        return {**result, self.name: value, "cached": cached, "evaluated": len(self.cache)}

    def _tradeoff_figure(self, result: Mapping[str, Any]) -> go.Figure:
        order = sorted(self.cache)
        xs = [float(self.cache[v][self.x_key]) for v in order]
        ys = [float(self.cache[v][self.y_key]) for v in order]
        labels = [f"{self.name}={v:g}" for v in order]
        current = order.index(result[self.name])
        return viz.tradeoff_curve(xs, ys, labels, self.x_title, self.y_title, highlight=current,
                                  title=f"{self.y_title} vs {self.x_title} over {self.name}")
