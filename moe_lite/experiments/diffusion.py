"""DiT-MoE and Expert Race: routing strategies at equal active compute on class-conditional
Fashion-MNIST generation.

Generation metrics are a Fréchet distance on the features of the kit's own Fashion-MNIST classifier
(``fd_fmnist_classifier``; NOT Inception FID: the numbers are not comparable with papers' FIDs) and
the conditional accuracy of samples (the classifier agrees with the class asked for).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch

from ..data import CLASS_NAMES
from ..models.dit import DiT, DiTConfig, track_experts
from ..models.diffusion import DiffusionTask, sample, to_unit_range
from ..train import TrainConfig
from .. import viz
from .common import StepStats, cached_fit, loaders, seeded_build
from .core import ExperimentResult, RunContext, Timer, mean_std


@dataclass(frozen=True)
class DiffusionSize:
    n_per_class: Optional[int]
    epochs: int
    batch_size: int
    lr: float
    time_budget_s: Optional[float]
    samples_per_class: int
    sample_steps: int
    cfg_scale: float
    model: Dict[str, Any] = field(default_factory=dict)


SIZES: Dict[str, DiffusionSize] = {
    "smoke": DiffusionSize(n_per_class=16, epochs=1, batch_size=40, lr=2e-3, time_budget_s=None,
                           samples_per_class=2, sample_steps=3, cfg_scale=2.0,
                           model={"dim": 32, "depth": 2, "heads": 2, "mlp_hidden": 64}),
    "quick": DiffusionSize(n_per_class=None, epochs=20, batch_size=128, lr=2e-3, time_budget_s=150,
                           samples_per_class=50, sample_steps=10, cfg_scale=2.0),
    "full": DiffusionSize(n_per_class=None, epochs=60, batch_size=256, lr=5e-4, time_budget_s=None,
                          samples_per_class=500, sample_steps=25, cfg_scale=2.0,
                          model={"dim": 256, "depth": 8, "heads": 8, "mlp_hidden": 1024}),
}

#: name -> DiTConfig overrides. All MoE variants: 8 experts, 2 active per token on average, each
#: expert half the dense MLP width (the paper's 2-in-8), so active compute equals the dense DiT.
RACE_RECIPE = {"moe_routing": "race", "gating": "identity", "per_layer_reg": True, "router_similarity": 1e-2}
VARIANTS: Dict[str, Dict[str, Any]] = {
    "dense": {"moe_routing": "none"},
    "token choice": {**RACE_RECIPE, "moe_routing": "token_choice"},
    "expert choice": {**RACE_RECIPE, "moe_routing": "expert_choice"},
    "expert race": dict(RACE_RECIPE),
    "BL choice": {**RACE_RECIPE, "moe_routing": "bl"},
    "BE choice": {**RACE_RECIPE, "moe_routing": "be"},
    "LE choice": {**RACE_RECIPE, "moe_routing": "le"},
    # the paper's Table 1 / Table 3 ablations
    "race, softmax gating": {"moe_routing": "race", "gating": "softmax"},
    "race, sigmoid gating": {"moe_routing": "race", "gating": "sigmoid"},
    "race, identity gating": {"moe_routing": "race", "gating": "identity"},
    "race + per-layer reg": {"moe_routing": "race", "gating": "identity", "per_layer_reg": True},
    "race, balance loss": {"moe_routing": "race", "gating": "identity", "per_layer_reg": True,
                           "balance_weight": 1e-2},
}
DEFAULT_VARIANTS = ("dense", "token choice", "expert choice", "expert race")


def variant_config(name: str, size: str) -> DiTConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown DiT variant {name!r}; choose from {list(VARIANTS)}")
    return DiTConfig(**{**SIZES[size].model, "num_experts": 8, "k": 2, **VARIANTS[name]})


@torch.no_grad()
def evaluate_samples(model: DiT, classifier: torch.nn.Module, reference: torch.Tensor, spec: DiffusionSize,
                     device: torch.device, seed: int = 0) -> Dict[str, Any]:
    """Sample ``samples_per_class`` images of every class; return generation metrics, the routed
    compute used while sampling (experts per token, per timestep bucket) and the images."""
    from ..metrics import generation_metrics

    labels = torch.arange(10).repeat_interleave(spec.samples_per_class)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), 1, 28, 28, generator=gen)
    def generate() -> torch.Tensor:
        return torch.cat([
            sample(model, labels[i:i + 250].to(device), steps=spec.sample_steps, cfg_scale=spec.cfg_scale,
                   noise=noise[i:i + 250].to(device)).cpu()
            for i in range(0, len(labels), 250)])

    usage = None
    if model.config.is_moe:
        with track_experts(model) as usage:
            images = generate()
    else:
        images = generate()
    metrics = generation_metrics(images, labels, reference, classifier)
    out: Dict[str, Any] = {**metrics, "images": images, "labels": labels}
    if usage is not None:
        out["experts_per_token"] = usage.experts_per_token
        out["experts_by_timestep"] = usage.by_timestep()
    return out


def run_dit(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
            data: str = "auto", progress: bool = True, variants: Sequence[str] = DEFAULT_VARIANTS,
            ctx: Optional[RunContext] = None) -> ExperimentResult:
    """Train a class-conditional DiT per variant (default: dense, token choice, expert choice, expert
    race at equal active compute), sample every class, and report the kit's classifier-feature
    Fréchet distance, conditional accuracy, experts per diffusion timestep and balance statistics."""
    ctx = ctx or RunContext.create(size, seeds, device, data, progress)
    spec = SIZES[ctx.size]
    train_all, test_all = ctx.splits()
    train = train_all.take(spec.n_per_class, seed=0)
    result = ExperimentResult("dit", ctx.size, str(ctx.device), train_all.source,
                              config={"variants": {v: VARIANTS[v] for v in variants}, "seeds": ctx.seeds,
                                      "train_images": len(train), "size": dataclasses.asdict(spec)},
                              notes=["fd_fmnist_classifier is a Fréchet distance on the features of moe_lite's own "
                                     "Fashion-MNIST classifier, not Inception FID."])
    with Timer() as timer:
        classifier = _classifier(ctx, train_all, test_all)
        reference = test_all.x
        rows, curves = [], {}
        for name in variants:
            config = variant_config(name, ctx.size)
            per_seed = []
            for seed in ctx.seeds:
                model = seeded_build(seed, lambda: DiT(config))
                tracker = StepStats(every=10)
                train_loader, test_loader = loaders(train, test_all.take(20, seed=1), spec.batch_size, seed)
                history = cached_fit("dit", name, model, DiffusionTask(), train_loader, test_loader,
                                     TrainConfig(epochs=spec.epochs, lr=spec.lr, seed=seed, device=str(ctx.device),
                                                 progress=ctx.progress, time_budget_s=spec.time_budget_s),
                                     ctx, key=(seed,), callbacks=[tracker])
                gen = evaluate_samples(model, classifier, reference, spec, ctx.device, seed=seed)
                per_seed.append((model, history, gen, tracker))
            model, history, gen, tracker = per_seed[0]
            fds = mean_std([g["fd_fmnist_classifier"] for _, _, g, _ in per_seed])
            caccs = mean_std([g["conditional_accuracy"] for _, _, g, _ in per_seed])
            final = history.evals[-1]
            entry = {"fd_fmnist_classifier": fds, "conditional_accuracy": caccs,
                     "val_loss": final.get("loss"), "train_time_s": history.wall_time_s,
                     "steps": history.steps[-1]["step"] if history.steps else 0,
                     "routing": final.get("routing"),
                     "sampling_experts_per_token": gen.get("experts_per_token")}
            result.metrics[name] = entry
            result.models[name] = model
            curves[name] = tracker.records
            rows.append({"variant": name, "fd_fmnist_classifier": round(fds["mean"], 3),
                         "fd_std": round(fds["std"], 3), "conditional_accuracy": round(caccs["mean"], 4),
                         "cond_acc_std": round(caccs["std"], 4), "seeds": fds["n"],
                         "val_loss": round(float(final.get("loss", float("nan"))), 4),
                         "experts_per_token (sampling)": round(gen["experts_per_token"], 3)
                         if "experts_per_token" in gen else "dense",
                         "steps": entry["steps"], "train_s": round(history.wall_time_s, 1)})
            per_class = min(spec.samples_per_class, 8)
            pick = torch.cat([torch.arange(c * spec.samples_per_class, c * spec.samples_per_class + per_class)
                              for c in range(10)])
            result.figures[f"samples: {name}"] = viz.image_grid(
                to_unit_range(gen["images"][pick]), labels=gen["labels"][pick], label_names=CLASS_NAMES,
                ncols=per_class)
            if "experts_by_timestep" in gen:
                result.metrics[name]["experts_by_timestep"] = gen["experts_by_timestep"]
                result.figures[f"experts per timestep: {name}"] = viz.layer_stat_bars(
                    {f"t in bucket {b}": {"experts_per_token": float(v)} for b, v in
                     enumerate(gen["experts_by_timestep"])}, keys="experts_per_token",
                    title=f"{name}: experts per token by diffusion timestep (0 = clean, 9 = noise)")
        result.tables["generation (fd_fmnist_classifier: classifier-feature Fréchet distance, not FID)"] = rows
        result.metrics["curves"] = curves
        moe_curves = {k: v for k, v in curves.items() if v}
        if moe_curves:
            result.figures["balance during training"] = viz.stat_curves(
                moe_curves, x="step", keys=("load_cv", "max_vio", "combination_usage"))
    result.wall_time_s = timer.seconds
    return result


def _classifier(ctx: RunContext, train, test) -> torch.nn.Module:
    """The kit's feature classifier (cached); at smoke size a throw-away one on a few images."""
    from ..metrics import get_feature_classifier

    if ctx.size == "smoke":
        small = train.take(30, seed=3)
        return get_feature_classifier(device=str(ctx.device), data=((small.x, small.y), None), epochs=1,
                                      verbose=ctx.progress)
    return get_feature_classifier(device=str(ctx.device), data=((train.x, train.y), (test.x, test.y)),
                                  progress=ctx.progress)
