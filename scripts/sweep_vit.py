"""Sweep ViT / ViMoE training recipes on Fashion-MNIST, with the kit's own models and trainer.

Each run builds a model from ``moe_lite.models.vit`` (or a logistic-regression / MLP reference),
trains it with :func:`moe_lite.train.fit` and :class:`moe_lite.train.ClassificationTask` for a fixed
number of steps, evaluates once at the end and prints one table row: test accuracy, training time
(optimizer steps only, the final evaluation left out) in wall seconds and in CPU seconds of the
process (with one thread: the cost on a quiet machine, even when other jobs share it) and the wall
time per step.

A run is a set of ``key=value`` settings: ``--set`` fixes some for every run, each ``--grid`` gives
a comma-separated list of values for one key, and the sweep runs the cartesian product; ``--seeds``
repeats every run. Keys (defaults in :data:`DEFAULTS`):

* ``arch``: ``vit`` (default), ``logreg`` (one linear layer on the pixels) or ``mlp`` (one hidden layer
  of ``hidden`` GELU units);
* ``variant``: a name :func:`moe_lite.experiments.vimoe.vimoe_variant` knows (``dense``: the ViT of the
  same active parameters as ``vimoe``; ``vimoe``, ``vimoe-all``, ...); both use the same recipe;
* any :class:`moe_lite.models.vit.ViTConfig` field: ``patch_size``, ``dim``, ``depth``, ``heads``,
  ``mlp_hidden``, ``stem``, ``stem_channels``, ``pooling``, ``dropout``, ``num_experts``, ...;
* the recipe: ``steps``, ``batch``, ``lr``, ``wd`` (weight decay), ``warmup`` (steps), ``min_lr``
  (cosine floor as a share of lr), ``clip``, ``ls`` (label smoothing), ``augment`` (0/1: random shifts
  and mirrors), ``shift`` (pixels).

Examples (one thread, as the issue's targets are stated)::

    python scripts/sweep_vit.py --set steps=100 --grid patch_size=4,7 --grid stem=patch,conv
    python scripts/sweep_vit.py --set arch=mlp --set steps=1200 --set lr=1e-3
    python scripts/sweep_vit.py --grid variant=dense,vimoe --seeds 0 1 --out runs.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moe_lite.data import load_splits, to_tensors  # noqa: E402
from moe_lite.experiments.common import loaders, seeded_build  # noqa: E402
from moe_lite.experiments.core import Dataset  # noqa: E402
from moe_lite.experiments.vimoe import vimoe_variant  # noqa: E402
from moe_lite.models.vit import ViT, ViTConfig, count_parameters  # noqa: E402
from moe_lite.train import ClassificationTask, TrainConfig, fit  # noqa: E402

#: the recipe keys and their defaults (today's quick size: 300 steps of 128, lr 3e-3, no augmentation)
DEFAULTS: Dict[str, Any] = {
    "arch": "vit", "variant": "dense", "hidden": 256,
    "steps": 300, "batch": 128, "lr": 3e-3, "wd": 0.05, "warmup": None, "min_lr": 0.1, "clip": 1.0,
    "ls": 0.0, "augment": 0, "shift": 2,
}
VIT_FIELDS = {f.name for f in dataclasses.fields(ViTConfig)}


def parse_value(text: str) -> Any:
    """``"3e-3"`` -> 0.003, ``"4"`` -> 4, ``"none"`` -> None, anything else stays a string."""
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_pair(text: str) -> tuple:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    if key not in DEFAULTS and key not in VIT_FIELDS:
        raise argparse.ArgumentTypeError(f"unknown key {key!r}; recipe keys {sorted(DEFAULTS)} or a ViTConfig field")
    return key, value


def expand(fixed: Sequence[tuple], grids: Sequence[tuple]) -> List[Dict[str, Any]]:
    """Every combination of the ``--grid`` values, on top of the defaults and ``--set`` values."""
    base = dict(DEFAULTS)
    base.update({k: parse_value(v) for k, v in fixed})
    keys = [k for k, _ in grids]
    choices = [[parse_value(v) for v in values.split(",")] for _, values in grids]
    return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*choices)]


def build_model(run: Dict[str, Any]) -> nn.Module:
    """The model a run's settings describe (unseeded: call under :func:`seeded_build`)."""
    if run["arch"] == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    if run["arch"] == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, run["hidden"]), nn.GELU(), nn.Linear(run["hidden"], 10))
    if run["arch"] != "vit":
        raise ValueError(f"arch must be vit, logreg or mlp, got {run['arch']!r}")
    base = ViTConfig(**{k: v for k, v in run.items() if k in VIT_FIELDS})
    return ViT(vimoe_variant(run["variant"], base))


def label(run: Dict[str, Any], varied: Sequence[str]) -> str:
    return " ".join(f"{k}={run[k]}" for k in varied) or "(the fixed settings)"


def train_one(run: Dict[str, Any], seed: int, train: Dataset, test: Dataset) -> Dict[str, Any]:
    """Train one model with the kit's ``fit`` and return its row."""
    model = seeded_build(seed, lambda: build_model(run))
    train_loader, test_loader = loaders(train, test, run["batch"], seed)
    config = TrainConfig(max_steps=run["steps"], lr=run["lr"], weight_decay=run["wd"], warmup_steps=run["warmup"],
                         min_lr_ratio=run["min_lr"], grad_clip=run["clip"], seed=seed, device="cpu",
                         eval_every=run["steps"], progress=False)
    task = ClassificationTask(label_smoothing=run["ls"], augment=bool(run["augment"]), shift=run["shift"])
    # (wall, CPU) clocks after each step. CPU seconds of this process are what one thread costs
    # even when other jobs share the machine; wall seconds grow with them.
    stamps: List[tuple] = []
    cpu0 = time.process_time()
    history = fit(model, task, train_loader, test_loader, config,
                  callbacks=[lambda event, info: stamps.append((time.perf_counter(), time.process_time()))
                             if event == "step" else None])
    final = history.evals[-1]
    train_s = final["wall_time_s"]  # the trainer's clock when the final evaluation began
    # the last step's callback comes after the final evaluation: count up to the step before it
    steps = len(stamps)
    cpu_s = (stamps[-2][1] - cpu0) * steps / max(1, steps - 1)
    half = steps // 2  # step time from the second half, past the first, slower steps
    step_ms = 1000 * (stamps[-2][0] - stamps[half][0]) / max(1, steps - 2 - half)
    return {**run, "seed": seed, "params": count_parameters(model)["total"], "train_s": round(train_s, 1),
            "cpu_s": round(cpu_s, 1), "step_ms": round(step_ms, 1), "accuracy": round(final["accuracy"], 4), "test_loss": round(final["loss"], 4),
            "train_loss_end": round(sum(s["task_loss"] for s in history.steps[-20:]) / min(20, len(history.steps)), 4)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--set", dest="fixed", action="append", type=parse_pair, default=[], metavar="KEY=VALUE")
    parser.add_argument("--grid", action="append", type=parse_pair, default=[], metavar="KEY=V1,V2,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the targets are stated)")
    parser.add_argument("--out", type=Path, help="append one JSON line per run to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = expand(args.fixed, args.grid)
    varied = [k for k, _ in args.grid]
    train_raw, test_raw = load_splits(source="embedded", verbose=False)  # 10k train / 2k test images
    train, test = (Dataset(*to_tensors(ds), source=ds.source) for ds in (train_raw, test_raw))
    header = f"{'run':<48} {'seed':>4} {'params':>8} {'steps':>6} {'train_s':>8} {'cpu_s':>6} {'ms/step':>8} {'acc':>7}"
    print(f"fixed: {' '.join(f'{k}={v}' for k, v in args.fixed) or '-'}; threads {args.threads}")
    print(header)
    print("-" * len(header))
    for run in runs:
        for seed in args.seeds:
            row = train_one(run, seed, train, test)
            print(f"{label(run, varied):<48} {seed:>4} {row['params']:>8,} {row['steps']:>6} {row['train_s']:>8.1f} "
                  f"{row['cpu_s']:>6.1f} "
                  f"{row['step_ms']:>8.1f} {row['accuracy']:>7.4f}", flush=True)
            if args.out is not None:
                with args.out.open("a") as f:
                    f.write(json.dumps({**row, "label": label(run, varied), "threads": args.threads}) + "\n")


if __name__ == "__main__":
    main()
