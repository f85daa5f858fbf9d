"""What the first cell of every notebook needs: where we run, at which size, and plots that render.

Usage (first code cell of a notebook)::

    from moe_lite.notebook import setup
    nb = setup()          # prints device, size, data source hint; returns a NotebookContext
    nb.size, nb.device    # "smoke" | "quick" | "gpu" | "full", torch.device

The size comes from ``$MOE_LITE_SIZE`` (CI sets ``smoke``), else ``quick`` on a CPU and ``gpu`` on a
GPU. Nothing here trains or downloads anything.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .experiments.core import SIZE_ENV, resolve_size
from .train import pick_device

#: Where the project lives. The Colab install cell (which runs before moe_lite is installed, so it holds
#: this URL as a literal) and the Colab/Binder badges must point here: tests/test_colab.py checks it.
REPOSITORY = "https://github.com/moe-lite/moe_lite"


def in_colab() -> bool:
    return "google.colab" in sys.modules


@dataclass(frozen=True)
class NotebookContext:
    size: str
    device: torch.device
    colab: bool
    figure_mode: str  # "widget" (FigureWidget updated in place) or "static" (redrawn)

    def __str__(self) -> str:
        return f"size={self.size}, device={self.device}, colab={self.colab}, figures={self.figure_mode}"


def choose_size(device: torch.device, size: Optional[str] = None) -> str:
    """``size`` if given, else ``$MOE_LITE_SIZE``, else ``gpu`` on CUDA and ``quick`` elsewhere."""
    size = size or os.environ.get(SIZE_ENV) or ("gpu" if device.type == "cuda" else "quick")
    size = resolve_size(size.strip().lower())
    os.environ[SIZE_ENV] = size  # experiments called without a size then agree with the notebook
    return size


#: ``1`` makes :func:`configure_plotly` also inline plotly.js (once per notebook) for front ends that
#: cannot draw plotly's JSON themselves: the classic Notebook (< 7) and ``jupyter nbconvert --to html``.
INLINE_ENV = "MOE_LITE_PLOTLY_INLINE"
INLINE_RENDERER = "moe_lite_inline"


def configure_plotly(colab: bool, inline: Optional[bool] = None) -> str:
    """Set plotly's default renderer so figures render offline; returns the renderer string.

    * Jupyter (default): ``"plotly_mimetype"``. The output is the figure's JSON alone, which
      JupyterLab, Notebook 7 and VS Code draw with the plotly.js their plotly extension bundles: no
      CDN, nothing to download, a few kB per figure in a saved notebook.
    * ``inline=True`` (or ``$MOE_LITE_PLOTLY_INLINE=1``): ``"plotly_mimetype+moe_lite_inline"``, which
      also embeds plotly.js (4 MB) once per kernel session, in the first figure's output, and gives
      each figure a small HTML copy drawn with it: for the classic Notebook and HTML exports opened
      offline. Only where needed: the committed notebooks never store it (notebooks/execute.py
      keeps only the JSON).
    * Colab: ``"colab"`` (Colab is online and draws HTML only).

    Never ``"notebook_connected"`` (plotly.js and MathJax from a CDN: blank offline) nor plain
    ``"notebook"`` by default (4 MB of plotly.js stored in every notebook).
    """
    import plotly.io as pio
    from plotly.io._base_renderers import NotebookRenderer

    class InlineRenderer(NotebookRenderer):
        """plotly's "notebook" renderer (plotly.js inlined once, on first use) minus its MathJax CDN tag."""

        def to_mimebundle(self, fig_dict):
            html = pio.to_html(fig_dict, config=self.config, include_plotlyjs=False, include_mathjax=False,
                               full_html=False, default_width="100%", default_height=525, validate=False)
            return {"text/html": html}

    if inline is None:
        inline = os.environ.get(INLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if inline and INLINE_RENDERER not in pio.renderers:
        pio.renderers[INLINE_RENDERER] = InlineRenderer()
    renderer = "colab" if colab else f"plotly_mimetype+{INLINE_RENDERER}" if inline else "plotly_mimetype"
    pio.renderers.default = renderer
    return renderer


def setup(size: Optional[str] = None, device: str = "auto", threads: Optional[int] = None,
          verbose: bool = True) -> NotebookContext:
    """Pick the device and size, configure plotly, and say what was chosen.

    ``threads``: torch CPU threads. Default: 1 at smoke size (its tensors are tiny, and a second
    OpenMP thread mostly spins, 10x slower when the machine is busy), else torch's own choice.
    """
    from .widgets import resolve_mode

    dev = pick_device(device)
    colab = in_colab()
    chosen = choose_size(dev, size)
    if threads is None and chosen == "smoke" and dev.type == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    configure_plotly(colab)
    ctx = NotebookContext(size=chosen, device=dev, colab=colab, figure_mode=resolve_mode(None))
    if verbose:
        print(f"moe_lite: {ctx}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    return ctx
