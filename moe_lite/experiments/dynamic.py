"""Harder inputs need more experts: top-p (Huang et al. 2024) against top-2 at the same parameters."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

from ..data import CLASS_NAMES
from ..models.vit import ViT, ViTConfig, dynamic_config, experts_per_sample, set_threshold, top2_config
from .. import viz
from .common import ClassifySize, predict, routing_table, seeded_build, train_classifier
from .core import Dataset, ExperimentResult, RunContext, Timer, mean_std
from .vimoe import SIZES as VIT_SIZES

SIZES: Dict[str, ClassifySize] = VIT_SIZES
#: thresholds swept on the trained top-p model (inference only, no retraining)
SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def base_config(size: str) -> ViTConfig:
    """The dynamic-routing backbone: 8 experts in every second block, no shared expert."""
    return dataclasses.replace(ViTConfig(), num_experts=8, moe_layers="every-2", **SIZES[size].model)


@torch.no_grad()
def expert_profile(model: torch.nn.Module, data: Dataset, device: torch.device,
                   batch_size: int = 500) -> Dict[str, torch.Tensor]:
    """Eval pass over ``data``: per-sample loss ``[N]``, correctness ``[N]``, experts per token per
    sample averaged over MoE layers ``[N]``, and per layer ``{layer: [N]}``."""
    per_layer: Dict[str, List[torch.Tensor]] = {}

    def collect(m: torch.nn.Module, start: int) -> None:
        for name, values in experts_per_sample(m).items():
            per_layer.setdefault(name, []).append(values.cpu())

    logits, losses = predict(model, data, device, batch_size, on_batch=collect)
    layers = {name: torch.cat(v) for name, v in per_layer.items()}
    mean = torch.stack(list(layers.values())).mean(0) if layers else torch.zeros(len(data))
    return {"loss": losses, "correct": (logits.argmax(-1) == data.y).float(), "experts": mean, "layers": layers}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        sorted_x, order = x.double().sort()
        _, group = torch.unique_consecutive(sorted_x, return_inverse=True)  # tie groups
        positions = torch.arange(len(x), dtype=torch.double)
        mean_rank = torch.zeros(int(group.max()) + 1, dtype=torch.double).index_add_(0, group, positions)
        mean_rank /= torch.bincount(group).double()
        r = torch.empty(len(x), dtype=torch.double)
        r[order] = mean_rank[group]
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def run_dynamic(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
                data: str = "auto", progress: bool = True, p: float = 0.4, entropy_weight: float = 1e-4,
                ctx: Optional[RunContext] = None) -> ExperimentResult:
    """Train a top-p ViMoE (entropy 1e-4 + load balance 1e-2) and a top-2 ViMoE with the same
    parameters; report accuracy, mean experts per token (overall, per layer, per class), whether
    high-loss samples take more experts, and an inference-only threshold sweep on the top-p model."""
    ctx = ctx or RunContext.create(size, seeds, device, data, progress)
    spec = SIZES[ctx.size]
    train_all, test_all = ctx.splits()
    train, test = train_all.take(spec.n_per_class, seed=0), test_all.take(spec.test_per_class, seed=1)
    base = base_config(ctx.size)
    configs = {"top-p": dynamic_config(base, p=p, entropy_weight=entropy_weight), "top-2": top2_config(base)}
    result = ExperimentResult("dynamic", ctx.size, str(ctx.device), train_all.source,
                              config={"p": p, "entropy_weight": entropy_weight, "seeds": ctx.seeds,
                                      "train_images": len(train), "size": dataclasses.asdict(spec)})
    with Timer() as timer:
        rows = []
        for name, config in configs.items():
            accs, experts, profiles = [], [], []
            for seed in ctx.seeds:
                record = train_classifier(name, seeded_build(seed, lambda: ViT(config)), ctx, spec, seed, train, test,
                                          experiment="dynamic")
                profile = expert_profile(record.model, test, ctx.device)
                accs.append(record.metrics["accuracy"])
                experts.append(float(profile["experts"].mean()))
                profiles.append(profile)
                if seed == ctx.seeds[0]:
                    result.models[name] = record.model
                    result.figures[f"training curves: {name}"] = viz.training_curves(record.history)
                    result.metrics[f"{name}/routing"] = record.metrics.get("routing")
            first = profiles[0]
            acc, ept = mean_std(accs), mean_std(experts)
            result.metrics[name] = {
                "accuracy": acc,
                "experts_per_token": ept,
                "experts_per_layer": {k: float(v.mean()) for k, v in first["layers"].items()},
                "experts_by_class": [float(first["experts"][test.y == c].mean()) for c in range(10)],
                "loss_experts_spearman": spearman(first["loss"], first["experts"]),
                "experts_correct_vs_wrong": [float(first["experts"][first["correct"] == 1].mean()),
                                             float(first["experts"][first["correct"] == 0].mean())
                                             if (first["correct"] == 0).any() else float("nan")],
            }
            rows.append({"model": name, "accuracy": round(acc["mean"], 4), "accuracy_std": round(acc["std"], 4),
                         "experts_per_token": round(ept["mean"], 3), "seeds": len(accs),
                         **{f"experts {k}": round(v, 3) for k, v in result.metrics[name]["experts_per_layer"].items()}})
        result.tables["top-p vs top-2"] = rows
        _class_table_and_figures(result, test)
        _threshold_sweep(result, test, ctx)
    result.wall_time_s = timer.seconds
    return result


def _class_table_and_figures(result: ExperimentResult, test: Dataset) -> None:
    dyn = result.metrics["top-p"]
    result.tables["experts per class (top-p)"] = [
        {"class": CLASS_NAMES[c], "experts_per_token": round(v, 3)} for c, v in enumerate(dyn["experts_by_class"])]
    result.figures["experts per token by layer"] = viz.layer_stat_bars(
        {layer: {"experts_per_token": v} for layer, v in dyn["experts_per_layer"].items()},
        keys="experts_per_token", title="top-p: mean experts per token in each MoE layer")
    result.figures["experts per token by class"] = viz.tradeoff_curve(
        list(range(10)), dyn["experts_by_class"], labels=list(CLASS_NAMES), x_title="class",
        y_title="mean experts per token", title="top-p: experts per token by class")
    routing = result.metrics.get("top-p/routing")
    if routing:
        result.tables["routing (top-p)"] = routing_table(routing)


def _threshold_sweep(result: ExperimentResult, test: Dataset, ctx: RunContext) -> None:
    model = result.models["top-p"]
    points = []
    trained_p = model.config.router_kwargs["p"]
    for value in SWEEP:
        set_threshold(model, value)
        profile = expert_profile(model, test, ctx.device)
        points.append({"p": value, "accuracy": float(profile["correct"].mean()),
                       "experts_per_token": float(profile["experts"].mean())})
    set_threshold(model, trained_p)
    result.tables["threshold sweep (inference only)"] = [{k: round(v, 4) for k, v in pt.items()} for pt in points]
    result.metrics["threshold_sweep"] = points
    result.figures["accuracy vs experts per token"] = viz.tradeoff_curve(
        [pt["experts_per_token"] for pt in points], [pt["accuracy"] for pt in points],
        labels=[f"p={pt['p']}" for pt in points], x_title="mean experts per token", y_title="test accuracy",
        title="top-p threshold moved at inference (trained at p=%.1f)" % trained_p)


__all__ = ["run_dynamic", "expert_profile", "spearman", "base_config"]
