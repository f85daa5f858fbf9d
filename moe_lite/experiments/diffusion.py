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
from ..models.dit import RACE_CANDIDATES, DiT, DiTConfig, track_experts, use_ema_threshold
from ..models.diffusion import DiffusionTask, sample, to_unit_range
from ..metrics import real_fd_floor
from ..train import TrainConfig
from .. import viz
from .common import StepStats, cached_fit, layer_mean, loaders, seeded_build
from .core import ExperimentResult, RunContext, Timer, add_paired_comparisons, format_mean_std, mean_std


@dataclass(frozen=True)
class DiffusionSize:
    """How big one DiT run is: training images per class (None = all), ``epochs`` or a fixed
    ``max_steps`` (quick: the same numbers on any machine), batch size, learning rate, an optional
    wall-time cap, and the sampling used for the metrics (images per class, Heun steps, CFG scale).
    ``model``: DiTConfig overrides."""

    n_per_class: Optional[int]
    epochs: int
    batch_size: int
    lr: float
    time_budget_s: Optional[float]
    samples_per_class: int
    sample_steps: int
    cfg_scale: float
    model: Dict[str, Any] = field(default_factory=dict)
    max_steps: Optional[int] = None


SIZES: Dict[str, DiffusionSize] = {
    "smoke": DiffusionSize(n_per_class=16, epochs=1, batch_size=40, lr=2e-3, time_budget_s=None,
                           samples_per_class=2, sample_steps=3, cfg_scale=2.0,
                           model={"dim": 32, "depth": 2, "heads": 2, "mlp_hidden": 64}),
    # 800 steps of 64 images (5 epochs of the 10k subset), measured by `scripts/sweep_dit.py` (seed 0,
    # one CPU thread, Heun 10 steps, guidance 2): conditional accuracy 0.53 at 500 steps and 0.73 at 1000
    # for the dense DiT; 0.62 for expert race at 800 (FD 28.5 against a real-vs-real floor of 5.4).
    # Guidance 3 buys 3-4 points of accuracy for about 6 points of FD; EMA weights did not help.
    "quick": DiffusionSize(n_per_class=None, epochs=1, max_steps=800, batch_size=64, lr=2e-3, time_budget_s=None,
                           samples_per_class=30, sample_steps=10, cfg_scale=2.0),
    # A free Colab GPU (T4): a wider, deeper DiT for longer. Calibrated by FLOPs, not yet measured on a T4.
    "gpu": DiffusionSize(n_per_class=None, epochs=1, max_steps=4000, batch_size=128, lr=1e-3, time_budget_s=None,
                         samples_per_class=100, sample_steps=20, cfg_scale=2.0,
                         model={"dim": 192, "depth": 6, "heads": 6, "mlp_hidden": 768}),
    "full": DiffusionSize(n_per_class=None, epochs=60, batch_size=256, lr=5e-4, time_budget_s=None,
                          samples_per_class=500, sample_steps=25, cfg_scale=2.0,
                          model={"dim": 256, "depth": 8, "heads": 8, "mlp_hidden": 1024}),
}

#: name -> DiTConfig overrides. All MoE variants: 8 experts, 2 active per token on average, each
#: expert half the dense MLP width (the paper's 2-in-8), so active compute equals the dense DiT.
#: The full recipe (Table 6 rows): identity gating, EMA threshold, per-layer regularization,
#: router similarity.
RACE_RECIPE = {"moe_routing": "race", "gating": "identity", "ema_threshold": True, "per_layer_reg": True,
               "router_similarity": 1e-2}
VARIANTS: Dict[str, Dict[str, Any]] = {
    "dense": {"moe_routing": "none"},
    # Table 6: which dimensions compete in the top-K (full recipe each)
    "token choice": {**RACE_RECIPE, "moe_routing": "token_choice"},
    "expert choice": {**RACE_RECIPE, "moe_routing": "expert_choice"},
    "BL choice": {**RACE_RECIPE, "moe_routing": "bl"},
    "BE choice": {**RACE_RECIPE, "moe_routing": "be"},
    "LE choice": {**RACE_RECIPE, "moe_routing": "le"},
    "expert race": dict(RACE_RECIPE),
    # Table 1 (race row) and the start of Table 3's cumulative ablation: no threshold, no PLR, no RS
    "race, softmax gating": {"moe_routing": "race", "gating": "softmax", "ema_threshold": False},
    "race, sigmoid gating": {"moe_routing": "race", "gating": "sigmoid", "ema_threshold": False},
    "race, identity gating": {"moe_routing": "race", "gating": "identity", "ema_threshold": False},
    # Table 3, cumulative: + EMA ("learnable") threshold, + per-layer reg (then + RS = expert race)
    "race + EMA threshold": {"moe_routing": "race", "gating": "identity", "ema_threshold": True},
    "race + per-layer reg": {"moe_routing": "race", "gating": "identity", "ema_threshold": True,
                             "per_layer_reg": True},
    # Table 2: no constraint (= race + per-layer reg) vs a balance loss vs router similarity (= expert race)
    "race, balance loss": {"moe_routing": "race", "gating": "identity", "ema_threshold": True,
                           "per_layer_reg": True, "balance_weight": 1e-2},
}
DEFAULT_VARIANTS = ("dense", "token choice", "expert choice", "expert race")
#: every variant the Race study (``python -m moe_lite run race``) trains
RACE_STUDY = tuple(VARIANTS)
#: the paper's tables, as (title, variant names in row order)
STUDY_TABLES = (
    ("Table 6: routing strategy (full recipe, equal active compute)",
     ("dense", "token choice", "expert choice", "BL choice", "BE choice", "LE choice", "expert race")),
    ("Table 1: gating function (race, no threshold, no PLR, no RS)",
     ("race, softmax gating", "race, sigmoid gating", "race, identity gating")),
    ("Table 3: cumulative ablation",
     ("race, softmax gating", "race, identity gating", "race + EMA threshold", "race + per-layer reg",
      "expert race")),
    ("Table 2: balance (MaxVio, combination usage)",
     ("race + per-layer reg", "race, balance loss", "expert race")),
)


def variant_config(name: str, size: str) -> DiTConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown DiT variant {name!r}; choose from {list(VARIANTS)}")
    return DiTConfig(**{**SIZES[size].model, "num_experts": 8, "k": 2, **VARIANTS[name]})


def training_config(config: DiTConfig) -> DiTConfig:
    """The config a variant trains with. The EMA threshold only changes inference, so variants
    that differ in it alone share one training run (and checkpoint) and are evaluated both ways."""
    return dataclasses.replace(config, ema_threshold=True) if config.is_moe else config


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
            ctx: Optional[RunContext] = None, name: str = "dit") -> ExperimentResult:
    """Train a class-conditional DiT per variant and seed (default: dense, token choice, expert
    choice, expert race at equal active compute), sample every class, and report the kit's
    classifier-feature Fréchet distance, conditional accuracy, experts per diffusion timestep and
    balance statistics (MaxVio, combination usage), each as mean and std over seeds. When the
    variants of one of the paper's tables (:data:`STUDY_TABLES`) are all present, that table is
    added too. ``name``: the experiment name the result is saved under."""
    ctx = ctx or RunContext.create(size, seeds, device, data, progress)
    spec = SIZES[ctx.size]
    train_all, test_all = ctx.splits()
    train = train_all.take(spec.n_per_class, seed=0)
    for v in variants:
        variant_config(v, ctx.size)  # unknown names fail before any training
    result = ExperimentResult(name, ctx.size, str(ctx.device), train_all.source,
                              config={"variants": {v: VARIANTS[v] for v in variants}, "seeds": ctx.seeds,
                                      "train_images": len(train), "size": dataclasses.asdict(spec)},
                              notes=["fd_fmnist_classifier is a Fréchet distance on the features of moe_lite's own "
                                     "Fashion-MNIST classifier, not Inception FID.",
                                     "Variants that differ only in the EMA threshold share their training run "
                                     "(the threshold acts at inference only). val_loss, max_vio and "
                                     "combination_usage come from the last evaluation in training, which uses "
                                     "the threshold, so those rows share them too; the generation metrics are "
                                     "measured with each variant's own inference rule."])
    with Timer() as timer:
        classifier = _classifier(ctx, train_all, test_all)
        reference = test_all.x
        # Real training images against the same reference, at the generated sample count: the FD a
        # perfect generator would get, printed beside every generated FD.
        floor = real_fd_floor(train_all.x, reference, classifier, num_samples=10 * spec.samples_per_class,
                              draws=3, seed=0)
        result.metrics["real_fd_floor"] = floor
        rows, curves = [], {}
        for variant in variants:
            config = variant_config(variant, ctx.size)
            train_config = training_config(config)
            # the cache slug of the first variant that trains this way, so shared runs share a file
            train_name = next(v for v in VARIANTS if training_config(variant_config(v, ctx.size)) == train_config)
            per_seed = []
            for seed in ctx.seeds:
                model = seeded_build(seed, lambda: DiT(train_config))
                tracker = StepStats(every=10)
                train_loader, test_loader = loaders(train, test_all.take(20, seed=1), spec.batch_size, seed)
                history = cached_fit("dit", train_name, model, DiffusionTask(), train_loader, test_loader,
                                     TrainConfig(epochs=spec.epochs, max_steps=spec.max_steps, lr=spec.lr, seed=seed,
                                                 device=str(ctx.device), progress=ctx.progress,
                                                 time_budget_s=spec.time_budget_s),
                                     ctx, key=(seed,), callbacks=[tracker])
                if config.moe_routing in RACE_CANDIDATES:
                    use_ema_threshold(model, config.ema_threshold)
                gen = evaluate_samples(model, classifier, reference, spec, ctx.device, seed=seed)
                balance = layer_mean(history.evals[-1].get("routing") or {},
                                     ("max_vio", "combination_usage", "load_cv"))
                per_seed.append((model, history, gen, tracker, balance))
            model, history, gen, tracker, _ = per_seed[0]
            summary = {key: mean_std([g[key] for _, _, g, _, _ in per_seed], seeds=ctx.seeds)
                       for key in ("fd_fmnist_classifier", "conditional_accuracy")}
            if "experts_per_token" in gen:
                summary["sampling_experts_per_token"] = mean_std([g["experts_per_token"] for _, _, g, _, _ in per_seed],
                                                                 seeds=ctx.seeds)
            for key in ("max_vio", "combination_usage", "load_cv"):
                if key in per_seed[0][4]:
                    summary[key] = mean_std([b[key] for *_, b in per_seed], seeds=ctx.seeds)
            final = history.evals[-1]
            entry = {**summary,
                     "val_loss": mean_std([h.evals[-1].get("loss") for _, h, *_ in per_seed], seeds=ctx.seeds),
                     "train_time_s": mean_std([h.wall_time_s for _, h, *_ in per_seed], seeds=ctx.seeds),
                     "steps": history.steps[-1]["step"] if history.steps else 0,
                     "routing": final.get("routing"), "config": dataclasses.asdict(config)}
            result.metrics[variant] = entry
            result.models[variant] = model
            curves[variant] = tracker.records
            rows.append(_row(variant, entry))
            per_class = min(spec.samples_per_class, 8)
            pick = torch.cat([torch.arange(c * spec.samples_per_class, c * spec.samples_per_class + per_class)
                              for c in range(10)])
            result.figures[f"samples: {variant}"] = viz.image_grid(
                to_unit_range(gen["images"][pick]), labels=gen["labels"][pick], label_names=CLASS_NAMES,
                ncols=per_class)
            if "experts_by_timestep" in gen:
                result.metrics[variant]["experts_by_timestep"] = gen["experts_by_timestep"]
                result.figures[f"experts per timestep: {variant}"] = viz.layer_stat_bars(
                    {f"t in bucket {b}": {"experts_per_token": float(v)} for b, v in
                     enumerate(gen["experts_by_timestep"])}, keys="experts_per_token",
                    title=f"{variant}: experts per token by diffusion timestep (0 = clean, 9 = noise)")
        floor_row = _floor_row(floor)
        result.tables["generation (fd_fmnist_classifier: classifier-feature Fréchet distance, not FID)"] = rows + [floor_row]
        by_name = {row["variant"]: row for row in rows}
        for title, names in STUDY_TABLES:
            if all(n in by_name for n in names):
                result.tables[title] = [by_name[n] for n in names] + [floor_row]
        result.metrics["curves"] = curves
        moe_curves = {k: v for k, v in curves.items() if v}
        if moe_curves:
            result.figures["balance during training"] = viz.stat_curves(
                moe_curves, x="step", keys=("load_cv", "max_vio", "combination_usage"))
    add_paired_comparisons(result)
    result.wall_time_s = timer.seconds
    return result


def run_race(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
             data: str = "auto", progress: bool = True, variants: Sequence[str] = RACE_STUDY,
             ctx: Optional[RunContext] = None) -> ExperimentResult:
    """The Expert Race study: every variant of :data:`VARIANTS` (the paper's Tables 1, 2, 3 and 6 at
    small scale), saved as ``race``. Run it with 3 seeds: the differences are small."""
    return run_dit(size, seeds=seeds, device=device, data=data, progress=progress, variants=variants, ctx=ctx,
                   name="race")


def _row(variant: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    """One table row: means with their std over seeds."""
    def pm(key: str, digits: int) -> Any:
        if key not in entry:
            return "dense" if key == "sampling_experts_per_token" else "-"
        return format_mean_std(entry[key], digits)

    return {"variant": variant, "fd_fmnist_classifier": pm("fd_fmnist_classifier", 2),
            "conditional_accuracy": pm("conditional_accuracy", 3), "max_vio": pm("max_vio", 2),
            "combination_usage": pm("combination_usage", 3), "val_loss": pm("val_loss", 4),
            "experts_per_token (sampling)": pm("sampling_experts_per_token", 2),
            "seeds": entry["fd_fmnist_classifier"]["n"], "steps": entry["steps"],
            "train_s": round(entry["train_time_s"]["mean"], 1)}


def _floor_row(floor: Dict[str, float]) -> Dict[str, Any]:
    """The table row of real images: the FD noise floor at this sample count (no other metric applies)."""
    return {"variant": f"real images (FD noise floor, {int(floor['draws'])} draws)",
            "fd_fmnist_classifier": format_mean_std({"mean": floor["mean"], "std": floor["std"],
                                                     "n": int(floor["draws"])}, 2),
            "conditional_accuracy": "-", "max_vio": "-", "combination_usage": "-", "val_loss": "-",
            "experts_per_token (sampling)": "-", "seeds": "-", "steps": "-", "train_s": "-"}


def _classifier(ctx: RunContext, train, test) -> torch.nn.Module:
    """The kit's feature classifier (cached); at smoke size a throw-away one on a few images."""
    from ..metrics import get_feature_classifier

    if ctx.size == "smoke":
        small = train.take(30, seed=3)
        return get_feature_classifier(device=str(ctx.device), data=((small.x, small.y), None), epochs=1,
                                      verbose=ctx.progress)
    return get_feature_classifier(device=str(ctx.device), data=((train.x, train.y), (test.x, test.y)),
                                  progress=ctx.progress)
