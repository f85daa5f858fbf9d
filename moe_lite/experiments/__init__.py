"""Named experiments at three sizes, shared by the notebooks and the CLI.

Each experiment is a function ``run_<name>(size=None, *, seeds=None, device="auto", data="auto",
progress=True) -> ExperimentResult``. The result holds every metric (JSON-ready), tables, plotly
figures and the trained models (for notebooks to keep exploring); :meth:`ExperimentResult.save`
writes ``<name>.json`` and a self-contained ``<name>.html``.

Sizes: ``smoke`` exercises the code in seconds (CI), ``quick`` gives a meaningful result on a
2-core CPU in a few minutes, ``full`` is for a GPU. The default size is ``$MOE_LITE_SIZE`` or quick.
"""
from .core import (
    DATA_CHOICES,
    SIZES,
    Experiment,
    ExperimentResult,
    RunContext,
    default_size,
)
from .registry import EXPERIMENTS, run_experiments
from .report import UsageError

__all__ = [
    "DATA_CHOICES",
    "SIZES",
    "EXPERIMENTS",
    "Experiment",
    "ExperimentResult",
    "RunContext",
    "default_size",
    "run_experiments",
    "UsageError",
]
