"""Routing in a language model with ground truth: which tokens take more experts?

A small causal transformer (:class:`moe_lite.models.lm.CausalLM`, MoE in every block) is trained on
the synthetic multi-task sequences of :mod:`moe_lite.sequences`, whose every token carries its task
and difficulty level. Top-1, top-2, top-p (Huang et al. 2024) and Expert Race share the experts and
widths; only the routing differs. For each, over seeds: per-token accuracy by task and level,
experts per token by level, by task and by layer, the Spearman correlation of experts per token
with the level and with the token's loss, and the mutual information between expert choice and
task (and token identity) in each layer.

Tokens measured: a causal model's position ``p`` predicts token ``p + 1``, so accuracy, loss,
experts per token and their correlations are read at the positions that predict an answer token
(:func:`moe_lite.sequences.predicting_positions`); the mutual information uses every non-padding
token. Race is evaluated with its EMA threshold (batch-independent: see :mod:`moe_lite.models.lm`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import plotly.graph_objects as go
import torch
from torch import Tensor, nn

from .. import viz
from ..layers import moe_layers
from ..models.lm import CausalLM, LMConfig, SequenceTask, accuracy_by_task_level
from ..routers import TopP
from ..inspect import inference_threshold
from ..models.vit import experts_per_token
from ..routing import by_label
from ..sequences import LEVELS, SEQ_LEN, TASKS, VOCAB, Sequences, chance_accuracy, load_sequences, \
    make_sequence_loader, predicting_positions
from ..train import TrainConfig
from .common import cached_fit, data_fingerprint, seeded_build
from .core import ExperimentResult, RunContext, format_mean_std, mean_std
from .dynamic import spearman
from .runner import Experiment, Run, run

__all__ = ["run_sequence", "SEQUENCE", "SIZES", "VARIANTS", "DEFAULT_VARIANTS", "SequenceSize", "variant_config",
           "sequence_profile", "seed_statistics", "mutual_information", "threshold_sweep"]


@dataclass(frozen=True)
class SequenceSize:
    """How big one sequence run is: train / test rows, a fixed number of optimizer steps (the same
    numbers on any machine), batch size, learning rate, evaluation interval; ``model``: LMConfig
    overrides."""

    train: int
    test: int
    max_steps: int
    batch_size: int
    lr: float
    eval_every: Optional[int] = None
    model: Dict[str, Any] = field(default_factory=dict)


SIZES: Dict[str, SequenceSize] = {
    "smoke": SequenceSize(train=256, test=96, max_steps=6, batch_size=32, lr=3e-3,
                          model={"dim": 32, "depth": 2, "heads": 2, "mlp_hidden": 64, "expert_hidden": 32,
                                 "num_experts": 4}),
    # 400 steps of 64 rows: about a minute per model with one CPU thread on a busy 2-core machine.
    # Measured (seed 0): at 1000 steps with rows of at most 8 digits, copy, reverse, sort, brackets and
    # count were near-perfect at every level; at 600 steps with 11, copy, reverse and count still
    # were (>= 0.97 at level 3). Fewer steps and longer rows keep the easy-to-hard gradient.
    "quick": SequenceSize(train=20_000, test=2_000, max_steps=400, batch_size=64, lr=3e-3, eval_every=200),
    "gpu": SequenceSize(train=100_000, test=4_000, max_steps=4_000, batch_size=256, lr=1e-3, eval_every=1000,
                        model={"dim": 128, "depth": 4, "heads": 4, "mlp_hidden": 256, "expert_hidden": 128}),
    "full": SequenceSize(train=200_000, test=4_000, max_steps=20_000, batch_size=256, lr=1e-3, eval_every=2000,
                         model={"dim": 128, "depth": 6, "heads": 4, "mlp_hidden": 256, "expert_hidden": 128}),
}

BALANCE = {"load_balance": 1e-2}
#: name -> (router, router kwargs, MoE losses). Same experts and widths for all: top-1 activates one
#: expert per token, top-2 and race two on average, top-p what its threshold gives.
VARIANTS: Dict[str, tuple] = {
    "top-1": ("topk", {"k": 1}, BALANCE),
    "top-2": ("topk", {"k": 2}, BALANCE),
    "top-p": ("topp", {"p": 0.4}, {"entropy": 1e-4, **BALANCE}),
    "race": ("race", {"k": 2}, BALANCE),
}
DEFAULT_VARIANTS = ("top-1", "top-2", "top-p", "race")
#: routers whose experts per token is a constant (no correlation to measure)
FIXED_K = ("top-1", "top-2")
#: top-p thresholds swept on the trained model (inference only)
SWEEP = (0.2, 0.4, 0.6, 0.8)


def variant_config(name: str, size: str) -> LMConfig:
    """The :class:`LMConfig` of variant ``name`` at ``size``: 8 experts (4 at smoke size) of width
    ``mlp_hidden / 2`` in every block."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    router, kwargs, losses = VARIANTS[name]
    base = {"vocab_size": len(VOCAB), "max_len": SEQ_LEN, "moe_layers": "all", "num_experts": 8,
            "expert_hidden": 64, **SIZES[size].model}
    return LMConfig(**base, router=router, router_kwargs=dict(kwargs), moe_losses=dict(losses))


class _SequenceContext(RunContext):
    """The run context with a checkpoint key made of the sequence data (the base class would load
    Fashion-MNIST to key on it)."""

    def checkpoint_path(self, experiment: str, name: str, *key_parts: Any):
        if self.cache_dir is None:
            return None
        key = repr((self.size, "sequences", str(self.device.type)) + tuple(repr(p) for p in key_parts))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        return self.cache_dir / experiment / f"{slug}-{digest}.pt"


# ---- measuring -------------------------------------------------------------------------------------
@torch.no_grad()
def sequence_profile(model: nn.Module, data: Sequences, device: torch.device, batch_size: int = 500) -> Dict[str, Any]:
    """One eval pass over ``data``, read at the ``A`` positions that predict an answer token.

    Returns:
        ``loss``, ``correct``, ``task``, ``level``: ``[A]``; ``experts``: ``[A]`` experts per token
        averaged over MoE layers; ``layers``: ``{layer: [A]}``; ``task_expert`` / ``token_expert``:
        ``{layer: [K, E]}`` / ``{layer: [V, E]}`` assignment counts over every non-padding token.
    """
    model.eval()
    out: Dict[str, List[Tensor]] = {"loss": [], "correct": [], "task": [], "level": []}
    layers: Dict[str, List[Tensor]] = {}
    joint: Dict[str, Dict[str, Tensor]] = {"task_expert": {}, "token_expert": {}}
    k, v = len(TASKS), len(VOCAB)
    for start in range(0, len(data), batch_size):
        tokens, mask, task, level = (t[start:start + batch_size] for t in data.tensors())
        logits = model(tokens.to(device)).float().cpu()
        at = predicting_positions(mask)  # [b, t]
        target = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # token p + 1 at position p
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        out["loss"].append(loss[at])
        out["correct"].append((logits.argmax(-1) == target)[at])
        out["task"].append(task[at])
        out["level"].append(level[at])
        for name, ept in experts_per_token(model).items():
            layers.setdefault(name, []).append(ept.cpu().float()[at])
        for name, layer in moe_layers(model):
            routing = getattr(layer, "routing", None)
            if routing is None:
                continue
            for key, labels, n in (("task_expert", task, k), ("token_expert", tokens, v)):
                # padding gets its own label n, dropped below
                labelled = torch.where(task >= 0, labels, torch.full_like(labels, n)).to(routing.token.device)
                counts = by_label(routing, labelled, num_labels=n + 1)["counts"][:n].cpu()
                joint[key][name] = joint[key].get(name, 0) + counts
    profile: Dict[str, Any] = {key: torch.cat(values) for key, values in out.items()}
    profile["layers"] = {name: torch.cat(values) for name, values in layers.items()}
    stacked = list(profile["layers"].values())
    profile["experts"] = torch.stack(stacked).mean(0) if stacked else torch.zeros_like(profile["loss"])
    profile.update(joint)
    return profile


def mutual_information(counts: Tensor) -> Dict[str, float]:
    """Mutual information of a joint count table ``[C, E]`` (label x expert), in bits.

    Returns ``{"mi": I(label; expert), "normalized": I / H(label)}`` (the share of the label's entropy
    that the expert choice carries: 0 = experts ignore the label, 1 = the expert identifies it);
    ``normalized`` is nan when H(label) is 0.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 2 or (counts < 0).any():
        raise ValueError(f"counts must be a non-negative [C, E] table, got shape {tuple(counts.shape)}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("counts must not be all zero")
    p = counts / total
    pc, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pc * pe).expand_as(p)[nz]).log2()).sum())
    pc = pc[pc > 0]
    h = float(-(pc * pc.log2()).sum())
    return {"mi": max(mi, 0.0), "normalized": max(mi, 0.0) / h if h > 0 else float("nan")}


def _by(values: Tensor, labels: Tensor, n: int) -> List[float]:
    """Mean of ``values`` within each label ``0..n-1`` (nan where none)."""
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, labels, values.double())
    counts = torch.bincount(labels, minlength=n).double()
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan"))).tolist()


def seed_statistics(profile: Dict[str, Any]) -> Dict[str, Any]:
    """One trained model's numbers from :func:`sequence_profile`: accuracy overall, by task, by level
    and by task x level; experts per token by level, by task, by task x level and by layer; Spearman
    of experts per token with the level and with the token's loss (nan when experts per token is a
    constant); per layer, the mutual information of expert choice with the task and with the token."""
    experts, level, task, correct = profile["experts"], profile["level"], profile["task"], profile["correct"]
    k = len(TASKS)
    grid = accuracy_by_task_level(correct, task, level, k, LEVELS)["accuracy"]
    varies = bool(experts.numel() > 1 and experts.std() > 0)
    cell = task * LEVELS + level
    return {
        "accuracy": float(correct.float().mean()),
        "accuracy_by_task": _by(correct.float(), task, k),
        "accuracy_by_level": _by(correct.float(), level, LEVELS),
        "accuracy_by_task_level": grid.tolist(),
        "experts_per_token": float(experts.mean()),
        "experts_by_level": _by(experts, level, LEVELS),
        "experts_by_task": _by(experts, task, k),
        "experts_by_task_level": torch.tensor(_by(experts, cell, k * LEVELS)).reshape(k, LEVELS).tolist(),
        "spearman_level": spearman(experts, level.double()) if varies else float("nan"),
        "spearman_loss": spearman(experts, profile["loss"]) if varies else float("nan"),
        "experts_by_layer": {name: float(v.mean()) for name, v in profile["layers"].items()},
        "mi_task": {name: mutual_information(c) for name, c in profile["task_expert"].items()},
        "mi_token": {name: mutual_information(c) for name, c in profile["token_expert"].items()},
    }


def threshold_sweep(model: nn.Module, data: Sequences, device: torch.device, values: Sequence[float] = SWEEP,
                    batch_size: int = 500) -> List[Dict[str, Any]]:
    """Move the top-p threshold of a trained model (:class:`moe_lite.inspect.inference_threshold`),
    inference only: per value, accuracy and experts per token overall and by level. The model's
    threshold is restored afterwards."""
    points = []
    for value in values:
        with inference_threshold(model, value, kind=TopP):  # the trained p is back on exit
            profile = sequence_profile(model, data, device, batch_size)
        points.append({"p": float(value), "accuracy": float(profile["correct"].float().mean()),
                       "experts_per_token": float(profile["experts"].mean()),
                       "experts_by_level": _by(profile["experts"], profile["level"], LEVELS)})
    return points


# ---- the experiment ------------------------------------------------------------------------------------
def _cell(values: Sequence[float], digits: int) -> Any:
    """A table cell: mean ± std over seeds, or "n/a" when a value is undefined (nan)."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return "n/a"
    return format_mean_std(mean_std(values), digits)


def _seed_mean_std(per_seed: List[Dict[str, Any]], key: str) -> Any:
    """mean_std over seeds of a scalar, a list or a (nested) dict of them."""
    first = per_seed[0][key]
    if isinstance(first, dict):
        return {k: _seed_mean_std([{key: d[key][k]} for d in per_seed], key) for k in first}
    if isinstance(first, list):
        return [_seed_mean_std([{key: d[key][i]} for d in per_seed], key) for i in range(len(first))]
    return mean_std([d[key] for d in per_seed])


def _prepare(run: Run) -> Dict[str, Any]:
    spec = run.spec
    train, test = load_sequences("train", spec.train, seed=0), load_sequences("test", spec.test, seed=0)
    run.state.update(train=train, test=test)
    return {"seeds": run.seeds, "variants": list(run.variants), "tasks": list(TASKS), "levels": LEVELS,
            "train_rows": len(train), "test_rows": len(test), "size": dataclasses.asdict(spec)}


def _train(name: str, definition: tuple, seed: int, run: Run) -> Dict[str, Any]:
    """One routing variant for one seed: :func:`seed_statistics` on the test rows; the first seed
    also its model and training curves."""
    ctx, test = run.ctx, run.state["test"]
    config = variant_config(name, ctx.size)
    model = seeded_build(seed, lambda: CausalLM(config))
    if ctx.progress:
        print(f"[{name}] seed {seed}: {sum(p.numel() for p in model.parameters()):,} parameters")
    history = _fit(name, model, run.state["train"], test, run.spec, seed, ctx)
    out: Dict[str, Any] = {"stats": seed_statistics(sequence_profile(model, test, ctx.device))}
    if run.first_seed(seed):
        out.update(model=model, figures={f"training curves: {name}": viz.training_curves(history)})
    return out


def _summarise(records: Dict[str, Dict[int, Dict[str, Any]]], run: Run) -> None:
    result = run.result
    stats = {name: [r["stats"] for r in per_seed.values()] for name, per_seed in records.items()}
    for name, per_seed in stats.items():
        result.metrics[f"{name}/first_seed"] = per_seed[0]
        result.metrics[name] = {key: _seed_mean_std(per_seed, key) for key in per_seed[0]}
    _tables(run, stats)
    _figures(result, stats)
    if "top-p" in result.models:
        sweep = threshold_sweep(result.models["top-p"], run.state["test"], run.ctx.device)
        result.metrics["threshold_sweep"] = sweep
        run.table("threshold_sweep", "top-p threshold moved after training (first seed)", [
            {"p": pt["p"], "accuracy": round(pt["accuracy"], 4),
             "experts_per_token": round(pt["experts_per_token"], 3),
             **{f"experts, level {q}": round(v, 3) for q, v in enumerate(pt["experts_by_level"])}}
            for pt in sweep])
    result.notes.append("Tokens measured: the positions that predict an answer token (position p predicts "
                        "token p + 1); mutual information: every non-padding token, in bits.")
    result.notes.append("Race is evaluated with its EMA threshold: each token is routed on its own scores, "
                        "independent of the batch and of later tokens (causal at inference).")


SEQUENCE = Experiment(
    "sequence", "causal LM on multi-task sequences: experts per token by ground-truth difficulty, task and layer",
    SIZES, VARIANTS, _train, _summarise, prepare=_prepare, default_variants=DEFAULT_VARIANTS,
    data_source="generated (moe_lite.sequences)", context=_SequenceContext)


def run_sequence(size: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None, device: str = "auto",
                 data: str = "auto", progress: bool = True, variants: Sequence[str] = DEFAULT_VARIANTS,
                 ctx: Optional[RunContext] = None, settings: Any = None, shipped: bool = True) -> ExperimentResult:
    """Train each routing variant (``variants``, from :data:`VARIANTS`) on the sequence set for every
    seed and measure where the experts go (see the module docstring). Numbers in the tables are
    mean ± std over seeds; figures and the threshold sweep use the first seed. ``data`` is accepted
    for the common experiment signature and unused (the sequences are generated, never loaded).
    """
    return run(SEQUENCE, ctx, settings=settings, size=size, seeds=seeds, device=device, data=data,
               progress=progress, variants=variants, shipped=shipped)


def _fit(name: str, model: nn.Module, train: Sequences, test: Sequences, spec: SequenceSize, seed: int,
         ctx: RunContext):
    train_loader = make_sequence_loader(train, spec.batch_size, shuffle=True, seed=seed)
    test_loader = make_sequence_loader(test, 500, shuffle=False)
    config = TrainConfig(max_steps=spec.max_steps, lr=spec.lr, seed=seed, device=str(ctx.device),
                         progress=ctx.progress, eval_every=spec.eval_every, batch_size=spec.batch_size)
    task = SequenceTask()
    return cached_fit("sequence", name, model, task, train_loader, test_loader, config, ctx,
                      key=(seed, task, data_fingerprint(test_loader.dataset)))


#: short name -> title of the tables with one row per model
TABLES = {"accuracy_by_task": "accuracy by task", "accuracy_by_level": "accuracy by difficulty level",
          "experts_by_level": "experts per token by difficulty level", "experts_by_task": "experts per token by task",
          "experts_by_layer": "experts per token by layer",
          "mi_task": "mutual information of expert choice with the task (bits, per layer)",
          "mi_token": "mutual information of expert choice with the token (bits, per layer)"}


def _tables(run: Run, stats: Dict[str, List[Dict[str, Any]]]) -> None:
    def column(name: str, key: str, index: Optional[int] = None, digits: int = 3) -> Any:
        values = [d[key] if index is None else d[key][index] for d in stats[name]]
        return _cell(values, digits)

    rows: Dict[str, List[Dict[str, Any]]] = {title: [] for title in TABLES.values()}
    for name, per_seed in stats.items():
        seeds = {"seeds": len(per_seed)}
        rows["accuracy by task"].append({"model": name, "all": column(name, "accuracy"),
                                         **{t: column(name, "accuracy_by_task", i) for i, t in enumerate(TASKS)},
                                         **seeds})
        rows["accuracy by difficulty level"].append(
            {"model": name, **{f"level {q}": column(name, "accuracy_by_level", q) for q in range(LEVELS)}, **seeds})
        rows["experts per token by difficulty level"].append(
            {"model": name, "all": column(name, "experts_per_token"),
             **{f"level {q}": column(name, "experts_by_level", q) for q in range(LEVELS)},
             "spearman(experts, level)": column(name, "spearman_level"),
             "spearman(experts, token loss)": column(name, "spearman_loss"), **seeds})
        rows["experts per token by task"].append(
            {"model": name, **{t: column(name, "experts_by_task", i) for i, t in enumerate(TASKS)}, **seeds})
        layers = list(per_seed[0]["experts_by_layer"])
        rows["experts per token by layer"].append(
            {"model": name, **{layer: _cell([d["experts_by_layer"][layer] for d in per_seed], 3) for layer in layers},
             **seeds})
        for key, title in (("mi_task", "task"), ("mi_token", "token")):
            table = f"mutual information of expert choice with the {title} (bits, per layer)"
            rows[table].append({"model": name, **{layer: _cell([d[key][layer]["mi"] for d in per_seed], 3)
                                                  for layer in layers}, **seeds})
    for name, title in TABLES.items():
        run.table(name, title, rows[title])
    first_name = "top-p" if "top-p" in stats else next(iter(stats))
    first = stats[first_name][0]
    run.table("accuracy_by_task_level", f"accuracy by task and level ({first_name}, first seed; chance in brackets)", [
        {"task": t, **{f"level {q}": f"{first['accuracy_by_task_level'][i][q]:.3f} ({chance_accuracy(t, q):.2f})"
                       for q in range(LEVELS)}} for i, t in enumerate(TASKS)])


def _figures(result: ExperimentResult, stats: Dict[str, List[Dict[str, Any]]]) -> None:
    levels = list(range(LEVELS))
    fig = go.Figure()
    for name, per_seed in stats.items():
        means = [mean_std([d["experts_by_level"][q] for d in per_seed])["mean"] for q in levels]
        fig.add_trace(go.Scatter(x=levels, y=means, mode="lines+markers", name=name))
    fig.update_layout(title="experts per token by difficulty level (mean over seeds and MoE layers)",
                      xaxis_title="difficulty level", yaxis_title="experts per token", xaxis=dict(dtick=1))
    result.figures["experts per token by difficulty"] = fig
    layers = list(next(iter(stats.values()))[0]["experts_by_layer"])
    result.figures["experts per token by layer"] = viz.layer_stat_bars(
        {layer: {name: mean_std([d["experts_by_layer"][layer] for d in per_seed])["mean"]
                 for name, per_seed in stats.items()} for layer in layers},
        keys=list(stats), title="experts per token in each MoE layer", y_title="experts per token")
    if "top-p" in result.models:
        result.figures["top-p: experts per token by task and level"] = experts_task_level_figure(
            result.metrics["top-p/first_seed"])
    name = "top-p" if "top-p" in result.models else next(iter(result.models))
    result.figures[f"{name}: accuracy by task and level"] = accuracy_heatmap(result.metrics[f"{name}/first_seed"],
                                                                            title=f"{name}: per-token accuracy")


def experts_task_level_figure(stats: Dict[str, Any], title: str = "experts per token by task and level") -> go.Figure:
    """One line per task: experts per token against the difficulty level (from :func:`seed_statistics`)."""
    fig = go.Figure()
    for i, task in enumerate(TASKS):
        fig.add_trace(go.Scatter(x=list(range(LEVELS)), y=stats["experts_by_task_level"][i], mode="lines+markers",
                                 name=task))
    fig.update_layout(title=title, xaxis_title="difficulty level", yaxis_title="experts per token",
                      xaxis=dict(dtick=1))
    return fig


def accuracy_heatmap(stats: Dict[str, Any], title: str = "per-token accuracy by task and level") -> go.Figure:
    """Task x level heatmap of per-token accuracy (from :func:`seed_statistics`)."""
    fig = go.Figure(go.Heatmap(z=stats["accuracy_by_task_level"], x=[f"level {q}" for q in range(LEVELS)],
                               y=list(TASKS), zmin=0, zmax=1, colorscale="Viridis", texttemplate="%{z:.2f}"))
    fig.update_layout(title=title, xaxis_title="difficulty level", yaxis_title="task")
    fig.update_yaxes(autorange="reversed")
    return fig
