"""Ship trained models with moe_lite: ``python -m moe_lite.experiments.ship --size quick --seeds 0
--experiments vimoe dynamic ...``.

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


def slim(payload: Dict[str, Any], key: str, dtype: torch.dtype = torch.float16) -> Dict[str, Any]:
    """A shipped copy of checkpoint ``payload`` for cache key ``key``: floating-point model weights in
    ``dtype`` (a tensor that would overflow it stays as it was), buffers, history, config (without its
    checkpoint path) and callback states; no optimizer, scheduler, scaler or RNG state."""
    def cast(value: Any) -> Any:
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        low = value.to(dtype)
        return low if torch.isfinite(low).eq(torch.isfinite(value)).all() else value

    return {**payload,
            "model": {name: cast(value) for name, value in payload["model"].items()},
            "optimizer": None, "scheduler": None, "scaler": None, "rng": None,
            "config": {**(payload.get("config") or {}), "checkpoint": None},
            "extra": {**payload["extra"], "shipped": {"key": key, "dtype": str(dtype).removeprefix("torch.")}}}


def ship(experiments: Sequence[str], size: str = "quick", seeds: Sequence[int] = (0,),
         variants: Optional[Sequence[str]] = None, cache: Any = "default", dest: Path = SHIPPED_DIR,
         dtype: torch.dtype = torch.float16, data: str = "auto") -> List[Tuple[Path, int]]:
    """Run ``experiments`` (CPU, ``size``, ``seeds``; ``variants`` as ``python -m moe_lite run --variants``)
    with the user ``cache`` and write the slimmed copy of every checkpoint they used under ``dest``.
    Returns ``[(file written, bytes)]``."""
    unknown = [name for name in experiments if name not in EXPERIMENTS]
    if unknown:
        raise UsageError(f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    check_variants(experiments, variants)
    ctx = RunContext.create(size, seeds, device="cpu", data=data, progress=False, cache=cache, shipped=False)
    if ctx.cache_dir is None:
        raise UsageError("ship copies from the user cache: cache=None has none")
    for name in experiments:
        print(f"== {name} ({size}, seeds {list(seeds)}) ==", flush=True)
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
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_lite.experiments.ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="quick", choices=SIZES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--experiments", nargs="+", required=True)
    parser.add_argument("--variants", nargs="+", default=None, help="only these variants (as `moe_lite run`)")
    parser.add_argument("--cache", default="default", help="the user cache folder (default: $MOE_LITE_CACHE/runs "
                                                         "or ~/.cache/moe_lite/runs)")
    parser.add_argument("--dest", type=Path, default=SHIPPED_DIR, help="default: the package's checkpoints/")
    parser.add_argument("--data", default="auto", choices=("auto", "embedded"))
    parser.add_argument("--fp32", action="store_true", help="keep the weights in fp32 (default: fp16)")
    args = parser.parse_args(argv)
    try:
        ship(args.experiments, args.size, args.seeds, args.variants, args.cache, args.dest,
             torch.float32 if args.fp32 else torch.float16, args.data)
    except UsageError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
