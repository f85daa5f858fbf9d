"""Sparse adaptation of a frozen model: LoRA experts (top-k, top-p, learned threshold) against a
linear probe, one LoRA with the same trainable parameters, and full fine-tuning."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..models.adapters import adapt, adapter_cost, split_classes
from ..models.vit import ViT, ViTConfig
from .. import viz
from .common import QUICK_MODEL, ClassifySize, seeded_build, train_classifier
from .core import Dataset, ExperimentResult, RunContext, Timer, add_paired_comparisons, mean_std

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
ADAPT_CLASSES = (5, 6, 7, 8, 9)

#: (pretraining size, adaptation size) per run size
SIZES: Dict[str, Tuple[ClassifySize, ClassifySize]] = {
    "smoke": (ClassifySize(n_per_class=24, test_per_class=8, epochs=1, batch_size=40,
                           model={"dim": 32, "depth": 2, "heads": 2, "mlp_hidden": 64}),
              ClassifySize(n_per_class=16, test_per_class=8, epochs=1, batch_size=40)),
    # pretraining: the ViT quick recipe (docs/recipes.md) on the five pretraining classes
    "quick": (ClassifySize(n_per_class=None, test_per_class=None, epochs=1, max_steps=1200, eval_every=400,
                           batch_size=128, lr=3e-3, augment=True, shift=0, label_smoothing=0.1, model=QUICK_MODEL),
              ClassifySize(n_per_class=200, test_per_class=None, epochs=1, max_steps=100, eval_every=50,
                           batch_size=100, lr=3e-3, augment=False)),
    "gpu": (ClassifySize(n_per_class=None, test_per_class=None, epochs=1, max_steps=4000, eval_every=1000,
                         batch_size=256, lr=2e-3, augment=True, shift=0, label_smoothing=0.1,
                         model={**QUICK_MODEL, "dim": 128, "depth": 6, "heads": 4, "mlp_hidden": 256}),
            ClassifySize(n_per_class=1000, test_per_class=None, epochs=1, max_steps=1000, eval_every=250,
                         batch_size=128, lr=1e-3, augment=False)),
    "full": (ClassifySize(n_per_class=None, test_per_class=None, epochs=20, batch_size=256, lr=1e-3,
                          model={"dim": 128, "depth": 6, "heads": 4, "mlp_hidden": 256}),
             ClassifySize(n_per_class=1000, test_per_class=None, epochs=10, batch_size=128, lr=1e-3)),
}

#: method name -> adapt() keyword arguments
METHODS: Mapping[str, Dict[str, Any]] = {
    "linear probe": {"method": "linear_probe"},
    "LoRA (matched params)": {"method": "lora"},
    "LoRA experts, top-2": {"method": "lora_experts", "router": "topk"},
    "LoRA experts, top-p": {"method": "lora_experts", "router": "topp", "inference_threshold": 0.2},
    "LoRA experts, learned threshold": {"method": "lora_experts", "router": "learned_threshold"},
    "full fine-tuning": {"method": "full"},
}


def _task(data: Dataset, classes: Sequence[int]) -> Dataset:
    x, y = split_classes(data.x, data.y, classes)
    return Dataset(x, y, data.source)


def run_adapt(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
              data: str = "auto", progress: bool = True, methods: Optional[Sequence[str]] = None,
              rank: int = 4, num_experts: int = 4, ctx: Optional[RunContext] = None) -> ExperimentResult:
    """Pretrain a dense ViT on classes 0-4, freeze it, adapt it to classes 5-9 with each method;
    report accuracy, trainable parameters and adapter FLOPs per token."""
    ctx = ctx or RunContext.create(size, seeds, device, data, progress)
    pre_spec, ada_spec = SIZES[ctx.size]
    chosen = list(methods or METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    train_all, test_all = ctx.splits()
    pre_train = _task(train_all.take(pre_spec.n_per_class, seed=0), PRETRAIN_CLASSES)
    pre_test = _task(test_all.take(pre_spec.test_per_class, seed=1), PRETRAIN_CLASSES)
    ada_train = _task(train_all, ADAPT_CLASSES).take(ada_spec.n_per_class, seed=2)
    ada_test = _task(test_all.take(ada_spec.test_per_class, seed=1), ADAPT_CLASSES)
    config = dataclasses.replace(ViTConfig(), num_classes=len(PRETRAIN_CLASSES), **pre_spec.model)
    result = ExperimentResult("adapt", ctx.size, str(ctx.device), train_all.source,
                              config={"methods": {m: METHODS[m] for m in chosen}, "rank": rank,
                                      "num_experts": num_experts, "seeds": ctx.seeds,
                                      "pretrain_images": len(pre_train), "adapt_images": len(ada_train),
                                      "test_images": len(ada_test)})
    with Timer() as timer:
        pretrained = seeded_build(ctx.seeds[0], lambda: ViT(config))
        base = train_classifier("pretrain (classes 0-4)", pretrained, ctx, pre_spec, ctx.seeds[0],
                                pre_train, pre_test, experiment="adapt")
        result.metrics["pretrain_accuracy"] = base.metrics["accuracy"]
        # the adapted runs' cache keys must change when the pretrained weights do
        pretrain_key = repr((config, pre_spec, ctx.seeds[0], len(pre_train)))
        result.models["pretrained"] = base.model
        rows = []
        for method in chosen:
            kwargs = dict(METHODS[method])
            accs, cost = [], None
            for seed in ctx.seeds:
                adapted = seeded_build(seed, lambda: adapt(base.model, num_classes=len(ADAPT_CLASSES), rank=rank,
                                                           num_experts=num_experts, **kwargs))
                # full fine-tuning wants a smaller step than the adapters
                lr = ada_spec.lr * (0.3 if kwargs["method"] == "full" else 1.0)
                record = train_classifier(method, adapted, ctx, ada_spec, seed, ada_train, ada_test, lr=lr,
                                          experiment="adapt", key=(kwargs, rank, num_experts, pretrain_key))
                accs.append(record.metrics["accuracy"])
                if cost is None:
                    # one eval forward on the first test batch, so a model loaded from the checkpoint
                    # cache has a routing too and fresh and cached runs report the same FLOPs
                    record.model.eval()
                    with torch.no_grad():
                        record.model(ada_test.x[:512].to(ctx.device))
                    cost = adapter_cost(record.model)  # routing of that eval forward
                    result.models[method] = record.model
            acc = mean_std(accs, seeds=ctx.seeds)
            result.metrics[method] = {"accuracy": acc, **cost}
            rows.append({"method": method, "accuracy": round(acc["mean"], 4), "accuracy_std": round(acc["std"], 4),
                         "seeds": acc["n"], "trainable_params": int(cost["trainable_params"]),
                         "adapter_flops_per_token": round(cost["adapter_flops_per_token"], 1)})
        result.tables["adaptation to classes 5-9"] = rows
        result.figures["accuracy vs trainable parameters"] = viz.tradeoff_curve(
            [r["trainable_params"] for r in rows], [r["accuracy"] for r in rows], labels=chosen,
            x_title="trainable parameters", y_title="test accuracy (classes 5-9)",
            title="Adapting a frozen ViT: accuracy against trainable parameters")
    add_paired_comparisons(result)
    result.wall_time_s = timer.seconds
    return result
