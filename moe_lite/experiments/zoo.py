"""Every router on the same ViMoE (``zoo``), and every balancing method on the same router (``balance``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ..models.vit import ViT, ViTConfig
from .. import viz
from .common import QUICK_MODEL, ClassifySize, StepStats, layer_mean, seeded_build, train_classifier
from .core import ExperimentResult, Pairing, RunContext, format_mean_std, mean_std
from .figures import compare_figures
from .runner import Experiment, Run, run

SIZES: Dict[str, ClassifySize] = {
    "smoke": ClassifySize(n_per_class=12, test_per_class=6, epochs=1, batch_size=40,
                          model={"dim": 32, "depth": 2, "heads": 2, "mlp_hidden": 64}),
    # The ViMoE quick recipe (docs/recipes.md) on 3,000 images; 16 tokens make a step about 3x cheaper
    # than the former 49, so 400 steps cost about what 120 did.
    "quick": ClassifySize(n_per_class=300, test_per_class=100, epochs=1, max_steps=400, eval_every=200, batch_size=100,
                          lr=3e-3, augment=True, shift=0, label_smoothing=0.1, model=QUICK_MODEL),
    "gpu": ClassifySize(n_per_class=None, test_per_class=None, epochs=1, max_steps=2000, eval_every=500,
                        batch_size=256, lr=2e-3, augment=True, shift=0, label_smoothing=0.1,
                        model={**QUICK_MODEL, "dim": 128, "depth": 6, "heads": 4, "mlp_hidden": 256}),
    "full": ClassifySize(n_per_class=None, test_per_class=None, epochs=15, batch_size=256, lr=1e-3,
                         model={"dim": 128, "depth": 6, "heads": 4, "mlp_hidden": 256}),
}

LB = {"load_balance": 1e-2}
#: the ZOO "router" name of Soft MoE (Puigcerver et al. 2023): ViTConfig(moe_type="soft"), no router.
SOFT = "soft"
#: name -> (router name, router kwargs, losses). Routers that balance by construction (hash, balanced
#: assignment, expert choice) or without an aux loss (bias-balanced) get no balance loss.
ZOO: Mapping[str, Tuple[str, Dict[str, Any], Dict[str, float]]] = {
    "top-2": ("topk", {"k": 2}, LB),
    "top-2 renormalised": ("topk", {"k": 2, "renormalize": True}, LB),
    "noisy top-2": ("topk", {"k": 2, "renormalize": True, "noise": "learned"}, LB),
    "switch (top-1, cf 1.25)": ("switch", {"capacity_factor": 1.25}, LB),
    "expert choice": ("expert_choice", {"k": 2}, {}),
    "top-p (p=0.4)": ("topp", {"p": 0.4}, {"load_balance": 1e-2, "entropy": 1e-4}),
    "expert race": ("race", {"k": 2}, LB),
    "hash (position)": ("hash", {}, {}),
    "balanced assignment": ("balanced", {}, {}),
    "bias-balanced": ("bias_balanced", {"k": 2}, {}),
    "learned threshold": ("learned_threshold", {}, LB),
    # not a router: every MoE block becomes a SoftMoE; kwargs go to the ViTConfig
    "soft MoE (1 slot/expert)": (SOFT, {"slots_per_expert": 1}, {}),
}

SOFT_NOTE = ("soft MoE routes no token: each expert slot is a softmax mix of all the image's tokens, so it "
             "drops nothing and needs no balance loss, but it is not causal (a token's output depends on every "
             "token of its image; unusable for autoregressive decoding) and has no routing statistics; its "
             "compute is slots/tokens expert forwards per token")

#: name -> (router name, router kwargs, losses): balancing methods on top-2 routing.
BALANCE: Mapping[str, Tuple[str, Dict[str, Any], Dict[str, float]]] = {
    "no balancing": ("topk", {"k": 2}, {}),
    "load balance": ("topk", {"k": 2}, {"load_balance": 1e-2}),
    "importance": ("topk", {"k": 2}, {"importance": 1e-2}),
    "z-loss + load balance": ("topk", {"k": 2}, {"load_balance": 1e-2, "z_loss": 1e-3}),
    "bias balancing (aux-free)": ("bias_balanced", {"k": 2}, {}),
    "router similarity": ("topk", {"k": 2}, {"router_similarity": 1e-2}),
}


def backbone(size: str) -> ViTConfig:
    """The shared backbone: 8 experts in the last 2 blocks, no shared expert (so routing matters)."""
    return dataclasses.replace(ViTConfig(), num_experts=8, moe_layers="last-2", num_shared=0,
                               **SIZES[size].model)


def entry_config(base: ViTConfig, router: str, kwargs: Dict[str, Any], losses: Dict[str, float]) -> ViTConfig:
    """The ViTConfig of one table entry: ``base`` with that router, or soft MoE blocks for :data:`SOFT`."""
    if router == SOFT:
        return dataclasses.replace(base, moe_type="soft", moe_losses=dict(losses), **kwargs)
    return dataclasses.replace(base, router=router, router_kwargs=kwargs, moe_losses=losses)


def _prepare(run: Run) -> Dict[str, Any]:
    spec, table = run.spec, run.experiment.variants
    train_all, test_all = run.ctx.splits()
    train, test = train_all.take(spec.n_per_class, seed=0), test_all.take(spec.test_per_class, seed=1)
    # record the balance statistics often enough for a curve (a smoke run has only 3 steps)
    steps = spec.max_steps or spec.epochs * -(-len(train) // spec.batch_size)
    run.state.update(train=train, test=test, base=backbone(run.ctx.size), every=max(1, min(5, steps // 10)))
    run.result.notes.append(DESCRIPTIONS[run.experiment.name])
    return {"entries": {c: {"router": table[c][0], "kwargs": table[c][1], "losses": table[c][2]} for c in run.variants},
            "seeds": run.seeds, "train_images": len(train), "test_images": len(test),
            "size": dataclasses.asdict(spec)}


def _train(entry: str, definition: Tuple[str, Dict[str, Any], Dict[str, float]], seed: int, run: Run) -> Dict[str, Any]:
    """One entry for one seed: accuracy, routing statistics and the balance curve of training."""
    every = run.state["every"]
    config = entry_config(run.state["base"], *definition)
    tracker = StepStats(every=every)
    model = seeded_build(seed, lambda: ViT(config))
    record = train_classifier(entry, model, run.ctx, run.spec, seed, run.state["train"], run.state["test"],
                              callbacks=[tracker], experiment=run.experiment.name, key=(f"stats every {every}",))
    return {"accuracy": record.metrics["accuracy"], "routing": record.metrics.get("routing") or {},
            "curve": tracker.records, "model": record.model, "config": config}


#: the routing statistics of the tables, each a mean over MoE layers per seed, then over seeds
KEYS = ("experts_per_token", "load_cv", "max_vio", "dropped_fraction", "dead_experts", "combination_usage",
        "router_entropy_norm")


def _summarise(records: Dict[str, Dict[int, Dict[str, Any]]], run: Run) -> None:
    name, result, table = run.experiment.name, run.result, run.experiment.variants
    rows, curves = [], {}
    for entry, per_seed in records.items():
        first = per_seed[run.seeds[0]]
        curves[entry] = first["curve"]
        means = [layer_mean(r["routing"], KEYS) for r in per_seed.values()]
        routing_seeds = {k: mean_std([s[k] for s in means], seeds=list(per_seed))
                         for k in KEYS if all(k in s for s in means)}
        acc = run.over_seeds(per_seed, "accuracy")
        result.metrics[entry] = {"accuracy": acc, "routing": first["routing"],
                                 "routing_mean": {k: v["mean"] for k, v in routing_seeds.items()},
                                 "routing_seeds": routing_seeds}
        rows.append({name if name != "zoo" else "router": entry, "accuracy": format_mean_std(acc, 4),
                     "seeds": acc["n"], **{k: format_mean_std(v, 3) for k, v in routing_seeds.items()}})
        if table[entry][0] == SOFT:
            config = first["config"]
            result.metrics[entry]["expert_forwards_per_token"] = config.num_experts * config.slots_per_expert / config.seq_len
            rows[-1].update({"dropped_fraction": "0 (no dropping)", "note": "not causal; see notes"})
            result.notes.append(SOFT_NOTE)
    run.table("comparison", "comparison (test set; routing statistics = mean over MoE layers)", rows)
    chosen = list(records)
    result.metrics["curves"] = curves
    result.figures["balance during training"] = viz.stat_curves(
        curves, x="step", keys=("load_cv", "max_vio", "combination_usage", "router_entropy_norm"))
    for entry in chosen:  # collapse and recovery, expert by expert (routed entries only)
        load = viz.expert_load_heatmap(curves[entry], title=f"{entry}: expert load during training "
                                       "(share of assignments; white = balanced 1/E)")
        if load.data:
            result.figures[f"expert load during training: {entry}"] = load
    result.figures["accuracy"] = viz.tradeoff_curve(
        [result.metrics[c]["routing_mean"].get(
            "experts_per_token", result.metrics[c].get("expert_forwards_per_token", 0.0)) for c in chosen],
        [result.metrics[c]["accuracy"]["mean"] for c in chosen],
        labels=chosen, x_title="mean experts per token (compute)", y_title="test accuracy",
        title=f"{name}: accuracy against compute")


DESCRIPTIONS = {"zoo": "Every router trained on the same ViMoE (8 experts, last 2 blocks) with the same budget.",
                "balance": "Top-2 routing on the same ViMoE; only the balancing method changes."}

ZOO_EXPERIMENT = Experiment(
    "zoo", "every router on the same ViMoE: accuracy, balance, compute", SIZES, ZOO, _train, _summarise,
    prepare=_prepare, figures=compare_figures, pairing=Pairing("top-2", {"accuracy": "higher"}))
BALANCE_EXPERIMENT = Experiment(
    "balance", "balancing methods on top-2: load CV, MaxVio, combination usage", SIZES, BALANCE, _train, _summarise,
    prepare=_prepare, figures=compare_figures,
    pairing=Pairing("no balancing", {"accuracy": "higher", "routing_seeds.max_vio": "lower"}))


def run_zoo(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
            data: str = "auto", progress: bool = True, variants: Optional[Sequence[str]] = None,
            ctx: Optional[RunContext] = None, settings: Any = None, shipped: bool = True) -> ExperimentResult:
    """Every router of the kit on the same ViMoE backbone: accuracy, balance and compute (and Soft MoE
    blocks in place of the routed ones, a row without routing statistics). ``variants``: router names
    (keys of :data:`ZOO`)."""
    return run(ZOO_EXPERIMENT, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data,
               progress=progress, variants=variants, shipped=shipped)


def run_balance(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
                data: str = "auto", progress: bool = True, variants: Optional[Sequence[str]] = None,
                ctx: Optional[RunContext] = None, settings: Any = None, shipped: bool = True) -> ExperimentResult:
    """Keeping experts busy: top-2 routing with no balancing, each balance loss, and bias balancing;
    load CV, MaxVio and combination usage during training. ``variants``: keys of :data:`BALANCE`."""
    return run(BALANCE_EXPERIMENT, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data,
               progress=progress, variants=variants, shipped=shipped)
