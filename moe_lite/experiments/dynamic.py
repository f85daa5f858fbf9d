"""Harder inputs need more experts: top-p (Huang et al. 2024) against top-2 at the same parameters."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

from ..data import CLASS_NAMES
from ..models.vit import ViT, ViTConfig, dynamic_config, experts_per_sample, set_threshold, top2_config, topk_config
from .. import viz
from .common import ClassifySize, predict, routing_table, seeded_build, train_classifier
from .core import Dataset, ExperimentResult, RunContext, Timer, add_paired_comparisons, format_mean_std, mean_std
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
                entropy_ablation: bool = True, ctx: Optional[RunContext] = None) -> ExperimentResult:
    """Train a top-p ViMoE (entropy ``entropy_weight`` + load balance 1e-2) and a top-2 ViMoE with
    the same parameters (and, with ``entropy_ablation``, top-p without the entropy loss), for every
    seed; report accuracy, mean experts per token (overall, per layer, per class), whether hard
    classes and high-loss samples take more experts, and an inference-only threshold sweep on the
    top-p model. Every number is a mean ± std over seeds; figures and per-class tables show the
    first seed."""
    ctx = ctx or RunContext.create(size, seeds, device, data, progress)
    spec = SIZES[ctx.size]
    train_all, test_all = ctx.splits()
    train, test = train_all.take(spec.n_per_class, seed=0), test_all.take(spec.test_per_class, seed=1)
    base = base_config(ctx.size)
    # top-1 is the compute floor: top-p only saves compute if it beats one expert per token
    configs = {"top-p": dynamic_config(base, p=p, entropy_weight=entropy_weight), "top-1": topk_config(base, k=1),
               "top-2": top2_config(base)}
    if entropy_ablation:
        configs["top-p, no entropy loss"] = dynamic_config(base, p=p, entropy_weight=0.0)
    result = ExperimentResult("dynamic", ctx.size, str(ctx.device), train_all.source,
                              config={"p": p, "entropy_weight": entropy_weight, "seeds": ctx.seeds,
                                      "models": list(configs), "train_images": len(train), "test_images": len(test),
                                      "size": dataclasses.asdict(spec)})
    with Timer() as timer:
        rows, hardness_rows = [], []
        for name, config in configs.items():
            per_seed: List[Dict[str, float]] = []
            for seed in ctx.seeds:
                record = train_classifier(name, seeded_build(seed, lambda: ViT(config)), ctx, spec, seed, train, test,
                                          experiment="dynamic")
                profile = expert_profile(record.model, test, ctx.device)
                per_seed.append(_difficulty(profile, test))
                if seed == ctx.seeds[0]:
                    result.models[name] = record.model
                    result.figures[f"training curves: {name}"] = viz.training_curves(record.history)
                    result.metrics[f"{name}/routing"] = record.metrics.get("routing")
                    first = profile
            summary = {key: mean_std([d[key] for d in per_seed], seeds=ctx.seeds)
                       for key in per_seed[0] if key != "layers"}
            layers = {layer: mean_std([d["layers"][layer] for d in per_seed], seeds=ctx.seeds)
                      for layer in per_seed[0]["layers"]}
            result.metrics[name] = {
                **summary,
                "experts_per_layer": {k: v["mean"] for k, v in layers.items()},
                "experts_per_layer_seeds": layers,
                "experts_by_class": [float(first["experts"][test.y == c].mean()) for c in range(10)],
                "accuracy_by_class": [float(first["correct"][test.y == c].mean()) for c in range(10)],
            }
            rows.append({"model": name, "accuracy": format_mean_std(summary["accuracy"], 4),
                         "experts_per_token": format_mean_std(summary["experts_per_token"], 3),
                         "seeds": len(per_seed),
                         **{f"experts {k}": format_mean_std(v, 3) for k, v in layers.items()}})
            hardness_rows.append({
                "model": name,
                "spearman(sample loss, experts)": format_mean_std(summary["loss_experts_spearman"], 3),
                "experts, correct": format_mean_std(summary["experts_correct"], 3),
                "experts, wrong": format_mean_std(summary["experts_wrong"], 3),
                "spearman(class error, class experts)": format_mean_std(summary["class_error_experts_spearman"], 3),
                "seeds": len(per_seed)})
        result.tables["top-p vs top-1 and top-2"] = rows
        result.tables["do harder inputs take more experts?"] = hardness_rows
        _class_table_and_figures(result, test)
        _threshold_sweep(result, test, ctx)
    add_paired_comparisons(result)
    result.wall_time_s = timer.seconds
    return result


def _difficulty(profile: Dict[str, torch.Tensor], test: Dataset) -> Dict[str, float]:
    """One seed's numbers: accuracy, experts per token (mean and per layer), and how experts relate
    to difficulty: rank correlation with the per-sample loss, experts on right vs wrong answers,
    and rank correlation over classes between error rate and experts."""
    experts, correct = profile["experts"], profile["correct"]
    class_error = torch.stack([1 - correct[test.y == c].mean() for c in range(10)])
    class_experts = torch.stack([experts[test.y == c].mean() for c in range(10)])
    wrong = correct == 0
    return {"accuracy": float(correct.mean()), "experts_per_token": float(experts.mean()),
            "loss_experts_spearman": spearman(profile["loss"], experts),
            "experts_correct": float(experts[~wrong].mean()),
            "experts_wrong": float(experts[wrong].mean()) if wrong.any() else float("nan"),
            "class_error_experts_spearman": spearman(class_error, class_experts),
            "layers": {k: float(v.mean()) for k, v in profile["layers"].items()}}


def _class_table_and_figures(result: ExperimentResult, test: Dataset) -> None:
    dyn = result.metrics["top-p"]
    result.tables["experts per class (top-p, first seed)"] = [
        {"class": CLASS_NAMES[c], "experts_per_token": round(v, 3), "accuracy": round(a, 4)}
        for c, (v, a) in enumerate(zip(dyn["experts_by_class"], dyn["accuracy_by_class"]))]
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
