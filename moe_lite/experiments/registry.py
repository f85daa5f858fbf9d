"""The named experiments and a runner that writes their JSON and HTML."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..train import pick_device
from .adapt import run_adapt
from .core import Experiment, ExperimentResult, RunContext, resolve_size
from .diffusion import run_dit, run_race
from .dynamic import run_dynamic
from .report import UsageError, check_output_folder
from .sequence import run_sequence
from .vimoe import run_vimoe, run_vimoe_grid
from .zoo import run_balance, run_zoo

EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in [
    Experiment("vimoe", "ViT vs ViMoE (shared expert, placement), class x expert maps", run_vimoe),
    Experiment("vimoe-grid", "ViMoE placement x shared expert x training-set size, over seeds", run_vimoe_grid),
    Experiment("dynamic", "top-p vs top-1 and top-2: experts per token by layer, class and difficulty", run_dynamic),
    Experiment("zoo", "every router on the same ViMoE: accuracy, balance, compute", run_zoo),
    Experiment("balance", "balancing methods on top-2: load CV, MaxVio, combination usage", run_balance),
    Experiment("adapt", "LoRA experts on a frozen ViT vs linear probe, LoRA, full fine-tuning", run_adapt),
    Experiment("dit", "DiT-MoE: token choice vs expert choice vs Expert Race, samples, FD", run_dit),
    Experiment("race", "Expert Race study: routing strategy, gating, cumulative ablation, balance (3 seeds)",
               run_race),
    Experiment("sequence", "causal LM on multi-task sequences: experts per token by ground-truth difficulty, "
                           "task and layer", run_sequence),
]}


class UnknownVariant(UsageError):
    """A ``variants`` selection names something an experiment does not have."""


#: seeds are 0 <= seed <= MAX_SEED: what every RNG they reach accepts (torch, NumPy's legacy
#: ``RandomState`` takes < 2**32), with room for ``seed + offset`` in a 64-bit torch seed
MAX_SEED = 2**32 - 1


def check_seeds(seeds: Optional[Sequence[int]]) -> None:
    """:class:`UsageError` naming the first seed that is not an int in ``[0, MAX_SEED]``."""
    for seed in seeds or ():
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UsageError(f"seed {seed!r}: seeds are integers from 0 to {MAX_SEED} (2**32 - 1)")


#: the keyword through which each experiment takes a selection of variants, and their names
def _selectable() -> Dict[str, Tuple[str, Sequence[str]]]:
    from . import adapt, diffusion, sequence, vimoe, zoo

    vit_variants = ("dense", *vimoe.VARIANTS)
    return {"vimoe": ("variants", vit_variants + vimoe.UPCYCLE_VARIANTS), "vimoe-grid": ("variants", vit_variants),
            "dit": ("variants", tuple(diffusion.VARIANTS)), "race": ("variants", tuple(diffusion.VARIANTS)),
            "zoo": ("routers", tuple(zoo.ZOO)), "balance": ("methods", tuple(zoo.BALANCE)),
            "adapt": ("methods", tuple(adapt.METHODS)), "sequence": ("variants", tuple(sequence.VARIANTS))}


def variant_kwargs(name: str, variants: Optional[Sequence[str]]) -> Dict[str, List[str]]:
    """``{keyword: variants}`` for experiment ``name`` (empty when ``variants`` is None); raises
    :class:`UnknownVariant` when the experiment takes no selection or a name is not one of its own."""
    if variants is None:
        return {}
    table = _selectable()
    if name not in table:
        raise UnknownVariant(f"experiment {name!r} takes no --variants (those that do: {', '.join(table)})")
    keyword, known = table[name]
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise UnknownVariant(f"{name} has no variant(s) {unknown}; choose from {list(known)}")
    return {keyword: list(variants)}


def run_experiments(names: Sequence[str], size: Optional[str] = None, out: str | Path = "results",
                    data: str = "auto", seeds: Optional[Sequence[int]] = None, device: str = "auto",
                    progress: bool = True, variants: Optional[Sequence[str]] = None) -> List[ExperimentResult]:
    """Run the named experiments in one process (data loaded once); save each as soon as it ends.
    ``variants``: run only these variants of each experiment (see :func:`variant_kwargs`).

    Every argument, and that ``out`` is a folder that can be written, is checked before any data
    is loaded or model trained: :class:`UsageError` naming the one at fault.
    """
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise UsageError(f"unknown experiment(s): {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)} "
                         f"(the command line also takes 'all')")
    selections = {name: variant_kwargs(name, variants) for name in names}
    check_seeds(seeds)
    try:
        resolve_size(size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        pick_device(device)
    except (RuntimeError, ValueError) as err:  # torch.device("bogus") raises RuntimeError
        raise UsageError(str(err) if repr(device) in str(err) else f"device {device!r}: {err}") from None
    check_output_folder(out, f"out {out}")
    ctx = RunContext.create(size, seeds, device, data, progress)
    results = []
    for name in names:
        print(f"== {name} ({ctx.size}, {ctx.device}) ==", flush=True)
        result = EXPERIMENTS[name].fn(ctx=ctx, **selections[name])
        if variants is not None:
            result.config["selected_variants"] = list(variants)
        json_path, html_path = result.save(out)
        print(f"== {name}: {result.wall_time_s:.1f} s -> {json_path}, {html_path}", flush=True)
        results.append(result)
    return results
