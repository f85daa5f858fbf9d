"""ViT vs ViMoE on Fashion-MNIST: shared expert, placement, class x expert maps, patch overlays."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..data import CLASS_NAMES, denormalize
from ..models.vit import ViT, ViTConfig, count_parameters, dense_equivalent, patch_experts, vimoe_config
from .. import analysis, viz
from ..layers import moe_layers
from ..models.reference import REFERENCES, PixelClassifier
from ..upcycle import upcycle, upcycled_config
from .common import QUICK_MODEL, ClassifySize, predict, routing_by_class, routing_table, seeded_build, train_classifier
from .core import ExperimentResult, Pairing, RunContext, format_mean_std, mean_std
from .figures import grid_figures
from .runner import Experiment, Run, run

SIZES: Dict[str, ClassifySize] = {
    "smoke": ClassifySize(n_per_class=24, test_per_class=10, epochs=1, batch_size=60,
                          model={"dim": 32, "depth": 2, "heads": 2, "mlp_hidden": 64}),
    # The recipe of docs/recipes.md (found by `scripts/sweep_vit.py` on one CPU thread): 16 tokens of
    # 7x7 patches after a 3x3 conv stem, a class token, mirrors without shifts, label smoothing 0.1,
    # a fixed 1200 steps (the same numbers on any machine). Seed 0: dense 86.5%, ViMoE 86.6%; seed 1:
    # 84.4% and 85.1%; about 90-98 s of CPU time per model on one thread.
    "quick": ClassifySize(n_per_class=None, test_per_class=None, epochs=1, max_steps=1200, eval_every=400,
                          batch_size=128, lr=3e-3, augment=True, shift=0, label_smoothing=0.1,
                          model=QUICK_MODEL),
    # A free Colab GPU (T4, fp16): the quick recipe on a wider, deeper ViT for longer. Calibrated by
    # FLOPs, not yet measured on a T4 (see `python -m moe_lite.flops`).
    "gpu": ClassifySize(n_per_class=None, test_per_class=None, epochs=1, max_steps=4000, eval_every=1000,
                        batch_size=256, lr=2e-3, augment=True, shift=0, label_smoothing=0.1,
                        model={**QUICK_MODEL, "dim": 128, "depth": 6, "heads": 4, "mlp_hidden": 256}),
    "full": ClassifySize(n_per_class=None, test_per_class=None, epochs=40, batch_size=256, lr=1e-3,
                         model={"dim": 192, "depth": 6, "heads": 6, "mlp_hidden": 384, "dropout": 0.1}),
}

#: The variants a run can compare: name -> (placement, shared experts); "dense" is the ViT with the
#: same active parameters per token as the default ViMoE.
VARIANTS = {
    "vimoe": ("last-2", 1),
    "vimoe-no-shared": ("last-2", 0),
    "vimoe-all": ("all", 1),
    "vimoe-every-2": ("every-2", 1),
    "vimoe-all-no-shared": ("all", 0),
    "vimoe-every-2-no-shared": ("every-2", 0),
}
DEFAULT_VARIANTS = ("dense", "vimoe")
#: the placement x shared-expert grid (``python -m moe_lite run vimoe-grid``)
GRID_VARIANTS = ("dense", "vimoe", "vimoe-no-shared", "vimoe-every-2", "vimoe-every-2-no-shared", "vimoe-all",
                 "vimoe-all-no-shared")
#: Sparse upcycling (Komatsuzaki et al. 2022) at equal total steps: "vimoe-upcycled" trains the plain
#: dense ViT for half the steps, turns its last two FFNs into MoE layers whose experts start as copies
#: (top-2 renormalised, one shared expert), and trains the other half; "vimoe-upcycled-scratch" is
#: the same MoE trained from scratch for all the steps (the control).
UPCYCLE_VARIANTS = ("vimoe-upcycled", "vimoe-upcycled-scratch")
UPCYCLE_KWARGS = {"num_experts": 8, "placement": "last-2", "num_shared": 1}
#: training-set sizes of the grid, images per class (None: the whole training split)
GRID_TRAIN_SIZES = {"smoke": (8, None), "quick": (200, None), "gpu": (1000, None), "full": (1000, None)}


def vimoe_variant(name: str, base: ViTConfig, num_experts: int = 8, k: int = 2) -> ViTConfig:
    """The ViTConfig of a variant name: ``"dense"`` or a key of :data:`VARIANTS`."""
    reference = vimoe_config(base, num_experts=num_experts, k=k, placement="last-2", num_shared=1)
    if name == "dense":
        return dense_equivalent(reference)
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose 'dense' or one of {sorted(VARIANTS)}")
    placement, shared = VARIANTS[name]
    # Without a shared expert, each routed expert is widened so active parameters stay equal.
    extra = {} if shared else {"expert_hidden": base.mlp_hidden + base.mlp_hidden // k}
    return dataclasses.replace(vimoe_config(base, num_experts=num_experts, k=k, placement=placement,
                                            num_shared=shared), **extra)


#: every variant of ``vimoe``: name -> how its model is made ("dense", (placement, shared experts),
#: or "upcycled")
ALL_VARIANTS: Dict[str, Any] = {"dense": "dense", **VARIANTS, **{v: "upcycled" for v in UPCYCLE_VARIANTS}}


def _variant_config(name: str, base: ViTConfig) -> ViTConfig:
    return upcycled_config(base, **UPCYCLE_KWARGS) if name in UPCYCLE_VARIANTS else vimoe_variant(name, base)


def _prepare(run: Run) -> Dict[str, Any]:
    spec = run.spec
    train_all, test_all = run.ctx.splits()
    train = train_all.take(run.options["n_per_class"] or spec.n_per_class, seed=0)
    test = test_all.take(spec.test_per_class, seed=1)
    run.state.update(train=train, test=test, base=dataclasses.replace(ViTConfig(), **spec.model))
    return {"variants": list(run.variants), "seeds": run.seeds, "train_images": len(train),
            "test_images": len(test), "size": dataclasses.asdict(spec)}


def _fit_variant(variant: str, seed: int, run: Run, train) -> Any:
    """The training record (:func:`train_classifier`) of ``variant`` for ``seed`` on ``train``."""
    base, spec, test = run.state["base"], run.spec, run.state["test"]
    if variant == "vimoe-upcycled":
        return _train_upcycled(run.ctx, spec, seed, base, train, test)
    config = _variant_config(variant, base)
    model = seeded_build(seed, lambda: ViT(config))
    return train_classifier(variant, model, run.ctx, spec, seed, train, test, experiment="vimoe")


def _train(variant: str, definition: Any, seed: int, run: Run) -> Dict[str, Any]:
    record = _fit_variant(variant, seed, run, run.state["train"])
    out = {"accuracy": record.metrics["accuracy"], "train_time_s": record.metrics["train_time_s"],
           "steps": record.metrics["steps"], "routing": record.metrics.get("routing"), "model": record.model}
    if run.first_seed(seed):
        out["figures"] = {f"training curves: {variant}": viz.training_curves(record.history)}
    return out


def _variant_entry(per_seed: Dict[int, Dict[str, Any]], run: Run) -> Dict[str, Any]:
    """One variant's metrics: accuracy and training time over seeds; parameters, steps and routing
    of the first seed's model."""
    first = per_seed[run.seeds[0]]
    params = count_parameters(first["model"])
    return {"accuracy": run.over_seeds(per_seed, "accuracy"), "params_total": params["total"],
            "params_active_per_token": params["active_per_token"],
            "train_time_s": run.over_seeds(per_seed, "train_time_s"), "steps": first["steps"],
            "routing": first.get("routing")}


def _summarise(records: Dict[str, Dict[int, Dict[str, Any]]], run: Run) -> None:
    result, rows, per_variant = run.result, [], {}
    for variant, per_seed in records.items():
        config = _variant_config(variant, run.state["base"])
        entry = per_variant[variant] = _variant_entry(per_seed, run)
        summary = entry["accuracy"]
        rows.append({"variant": variant, "placement": config.moe_layers, "shared": config.num_shared,
                     "accuracy": round(summary["mean"], 4), "accuracy_std": round(summary["std"], 4),
                     "seeds": summary["n"], "params": entry["params_total"],
                     "active_params": int(entry["params_active_per_token"]),
                     "train_s": round(entry["train_time_s"]["mean"], 1)})
    result.metrics["variants"] = per_variant
    if run.options["references"]:
        rows += _reference_rows(result, run.ctx, run.spec, run.state["train"], run.state["test"])
    run.table("accuracy", "accuracy", rows)
    if run.options["routing_views"]:
        _routing_views(run, run.state["test"])


VIMOE = Experiment(
    "vimoe", "ViT vs ViMoE (shared expert, placement), class x expert maps", SIZES, ALL_VARIANTS, _train,
    _summarise, prepare=_prepare, default_variants=DEFAULT_VARIANTS,
    options={"n_per_class": None, "routing_views": True, "references": True},
    pairing=Pairing("dense", {"accuracy": "higher"}, "variants"))


def run_vimoe(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
              data: str = "auto", progress: bool = True, variants: Sequence[str] = DEFAULT_VARIANTS,
              n_per_class: Optional[int] = None, ctx: Optional[RunContext] = None,
              routing_views: bool = True, references: bool = True, settings: Any = None,
              shipped: bool = True) -> ExperimentResult:
    """Train each variant (default: the dense ViT and ViMoE with a shared expert, last-2 placement)
    for every seed; report accuracy (mean and spread over seeds), parameters, routing statistics,
    class x expert maps per MoE layer and test images with each patch coloured by its expert.

    ``n_per_class`` overrides the training-set size (images per class), for data-size studies.
    ``references``: add a logistic regression and a one-hidden-layer MLP on the pixels to the table,
    trained by the same trainer on the same data, so a reader sees where the ViTs stand.
    """
    return run(VIMOE, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data, progress=progress,
               variants=variants, n_per_class=n_per_class, routing_views=routing_views, references=references,
               shipped=shipped)


def _train_upcycled(ctx: RunContext, spec: ClassifySize, seed: int, base: ViTConfig, train, test):
    """``"vimoe-upcycled"`` for one seed: the dense ``base`` ViT for the first half of the steps, then
    :func:`~moe_lite.upcycle.upcycle` and the second half (fresh optimizer, its own warm-up and decay).
    Sizes that train by epochs count their steps from the training set. Returns the MoE's record, its
    ``steps`` the total of both halves."""
    total = spec.max_steps or spec.epochs * math.ceil(len(train) / spec.batch_size)
    half = dataclasses.replace(spec, epochs=1, max_steps=max(1, total // 2), eval_every=None)
    dense = seeded_build(seed, lambda: ViT(base))
    first = train_classifier("upcycle base (dense, first half)", dense, ctx, half, seed, train, test,
                             experiment="vimoe")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new gates' initial weights depend on the seed alone
        model = upcycle(dense, **UPCYCLE_KWARGS)
    record = train_classifier("vimoe-upcycled", model, ctx, half, seed, train, test, experiment="vimoe",
                              key=("upcycled from the dense first half",))
    record.metrics["steps"] += first.metrics["steps"]
    record.metrics["train_time_s"] += first.metrics["train_time_s"]
    return record


def _reference_rows(result: ExperimentResult, ctx: RunContext, spec: ClassifySize, train, test) -> list:
    """Train :data:`~moe_lite.models.reference.REFERENCES` for every seed (the run's steps and batch;
    lr 1e-3, no augmentation, no label smoothing: what they were measured with in docs/recipes.md)."""
    ref_spec = dataclasses.replace(spec, lr=1e-3, augment=False, label_smoothing=0.0, model={})
    rows, metrics = [], {}
    for name, hidden in REFERENCES.items():
        runs = [train_classifier(name, seeded_build(seed, lambda: PixelClassifier(hidden)), ctx, ref_spec, seed,
                                 train, test, experiment="vimoe") for seed in ctx.seeds]
        summary = mean_std([r.metrics["accuracy"] for r in runs], seeds=ctx.seeds)
        params = sum(p.numel() for p in runs[0].model.parameters())
        metrics[name] = {"accuracy": summary, "params_total": params,
                         "train_time_s": mean_std([r.metrics["train_time_s"] for r in runs], seeds=ctx.seeds)}
        rows.append({"variant": name, "placement": "-", "shared": "-", "accuracy": round(summary["mean"], 4),
                     "accuracy_std": round(summary["std"], 4), "seeds": summary["n"], "params": params,
                     "active_params": params, "train_s": round(metrics[name]["train_time_s"]["mean"], 1)})
    result.metrics["references"] = metrics
    return rows


def _routing_views(run: Run, test) -> None:
    """Class x expert maps and patch overlays for the first MoE variant of the run."""
    result, ctx = run.result, run.ctx
    moe_name = next((n for n in result.models if n != "dense"), None)
    if moe_name is None:
        return
    model = result.models[moe_name]
    per_layer = routing_by_class(model, test, ctx.device)
    result.metrics["class_expert_fraction"] = {k: v["fraction"] for k, v in per_layer.items()}
    result.metrics["specialisation"] = {k: class_specialisation(v["fraction"]) for k, v in per_layer.items()}
    for layer_name, part in per_layer.items():
        result.figures[f"class x expert: {layer_name}"] = viz.label_expert_heatmap(
            part, label_names=CLASS_NAMES, title=f"{moe_name}, {layer_name}: share of each class's tokens per expert")
    stats = result.metrics["variants"][moe_name].get("routing") or {}
    if stats:
        run.table("routing", f"routing ({moe_name})", routing_table(stats))
    # one test image per class, each patch coloured by its first expert in the last MoE layer
    first = [int((test.y == c).nonzero()[0]) for c in range(10) if (test.y == c).any()]
    model.eval()
    with torch.no_grad():
        model(test.x[first].to(ctx.device))
    last_layer = list(per_layer)[-1]
    experts = patch_experts(model, last_layer)[..., 0]  # [B, P]: each patch's highest-weight expert
    result.figures[f"patches by expert: {last_layer}"] = viz.patch_expert_overlay(
        denormalize(test.x[first]), experts,
        patch_size=model.config.patch_size, num_experts=model.config.num_experts, ncols=5,
        labels=test.y[first], label_names=CLASS_NAMES)
    _path_views(run, model, moe_name, test)


def _path_views(run: Run, model, moe_name: str, test) -> None:
    """Expert co-activation per MoE layer and the cross-layer expert paths of ``model`` over the
    test set (:mod:`moe_lite.analysis`), with how predictable each layer's top expert is from the last."""
    result, ctx = run.result, run.ctx
    co: Dict[str, torch.Tensor] = {}
    tokens: Dict[str, int] = {}
    paths: Dict = {}

    def collect(m, start: int) -> None:
        routings = {n: layer.routing for n, layer in moe_layers(m) if layer.routing is not None}
        for n, r in routings.items():
            co[n] = co.get(n, 0) + analysis.coactivation(r, normalize=False).cpu()
            tokens[n] = tokens.get(n, 0) + r.num_tokens
        for pair, counts in analysis.layer_transitions(routings).items():
            paths[pair] = paths.get(pair, 0) + counts.cpu()

    predict(model, test, ctx.device, on_batch=collect)
    for n, counts in co.items():
        result.figures[f"expert co-activation: {n}"] = viz.coactivation_heatmap(
            counts / max(tokens[n], 1),
            title=f"{moe_name}, {n}: share of test tokens two experts serve together (diagonal = load)")
    if paths:
        predictability = {f"{a} -> {b}": analysis.transition_predictability(c) for (a, b), c in paths.items()}
        result.metrics["cross_layer_predictability"] = predictability
        run.table("cross_layer_predictability", f"cross-layer expert predictability ({moe_name})", [
            {"layers": k, **{m: round(v[m], 4) for m in ("top1_accuracy", "baseline_accuracy", "normalized_mi",
                                                         "conditional_entropy")}} for k, v in predictability.items()])
        result.figures["cross-layer expert paths"] = viz.expert_sankey(
            paths, title=f"{moe_name}: each test token's top expert, layer to layer")


def class_specialisation(fraction) -> float:
    """How much a layer's routing depends on the class: the mean over experts of the total-variation
    distance between each class's expert distribution and the average one (0 = class-blind)."""
    dist = fraction / fraction.sum(-1, keepdim=True).clamp_min(1e-12)  # [C, E]
    return float(0.5 * (dist - dist.mean(0, keepdim=True)).abs().sum(-1).mean())


def _grid_prepare(run: Run) -> Dict[str, Any]:
    spec = run.spec
    train_all, test_all = run.ctx.splits()
    sizes = list(run.options["train_sizes"] if run.options["train_sizes"] is not None
                 else GRID_TRAIN_SIZES[run.ctx.size])
    # one training set per cell size: None takes the size's own (every image at quick size)
    trains = {"all" if n is None else str(n): train_all.take(n or spec.n_per_class, seed=0) for n in sizes}
    run.state.update(trains=trains, test=test_all.take(spec.test_per_class, seed=1),
                     base=dataclasses.replace(ViTConfig(), **spec.model))
    return {"variants": list(run.variants), "train_sizes": sizes, "seeds": run.seeds, "size": dataclasses.asdict(spec)}


def _grid_train(variant: str, definition: Any, seed: int, run: Run) -> Dict[str, Any]:
    """One variant for one seed at every training-set size: ``{size label: record}``."""
    cells = {}
    for label, train in run.state["trains"].items():
        record = _fit_variant(variant, seed, run, train)
        cells[label] = {"accuracy": record.metrics["accuracy"], "train_time_s": record.metrics["train_time_s"],
                        "steps": record.metrics["steps"], "routing": record.metrics.get("routing"),
                        "model": record.model}
    return {"cells": cells}


def _grid_summarise(records: Dict[str, Dict[int, Dict[str, Any]]], run: Run) -> None:
    result, test, variants = run.result, run.state["test"], list(records)
    cells: Dict[str, Dict[str, Any]] = {}
    for label, train in run.state["trains"].items():
        cells[label] = {"train_images": len(train),
                        **{v: _variant_entry({seed: r["cells"][label] for seed, r in per_seed.items()}, run)
                           for v, per_seed in records.items()}}
    result.metrics["cells"] = cells
    run.table("accuracy", "accuracy by training-set size (mean ± std over seeds)", [
        {"variant": v, "placement": VARIANTS[v][0] if v in VARIANTS else "none (dense)",
         "shared": VARIANTS[v][1] if v in VARIANTS else "-",
         **{f"acc, {cell['train_images']} images": format_mean_std(cell[v]["accuracy"], 4)
            for cell in cells.values()}}
        for v in variants])
    run.table("seed_spread", "seed spread: shared expert vs none (std of accuracy, in points)",
              _spread_rows(cells, variants))
    last = list(run.state["trains"])[-1]
    models = {v: {seed: r["cells"][last]["model"] for seed, r in per_seed.items()} for v, per_seed in records.items()}
    rows, result.metrics["specialisation"] = _specialisation_rows(models, test, run.ctx)
    run.table("specialisation", f"class specialisation per MoE layer (0 = class-blind; mean ± std over "
              f"{len(run.seeds)} seeds, {cells[last]['train_images']} training images)", rows)
    result.figures["accuracy by training-set size"] = viz.tradeoff_curve(
        [cells[label]["train_images"] for label in cells for v in variants],
        [cells[label][v]["accuracy"]["mean"] for label in cells for v in variants],
        labels=[f"{v} ({cells[label]['train_images']})" for label in cells for v in variants],
        x_title="training images", y_title="test accuracy (mean over seeds)",
        title="ViMoE placement x shared expert, by training-set size")


VIMOE_GRID = Experiment(
    "vimoe-grid", "ViMoE placement x shared expert x training-set size, over seeds", SIZES,
    {"dense": "dense", **VARIANTS}, _grid_train, _grid_summarise, prepare=_grid_prepare,
    default_variants=GRID_VARIANTS, options={"train_sizes": None}, figures=grid_figures,
    pairing=Pairing("dense", {"accuracy": "higher"}, "cells"))


def run_vimoe_grid(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
                   data: str = "auto", progress: bool = True, variants: Sequence[str] = GRID_VARIANTS,
                   train_sizes: Optional[Sequence[Optional[int]]] = None,
                   ctx: Optional[RunContext] = None, settings: Any = None, shipped: bool = True) -> ExperimentResult:
    """ViMoE's design questions at small scale: placement (all / every-2 / last-2) x shared expert,
    at several training-set sizes (default :data:`GRID_TRAIN_SIZES`), every cell over all seeds.

    Tables: accuracy mean ± std per variant and size; the seed spread with and without the shared
    expert; class specialisation of every MoE layer (total-variation distance of each class's
    expert distribution from the average, on the test set; every seed's model, largest training set).
    """
    return run(VIMOE_GRID, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data,
               progress=progress, variants=variants, train_sizes=train_sizes, shipped=shipped)


def _spread_rows(cells: Dict[str, Dict], variants: Sequence[str]):
    """Per placement and training size: the accuracy std over seeds with and without a shared expert."""
    rows = []
    for placement in ("last-2", "every-2", "all"):
        with_shared = next((v for v in variants if VARIANTS.get(v) == (placement, 1)), None)
        without = next((v for v in variants if VARIANTS.get(v) == (placement, 0)), None)
        if with_shared is None or without is None:
            continue
        for label, cell in cells.items():
            rows.append({"placement": placement, "train_images": cell["train_images"],
                         "std, shared": round(100 * cell[with_shared]["accuracy"]["std"], 2),
                         "std, no shared": round(100 * cell[without]["accuracy"]["std"], 2),
                         "mean, shared": round(cell[with_shared]["accuracy"]["mean"], 4),
                         "mean, no shared": round(cell[without]["accuracy"]["mean"], 4)})
    return rows


def _specialisation_rows(models: Dict[str, Dict[int, Any]], test, ctx: RunContext):
    """Class specialisation of every MoE layer of every variant, each seed's model measured on ``test``.
    ``models``: ``{variant: {seed: model}}``. Returns ``(table rows, {variant: {layer: mean_std}})``."""
    per_variant: Dict[str, Dict[str, Any]] = {}
    for variant, per_seed in models.items():
        if variant == "dense":
            continue
        values: Dict[str, List[float]] = {}
        for model in per_seed.values():
            for layer, v in routing_by_class(model, test, ctx.device).items():
                values.setdefault(layer, []).append(class_specialisation(v["fraction"]))
        per_variant[variant] = {layer: mean_std(v, seeds=list(per_seed)) for layer, v in values.items()}
    # one column per MoE layer of any variant, in block order; "-" where a variant has a dense block
    layers = sorted({layer for entry in per_variant.values() for layer in entry},
                    key=lambda name: [int(t) if t.isdigit() else t for t in name.split(".")])
    rows = [{"variant": variant, **{layer: format_mean_std(entry[layer], 3) if layer in entry else "-"
                                    for layer in layers}} for variant, entry in per_variant.items()]
    return rows, per_variant
