"""DiT-MoE and Expert Race: routing strategies at equal active compute on class-conditional
Fashion-MNIST generation.

Generation metrics are a Fréchet distance on the features of the kit's own Fashion-MNIST classifier
(``fd_fmnist_classifier``; NOT Inception FID: the numbers are not comparable with papers' FIDs) and
the conditional accuracy of samples (the classifier agrees with the class asked for).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..data import CLASS_NAMES, MEAN, STD
from ..inspect import record_routing, timestep_label
from ..models.dit import RACE_CANDIDATES, DiT, DiTConfig, use_ema_threshold
from ..models.diffusion import PixelScale, sample, to_unit_range
from ..metrics import generation_metrics, get_feature_classifier, real_fd_floor
from ..train import DiffusionTask, TrainConfig, evaluate
from .. import viz
from .common import StepStats, cached_fit, layer_mean, loaders, seeded_build
from .core import ExperimentResult, Pairing, RunContext, format_mean_std, mean_std
from .figures import diffusion_figures
from .runner import Experiment, Run, run


#: how the data loader normalised the images (the DiT's samples are in that range)
PIXELS = PixelScale(MEAN, STD)


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
    # Table 3, cumulative: + EMA ("learnable") threshold, + the two-layer MLP router alone, + per-layer reg
    # (whose target head needs that router; then + RS = expert race). The MLP-router step is ours: the
    # paper's "+ per-layer reg" row changes the router and adds the loss at once, so here the two are
    # separate rows.
    "race + EMA threshold": {"moe_routing": "race", "gating": "identity", "ema_threshold": True},
    "race + MLP router": {"moe_routing": "race", "gating": "identity", "ema_threshold": True, "mlp_router": True},
    "race + per-layer reg": {"moe_routing": "race", "gating": "identity", "ema_threshold": True,
                             "per_layer_reg": True},
    # Table 2: no constraint (= race + per-layer reg) vs a balance loss vs router similarity (= expert race)
    "race, balance loss": {"moe_routing": "race", "gating": "identity", "ema_threshold": True,
                           "per_layer_reg": True, "balance_weight": 1e-2},
    # The two loss weights have no published value (papers.md): each swept over 3 log-spaced values
    # around the one the recipe uses (λ_plr 0.1, λ_sim 0.01).
    **{f"race + per-layer reg, λ_plr={w:g}": {"moe_routing": "race", "gating": "identity", "ema_threshold": True,
                                              "per_layer_reg": True, "per_layer_weight": w} for w in (0.01, 1.0)},
    **{f"expert race, λ_sim={w:g}": {**RACE_RECIPE, "router_similarity": w} for w in (1e-3, 1e-1)},
    # Table 5: granularity at equal active compute: k of E experts, each 1/k of the dense MLP's width
    **{f"expert race, {k}-in-{e}": {**RACE_RECIPE, "num_experts": e, "k": k} for k, e in ((1, 4), (4, 16), (8, 32))},
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
     ("race, softmax gating", "race, identity gating", "race + EMA threshold", "race + MLP router",
      "race + per-layer reg", "expert race")),
    ("Table 2: balance (MaxVio, combination usage)",
     ("race + per-layer reg", "race, balance loss", "expert race")),
    ("Loss weights: λ_plr (per-layer reg) and λ_sim (router similarity), 3 log-spaced values each",
     ("race + per-layer reg, λ_plr=0.01", "race + per-layer reg", "race + per-layer reg, λ_plr=1",
      "expert race, λ_sim=0.001", "expert race", "expert race, λ_sim=0.1")),
    ("Table 5: granularity (k-in-E at equal active compute, full recipe)",
     ("dense", "expert race, 1-in-4", "expert race", "expert race, 4-in-16", "expert race, 8-in-32")),
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
        with record_routing(model, labels={"timestep": timestep_label(10)}, per_sample=False) as usage:
            images = generate()
    else:
        images = generate()
    metrics = generation_metrics(images, labels, reference, classifier)
    out: Dict[str, Any] = {**metrics, "images": images, "labels": labels}
    if usage is not None:
        out["experts_per_token"] = usage.experts_per_token
        out["experts_by_timestep"] = usage.experts_per_token_by("timestep")
    return out


NOTES = ["fd_fmnist_classifier is a Fréchet distance on the features of moe_lite's own "
         "Fashion-MNIST classifier, not Inception FID.",
         "Variants that differ only in the EMA threshold share their training run "
         "(the threshold acts at inference only). Every metric, val_loss, max_vio and "
         "combination_usage included (an evaluation on 200 held-out images after training), "
         "is measured with each variant's own inference rule."]


def _prepare(run: Run) -> Dict[str, Any]:
    """The training images, the feature classifier and the FD noise floor, shared by every variant."""
    ctx, spec = run.ctx, run.spec
    train_all, test_all = ctx.splits()
    train = train_all.take(spec.n_per_class, seed=0)
    run.result.notes.extend(NOTES)
    classifier = _classifier(ctx, train_all, test_all)
    # Real training images against the same reference, at the generated sample count: the FD a
    # perfect generator would get, printed beside every generated FD.
    floor = real_fd_floor(train_all.x, test_all.x, classifier, num_samples=10 * spec.samples_per_class,
                          draws=3, seed=0)
    run.result.metrics["real_fd_floor"] = floor
    run.state.update(train=train, val=test_all.take(20, seed=1), reference=test_all.x, classifier=classifier,
                     floor=floor)
    return {"variants": {v: VARIANTS[v] for v in run.variants}, "seeds": ctx.seeds, "train_images": len(train),
            "size": dataclasses.asdict(spec)}


def _train(variant: str, overrides: Dict[str, Any], seed: int, run: Run) -> Dict[str, Any]:
    """One variant for one seed: generation metrics of its samples, balance from the last evaluation;
    the first seed also its model, routing, balance curve and sample figures."""
    ctx, spec = run.ctx, run.spec
    config = variant_config(variant, ctx.size)
    train_config = training_config(config)
    # the cache slug of the first variant that trains this way, so shared runs share a file
    train_name = next(v for v in VARIANTS if training_config(variant_config(v, ctx.size)) == train_config)
    model = seeded_build(seed, lambda: DiT(train_config, pixel_scale=PIXELS))
    tracker = StepStats(every=10)
    train_loader, test_loader = loaders(run.state["train"], run.state["val"], spec.batch_size, seed)
    history = cached_fit("dit", train_name, model, DiffusionTask(), train_loader, test_loader,
                         TrainConfig(epochs=spec.epochs, max_steps=spec.max_steps, lr=spec.lr, seed=seed,
                                     device=str(ctx.device), progress=ctx.progress,
                                     time_budget_s=spec.time_budget_s),
                         ctx, key=(seed,), callbacks=[tracker])
    if config.moe_routing in RACE_CANDIDATES:
        use_ema_threshold(model, config.ema_threshold)
    gen = evaluate_samples(model, run.state["classifier"], run.state["reference"], spec, ctx.device, seed=seed)
    # the trainer's last evaluation, measured now by this code (a cached run's history holds what the
    # code that trained it measured)
    final = evaluate(model, DiffusionTask(), test_loader, device=ctx.device, seed=seed)
    out: Dict[str, Any] = {key: gen[key] for key in ("fd_fmnist_classifier", "conditional_accuracy",
                                                     "experts_per_token") if key in gen}
    if "experts_by_timestep" in gen:  # every seed's, for the mean over seeds
        out["timestep_profile"] = [float(v) for v in gen["experts_by_timestep"]]
    # per MoE layer at the last evaluation (eval mode: Race routes by its threshold), every seed
    out["dropped_by_layer"] = {layer: float(stats["dropped_fraction"])
                               for layer, stats in (final.get("routing") or {}).items() if "dropped_fraction" in stats}
    out.update(balance=layer_mean(final.get("routing") or {}, ("max_vio", "combination_usage", "load_cv")),
               val_loss=final.get("loss"), train_time_s=history.wall_time_s,
               loss_curve=smoothed_loss(history.steps))
    if run.first_seed(seed):
        out.update(model=model, config=config, curve=tracker.records, routing=final.get("routing"),
                   steps=history.steps[-1]["step"] if history.steps else 0,
                   experts_by_timestep=gen.get("experts_by_timestep"), figures=_sample_figures(variant, gen, spec))
    return out


#: training steps averaged in the loss curves the convergence comparison reads (the flow-matching loss
#: of one batch is noisy: its timesteps are random)
LOSS_WINDOW = 50


def smoothed_loss(steps: Sequence[Dict[str, Any]], window: int = LOSS_WINDOW) -> List[Tuple[int, float]]:
    """``[(step, mean flow-matching loss of the last window steps)]`` for every step from the
    ``window``-th on: the ``diffusion`` part of the loss (the per-layer regression and the aux losses
    differ between variants, so they are left out; records without it fall back to the task loss).
    A short run (smoke size) averages over a fifth of its steps instead."""
    losses = [float(r.get("diffusion", r.get("task_loss", r["loss"]))) for r in steps]
    window = max(1, min(window, len(losses) // 5))
    out, total = [], 0.0
    for i, value in enumerate(losses):
        total += value - (losses[i - window] if i >= window else 0.0)
        if i + 1 >= window:
            out.append((int(steps[i]["step"]), total / window))
    return out


def steps_to_reach(curve: Sequence[Tuple[int, float]], target: float) -> Optional[int]:
    """The first step at which the smoothed loss ``curve`` is at or below ``target``; None if never."""
    return next((step for step, loss in curve if loss <= target), None)


def _convergence(records: Dict[str, Dict[int, Dict[str, Any]]], seeds: Sequence[int]) -> List[Dict[str, Any]]:
    """The paper's convergence claim, per seed: the steps each variant takes to reach the dense DiT's
    final smoothed training loss of the same seed (paired: same data order and noise)."""
    rows = []
    dense = records["dense"]
    for variant, per_seed in records.items():
        if variant == "dense":
            continue
        reached = [steps_to_reach(per_seed[s]["loss_curve"], dense[s]["loss_curve"][-1][1])
                   if per_seed[s]["loss_curve"] and dense[s]["loss_curve"] else None for s in seeds]
        got = [r for r in reached if r is not None]
        final = [dense[s]["loss_curve"][-1][0] if dense[s]["loss_curve"] else None for s in seeds]
        rows.append({"variant": variant, "steps to dense's final loss (per seed)": reached,
                     "seeds reaching it": f"{len(got)} of {len(seeds)}",
                     "mean steps (those reaching it)": round(sum(got) / len(got)) if got else "-",
                     "dense's steps": final[0]})
    return rows


def _sample_figures(variant: str, gen: Dict[str, Any], spec: DiffusionSize) -> Dict[str, Any]:
    per_class = min(spec.samples_per_class, 8)
    pick = torch.cat([torch.arange(c * spec.samples_per_class, c * spec.samples_per_class + per_class)
                      for c in range(10)])
    figures = {f"samples: {variant}": viz.image_grid(
        to_unit_range(gen["images"][pick], PIXELS), labels=gen["labels"][pick], label_names=CLASS_NAMES, ncols=per_class)}
    if "experts_by_timestep" in gen:
        n = len(gen["experts_by_timestep"])
        figures[f"experts per timestep: {variant}"] = viz.layer_stat_bars(
            {f"{b / n:.1f}-{(b + 1) / n:.1f}": {"experts_per_token": float(v)} for b, v in
             enumerate(gen["experts_by_timestep"])}, keys="experts_per_token",
            x_title="noise level t while sampling (share of the way to pure noise: 0 = clean image, 1 = noise)",
            y_title="routed experts per token", title=f"{variant}: experts per token by diffusion time t")
    return figures


def _summarise(records: Dict[str, Dict[int, Dict[str, Any]]], run: Run) -> None:
    result, seeds = run.result, run.seeds
    rows, curves = [], {}
    for variant, per_seed in records.items():
        first = per_seed[seeds[0]]
        summary = {key: run.over_seeds(per_seed, key) for key in ("fd_fmnist_classifier", "conditional_accuracy")}
        if "experts_per_token" in first:
            summary["sampling_experts_per_token"] = run.over_seeds(per_seed, "experts_per_token")
        for key in ("max_vio", "combination_usage", "load_cv"):
            if key in first["balance"]:
                summary[key] = mean_std([r["balance"][key] for r in per_seed.values()], seeds=seeds)
        entry = {**summary, "val_loss": run.over_seeds(per_seed, "val_loss"),
                 "train_time_s": run.over_seeds(per_seed, "train_time_s"),
                 "steps": first["steps"], "routing": first["routing"], "config": dataclasses.asdict(first["config"])}
        if "timestep_profile" in first:
            buckets = range(len(first["timestep_profile"]))
            entry["experts_by_timestep_seeds"] = [
                mean_std([r["timestep_profile"][b] for r in per_seed.values()], seeds=seeds) for b in buckets]
            entry["experts_by_timestep"] = [v["mean"] for v in entry["experts_by_timestep_seeds"]]
        result.metrics[variant] = entry
        curves[variant] = first["curve"]
        rows.append(_row(variant, entry))
    floor_row = _floor_row(run.state["floor"])
    run.table("generation", "generation (fd_fmnist_classifier: classifier-feature Fréchet distance, not FID)",
              rows + [floor_row])
    by_name = {row["variant"]: row for row in rows}
    for title, names in STUDY_TABLES:
        if all(n in by_name for n in names):
            run.table(title.split(":")[0].lower().replace(" ", "_"), title, [by_name[n] for n in names] + [floor_row])
    _per_seed_routing_tables(records, run)
    if "dense" in records and len(records) > 1:
        run.table("convergence", "convergence: steps to reach the dense DiT's final training loss "
                  f"(flow-matching loss, mean of {LOSS_WINDOW} steps; same seed)", _convergence(records, seeds))
    result.metrics["curves"] = curves
    moe_curves = {k: v for k, v in curves.items() if v}
    if moe_curves:
        result.figures["balance during training"] = viz.stat_curves(
            moe_curves, x="step", keys=("load_cv", "max_vio", "combination_usage"))


def _per_seed_routing_tables(records: Dict[str, Dict[int, Dict[str, Any]]], run: Run) -> None:
    """Two routing tables over every seed of the MoE variants: experts per token by diffusion time
    while sampling, and the share of tokens that get no expert, per MoE layer, at the last evaluation."""
    seeds = run.seeds
    timestep_rows, dropped_rows = [], []
    for variant, per_seed in records.items():
        first = per_seed[seeds[0]]
        if "timestep_profile" in first:
            n = len(first["timestep_profile"])
            timestep_rows.append({"variant": variant, **{
                f"t {b / n:.1f}-{(b + 1) / n:.1f}": format_mean_std(
                    mean_std([r["timestep_profile"][b] for r in per_seed.values()], seeds=seeds), 2)
                for b in range(n)}})
        if first.get("dropped_by_layer"):
            dropped_rows.append({"variant": variant, **{
                layer: format_mean_std(mean_std([r["dropped_by_layer"][layer] for r in per_seed.values()],
                                                seeds=seeds), 3) for layer in first["dropped_by_layer"]}})
            run.result.metrics[variant]["dropped_by_layer_seeds"] = {
                layer: mean_std([r["dropped_by_layer"][layer] for r in per_seed.values()], seeds=seeds)
                for layer in first["dropped_by_layer"]}
    if timestep_rows:
        run.table("experts_by_timestep", "experts per token while sampling, by diffusion time t (0 = clean, "
                  f"1 = noise; mean ± std over {len(seeds)} seeds)", timestep_rows)
    if dropped_rows:
        run.table("no_expert_by_layer", "share of tokens with no expert, per MoE layer, at the last evaluation "
                  f"(mean ± std over {len(seeds)} seeds)", dropped_rows)


PAIRING = Pairing("dense", {"fd_fmnist_classifier": "lower", "conditional_accuracy": "higher"})
DIT = Experiment("dit", "DiT-MoE: token choice vs expert choice vs Expert Race, samples, FD", SIZES, VARIANTS,
                 _train, _summarise, prepare=_prepare, default_variants=DEFAULT_VARIANTS, figures=diffusion_figures,
                 pairing=PAIRING)
#: the Expert Race study: every variant (the paper's Tables 1, 2, 3 and 6 at small scale)
RACE = dataclasses.replace(
    DIT, name="race", description="Expert Race study: routing strategy, gating, cumulative ablation, balance "
                                  "(3 seeds)", default_variants=RACE_STUDY)


def run_dit(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
            data: str = "auto", progress: bool = True, variants: Sequence[str] = DEFAULT_VARIANTS,
            ctx: Optional[RunContext] = None, name: str = "dit", settings: Any = None, shipped: bool = True) -> ExperimentResult:
    """Train a class-conditional DiT per variant and seed (default: dense, token choice, expert
    choice, expert race at equal active compute), sample every class, and report the kit's
    classifier-feature Fréchet distance, conditional accuracy, experts per diffusion timestep and
    balance statistics (MaxVio, combination usage), each as mean and std over seeds. When the
    variants of one of the paper's tables (:data:`STUDY_TABLES`) are all present, that table is
    added too. ``name``: the experiment the result is saved under (``"dit"`` or ``"race"``)."""
    experiment = {"dit": DIT, "race": RACE}[name]
    return run(experiment, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data,
               progress=progress, variants=variants, shipped=shipped)


def run_race(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
             data: str = "auto", progress: bool = True, variants: Sequence[str] = RACE_STUDY,
             ctx: Optional[RunContext] = None, settings: Any = None, shipped: bool = True) -> ExperimentResult:
    """The Expert Race study: every variant of :data:`VARIANTS` (the paper's Tables 1, 2, 3 and 6 at
    small scale), saved as ``race``. Run it with 3 seeds: the differences are small."""
    return run(RACE, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data, progress=progress,
               variants=variants, shipped=shipped)


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
    if ctx.size == "smoke":
        small = train.take(30, seed=3)
        return get_feature_classifier(device=str(ctx.device), data=((small.x, small.y), None), epochs=1,
                                      verbose=ctx.progress, cache_dir=ctx.cache_root)
    return get_feature_classifier(device=str(ctx.device), data=((train.x, train.y), (test.x, test.y)),
                                  progress=ctx.progress, cache_dir=ctx.cache_root)
