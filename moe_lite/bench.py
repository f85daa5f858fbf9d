"""Speed benchmark: MoE training steps over dense ones with the same active FLOPs, in the same run.

    python -m moe_lite.bench [--sections layers,model] [--repeats R] [--device cpu|cuda|auto]
                             [--quick] [--json PATH] [--routers TopK,Race,...] [--backends sorted,padded,...]
                             [--activation gelu] [--threads N] [--clock wall|cpu] [--budget S]
                             [--model-size quick|smoke|...]

Section ``layers`` (the dispatch benchmark). For every configuration (``E=16, H=256`` and the
fine-grained ``E=64, H=64``, both top-2 over 3136 tokens = 64 images x 49 patches, width 128), every
router and every dispatch backend it times one training step of ``MoE(128, H, E, router,
dispatch=backend)`` (gate + router + experts, forward and backward, gradients for x and all parameters)
against a dense :class:`~moe_lite.layers.FFN` of hidden ``k * H`` and the same activation. Targets
(CPU): ratio <= 1.3 for ``E=16, H=256`` and <= 2.0 for ``E=64, H=64``. ``experts/token`` is the
realised mean number of experts per token (ExpertChoice rounds its capacity, so it can exceed k);
``used`` is the backend that actually ran (``auto``'s choice, or a fallback).

Section ``model`` (one row, :func:`run_model`): a whole training step (forward, cross-entropy plus
``moe_lite.aux_loss``, backward, gradient-norm clipping, AdamW) of the quick-size ViMoE with MoE in
*every* block (``vimoe-all``: TopK(2) over 8 experts plus a shared expert, load-balance loss) over the
dense ViT of equal active parameters built for that placement (:func:`~moe_lite.models.vit.dense_equivalent`),
on the quick-size batch (``--model-size``). Target (CPU): ratio <= 1.3.

Both sections run MoE and dense steps alternately in this process after a warm-up; the reported ratio
is the median over repeats of (MoE time / dense time of the adjacent run), which cancels slow drifts
of a shared machine; the medians in milliseconds are printed too.

The whole run aims at ``--budget`` seconds (default 100): every row gets an equal share of the time
left, with at least 3 timed repeats, so a busy machine yields fewer repeats rather than a longer run.
On a CPU shared with other jobs, multi-threaded timings are dominated by waits for busy cores (every
parallel region needs all threads scheduled); ``--threads 1`` gives much more stable ratios there, and
``--clock cpu`` (CPU time of this process instead of wall time; CPU only) leaves out the time the
process waits for a core. The figures to quote: ``python -m moe_lite.bench --threads 1``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .experts import DISPATCHES
from .experiments.vimoe import SIZES, vimoe_variant
from .layers import FFN, MoE, aux_loss
from .models.vit import ViT, ViTConfig, count_parameters, dense_equivalent
from .routers import ROUTERS, RouterSpec

__all__ = ["Config", "CONFIGS", "SECTIONS", "MODEL_TARGET", "router_specs", "router_spec", "router_factories",
           "time_pair", "run",
           "model_pair", "run_model", "main"]


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
SECTIONS = ("layers", "model")
#: CPU target of the model-level row (ViMoE with MoE in every block / dense ViT, one training step)
MODEL_TARGET = 1.3
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def router_specs(k: int) -> Dict[str, RouterSpec]:
    """The routers the layer rows time by default: row name -> :class:`~moe_lite.routers.RouterSpec`."""
    return {
        "TopK": RouterSpec("topk", k=k),
        "Race": RouterSpec("race", k=k),
        "ExpertChoice": RouterSpec("expert_choice", k=k),
        # top-p at init (near-uniform probabilities) would pick most experts; cap it at k so the
        # active FLOPs stay those of the dense baseline
        "TopP": RouterSpec("topp", p=0.5, max_k=k),
    }


def router_spec(name: str, k: int) -> RouterSpec:
    """The spec of a ``--routers`` name: a default row name (:func:`router_specs`), or any registered
    router name (:data:`moe_lite.routers.ROUTERS`: its defaults, with ``k`` where it takes one)."""
    specs = router_specs(k)
    if name in specs:
        return specs[name]
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {list(specs)} or {list(ROUTERS)}")
    spec = RouterSpec(name)
    return spec.replace(k=k) if "k" in spec.effective_kwargs else spec


def router_factories(k: int, dim: Optional[int] = None, num_experts: Optional[int] = None
                     ) -> Dict[str, Callable[[], nn.Module]]:
    """Row name -> zero-arg factory of the default routers (:func:`router_specs`), built with the layer
    facts they need."""
    return {name: partial(spec.build, dim, num_experts) for name, spec in router_specs(k).items()}


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
    clock: str = "wall",
) -> Dict[str, float]:
    """Alternate dense and MoE training steps on ``x`` (backward of ``grad``); medians in ms and the
    median paired ratio. Stops early (after at least ``min_repeats``) once ``max_seconds`` have passed."""
    return _time_steps(lambda: _step(moe, x, grad), lambda: _step(dense, x, grad), x.device,
                       repeats, warmup, max_seconds, min_repeats, clock)


def _time_steps(
    moe_step: Callable[[], None],
    dense_step: Callable[[], None],
    device: torch.device,
    repeats: int,
    warmup: int,
    max_seconds: Optional[float] = None,
    min_repeats: int = 3,
    clock: str = "wall",
) -> Dict[str, float]:
    """The timing loop of :func:`time_pair` for any two zero-argument step functions."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and device.type != "cpu":
        raise ValueError(f"clock='cpu' measures host CPU time: use clock='wall' on {device.type}")
    now = CLOCKS[clock]
    start = time.perf_counter()
    for _ in range(warmup):
        dense_step()
        moe_step()
    t_dense, t_moe, ratios = [], [], []
    for i in range(repeats):
        if max_seconds is not None and i >= min_repeats and time.perf_counter() - start > max_seconds:
            break
        _sync(device)
        t0 = now()
        dense_step()
        _sync(device)
        t1 = now()
        moe_step()
        _sync(device)
        t2 = now()
        t_dense.append(t1 - t0)
        t_moe.append(t2 - t1)
        ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
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
    clock: str = "wall",
) -> List[dict]:
    """Run the ``layers`` section, print the table to ``out`` and return its rows as dicts.

    ``budget_s``: total time to aim for; each row gets an equal share of what is left (at least
    3 repeats each), so a busy machine gives fewer repeats instead of a longer run. ``clock``:
    ``"wall"`` or ``"cpu"`` (process CPU time, see the module docstring).
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
        names = _router_names(cfg, routers)
        torch.manual_seed(seed)
        x = torch.randn(cfg.batch, cfg.seq_len, cfg.dim, device=dev, requires_grad=True)
        grad = torch.randn(cfg.batch, cfg.seq_len, cfg.dim, device=dev)
        dense = FFN(cfg.dim, cfg.k * cfg.hidden, activation).to(dev)
        for router_name in names:
            for backend in backends:
                torch.manual_seed(seed + 1)
                router = router_spec(router_name, cfg.k).build(cfg.dim, cfg.num_experts)
                moe = MoE(cfg.dim, cfg.hidden, cfg.num_experts, router, activation=activation,
                          dispatch=backend).to(dev)
                moe.train()
                share = None
                if budget_s is not None:
                    share = max(0.0, budget_s - (time.perf_counter() - start)) / max(1, len(plan) - done)
                timing = time_pair(moe, dense, x, grad, repeats, warmup, max_seconds=share, clock=clock)
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


def model_pair(size: str = "quick", variant: str = "vimoe-all", seed: int = 0):
    """The two models of the ``model`` section: ``(moe_model, dense_model, moe_config, dense_config, batch)``.

    ``moe_config`` is the ViMoE experiment's ``variant`` (default ``"vimoe-all"``: MoE in every block)
    on that experiment's ``size`` model; ``dense_config = dense_equivalent(moe_config)``, the dense
    ViT with the same active parameters for that placement; ``batch`` the size's batch size.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    spec = SIZES[size]
    moe_config = vimoe_variant(variant, dataclasses.replace(ViTConfig(), **spec.model))
    dense_config = dense_equivalent(moe_config)
    torch.manual_seed(seed)
    return ViT(moe_config), ViT(dense_config), moe_config, dense_config, spec.batch_size


def _train_step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One training step as the trainer takes it: cross-entropy + ``aux_loss``, backward, clip, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = [p for p in model.parameters()]

    def step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels) + aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step


def run_model(
    repeats: int = 15,
    warmup: int = 3,
    device: str = "cpu",
    size: str = "quick",
    seed: int = 0,
    budget_s: Optional[float] = None,
    out=sys.stdout,
    clock: str = "wall",
) -> dict:
    """The ``model`` section: one row, ViMoE (MoE in every block) training step / dense ViT step.

    Prints the row to ``out`` and returns it as a dict (``params`` and ``active_params`` of both models
    come with it, so the reader sees the dense model is the fair one).
    """
    dev = torch.device(device)
    moe_model, dense_model, moe_config, dense_config, batch = model_pair(size, seed=seed)
    moe_model.to(dev).train()
    dense_model.to(dev).train()
    torch.manual_seed(seed + 1)
    c = moe_config
    images = torch.randn(batch, c.in_channels, c.image_size, c.image_size, device=dev)
    labels = torch.randint(0, c.num_classes, (batch,), device=dev)
    timing = _time_steps(_train_step_fn(moe_model, images, labels), _train_step_fn(dense_model, images, labels),
                         dev, repeats, warmup, max_seconds=budget_s, clock=clock)
    moe_params, dense_params = count_parameters(moe_model), count_parameters(dense_model)
    row = {
        "config": f"ViMoE all blocks ({size})",
        "moe": f"depth {c.depth}, dim {c.dim}, E={c.num_experts}, TopK(2), shared {c.num_shared}, "
               f"expert hidden {c.expert_width}, losses {dict(c.moe_losses)}",
        "dense": f"dense_equivalent: mlp_hidden {dense_config.mlp_hidden}"
                 + (f", block_hidden {list(dense_config.block_hidden)}" if dense_config.block_hidden else ""),
        "batch": batch,
        "moe_active_params": int(moe_params["active_per_token"]),
        "dense_params": int(dense_params["total"]),
        **timing,
        "target": MODEL_TARGET if dev.type == "cpu" else None,
    }
    row["pass"] = None if row["target"] is None else bool(row["ratio"] <= row["target"])
    result = "-" if row["pass"] is None else ("PASS" if row["pass"] else "MISS")
    target = "-" if row["target"] is None else f"<={row['target']:.1f}"
    print(f"\nmodel: training step (forward, loss + aux, backward, clip, AdamW), batch {batch}", file=out)
    print(f"  MoE:   {row['moe']}; active params/token {row['moe_active_params']:,}", file=out)
    print(f"  dense: {row['dense']}; params {row['dense_params']:,}", file=out)
    header = f"{'config':<28}{'reps':>5}{'dense ms':>10}{'moe ms':>10}{'ratio':>8}{'target':>8}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    print(f"{row['config']:<28}{row['repeats']:>5}{row['dense_ms']:>10.2f}{row['moe_ms']:>10.2f}"
          f"{row['ratio']:>8.2f}{target:>8}  {result}", file=out, flush=True)
    return row


def _router_names(cfg: Config, routers: Optional[Sequence[str]]) -> List[str]:
    """The routers' row names: the defaults, or the given ones (default row names or registered names)."""
    if routers is None:
        return list(router_specs(cfg.k))
    for name in routers:
        router_spec(name, cfg.k)  # ValueError for an unknown one
    return list(routers)


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
    """Command line entry; returns every row printed (the ``layers`` rows, then the ``model`` row,
    marked by its ``"section"`` key)."""
    parser = argparse.ArgumentParser(prog="python -m moe_lite.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of {SECTIONS}: the MoE layer rows, the ViMoE-vs-ViT training-step row")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 20, quick 3)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke test for CI")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows and environment as JSON")
    parser.add_argument("--routers", default=None,
                        help="comma list of TopK,Race,ExpertChoice,TopP (the default) or registered router names "
                             "(moe_lite.routers.ROUTERS, e.g. topk,hash)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {BACKENDS}")
    parser.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--model-size", default="quick",
                        help="experiment size of the model row's ViMoE / ViT (default quick; smoke for CI)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall time, or this process's CPU time (CPU only; ignores waits for a busy core)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds to aim for in total (default 100, quick 30); rows get fewer repeats when busy")
    args = parser.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    if not sections or any(x not in SECTIONS for x in sections):
        parser.error(f"--sections: choose from {SECTIONS}, got {args.sections!r}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.clock == "cpu" and not device.startswith("cpu"):
        parser.error("--clock cpu measures host CPU time: use --clock wall on a GPU")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 20)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        parser.error(f"unknown backends {bad}; choose from {BACKENDS}")
    routers = [r for r in args.routers.split(",") if r] if args.routers else None
    for name in routers or ():
        try:
            router_spec(name, 2)
        except ValueError as err:
            parser.error(f"--routers: {err}")
    env = _environment(device)
    env["clock"] = args.clock
    print(
        f"moe_lite.bench: torch {env['torch']}, device {device}, {env['threads']} threads, "
        f"repeats {repeats}, clock {args.clock}"
        + (f", load average {env['loadavg_start']:.2f}" if "loadavg_start" in env else ""),
    )
    load = env.get("loadavg_start")
    if load is not None and env["cpu_count"] and load > env["cpu_count"]:
        hint = " (multi-threaded ops wait for busy cores at every parallel region: try --threads 1)"
        print(
            f"warning: load average {load:.1f} > {env['cpu_count']} cores: the CPU is shared with other jobs, "
            f"timings are noisy" + (hint if env["threads"] > 1 else "")
        )
    start = time.perf_counter()
    budget = args.budget if args.budget is not None else (30.0 if args.quick else 100.0)
    warmup = 1 if args.quick else 3
    rows: List[dict] = []
    model_row = None
    if "layers" in sections:
        # the model row is one row of many: it gets a share like two layer rows
        share = budget * (1.0 - 2.0 / (2 + len(CONFIGS) * len(backends) * 4)) if "model" in sections else budget
        rows = run(repeats=repeats, warmup=warmup, device=device, routers=routers, backends=backends,
                   activation=args.activation, budget_s=share, clock=args.clock)
        for row in rows:
            row["section"] = "layers"
    if "model" in sections:
        left = max(0.0, budget - (time.perf_counter() - start))
        try:
            model_row = run_model(repeats=repeats, warmup=warmup, device=device, size=args.model_size,
                                  budget_s=left, clock=args.clock)
        except ValueError as err:  # an unknown --model-size
            parser.error(str(err))
        model_row["section"] = "model"
        rows.append(model_row)
    env["seconds"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = os.getloadavg()[0]
    print(f"done in {env['seconds']:.0f} s (ratio = median of MoE/dense over adjacent runs; shared CPUs are noisy)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": [r for r in rows if r.get("section") != "model"],
                       "model": model_row}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
