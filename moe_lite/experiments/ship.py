"""Ship trained models with moe_lite: ``python -m moe_lite.experiments.ship --notebooks`` (every
model the notebooks show: :data:`NOTEBOOK_RUNS`, quick size, seed 0), or ``--experiments vimoe ...``.

Runs the named experiments on the CPU at that size and those seeds, exactly as a notebook or
``python -m moe_lite run`` would (a run already in the user cache is loaded from it, not retrained),
records every checkpoint they looked up, and copies each into the shipped folder
(:data:`moe_lite.experiments.core.SHIPPED_DIR`, ``<size>/<experiment>/<same file name>``), slimmed:
the model (floating-point weights in fp16 unless ``--fp32``; buffers as they are), the history and the
callbacks' states, nothing needed only to resume training (optimizer, scheduler, scaler, RNG states) and
no path of this machine. Each file records its cache key; :func:`moe_lite.experiments.common.cached_fit`
loads it only for that key and training configuration. Prints each file's size and the total.

The keys include the device type and the data: ship what the learners will run, i.e. CPU runs (the
default here) on the data they will have (a full copy of Fashion-MNIST or the embedded subset).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..train import atomic_save, read_checkpoint
from .common import shipped_key
from .core import SHIPPED_DIR, SIZES, RunContext, UsageError
from .registry import EXPERIMENTS, check_variants
from .runner import run


#: what each notebook runs, as ``(experiment, variants)`` (None: the experiment's defaults), at the
#: size and seed its stored outputs show (quick, seed 0): ``--notebooks`` ships exactly these models.
#: ``tests/test_shipped.py`` checks it against the notebooks' stored outputs and the shipped folder.
NOTEBOOK_RUNS: Dict[str, List[Tuple[str, Optional[List[str]]]]] = {
    "03_keeping_experts_busy": [("balance", None), ("zoo", ["top-2", "soft MoE (1 slot/expert)"])],
    "04_vimoe": [("vimoe", ["dense", "vimoe", "vimoe-no-shared"]),
                 ("vimoe", ["dense", "vimoe-upcycled", "vimoe-upcycled-scratch"])],
    "05_dynamic_routing": [("dynamic", None)],
    "06_dit_moe_expert_race": [("dit", None)],
    "07_sparse_adaptation": [("adapt", None)],
    "09_sequence_routing": [("sequence", None)],
}


#: floating-point tensors of fewer values than this stay exact when slimmed: they are the settings the
#: routers compare against (inference thresholds, EMA thresholds, bias-balancing biases) more than
#: weights, fp16 would move them (a threshold of 0.2 becomes 0.19995), and they cost next to nothing
SMALL_TENSOR = 1024


def slim(payload: Dict[str, Any], key: str, dtype: torch.dtype = torch.float16,
         small: int = SMALL_TENSOR) -> Dict[str, Any]:
    """A shipped copy of checkpoint ``payload`` for cache key ``key``: floating-point model weights in
    ``dtype`` (a tensor of fewer than ``small`` values, or one that would overflow it, stays as it
    was), buffers, history, config (without its checkpoint path) and callback states; no optimizer,
    scheduler, scaler or RNG state (the training RNGs' nor the data loaders')."""
    def cast(value: Any) -> Any:
        if (not isinstance(value, Tensor) or not value.is_floating_point() or value.dtype == dtype
                or value.numel() < small):
            return value
        low = value.to(dtype)
        return low if torch.isfinite(low).eq(torch.isfinite(value)).all() else value

    return {**payload,
            "model": {name: cast(value) for name, value in payload["model"].items()},
            "optimizer": None, "scheduler": None, "scaler": None, "rng": None,
            "config": {**(payload.get("config") or {}), "checkpoint": None},
            # the data loaders' RNG states, like the optimizer's, only resume a run
            "extra": {**{k: v for k, v in payload["extra"].items() if k not in ("loader_rng", "epoch_start_rng")},
                      "shipped": {"key": key, "dtype": str(dtype).removeprefix("torch.")}}}


def ship(experiments: Sequence[str], size: str = "quick", seeds: Sequence[int] = (0,),
         variants: Optional[Sequence[str]] = None, cache: Any = "default", dest: Path = SHIPPED_DIR,
         dtype: torch.dtype = torch.float16, data: str = "auto") -> List[Tuple[Path, int]]:
    """Run ``experiments`` (CPU, ``size``, ``seeds``; ``variants`` as ``python -m moe_lite run --variants``)
    with the user ``cache`` and write the slimmed copy of every checkpoint they used under ``dest``.
    Returns ``[(file written, bytes)]``."""
    return ship_runs([(name, variants) for name in experiments], size, seeds, cache, dest, dtype, data)


def ship_runs(runs: Sequence[Tuple[str, Optional[Sequence[str]]]], size: str = "quick", seeds: Sequence[int] = (0,),
              cache: Any = "default", dest: Path = SHIPPED_DIR, dtype: torch.dtype = torch.float16,
              data: str = "auto", prune: bool = False) -> List[Tuple[Path, int]]:
    """:func:`ship` for ``runs``, each ``(experiment, variants or None)``; a checkpoint two runs share
    (notebook 04's dense ViT) is written once. ``prune``: ``runs`` are everything that ships at
    ``size``, so a file under ``dest/<size>`` that they did not write (a key that changed) is deleted."""
    unknown = [name for name, _ in runs if name not in EXPERIMENTS]
    if unknown:
        raise UsageError(f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    for name, variants in runs:
        check_variants([name], variants)  # a clear error before anything trains
    ctx = RunContext.create(size, seeds, device="cpu", data=data, progress=False, cache=cache, shipped=False)
    if ctx.cache_dir is None:
        raise UsageError("ship copies from the user cache: cache=None has none")
    for name, variants in runs:
        chosen = "" if variants is None else f", {list(variants)}"
        print(f"== {name} ({size}, seeds {list(seeds)}{chosen}) ==", flush=True)
        run(EXPERIMENTS[name], ctx, variants=variants)
    written = []
    for path in dict.fromkeys(ctx.checkpoints_used):  # in order, once each
        payload = read_checkpoint(path)
        if payload.get("completed") is not True:
            raise RuntimeError(f"{path} is not a finished run: nothing shipped for it")
        key = shipped_key(path, ctx)
        target = Path(dest) / key
        atomic_save(slim(payload, key, dtype), target)
        written.append((target, target.stat().st_size))
    total = 0
    for target, size_bytes in written:
        total += size_bytes
        print(f"{size_bytes / 1e6:8.3f} MB  {target}")
    print(f"{total / 1e6:8.3f} MB  in {len(written)} files")
    if prune:
        kept = {target.resolve() for target, _ in written}
        for stale in sorted((Path(dest) / size).rglob("*.pt")):
            if stale.resolve() not in kept:
                stale.unlink()
                print(f"removed {stale} (no run of the notebooks uses it)")
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_lite.experiments.ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="quick", choices=SIZES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--notebooks", action="store_true",
                       help="every model the notebooks show (NOTEBOOK_RUNS; use with --size quick --seeds 0)")
    which.add_argument("--experiments", nargs="+")
    parser.add_argument("--variants", nargs="+", default=None, help="only these variants (as `moe_lite run`)")
    parser.add_argument("--cache", default="default", help="the user cache folder (default: $MOE_LITE_CACHE/runs "
                                                         "or ~/.cache/moe_lite/runs)")
    parser.add_argument("--dest", type=Path, default=SHIPPED_DIR, help="default: the package's checkpoints/")
    parser.add_argument("--data", default="auto", choices=("auto", "embedded"))
    parser.add_argument("--fp32", action="store_true", help="keep the weights in fp32 (default: fp16)")
    args = parser.parse_args(argv)
    try:
        dtype = torch.float32 if args.fp32 else torch.float16
        if args.notebooks:
            if args.variants is not None:
                raise UsageError("--variants goes with --experiments; --notebooks ships each notebook's own")
            ship_runs([run for runs in NOTEBOOK_RUNS.values() for run in runs], args.size, args.seeds,
                      args.cache, args.dest, dtype, args.data, prune=True)
        else:
            ship(args.experiments, args.size, args.seeds, args.variants, args.cache, args.dest, dtype, args.data)
    except UsageError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
