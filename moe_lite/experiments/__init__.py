"""Named experiments at four sizes, shared by the notebooks and the CLI.

Each experiment is a declaration (:class:`Experiment`: its sizes, variants, how one variant trains
for one seed, how the records are summarised, its figures and paired comparisons), registered in
:data:`EXPERIMENTS` (whose order is the results page's), and run by one runner, :func:`run`. The
functions ``run_<name>(size=None, *, seeds=None, device="auto", data="auto", progress=True,
variants=None, ...) -> ExperimentResult`` call it. The result holds every metric (JSON-ready),
named tables (``result.table("accuracy")``), plotly figures and the trained models (for notebooks
to keep exploring); :meth:`ExperimentResult.save` writes ``<name>.json`` and a self-contained
``<name>.html``.

Sizes: ``smoke`` exercises the code in seconds (CI), ``quick`` gives a meaningful result on a
2-core CPU in a few minutes, ``gpu`` and ``full`` are for a GPU. The default size is
``$MOE_LITE_SIZE`` or quick.
"""
from .adapt import run_adapt
from .core import (
    DATA_CHOICES,
    SIZES,
    ExperimentResult,
    Pairing,
    RunContext,
    UsageError,
    default_size,
)
from .diffusion import run_dit, run_race
from .dynamic import run_dynamic
from .registry import EXPERIMENTS, record_figures, register, run_experiments
from .runner import Experiment, Run, UnknownVariant, run
from .sequence import run_sequence
from .vimoe import run_vimoe, run_vimoe_grid
from .zoo import run_balance, run_zoo

__all__ = [
    "DATA_CHOICES",
    "SIZES",
    "EXPERIMENTS",
    "Experiment",
    "ExperimentResult",
    "Pairing",
    "Run",
    "RunContext",
    "UnknownVariant",
    "UsageError",
    "default_size",
    "record_figures",
    "register",
    "run",
    "run_experiments",
    "run_adapt",
    "run_balance",
    "run_dit",
    "run_dynamic",
    "run_race",
    "run_sequence",
    "run_vimoe",
    "run_vimoe_grid",
    "run_zoo",
]
