"""Harder inputs need more experts: top-p (Huang et al. 2024) against top-2 at the same parameters."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..data import CLASS_NAMES
from ..inspect import inference_threshold, record_routing
from ..models.vit import ViT, ViTConfig, dynamic_config, top2_config, topk_config
from ..routers import TopP
from .. import viz
from .common import ClassifySize, predict, routing_table, seeded_build, train_classifier
from .core import Dataset, ExperimentResult, Pairing, RunContext, format_mean_std, mean_std
from .figures import dynamic_figures
from .runner import Experiment, Run, run
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
    sample averaged over MoE layers ``[N]``, and per layer ``{layer: [N]}`` (recorded with
    :func:`moe_lite.inspect.record_routing`)."""
    with record_routing(model) as rec:
        logits, losses = predict(model, data, device, batch_size)
    layers = rec.experts_per_sample()
    mean = rec.mean_experts_per_sample()
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


#: name -> its ViTConfig from the backbone, the top-p threshold and the entropy weight. top-1 is the
#: compute floor: top-p only saves compute if it beats one expert per token.
VARIANTS: Dict[str, Callable[[ViTConfig, float, float], ViTConfig]] = {
    "top-p": lambda base, p, w: dynamic_config(base, p=p, entropy_weight=w),
    "top-1": lambda base, p, w: topk_config(base, k=1),
    "top-2": lambda base, p, w: top2_config(base),
    "top-p, no entropy loss": lambda base, p, w: dynamic_config(base, p=p, entropy_weight=0.0),
}
#: what ``entropy_ablation=False`` leaves out
ABLATION = "top-p, no entropy loss"


def _prepare(run: Run) -> Dict[str, Any]:
    spec = run.spec
    train_all, test_all = run.ctx.splits()
    train, test = train_all.take(spec.n_per_class, seed=0), test_all.take(spec.test_per_class, seed=1)
    run.state.update(train=train, test=test, base=base_config(run.ctx.size))
    return {"p": run.options["p"], "entropy_weight": run.options["entropy_weight"], "seeds": run.seeds,
            "models": list(run.variants), "train_images": len(train), "test_images": len(test),
            "size": dataclasses.asdict(spec)}


def _train(name: str, make: Callable[..., ViTConfig], seed: int, run: Run) -> Dict[str, Any]:
    """One model for one seed: its difficulty numbers (:func:`_difficulty`); the first seed keeps
    its model, routing, test-set profile and training curves."""
    config = make(run.state["base"], run.options["p"], run.options["entropy_weight"])
    test = run.state["test"]
    record = train_classifier(name, seeded_build(seed, lambda: ViT(config)), run.ctx, run.spec, seed,
                              run.state["train"], test, experiment="dynamic")
    profile = expert_profile(record.model, test, run.ctx.device)
    out: Dict[str, Any] = {"difficulty": _difficulty(profile, test),
                           "experts_by_class": [float(profile["experts"][test.y == c].mean()) for c in range(10)],
                           "accuracy_by_class": [float(profile["correct"][test.y == c].mean()) for c in range(10)]}
    if name == "top-p":  # the inference-only sweep, on every seed's model
        out["sweep"] = _sweep(record.model, test, run.ctx.device)
    if run.first_seed(seed):
        out.update(model=record.model, routing=record.metrics.get("routing"), profile=profile,
                   figures={f"training curves: {name}": viz.training_curves(record.history)})
    return out


def _summarise(records: Dict[str, Dict[int, Dict[str, Any]]], run: Run) -> None:
    result, seeds = run.result, run.seeds
    rows, hardness_rows = [], []
    for name, by_seed in records.items():
        per_seed = [r["difficulty"] for r in by_seed.values()]
        result.metrics[f"{name}/routing"] = by_seed[seeds[0]]["routing"]
        summary = {key: mean_std([d[key] for d in per_seed], seeds=seeds) for key in per_seed[0] if key != "layers"}
        layers = {layer: mean_std([d["layers"][layer] for d in per_seed], seeds=seeds) for layer in per_seed[0]["layers"]}
        by_class = {key: [mean_std([r[key][c] for r in by_seed.values()], seeds=seeds) for c in range(10)]
                    for key in ("experts_by_class", "accuracy_by_class")}
        result.metrics[name] = {
            **summary,
            "experts_per_layer": {k: v["mean"] for k, v in layers.items()},
            "experts_per_layer_seeds": layers,
            **{key: [v["mean"] for v in values] for key, values in by_class.items()},
            **{f"{key}_seeds": values for key, values in by_class.items()},
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
    run.table("comparison", "top-p vs top-1 and top-2", rows)
    run.table("hardness", "do harder inputs take more experts?", hardness_rows)
    if "top-p" in result.metrics:
        _class_table_and_figures(run)
        _threshold_sweep_table(run, [records["top-p"][s]["sweep"] for s in seeds])


DYNAMIC = Experiment(
    "dynamic", "top-p vs top-1 and top-2: experts per token by layer, class and difficulty", SIZES, VARIANTS,
    _train, _summarise, prepare=_prepare, options={"p": 0.4, "entropy_weight": 1e-4}, figures=dynamic_figures,
    pairing=Pairing(("top-2", "top-1"), {"accuracy": "higher", "experts_per_token": "lower"}))


def run_dynamic(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
                data: str = "auto", progress: bool = True, p: float = 0.4, entropy_weight: float = 1e-4,
                entropy_ablation: bool = True, variants: Optional[Sequence[str]] = None,
                ctx: Optional[RunContext] = None, settings: Any = None, shipped: bool = True) -> ExperimentResult:
    """Train a top-p ViMoE (entropy ``entropy_weight`` + load balance 1e-2), a top-1 and a top-2 ViMoE
    with the same parameters (and, with ``entropy_ablation``, top-p without the entropy loss), for
    every seed; report accuracy, mean experts per token (overall, per layer, per class), whether hard
    classes and high-loss samples take more experts, and an inference-only threshold sweep on the
    top-p model. Every number is a mean ± std over seeds; figures and per-class tables show the
    first seed. ``variants``: keys of :data:`VARIANTS` (default: all, less the ablation without
    ``entropy_ablation``)."""
    if variants is None:
        variants = [v for v in VARIANTS if entropy_ablation or v != ABLATION]
    return run(DYNAMIC, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data, progress=progress,
               variants=variants, p=p, entropy_weight=entropy_weight, shipped=shipped)


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


def _class_table_and_figures(run: Run) -> None:
    result = run.result
    dyn = result.metrics["top-p"]
    run.table("experts_per_class", f"experts per class (top-p, mean ± std over {len(run.seeds)} seeds)", [
        {"class": CLASS_NAMES[c], "experts_per_token": format_mean_std(v, 3), "accuracy": format_mean_std(a, 4)}
        for c, (v, a) in enumerate(zip(dyn["experts_by_class_seeds"], dyn["accuracy_by_class_seeds"]))])
    result.figures["experts per token by layer"] = viz.layer_stat_bars(
        {layer: {"experts_per_token": v} for layer, v in dyn["experts_per_layer"].items()},
        keys="experts_per_token", title="top-p: mean experts per token in each MoE layer")
    # classes are categories: one bar each, named (a line through class indices would suggest an order)
    result.figures["experts per token by class"] = viz.layer_stat_bars(
        {CLASS_NAMES[c]: {"experts_per_token": v} for c, v in enumerate(dyn["experts_by_class"])},
        keys="experts_per_token", x_title="class", y_title="mean experts per token",
        title=f"top-p: experts per token by class (mean over {len(run.seeds)} seeds)")
    routing = result.metrics.get("top-p/routing")
    if routing:
        run.table("routing", "routing (top-p)", routing_table(routing))


def _sweep(model: torch.nn.Module, test: Dataset, device: torch.device) -> List[Dict[str, float]]:
    """The trained top-p model at every threshold of :data:`SWEEP` (inference only): accuracy and
    experts per token at each."""
    points = []
    for value in SWEEP:
        with inference_threshold(model, value, kind=TopP):  # the trained p comes back on exit
            profile = expert_profile(model, test, device)
        points.append({"p": value, "accuracy": float(profile["correct"].mean()),
                       "experts_per_token": float(profile["experts"].mean())})
    return points


def _threshold_sweep_table(run: Run, sweeps: Sequence[List[Dict[str, float]]]) -> None:
    """The sweep over every seed's top-p model: mean ± std over seeds at each threshold."""
    rows = []
    for i, value in enumerate(SWEEP):
        rows.append({"p": value, **{key: format_mean_std(mean_std([sweep[i][key] for sweep in sweeps],
                                                                  seeds=run.seeds), 4)
                                    for key in ("accuracy", "experts_per_token")}})
    run.result.metrics["threshold_sweep"] = [
        {"p": value, **{key: mean_std([sweep[i][key] for sweep in sweeps], seeds=run.seeds)
                        for key in ("accuracy", "experts_per_token")}} for i, value in enumerate(SWEEP)]
    run.table("threshold_sweep", f"threshold sweep (inference only, mean ± std over {len(run.seeds)} seeds)", rows)


__all__ = ["run_dynamic", "DYNAMIC", "VARIANTS", "expert_profile", "spearman", "base_config"]
