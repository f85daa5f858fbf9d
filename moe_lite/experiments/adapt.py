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
from .core import Dataset, ExperimentResult, Pairing, RunContext
from .figures import adapt_figures
from .runner import Experiment, Run, run

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


def _prepare(run: Run) -> Dict[str, Any]:
    """The data of both tasks and the dense ViT pretrained on classes 0-4 (first seed), frozen later."""
    ctx = run.ctx
    pre_spec, ada_spec = run.spec
    train_all, test_all = ctx.splits()
    pre_train = _task(train_all.take(pre_spec.n_per_class, seed=0), PRETRAIN_CLASSES)
    pre_test = _task(test_all.take(pre_spec.test_per_class, seed=1), PRETRAIN_CLASSES)
    ada_train = _task(train_all, ADAPT_CLASSES).take(ada_spec.n_per_class, seed=2)
    ada_test = _task(test_all.take(ada_spec.test_per_class, seed=1), ADAPT_CLASSES)
    config = dataclasses.replace(ViTConfig(), num_classes=len(PRETRAIN_CLASSES), **pre_spec.model)
    pretrained = seeded_build(ctx.seeds[0], lambda: ViT(config))
    base = train_classifier("pretrain (classes 0-4)", pretrained, ctx, pre_spec, ctx.seeds[0],
                            pre_train, pre_test, experiment="adapt")
    run.result.metrics["pretrain_accuracy"] = base.metrics["accuracy"]
    run.result.models["pretrained"] = base.model
    # the adapted runs' cache keys must change when the pretrained weights do
    run.state.update(train=ada_train, test=ada_test, base=base.model,
                     pretrain_key=repr((config, pre_spec, ctx.seeds[0], len(pre_train))))
    return {"methods": {m: METHODS[m] for m in run.variants}, "rank": run.options["rank"],
            "num_experts": run.options["num_experts"], "seeds": ctx.seeds,
            "pretrain_images": len(pre_train), "adapt_images": len(ada_train), "test_images": len(ada_test)}


def _train(method: str, kwargs: Dict[str, Any], seed: int, run: Run) -> Dict[str, Any]:
    """One adaptation method for one seed: accuracy; the first seed also its cost (trainable
    parameters, adapter FLOPs per token) and model."""
    ctx, ada_spec, test = run.ctx, run.spec[1], run.state["test"]
    rank, num_experts = run.options["rank"], run.options["num_experts"]
    kwargs = dict(kwargs)
    adapted = seeded_build(seed, lambda: adapt(run.state["base"], num_classes=len(ADAPT_CLASSES), rank=rank,
                                               num_experts=num_experts, **kwargs))
    # full fine-tuning wants a smaller step than the adapters
    lr = ada_spec.lr * (0.3 if kwargs["method"] == "full" else 1.0)
    record = train_classifier(method, adapted, ctx, ada_spec, seed, run.state["train"], test, lr=lr,
                              experiment="adapt", key=(kwargs, rank, num_experts, run.state["pretrain_key"]))
    out: Dict[str, Any] = {"accuracy": record.metrics["accuracy"]}
    if run.first_seed(seed):
        # one eval forward on the first test batch, so a model loaded from the checkpoint
        # cache has a routing too and fresh and cached runs report the same FLOPs
        record.model.eval()
        with torch.no_grad():
            record.model(test.x[:512].to(ctx.device))
        out.update(cost=adapter_cost(record.model), model=record.model)  # routing of that eval forward
    return out


def _summarise(records: Dict[str, Dict[int, Dict[str, Any]]], run: Run) -> None:
    result, rows = run.result, []
    for method, per_seed in records.items():
        cost = per_seed[run.seeds[0]]["cost"]
        acc = run.over_seeds(per_seed, "accuracy")
        result.metrics[method] = {"accuracy": acc, **cost}
        rows.append({"method": method, "accuracy": round(acc["mean"], 4), "accuracy_std": round(acc["std"], 4),
                     "seeds": acc["n"], "trainable_params": int(cost["trainable_params"]),
                     "adapter_flops_per_token": round(cost["adapter_flops_per_token"], 1)})
    run.table("adaptation", "adaptation to classes 5-9", rows)
    result.figures["accuracy vs trainable parameters"] = viz.tradeoff_curve(
        [r["trainable_params"] for r in rows], [r["accuracy"] for r in rows], labels=list(records),
        x_title="trainable parameters", y_title="test accuracy (classes 5-9)", mode="markers+text",
        title="Adapting a frozen ViT: accuracy against trainable parameters")  # methods: no line between them


ADAPT = Experiment(
    "adapt", "LoRA experts on a frozen ViT vs linear probe, LoRA, full fine-tuning", SIZES, METHODS, _train,
    _summarise, prepare=_prepare, options={"rank": 4, "num_experts": 4}, figures=adapt_figures,
    pairing=Pairing("LoRA (matched params)", {"accuracy": "higher"}))


def run_adapt(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
              data: str = "auto", progress: bool = True, variants: Optional[Sequence[str]] = None,
              rank: int = 4, num_experts: int = 4, ctx: Optional[RunContext] = None,
              settings: Any = None, shipped: bool = True) -> ExperimentResult:
    """Pretrain a dense ViT on classes 0-4, freeze it, adapt it to classes 5-9 with each method
    (``variants``: keys of :data:`METHODS`, default all); report accuracy, trainable parameters and
    adapter FLOPs per token."""
    return run(ADAPT, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data, progress=progress,
               variants=variants, rank=rank, num_experts=num_experts, shipped=shipped)
