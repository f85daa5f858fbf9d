"""An experiment is a declaration (:class:`Experiment`); :func:`run` runs any of them.

The runner owns what every experiment shares: the run context (data, device, seeds, cache), timing,
the variants x seeds loop with a progress line, the paired comparisons against the baseline(s) and
the :class:`~moe_lite.experiments.core.ExperimentResult`. A declaration says only what is its own:

- ``prepare(run) -> config``: data splits, anything trained once for all variants (kept in
  ``run.state``); returns the result's JSON ``config``.
- ``train(variant_name, variant, seed, run) -> record``: one variant for one seed; a dict of numbers,
  optionally ``"model"`` and ``"figures"`` (kept from the first seed only).
- ``summarise(records, run)``: ``records[variant][seed]`` -> metrics, named tables
  (:meth:`Run.table`) and figures on ``run.result``.

Adding an experiment is one module with one declaration, registered in :mod:`.registry`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ..train import pick_device
from .core import ExperimentResult, Pairing, RunContext, Timer, UsageError, mean_std, paired_comparisons, provenance

__all__ = ["Experiment", "Run", "UnknownVariant", "run"]

#: one seed's record of one variant: numbers, and optionally "model" and "figures"
Record = Dict[str, Any]


class UnknownVariant(UsageError):
    """A ``variants`` selection names something an experiment does not have."""


@dataclass(frozen=True)
class Experiment:
    """One experiment, declared.

    ``variants``: ordered name -> what defines it (a config, a tuple of router settings, ...);
    ``default_variants``: what runs when none are chosen (None: all). ``options``: the experiment's
    own keyword arguments and their defaults (e.g. dynamic's ``p``), read as ``run.options``.
    ``figures``: summary figures from a saved JSON record (the results page); ``pairing``: which
    variants are compared with which baseline(s), per seed. ``data_source``: a fixed label for
    experiments that load no Fashion-MNIST (their ``context`` may key checkpoints differently).
    """

    name: str
    description: str
    sizes: Mapping[str, Any]
    variants: Mapping[str, Any]
    train: Callable[[str, Any, int, "Run"], Record]
    summarise: Callable[[Dict[str, Dict[int, Record]], "Run"], None]
    prepare: Optional[Callable[["Run"], Dict[str, Any]]] = None
    default_variants: Optional[Sequence[str]] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    figures: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    pairing: Optional[Pairing] = None
    data_source: Optional[str] = None
    context: Optional[type] = None

    def select(self, variants: Optional[Sequence[str]]) -> List[str]:
        """The variant names to run: ``variants`` (checked) or the defaults."""
        if variants is None:
            return list(self.default_variants if self.default_variants is not None else self.variants)
        chosen = list(variants)
        unknown = [v for v in chosen if v not in self.variants]
        if unknown:
            raise UnknownVariant(f"{self.name} has no variant(s) {unknown}; choose from {list(self.variants)}")
        if not chosen:
            raise UnknownVariant(f"{self.name}: choose at least one variant of {list(self.variants)}")
        return chosen


@dataclass
class Run:
    """One run of an experiment, handed to its ``prepare``, ``train`` and ``summarise``."""

    experiment: Experiment
    ctx: RunContext
    variants: List[str]
    options: Dict[str, Any]
    result: ExperimentResult
    #: what ``prepare`` made for every variant (data sets, a pretrained model, ...)
    state: Dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> Any:
        """This size's entry of the experiment's ``sizes``."""
        return self.experiment.sizes[self.ctx.size]

    @property
    def seeds(self) -> List[int]:
        return self.ctx.seeds

    def first_seed(self, seed: int) -> bool:
        """Whether ``seed`` is the one whose model and figures are kept."""
        return seed == self.ctx.seeds[0]

    def table(self, name: str, title: str, rows: Any) -> None:
        """Add the table ``name`` (a stable short name) under its human ``title``."""
        self.result.add_table(name, title, rows)

    @staticmethod
    def over_seeds(per_seed: Mapping[int, Record], key: str) -> Dict[str, Any]:
        """:func:`~moe_lite.experiments.core.mean_std` of ``record[key]`` over seeds, seed ids kept."""
        return mean_std([record[key] for record in per_seed.values()], seeds=list(per_seed))


def _context(ctx_or_settings: Any, settings: Any, size: Optional[str], seeds: Optional[Sequence[int]],
             device: str, data: str, progress: bool) -> RunContext:
    if isinstance(ctx_or_settings, RunContext):
        return ctx_or_settings
    settings = settings if settings is not None else ctx_or_settings
    if settings is not None:
        # moe_lite.settings.Settings (resolved at the CLI or notebook edge)
        return RunContext.create(seeds=seeds, progress=progress, settings=settings)
    return RunContext.create(size, seeds, device, data, progress)


def run(experiment: Experiment, ctx_or_settings: Any = None, *, settings: Any = None, size: Optional[str] = None,
        seeds: Optional[Sequence[int]] = None, device: str = "auto", data: str = "auto", progress: bool = True,
        variants: Optional[Sequence[str]] = None, ctx: Optional[RunContext] = None, shipped: bool = True,
        **options: Any) -> ExperimentResult:
    """Run ``experiment``: its chosen ``variants`` (default: its defaults) for every seed.

    The context is ``ctx`` (or a :class:`RunContext` given first), else one made from ``settings``
    (a :class:`moe_lite.settings.Settings`), else from ``size``, ``seeds``, ``device``, ``data``.
    ``shipped=False``: train the models that ship with moe_lite instead of loading them (a copy of
    the context with ``shipped`` off; the user's own cache is still read). ``options``: the
    experiment's own keywords (:attr:`Experiment.options`).
    """
    unknown = [k for k in options if k not in experiment.options]
    if unknown:
        raise TypeError(f"{experiment.name} takes no option(s) {unknown}; its options: {list(experiment.options)}")
    chosen = experiment.select(variants)
    ctx = ctx or _context(ctx_or_settings, settings, size, seeds, device, data, progress)
    if not shipped and ctx.shipped:
        # a copy: the caller's context keeps loading shipped models; the lists of checkpoints used and
        # loaded are the same objects, so its records still see this run
        ctx = dataclasses.replace(ctx, shipped=False)
    if experiment.context is not None and not isinstance(ctx, experiment.context):
        # the same context with the experiment's own checkpoint keys; it shares checkpoints_used
        ctx = experiment.context(**{f.name: getattr(ctx, f.name) for f in dataclasses.fields(RunContext)})
    source = experiment.data_source or ctx.splits()[0].source
    result = ExperimentResult(experiment.name, ctx.size, str(ctx.device), source)
    state = Run(experiment, ctx, chosen, {**experiment.options, **options}, result)
    used, loaded = len(ctx.checkpoints_used), len(ctx.checkpoints_loaded)
    with Timer() as timer:
        if experiment.prepare is not None:
            result.config = experiment.prepare(state)
        # the page's command line and provenance read the seeds from the config: every result has them
        result.config.setdefault("seeds", list(ctx.seeds))
        records: Dict[str, Dict[int, Record]] = {}
        total = len(chosen) * len(ctx.seeds)
        for i, name in enumerate(chosen):
            records[name] = {}
            for j, seed in enumerate(ctx.seeds):
                if ctx.progress:
                    print(f"[{experiment.name}] {name}, seed {seed} ({i * len(ctx.seeds) + j + 1}/{total})",
                          flush=True)
                record = experiment.train(name, experiment.variants[name], seed, state)
                if j > 0:  # only the first seed's model and figures are kept (memory)
                    record.pop("model", None)
                    record.pop("figures", None)
                records[name][seed] = record
            first = records[name][ctx.seeds[0]]
            if first.get("model") is not None:
                result.models[name] = first["model"]
            result.figures.update(first.get("figures") or {})
        experiment.summarise(records, state)
        if experiment.pairing is not None:
            title, rows = paired_comparisons(experiment.pairing, result.metrics, ctx.seeds)
            if rows:
                result.add_table("paired", title, rows)
    result.wall_time_s = timer.seconds
    # the wall time is this run's: say how many models it trained and how many it loaded finished
    n_loaded = len(ctx.checkpoints_loaded) - loaded
    result.provenance = {**provenance(str(ctx.device), result.config.get("seeds")),
                         "models_trained": len(ctx.checkpoints_used) - used - n_loaded, "models_loaded": n_loaded}
    return result


def check_device(device: str) -> None:
    """:class:`UsageError` when ``device`` is not one torch knows (or is not there)."""
    try:
        pick_device(device)
    except (RuntimeError, ValueError) as err:  # torch.device("bogus") raises RuntimeError
        raise UsageError(str(err) if repr(device) in str(err) else f"device {device!r}: {err}") from None
