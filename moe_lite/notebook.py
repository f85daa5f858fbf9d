"""What the first cell of every notebook needs: where we run, at which size, and plots that render.

Usage (first code cell of a notebook)::

    from moe_lite.notebook import setup
    nb = setup()          # prints device, size and figure mode; returns a NotebookContext
    nb.size, nb.device    # "smoke" | "quick" | "gpu" | "full", torch.device
    nb.settings           # the resolved moe_lite.settings.Settings: pass it on (run_x(settings=nb.settings), ...)

The size comes from ``setup(size=...)``, else ``$MOE_LITE_SIZE`` (CI sets ``smoke``), else ``gpu`` on a
GPU and ``quick`` elsewhere (:meth:`Settings.resolve`). ``setup()`` never writes the environment: later
calls agree with it because the notebook passes ``nb.settings`` (or ``nb.size``) to them. Nothing here
trains or downloads anything.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .settings import ENV_PLOTLY_INLINE, ENV_SIZE, Settings
from .train import pick_device

#: Where the project lives. The Colab install cell (which runs before moe_lite is installed, so it holds
#: this URL as a literal) and the Colab/Binder badges must point here: tests/test_colab.py checks it.
REPOSITORY = "https://github.com/moe-lite/moe_lite"


def in_colab() -> bool:
    return "google.colab" in sys.modules


@dataclass(frozen=True)
class NotebookContext:
    """What :func:`setup` chose. ``settings`` is the one resolved :class:`Settings` (its ``size`` and
    ``device`` are the ones below); pass it to what the notebook calls next."""

    size: str
    device: torch.device
    colab: bool
    figure_mode: str  # "widget" (FigureWidget updated in place) or "static" (redrawn): pass as mode=
    settings: Optional[Settings] = None

    def __str__(self) -> str:
        return f"size={self.size}, device={self.device}, colab={self.colab}, figures={self.figure_mode}"


def choose_size(device: torch.device, size: Optional[str] = None) -> str:
    """``size`` if given, else ``$MOE_LITE_SIZE``, else ``gpu`` on CUDA and ``quick`` elsewhere (the
    rule of :meth:`Settings.resolve`). Writes nothing."""
    return Settings.resolve(size=size.strip().lower() if size else None,
                            device="cuda" if device.type == "cuda" else "cpu").size


SIZE_ENV = ENV_SIZE
#: ``1`` makes :func:`setup` (``Settings.plotly_inline``) have :func:`configure_plotly` also inline
#: plotly.js (once per notebook) for front ends that cannot draw plotly's JSON themselves: the classic
#: Notebook (< 7) and ``jupyter nbconvert --to html``.
INLINE_ENV = ENV_PLOTLY_INLINE
INLINE_RENDERER = "moe_lite_inline"


def configure_plotly(colab: bool, inline: bool = False) -> str:
    """Set plotly's default renderer so figures render offline; returns the renderer string.

    * Jupyter (default): ``"plotly_mimetype"``. The output is the figure's JSON alone, which
      JupyterLab, Notebook 7 and VS Code draw with the plotly.js their plotly extension bundles: no
      CDN, nothing to download, a few kB per figure in a saved notebook.
    * ``inline=True`` (:func:`setup` passes ``Settings.plotly_inline``, i.e. ``$MOE_LITE_PLOTLY_INLINE=1``):
      ``"plotly_mimetype+moe_lite_inline"``, which
      also embeds plotly.js (4 MB) once per kernel session, in the first figure's output, and gives
      each figure a small HTML copy drawn with it: for the classic Notebook and HTML exports opened
      offline. Only where needed: the committed notebooks never store it (notebooks/execute.py
      keeps only the JSON).
    * Colab: ``"colab"`` (Colab is online and draws HTML only).

    Never ``"notebook_connected"`` (plotly.js and MathJax from a CDN: blank offline) nor plain
    ``"notebook"`` by default (4 MB of plotly.js stored in every notebook).
    """
    # plotly is an optional (notebooks) dependency: imported when a notebook configures it
    import plotly.io as pio
    from plotly.io._base_renderers import NotebookRenderer

    class InlineRenderer(NotebookRenderer):
        """plotly's "notebook" renderer (plotly.js inlined once, on first use) minus its MathJax CDN tag."""

        def to_mimebundle(self, fig_dict):
            html = pio.to_html(fig_dict, config=self.config, include_plotlyjs=False, include_mathjax=False,
                               full_html=False, default_width="100%", default_height=525, validate=False)
            return {"text/html": html}

    if inline and INLINE_RENDERER not in pio.renderers:
        pio.renderers[INLINE_RENDERER] = InlineRenderer()
    renderer = "colab" if colab else f"plotly_mimetype+{INLINE_RENDERER}" if inline else "plotly_mimetype"
    pio.renderers.default = renderer
    return renderer


def setup(size: Optional[str] = None, device: str = "auto", threads: Optional[int] = None,
          verbose: bool = True, settings: Optional[Settings] = None) -> NotebookContext:
    """The notebook's edge: resolve the :class:`Settings` once (``size``/``device`` arguments, else
    the environment, see :mod:`moe_lite.settings`; or take ``settings`` as given), pick the device,
    configure plotly, say what was chosen, and return it all as a :class:`NotebookContext`
    (``nb.settings`` is the Settings, with ``device`` the one picked). Writes no environment variable.

    ``threads``: torch CPU threads. Default: 1 at smoke size (its tensors are tiny, and a second
    OpenMP thread mostly spins, 10x slower when the machine is busy), else torch's own choice.
    """
    # widgets needs ipywidgets and plotly (optional, notebook-only dependencies)
    from .widgets import resolve_mode

    if settings is None:
        settings = Settings.resolve(size=size.strip().lower() if size else None,
                                    device=None if device == "auto" else device)
    dev = pick_device(settings.device)
    settings = dataclasses.replace(settings, device=str(dev))  # later calls use the device picked here
    colab = in_colab()
    chosen = settings.size
    if threads is None and chosen == "smoke" and dev.type == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    configure_plotly(colab, inline=settings.plotly_inline)
    ctx = NotebookContext(size=chosen, device=dev, colab=colab,
                          figure_mode=resolve_mode(None, static=settings.static_figures), settings=settings)
    if verbose:
        print(f"moe_lite: {ctx}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    return ctx
