"""Dispatch benchmark: MoE layer forward+backward time over a dense FFN with the same active FLOPs.

    python -m moe_lite.bench [--repeats R] [--device cpu|cuda|auto] [--quick] [--json PATH]
                             [--routers TopK,Race,...] [--backends sorted,padded,...] [--activation gelu]
                             [--threads N]

For every configuration (``E=16, H=256`` and the fine-grained ``E=64, H=64``, both top-2 over 3136
tokens = 64 images x 49 patches, width 128), every router and every dispatch backend it times one
training step of ``MoE(128, H, E, router, dispatch=backend)`` (gate + router + experts, forward and
backward, gradients for x and all parameters) against a dense :class:`~moe_lite.layers.FFN` of hidden
``k * H`` and the same activation. The two run alternately in this process after a warm-up; the
reported ratio is the median over repeats of (MoE time / dense time of the adjacent run), which cancels
slow drifts of a shared machine; the medians in milliseconds are printed too.

Targets (CPU): ratio <= 1.3 for ``E=16, H=256`` and <= 2.0 for ``E=64, H=64``. ``experts/token`` is
the realised mean number of experts per token (ExpertChoice rounds its capacity, so it can exceed k);
``used`` is the backend that actually ran (``auto``'s choice, or a fallback).

The whole run aims at ``--budget`` seconds (default 100): every row gets an equal share of the time
left, with at least 3 timed repeats, so a busy machine yields fewer repeats rather than a longer run.
On a CPU shared with other jobs, multi-threaded timings are dominated by waits for busy cores (every
parallel region needs all threads scheduled); ``--threads 1`` gives much more stable ratios there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .experts import DISPATCHES
from .layers import FFN, MoE

__all__ = ["Config", "CONFIGS", "router_factories", "time_pair", "run", "main"]


@dataclass(frozen=True)
class Config:
    """One benchmark shape."""

    name: str
    num_experts: int
    hidden: int
    k: int = 2
    dim: int = 128
    batch: int = 64
    seq_len: int = 49
    target: float = 1.3  # CPU target for the MoE / dense ratio


CONFIGS = (
    Config("E16-H256", num_experts=16, hidden=256, target=1.3),
    Config("E64-H64 (fine-grained)", num_experts=64, hidden=64, target=2.0),
)
BACKENDS = tuple(d for d in DISPATCHES)  # loop, sorted, grouped_mm, padded, auto


def router_factories(k: int) -> Dict[str, Callable[[], nn.Module]]:
    """Name -> zero-arg factory for every router of ``moe_lite.routers`` that the benchmark uses.

    Routers missing from the module (or the module itself) are left out.
    """
    try:
        from . import routers
    except ImportError:  # the routers module is optional for the benchmark
        return {}
    wanted = {
        "TopK": lambda: routers.TopK(k),
        "Race": lambda: routers.Race(k),
        "ExpertChoice": lambda: routers.ExpertChoice(k),
        # top-p at init (near-uniform probabilities) would pick most experts; cap it at k so the
        # active FLOPs stay those of the dense baseline
        "TopP": lambda: routers.TopP(0.5, max_k=k),
    }
    return {name: f for name, f in wanted.items() if hasattr(routers, name)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).backward(grad)


def time_pair(
    moe: nn.Module,
    dense: nn.Module,
    x: torch.Tensor,
    grad: torch.Tensor,
    repeats: int,
    warmup: int,
    max_seconds: Optional[float] = None,
    min_repeats: int = 3,
) -> Dict[str, float]:
    """Alternate dense and MoE training steps; medians in ms and the median paired ratio.

    Stops early (after at least ``min_repeats``) once ``max_seconds`` have passed.
    """
    device = x.device
    start = time.perf_counter()
    for _ in range(warmup):
        _step(dense, x, grad)
        _step(moe, x, grad)
    t_dense, t_moe, ratios = [], [], []
    for i in range(repeats):
        if max_seconds is not None and i >= min_repeats and time.perf_counter() - start > max_seconds:
            break
        _sync(device)
        t0 = time.perf_counter()
        _step(dense, x, grad)
        _sync(device)
        t1 = time.perf_counter()
        _step(moe, x, grad)
        _sync(device)
        t2 = time.perf_counter()
        t_dense.append(t1 - t0)
        t_moe.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return {
        "repeats": len(ratios),
        "dense_ms": 1e3 * statistics.median(t_dense),
        "moe_ms": 1e3 * statistics.median(t_moe),
        "ratio": statistics.median(ratios),
    }


def run(
    repeats: int = 15,
    warmup: int = 3,
    device: str = "cpu",
    routers: Optional[Sequence[str]] = None,
    backends: Sequence[str] = BACKENDS,
    activation: str = "gelu",
    configs: Sequence[Config] = CONFIGS,
    seed: int = 0,
    budget_s: Optional[float] = None,
    out=sys.stdout,
) -> List[dict]:
    """Run the benchmark, print the table to ``out`` and return its rows as dicts.

    ``budget_s``: total time to aim for; each row gets an equal share of what is left (at least
    3 repeats each), so a busy machine gives fewer repeats instead of a longer run.
    """
    dev = torch.device(device)
    rows: List[dict] = []
    start = time.perf_counter()
    plan = [(cfg, r, b) for cfg in configs for r in _router_names(cfg, routers) for b in backends]
    done = 0
    header = (
        f"{'config':<24}{'router':<14}{'backend':<12}{'used':<12}{'exp/tok':>8}{'reps':>5}"
        f"{'dense ms':>10}{'moe ms':>10}{'ratio':>8}{'target':>8}  result"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for cfg in configs:
        factories = router_factories(cfg.k)
        names = _router_names(cfg, routers)
        torch.manual_seed(seed)
        x = torch.randn(cfg.batch, cfg.seq_len, cfg.dim, device=dev, requires_grad=True)
        grad = torch.randn(cfg.batch, cfg.seq_len, cfg.dim, device=dev)
        dense = FFN(cfg.dim, cfg.k * cfg.hidden, activation).to(dev)
        for router_name in names:
            for backend in backends:
                torch.manual_seed(seed + 1)
                moe = MoE(cfg.dim, cfg.hidden, cfg.num_experts, factories[router_name](),
                          activation=activation, dispatch=backend).to(dev)
                moe.train()
                share = None
                if budget_s is not None:
                    share = max(0.0, budget_s - (time.perf_counter() - start)) / max(1, len(plan) - done)
                timing = time_pair(moe, dense, x, grad, repeats, warmup, max_seconds=share)
                done += 1
                routing = moe.routing
                row = {
                    "config": cfg.name,
                    "num_experts": cfg.num_experts,
                    "hidden": cfg.hidden,
                    "k": cfg.k,
                    "router": router_name,
                    "backend": backend,
                    "used": moe.experts.last_dispatch,
                    "experts_per_token": routing.num_assignments / routing.num_tokens,
                    **timing,
                    "target": cfg.target if dev.type == "cpu" else None,
                }
                row["pass"] = None if row["target"] is None else bool(row["ratio"] <= row["target"])
                rows.append(row)
                result = "-" if row["pass"] is None else ("PASS" if row["pass"] else "MISS")
                target = "-" if row["target"] is None else f"<={row['target']:.1f}"
                print(
                    f"{cfg.name:<24}{router_name:<14}{backend:<12}{row['used']:<12}"
                    f"{row['experts_per_token']:>8.2f}{row['repeats']:>5}{row['dense_ms']:>10.2f}{row['moe_ms']:>10.2f}"
                    f"{row['ratio']:>8.2f}{target:>8}  {result}",
                    file=out,
                    flush=True,
                )
    return rows


def _router_names(cfg: Config, routers: Optional[Sequence[str]]) -> List[str]:
    factories = router_factories(cfg.k)
    return list(factories) if routers is None else [r for r in routers if r in factories]


def _environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = os.getloadavg()[0]
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(prog="python -m moe_lite.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 20, quick 3)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke test for CI")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows and environment as JSON")
    parser.add_argument("--routers", default=None, help="comma list (default: TopK,Race,ExpertChoice,TopP)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {BACKENDS}")
    parser.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds to aim for in total (default 100, quick 30); rows get fewer repeats when busy")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 20)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        parser.error(f"unknown backends {bad}; choose from {BACKENDS}")
    routers = [r for r in args.routers.split(",") if r] if args.routers else None
    env = _environment(device)
    print(
        f"moe_lite.bench: torch {env['torch']}, device {device}, {env['threads']} threads, "
        f"repeats {repeats}" + (f", load average {env['loadavg_start']:.2f}" if "loadavg_start" in env else ""),
    )
    if not router_factories(2):
        print("moe_lite.routers is not available: nothing to benchmark")
        return []
    load = env.get("loadavg_start")
    if load is not None and env["cpu_count"] and load > env["cpu_count"]:
        hint = " (multi-threaded ops wait for busy cores at every parallel region: try --threads 1)"
        print(
            f"warning: load average {load:.1f} > {env['cpu_count']} cores: the CPU is shared with other jobs, "
            f"timings are noisy" + (hint if env["threads"] > 1 else "")
        )
    start = time.perf_counter()
    budget = args.budget if args.budget is not None else (30.0 if args.quick else 100.0)
    rows = run(repeats=repeats, warmup=1 if args.quick else 3, device=device, routers=routers,
               backends=backends, activation=args.activation, budget_s=budget)
    env["seconds"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = os.getloadavg()[0]
    print(f"done in {env['seconds']:.0f} s (ratio = median of MoE/dense over adjacent runs; shared CPUs are noisy)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
