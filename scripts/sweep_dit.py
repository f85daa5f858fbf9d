"""Sweep DiT training and sampling knobs at quick size on one CPU thread (issue: strong small models).

Trains one DiT per training recipe (cached like every experiment), then scores its samples over a grid
of guidance scales and sampling steps, printing conditional accuracy, the classifier-feature FD and the
real-vs-real FD floor at the same sample count::

    python scripts/sweep_dit.py --variants dense "expert race" --steps 500 --cfg 2 3 4 --sample-steps 10 20
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch

from moe_lite.experiments.common import loaders, seeded_build
from moe_lite.experiments.core import RunContext
from moe_lite.experiments.diffusion import SIZES, _classifier, evaluate_samples, training_config, variant_config
from moe_lite.metrics import real_fd_floor
from moe_lite.models.dit import RACE_CANDIDATES, DiT, use_ema_threshold
from moe_lite.train import DiffusionTask, TrainConfig, fit


class WeightEMA:
    """Exponential moving averages of a model's floating parameters and buffers, one per decay."""

    def __init__(self, decays) -> None:
        self.decays = [d for d in decays if d > 0]
        self.shadows = None

    def __call__(self, event, info) -> None:
        if event != "step" or not self.decays:
            return
        state = {k: v.detach().clone() for k, v in info["model"].state_dict().items() if v.is_floating_point()}
        if self.shadows is None:
            self.shadows = [{k: v.clone() for k, v in state.items()} for _ in self.decays]
            return
        for decay, shadow in zip(self.decays, self.shadows):
            for k, v in state.items():
                shadow[k].mul_(decay).add_(v, alpha=1 - decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["dense"])
    parser.add_argument("--steps", type=int, nargs="+", default=[500])
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-3])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cfg", type=float, nargs="+", default=[2.0])
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[10])
    parser.add_argument("--samples-per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ema", type=float, nargs="+", default=[0.0],
                        help="EMA decays of the weights to score besides the raw weights (0: raw only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ctx = RunContext.create("quick", [args.seed], "cpu", "embedded", False)
    train, test = ctx.splits()
    classifier = _classifier(ctx, train, test)
    base = dataclasses.replace(SIZES["quick"], batch_size=args.batch, samples_per_class=args.samples_per_class)
    floor = real_fd_floor(train.x, test.x, classifier, num_samples=10 * args.samples_per_class, draws=3)
    print(f"real-vs-real FD floor at {10 * args.samples_per_class} samples: {floor['mean']:.2f} ± {floor['std']:.2f}")
    print("variant | steps | lr | train_s | cfg | sample_steps | cond_acc | FD | sample_s")
    for variant, steps, lr in itertools.product(args.variants, args.steps, args.lr):
        config = training_config(variant_config(variant, "quick"))
        model = seeded_build(args.seed, lambda: DiT(config))
        train_loader, test_loader = loaders(train, test.take(20, seed=1), args.batch, args.seed)
        ema = WeightEMA(args.ema)
        t0 = time.perf_counter()
        fit(model, DiffusionTask(), train_loader, test_loader,
            TrainConfig(epochs=1, max_steps=steps, lr=lr, seed=args.seed, device="cpu", progress=False),
            callbacks=[ema])
        train_s = time.perf_counter() - t0
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        weights = [("raw", raw)] + [(f"ema{d:g}", {**raw, **shadow}) for d, shadow in zip(ema.decays, ema.shadows or [])]
        if config.moe_routing in RACE_CANDIDATES:
            use_ema_threshold(model, True)
        for (label, state), cfg, sample_steps in itertools.product(weights, args.cfg, args.sample_steps):
            model.load_state_dict(state)
            spec = dataclasses.replace(base, cfg_scale=cfg, sample_steps=sample_steps)
            t1 = time.perf_counter()
            gen = evaluate_samples(model, classifier, test.x, spec, ctx.device, seed=args.seed)
            print(f"{variant} {label} | {steps} | {lr:g} | {train_s:.0f} | {cfg:g} | {sample_steps} | "
                  f"{gen['conditional_accuracy']:.3f} | {gen['fd_fmnist_classifier']:.2f} | "
                  f"{time.perf_counter() - t1:.0f}", flush=True)


if __name__ == "__main__":
    main()
