"""Training and analysis steps that several experiments share (classification on Fashion-MNIST)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..analysis import EXPERT_LOAD, expert_load
from ..data import make_loader
from ..inspect import moe_layers, record_routing, routing_stats
from ..train import (CheckpointError, ClassificationTask, History, TrainConfig, evaluate, fit, load_checkpoint,
                     read_checkpoint, remove_stale_temporaries)
from . import core
from .core import Dataset, RunContext


#: the quick ViT recipe's architecture (docs/recipes.md), as overrides of ViTConfig's defaults: 16 tokens
#: of 7x7 patches after a 3x3 conv stem with 8 maps, and a class token
QUICK_MODEL = {"patch_size": 7, "stem": "conv", "stem_channels": 8, "pooling": "cls"}


@dataclass(frozen=True)
class ClassifySize:
    """How big one classification run is at a given size.

    ``n_per_class`` / ``test_per_class``: stratified images per class (None = the whole split);
    ``epochs``, ``batch_size``, ``lr``; ``max_steps``: a fixed number of optimizer steps instead of
    ``epochs`` (quick runs use it, so a run gives the same numbers on any machine);
    ``eval_every``: evaluate (and checkpoint) every this many steps (None: after every epoch, which
    on a small training set is often); ``time_budget_s``: a wall-time cap (stops early on a slow
    machine, so results then depend on its speed);
    ``model``: ViTConfig field overrides (e.g. a tinier model for smoke); ``augment``: random
    shifts (up to ``shift`` pixels; 0 = mirrors only) and mirrors in training, ``label_smoothing``
    of the training loss (:class:`moe_lite.train.ClassificationTask`).
    """

    n_per_class: Optional[int]
    test_per_class: Optional[int]
    epochs: int
    batch_size: int = 128
    lr: float = 2e-3
    max_steps: Optional[int] = None
    eval_every: Optional[int] = None
    time_budget_s: Optional[float] = None
    model: Dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    shift: int = 2
    label_smoothing: float = 0.0


def seeded_build(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with the global RNG seeded by ``seed`` (and restored afterwards), so a model's
    initial weights depend on its seed alone, not on whatever ran before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def loaders(train: Dataset, test: Dataset, batch_size: int, seed: int):
    """Shuffled train loader and ordered test loader over in-memory tensors (num_workers=0)."""
    return (make_loader((train.x, train.y), batch_size=batch_size, shuffle=True, seed=seed),
            make_loader((test.x, test.y), batch_size=512, shuffle=False))


@dataclass
class RunRecord:
    """One trained classifier: the model, its history and headline numbers."""

    name: str
    model: nn.Module
    history: History
    metrics: Dict[str, Any]


def data_fingerprint(dataset: Any) -> str:
    """A short hash of a TensorDataset's contents (its size alone would not notice a different
    selection of images), for checkpoint cache keys."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        return f"n={len(dataset)}"
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_fit(experiment: str, name: str, model: nn.Module, task: Any, train_loader: Any, eval_loader: Any,
               config: TrainConfig, ctx: RunContext, key: Sequence[Any] = (),
               callbacks: Sequence[Callable] = ()) -> History:
    """:func:`moe_lite.train.fit` with a checkpoint cache for this exact run (same model config, train
    config, data, size, seed) in the run context's cache folder. Prints one line saying which case held:

    - a checkpoint of the *finished* run (it records that its planned schedule completed): the model
      and the callbacks' states are loaded from it and its history returned, without training;
    - a checkpoint of an interrupted run (a stopped kernel, a killed process, a divergence): training
      resumes from it, bit for bit as if it had never stopped (a diverged run diverges again);
    - an unreadable file, or one without a completion record (older moe_lite): trained from scratch;
    - no usable file, but moe_lite ships this finished run (``RunContext.shipped_path``: the same
      key): loaded from there, without training, once it is checked (:func:`shipped_problem`); a
      shipped file that fails a check is ignored, with a line saying why, and the run trains;
    - nothing: trained from scratch.

    Callbacks with ``state_dict()`` / ``load_state_dict()`` (e.g. :class:`StepStats`) travel in the
    checkpoint. Training writes its checkpoints there (every evaluation); ``ctx.reuse=False``
    retrains and overwrites; ``ctx.shipped=False`` never loads a shipped model.
    """
    train_config = {k: v for k, v in config.to_dict().items() if k not in NOT_KEYED}
    path = ctx.checkpoint_path(experiment, name, getattr(model, "config", None), train_config,
                               data_fingerprint(train_loader.dataset), *key)
    config.checkpoint = str(path) if path is not None else None
    if path is not None:
        ctx.checkpoints_used.append(path)
    resume = None
    if path is not None and ctx.reuse and path.is_file():
        remove_stale_temporaries(path)  # left by a save killed mid-write
        try:
            payload = read_checkpoint(path)
            if payload.get("completed") is True:
                return _load_finished(path, payload, name, model, callbacks, ctx)
            if payload.get("planned_steps") is None:
                print(f"[{name}] {path} has no completion record (an older moe_lite wrote it): retraining")
            else:
                print(f"[{name}] resuming the interrupted run in {path} from step {payload['step']} "
                      f"of {payload['planned_steps']}")
                resume = path
        except CheckpointError as err:  # nothing was loaded into the model or the callbacks
            print(f"[{name}] cannot use the cached checkpoint: {err}; retraining from scratch")
    shipped = ctx.shipped_path(path) if path is not None and ctx.reuse and resume is None else None
    if shipped is not None and shipped.is_file():
        try:
            payload = read_checkpoint(shipped)
            problem = shipped_problem(payload, shipped_key(path, ctx), train_config)
            if problem:
                raise CheckpointError(problem, shipped)
            return _load_finished(shipped, payload, name, model, callbacks, ctx, shipped=True)
        except CheckpointError as err:  # nothing was loaded into the model or the callbacks
            print(f"[{name}] ignoring the shipped checkpoint {_shown(shipped)}: {err}; training instead")
    return fit(model, task, train_loader, eval_loader, config, callbacks=list(callbacks), resume=resume)


#: TrainConfig fields that do not define a run (where its checkpoint goes, whether a bar is drawn)
NOT_KEYED = ("checkpoint", "progress")


def shipped_key(path: Path, ctx: RunContext) -> str:
    """The cache key of checkpoint ``path`` as a shipped file stores it: ``"<size>/<experiment>/<file>"``
    (the file name carries the hash of everything that defines the run)."""
    return f"{ctx.size}/{Path(path).relative_to(ctx.cache_dir).as_posix()}"


def shipped_problem(payload: Dict[str, Any], key: str, train_config: Dict[str, Any]) -> str:
    """Why a shipped checkpoint ``payload`` must not stand for the run keyed ``key`` with ``train_config``
    ("" when it may): it must be a finished run that :mod:`moe_lite.experiments.ship` wrote for this key
    and this training configuration."""
    info = payload.get("extra", {}).get("shipped")
    if not isinstance(info, dict):
        return "it has no shipped record (not written by python -m moe_lite.experiments.ship)"
    if info.get("key") != key:
        return f"it was shipped for {info.get('key')!r}, not for {key!r}"
    if payload.get("completed") is not True:
        return "it is not a finished run"
    saved = {k: v for k, v in (payload.get("config") or {}).items() if k not in NOT_KEYED}
    differs = sorted(k for k in set(saved) | set(train_config) if saved.get(k) != train_config.get(k))
    if differs:
        return "its training configuration differs in " + ", ".join(
            f"{k} ({saved.get(k)!r} there, {train_config.get(k)!r} here)" for k in differs[:3])
    return ""


def _shown(path: Path) -> str:
    """``path`` inside the installed package as ``moe_lite/...`` (no machine's folders in outputs)."""
    try:
        return f"moe_lite/{Path(path).relative_to(core.SHIPPED_DIR.parent).as_posix()}"
    except ValueError:
        return str(path)


def _load_finished(path: Path, payload: Dict[str, Any], name: str, model: nn.Module,
                   callbacks: Sequence[Callable], ctx: RunContext, shipped: bool = False) -> History:
    """Load the finished cached run ``payload`` (read from ``path``; ``shipped``: a model that ships
    with moe_lite) into ``model`` and the stateful ``callbacks``; a :class:`CheckpointError`, with
    nothing loaded, when it does not fit them."""
    stateful = [cb for cb in callbacks if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")]
    states = payload["extra"].get("callbacks") or []
    if len(states) != len(stateful):
        raise CheckpointError(f"{path} holds the states of {len(states)} callbacks, not of the {len(stateful)} "
                              f"given", path)
    load_checkpoint(path, model)  # refuses one that does not fit, leaving the model as it was
    ctx.checkpoints_loaded.append(path)
    for callback, state in zip(stateful, states):
        callback.load_state_dict(state)
    model.to(ctx.device).eval()
    if shipped:
        print(f"[{name}] loaded the shipped {ctx.size}-size model ({payload['step']} steps) from {_shown(path)} "
              f"(to train it yourself: pass shipped=False to the run_* function)")
    else:
        print(f"[{name}] loaded the finished run ({payload['step']} steps) from {path} "
              f"(delete it, or pass reuse=False, to retrain)")
    return History.from_dict(payload["history"])


def train_classifier(name: str, model: nn.Module, ctx: RunContext, size: ClassifySize, seed: int,
                     train: Dataset, test: Dataset, callbacks: Sequence[Callable] = (),
                     lr: Optional[float] = None, experiment: str = "classify",
                     key: Sequence[Any] = ()) -> RunRecord:
    """Train ``model`` with the kit's trainer (or load its cached checkpoint) and return its final
    test metrics.

    Metrics: ``accuracy``, ``loss``, ``train_time_s``, ``steps``, ``stop_reason`` and, for MoE models,
    ``routing`` (layer -> statistics on the first test batch).
    """
    train_loader, test_loader = loaders(train, test, size.batch_size, seed)
    config = TrainConfig(epochs=size.epochs, max_steps=size.max_steps, lr=lr or size.lr, seed=seed,
                         device=str(ctx.device), progress=ctx.progress, time_budget_s=size.time_budget_s,
                         eval_every=size.eval_every)
    if ctx.progress:
        print(f"[{name}] seed {seed}: {sum(p.numel() for p in model.parameters()):,} parameters")
    task = ClassificationTask(augment=size.augment, shift=size.shift, label_smoothing=size.label_smoothing)
    history = cached_fit(experiment, name, model, task, train_loader, test_loader, config, ctx,
                         key=(seed, task, *key), callbacks=callbacks)
    # measured now, by this code, not read from the history (a cached run's history holds what the code
    # that trained it measured); the same evaluation the trainer's last one ran
    final = evaluate(model, task, test_loader, device=ctx.device, seed=seed)
    metrics = {
        "accuracy": final.get("accuracy"),
        "loss": final.get("loss"),
        "train_time_s": history.wall_time_s,
        "steps": history.steps[-1]["step"] if history.steps else 0,
        "stop_reason": history.stop_reason,
    }
    if "routing" in final:
        metrics["routing"] = final["routing"]
    return RunRecord(name, model, history, metrics)


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 500,
            on_batch: Optional[Callable[[nn.Module, int], None]] = None) -> Tuple[Tensor, Tensor]:
    """Eval-mode logits ``[N, C]`` and per-sample cross-entropy ``[N]`` over ``data``.

    ``on_batch(model, start)`` runs after each forward (e.g. to read every MoE layer's routing).
    """
    model.eval()
    logits = []
    for start in range(0, len(data), batch_size):
        out = model(data.x[start:start + batch_size].to(device)).float().cpu()
        logits.append(out)
        if on_batch is not None:
            on_batch(model, start)
    logits_all = torch.cat(logits)
    losses = nn.functional.cross_entropy(logits_all, data.y, reduction="none")
    return logits_all, losses


@torch.no_grad()
def routing_by_class(model: nn.Module, data: Dataset, device: torch.device, num_classes: int = 10,
                     batch_size: int = 500) -> Dict[str, Dict[str, Tensor]]:
    """Per MoE layer, the routing of an eval pass over ``data`` broken down by class
    (:func:`moe_lite.inspect.record_routing` with the label ``"class"``).

    Returns layer name -> {"counts" [C, E], "fraction" [C, E], "tokens" [C], "experts_per_token" [C],
    "dropped_fraction" [C]} (the last two nan for a class absent from ``data``).
    """
    model.eval()
    with record_routing(model, labels={"class": num_classes}, per_sample=False) as rec:
        for start in range(0, len(data), batch_size):
            rec.set_labels({"class": data.y[start:start + batch_size]})
            model(data.x[start:start + batch_size].to(device))
    return rec.by_label("class")


def routing_table(stats: Dict[str, Dict[str, float]], keys: Sequence[str] = (
        "experts_per_token", "load_cv", "max_vio", "dead_experts", "dropped_fraction",
        "combination_usage", "router_entropy_norm")) -> List[Dict[str, Any]]:
    """Rows ``{"layer": name, key: value...}`` for a report table."""
    return [{"layer": name, **{k: round(float(v[k]), 4) for k in keys if k in v}} for name, v in stats.items()]


def layer_mean(stats: Dict[str, Dict[str, float]], keys: Sequence[str]) -> Dict[str, float]:
    """The mean over MoE layers of each statistic in ``keys`` (layer name -> statistics, as
    :func:`moe_lite.routing_stats` gives them); keys no layer reports are left out."""
    out = {}
    for key in keys:
        values = [v[key] for v in stats.values() if key in v]
        if values:
            out[key] = sum(values) / len(values)
    return out


class StepStats:
    """A training callback that records each MoE layer's routing statistics every ``every`` steps
    (from the training forward it just did: no extra compute).

    A record holds ``step``, ``"<layer>/<statistic>"`` for every entry of ``routing.summary()``, the
    mean over layers of the main ones, and, with ``expert_load`` (default), ``"<layer>/expert_load"``:
    the ``[E]`` list of each expert's share of the assignments (:func:`moe_lite.analysis.expert_load`),
    what :func:`moe_lite.viz.expert_load_heatmap` draws over training (one more host read per layer
    per record, beside the summary's).
    """

    def __init__(self, every: int = 10, expert_load: bool = True) -> None:
        self.every = every
        self.expert_load = bool(expert_load)
        self.records: List[Dict[str, Any]] = []

    def __call__(self, event: str, info: Dict[str, Any]) -> None:
        if event != "step":
            return
        step = int(info.get("step", len(info["history"].steps)))
        if step % self.every:
            return
        layers = routing_stats(info["model"])
        record: Dict[str, Any] = {"step": step}
        for layer_name, values in layers.items():
            for key, value in values.items():
                record[f"{layer_name}/{key}"] = value
        if self.expert_load:
            for layer_name, layer in moe_layers(info["model"]):
                if layer.routing is not None:
                    record[f"{layer_name}/{EXPERT_LOAD}"] = expert_load(layer.routing).tolist()
        # the mean over layers: the curve a reader looks at first
        record.update(layer_mean(layers, ("load_cv", "max_vio", "combination_usage", "experts_per_token",
                                          "dead_experts", "router_entropy_norm")))
        self.records.append(record)

    def state_dict(self) -> Dict[str, Any]:
        return {"every": self.every, "expert_load": self.expert_load, "records": self.records}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.every, self.records = state["every"], list(state["records"])
        self.expert_load = bool(state.get("expert_load", self.expert_load))
