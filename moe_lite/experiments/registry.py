"""The registry: every experiment's declaration, in the order the results page shows them, and the
runner of several at once that writes their JSON and HTML.

Adding an experiment: declare it (:class:`~moe_lite.experiments.runner.Experiment`) in its own module
and add it to :data:`EXPERIMENTS` below (or :func:`register` it at run time).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import plotly
import plotly.io as pio

from .adapt import ADAPT
from .core import ExperimentResult, Pairing, RunContext, UsageError, check_output_folder, resolve_size
from .diffusion import DIT, RACE
from .dynamic import DYNAMIC
from .runner import Experiment, UnknownVariant, check_device, run
from .sequence import SEQUENCE
from .vimoe import VIMOE, VIMOE_GRID
from .zoo import BALANCE_EXPERIMENT, ZOO_EXPERIMENT

__all__ = ["EXPERIMENTS", "UnknownVariant", "UsageError", "check_seeds", "check_variants", "pairing_of", "register",
           "record_figures", "run_experiments", "write_figures"]

#: name -> declaration; this order is the order of ``list``, of ``run all`` and of the results page
EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in [
    RACE, DIT, DYNAMIC, SEQUENCE, VIMOE_GRID, VIMOE, ADAPT, ZOO_EXPERIMENT, BALANCE_EXPERIMENT]}


def register(experiment: Experiment, registry: Optional[Dict[str, Experiment]] = None) -> Experiment:
    """Add ``experiment`` to ``registry`` (default :data:`EXPERIMENTS`), last; returns it."""
    target = EXPERIMENTS if registry is None else registry
    if experiment.name in target and target[experiment.name] is not experiment:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered")
    target[experiment.name] = experiment
    return experiment


def pairing_of(name: str) -> Optional[Pairing]:
    """The paired-comparison spec of experiment ``name`` (None when it has none or is unknown)."""
    experiment = EXPERIMENTS.get(name)
    return experiment.pairing if experiment is not None else None


def record_figures(record: Dict[str, Any]) -> Dict[str, Any]:
    """The summary figures of one run's JSON record (``{}`` for experiments without any)."""
    experiment = EXPERIMENTS.get(record.get("name", ""))
    return experiment.figures(record) if experiment is not None and experiment.figures is not None else {}


def write_figures(record: Dict[str, Any], folder: str | Path, fmt: str = "svg") -> Dict[str, Path]:
    """Write ``record``'s figures as ``<folder>/<experiment>-<figure>.<fmt>``; returns name -> path.

    ``fmt``: ``svg`` or ``png`` (both need ``kaleido``) or ``html`` (plotly.js from its CDN).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    with _local_plotlyjs():
        for name, fig in record_figures(record).items():
            path = folder / f"{record['name']}-{name}.{fmt}"
            if fmt == "html":
                fig.write_html(path, include_plotlyjs="cdn")
            else:
                fig.write_image(path)
            paths[name] = path
    return paths


@contextlib.contextmanager
def _local_plotlyjs() -> Iterator[None]:
    """While open, kaleido (1.x) renders with the plotly.js that ships inside the plotly package.
    Without it kaleido fetches plotly.js from a CDN and, offline, fails with "kaleido_scopes is not
    defined". plotly's setting is restored on exit; a value the user set is left alone."""
    defaults = getattr(pio, "defaults", None)
    bundled = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if defaults is None or not hasattr(defaults, "plotlyjs") or defaults.plotlyjs or not bundled.is_file():
        yield
        return
    previous, defaults.plotlyjs = defaults.plotlyjs, str(bundled)
    try:
        yield
    finally:
        defaults.plotlyjs = previous


#: seeds are 0 <= seed <= MAX_SEED: what every RNG they reach accepts (torch, NumPy's legacy
#: ``RandomState`` takes < 2**32), with room for ``seed + offset`` in a 64-bit torch seed
MAX_SEED = 2**32 - 1


def check_seeds(seeds: Optional[Sequence[int]]) -> None:
    """:class:`UsageError` naming the first seed that is not an int in ``[0, MAX_SEED]``."""
    for seed in seeds or ():
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UsageError(f"seed {seed!r}: seeds are integers from 0 to {MAX_SEED} (2**32 - 1)")


def check_names(names: Sequence[str]) -> None:
    """:class:`UsageError` naming the experiments that are not registered."""
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise UsageError(f"unknown experiment(s): {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)} "
                         f"(the command line also takes 'all')")


def check_variants(names: Sequence[str], variants: Optional[Sequence[str]]) -> None:
    """:class:`UnknownVariant` when ``variants`` names something one of the experiments lacks."""
    if variants is not None:
        for name in names:
            EXPERIMENTS[name].select(variants)


def run_experiments(names: Sequence[str], size: Optional[str] = None, out: str | Path = "results",
                    data: str = "auto", seeds: Optional[Sequence[int]] = None, device: str = "auto",
                    progress: bool = True, variants: Optional[Sequence[str]] = None,
                    settings: Any = None) -> List[ExperimentResult]:
    """Run the named experiments in one process (data loaded once); save each as soon as it ends.
    ``variants``: run only these variants of each experiment. ``settings``: a
    :class:`moe_lite.settings.Settings` in place of ``size``, ``data`` and ``device``.

    Every argument, and that ``out`` is a folder that can be written, is checked before any data
    is loaded or model trained: :class:`UsageError` naming the one at fault.
    """
    check_names(names)
    check_variants(names, variants)
    check_seeds(seeds)
    if settings is None:
        try:
            resolve_size(size)
        except ValueError as err:
            raise UsageError(str(err)) from None
        check_device(device)
    check_output_folder(out, f"out {out}")
    if settings is not None:
        ctx = RunContext.create(seeds=seeds, progress=progress, settings=settings)
    else:
        ctx = RunContext.create(size, seeds, device, data, progress)
    results = []
    for name in names:
        print(f"== {name} ({ctx.size}, {ctx.device}) ==", flush=True)
        result = run(EXPERIMENTS[name], ctx, variants=variants)
        if variants is not None:
            result.config["selected_variants"] = list(variants)
        json_path, html_path = result.save(out)
        print(f"== {name}: {result.wall_time_s:.1f} s -> {json_path}, {html_path}", flush=True)
        results.append(result)
    return results
