"""The named experiments and a runner that writes their JSON and HTML."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .adapt import run_adapt
from .core import Experiment, ExperimentResult, RunContext
from .diffusion import run_dit
from .dynamic import run_dynamic
from .vimoe import run_vimoe
from .zoo import run_balance, run_zoo

EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in [
    Experiment("vimoe", "ViT vs ViMoE (shared expert, placement), class x expert maps", run_vimoe),
    Experiment("dynamic", "top-p vs top-2: experts per token by layer, class and difficulty", run_dynamic),
    Experiment("zoo", "every router on the same ViMoE: accuracy, balance, compute", run_zoo),
    Experiment("balance", "balancing methods on top-2: load CV, MaxVio, combination usage", run_balance),
    Experiment("adapt", "LoRA experts on a frozen ViT vs linear probe, LoRA, full fine-tuning", run_adapt),
    Experiment("dit", "DiT-MoE: token choice vs expert choice vs Expert Race, samples, FD", run_dit),
]}


def run_experiments(names: Sequence[str], size: Optional[str] = None, out: str | Path = "results",
                    data: str = "auto", seeds: Optional[Sequence[int]] = None, device: str = "auto",
                    progress: bool = True) -> List[ExperimentResult]:
    """Run the named experiments in one process (data loaded once); save each as soon as it ends."""
    ctx = RunContext.create(size, seeds, device, data, progress)
    results = []
    for name in names:
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r}; choose from {list(EXPERIMENTS)}")
        print(f"== {name} ({ctx.size}, {ctx.device}) ==", flush=True)
        result = EXPERIMENTS[name].fn(ctx=ctx)
        json_path, html_path = result.save(out)
        print(f"== {name}: {result.wall_time_s:.1f} s -> {json_path}, {html_path}", flush=True)
        results.append(result)
    return results
