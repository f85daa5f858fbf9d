"""One small trainer for every moe_lite model (ViMoE classifiers, DiT-MoE diffusion, adapters).

What :func:`fit` does, in order, at each optimizer step::

    task_loss, logs = task.loss(model, batch)         # the task protocol (below)
    aux = moe_lite.aux_loss(model)                     # ALWAYS added: weights live on the layers
    (task_loss + aux).backward(); clip; AdamW step; warm-up + cosine scheduler step
    moe_lite.update_biases(model)                      # BiasBalanced routers, after the step
    callbacks("step")                                  # they see this step's training forward

and at each evaluation (every epoch by default): ``task.evaluate`` on the eval loader, then
``moe_lite.routing_stats(model)`` per MoE layer from one extra forward on the *first* eval batch
(so the statistics always describe a full batch, not a ragged last one), then a checkpoint.

Per-step logs (``History.steps``) hold the task loss, the aux total and every aux part apart
(``aux/<layer>/<loss>``), the lr and the gradient norm. On a GPU they are copied to the host every
``sync_every`` steps in one transfer, not one sync per value per step.

Device and precision: :func:`pick_device` (cuda, then mps, then cpu); ``amp="auto"`` is bf16 autocast
on CUDA (fp16 with a grad scaler on GPUs without bf16), float32 on CPU and MPS.

Reproducibility: ``seed_everything(config.seed)`` at the start; evaluation runs inside a forked,
fixed-seed RNG so it never changes the training randomness; a checkpoint holds model (all buffers,
persistent or not: EMA thresholds, balancing biases), optimizer, scheduler, grad scaler, history,
config, every RNG state, including the train loader's sampling generators and their state at
the start of the current epoch, the states of callbacks that have ``state_dict`` /
``load_state_dict``, and ``planned_steps`` / ``completed`` (whether the run had finished its
schedule at that step, so a cache can tell a finished run from an interrupted one). Resuming on CPU
therefore reproduces uninterrupted training bit for bit, even from the middle of an epoch (the loader must give the same batches for the same
generator state, as :func:`moe_lite.data.make_loader` does).

Divergence: a non-finite loss (task, any aux part, or the total), without a grad scaler a
non-finite gradient norm, or a :class:`moe_lite.NonFiniteError` raised inside the forward (a router
given NaN/inf logits), in training or evaluation, stops training with :class:`TrainingDiverged`
(naming the step, and the first parameter or buffer holding NaN/inf when there is one). It is
detected before the optimizer step on CPU (a non-finite loss on a GPU up to ``sync_every`` steps
later), and the checkpoint written at the last good evaluation is never overwritten.

Files: checkpoints are written atomically with the permissions of any new file (umask); a save
killed mid-write leaves a temporary file that the next save of that checkpoint removes. A file
that is not a readable checkpoint of the model raises :class:`CheckpointError` naming it.

Task protocol (any object with these two methods)::

    task.loss(model, batch) -> (loss: scalar Tensor, logs: dict[str, float | scalar Tensor])
    task.evaluate(model, batches: Iterable) -> dict[str, float]     # "loss" if it has one
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pickle
import platform
import random
import secrets
import time
import warnings
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .layers import aux_loss, aux_losses, routing_stats, update_biases
from .routing import NonFiniteError

__all__ = [
    "Task",
    "ClassificationTask",
    "TrainConfig",
    "History",
    "TrainingDiverged",
    "fit",
    "evaluate",
    "pick_device",
    "seed_everything",
    "lr_factor",
    "build_optimizer",
    "build_scheduler",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "CheckpointError",
    "to_device",
    "atomic_save",
    "remove_stale_temporaries",
]

CHECKPOINT_FORMAT = "moe_lite.checkpoint"
CHECKPOINT_VERSION = 2  # 2: planned_steps and completed
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
GPU_SYNC_EVERY = 16  # default host-copy interval of per-step logs off the CPU

Callback = Callable[[str, Dict[str, Any]], Optional[bool]]
PathLike = Union[str, "os.PathLike[str]"]


# ================================================================================================
# Devices, seeds, moving batches
# ================================================================================================


def pick_device(pref: Union[str, torch.device, None] = "auto") -> torch.device:
    """The device to train on: ``"auto"`` picks cuda, then mps, then cpu.

    Any other value is passed to ``torch.device``; asking for an unavailable cuda or mps is an error
    (rather than a silent fall-back to a 100x slower CPU run).
    """
    if pref is None or pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={pref!r} but CUDA is not available here; use device='auto'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError(f"device={pref!r} but MPS is not available here; use device='auto'")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tensors, tuples, lists, namedtuples, dicts)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: None (float32) off CUDA or when ``amp="off"``."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"amp={amp!r} needs a CUDA device, got {device}; use amp='auto' or 'off'")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ================================================================================================
# Tasks
# ================================================================================================


class Task(Protocol):
    """What :func:`fit` needs from a task (classification here, diffusion in ``models/dit.py``)."""

    def loss(self, model: nn.Module, batch: Any) -> Tuple[Tensor, Dict[str, Union[float, Tensor]]]:
        """The task loss (scalar, with grad) and scalars to log for one training batch."""

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> Dict[str, float]:
        """Metrics over a whole evaluation pass (a ``"loss"`` where there is one). Called under no_grad,
        in eval mode; a non-finite loss-like metric counts as divergence."""


def _image_label(batch: Any) -> Tuple[Tensor, Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"ClassificationTask expects (images, labels) batches, got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""))


@dataclass
class ClassificationTask:
    """Cross-entropy classification: ``model(images) -> logits [B, C]``; batches are ``(x, y)``.

    Args:
        label_smoothing: for the training loss only (evaluation reports plain cross-entropy).
        per_class: also report ``accuracy/<c>`` for every class ``c`` in :meth:`evaluate`.
        augment: in the training loss only, translate images by up to ``shift`` pixels and mirror
            them at random (:func:`moe_lite.data.random_shift_flip`); small ViTs overfit a 10k-image
            set without it.
        shift: the largest translation in pixels when ``augment``.
    """

    label_smoothing: float = 0.0
    per_class: bool = False
    augment: bool = False
    shift: int = 2

    def loss(self, model: nn.Module, batch: Any) -> Tuple[Tensor, Dict[str, Tensor]]:
        x, y = _image_label(batch)
        if self.augment and model.training:
            from .data import random_shift_flip

            x = random_shift_flip(x, shift=self.shift)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(-1) == y).float().mean()
        return loss, {"acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> Dict[str, float]:
        """``loss`` (mean cross-entropy), ``accuracy`` and, if ``per_class``, ``accuracy/<c>``
        (NaN for a class with no example)."""
        loss_sum, correct, count = None, None, None
        for batch in batches:
            x, y = _image_label(batch)
            logits = model(x).float()
            num_classes = logits.shape[-1]
            hit = logits.argmax(-1) == y
            batch_loss = F.cross_entropy(logits, y, reduction="sum")
            batch_correct = torch.bincount(y[hit], minlength=num_classes)
            batch_count = torch.bincount(y, minlength=num_classes)
            if loss_sum is None:
                loss_sum, correct, count = batch_loss, batch_correct, batch_count
            else:
                loss_sum, correct, count = loss_sum + batch_loss, correct + batch_correct, count + batch_count
        if loss_sum is None:
            raise ValueError("ClassificationTask.evaluate got no batches")
        total = count.sum().clamp_min(1)
        per_class = torch.where(count > 0, correct.float() / count.clamp_min(1), float("nan"))
        values = torch.cat([(loss_sum / total).reshape(1), (correct.sum() / total).reshape(1).float(),
                            per_class]).tolist()  # one host copy
        metrics = {"loss": values[0], "accuracy": values[1]}
        if self.per_class:
            metrics.update({f"accuracy/{c}": v for c, v in enumerate(values[2:])})
        return metrics


# ================================================================================================
# Configuration, schedule, optimizer
# ================================================================================================


@dataclass
class TrainConfig:
    """Everything :func:`fit` needs; defaults suit the kit's small models.

    Attributes:
        epochs: passes over the train loader (ignored when ``max_steps`` is given).
        max_steps: total optimizer steps; overrides ``epochs`` (the loader is cycled as needed).
        lr, weight_decay: AdamW; weight decay applies to >= 2-D parameters only (not to biases,
            norms' scales or other 1-D parameters).
        warmup_fraction: linear warm-up length as a share of the total steps ...
        warmup_steps: ... or as a number of steps (overrides ``warmup_fraction``).
        min_lr_ratio: the cosine decays from ``lr`` to ``lr * min_lr_ratio`` at the last step.
        grad_clip: max global gradient norm (None: no clipping; the norm is logged either way).
        batch_size: for callers that build loaders from the config (``fit`` takes loaders as given).
        amp: ``"auto"`` (bf16 autocast on CUDA when supported, else fp16 with a grad scaler;
            float32 on CPU and MPS), ``"bf16"``, ``"fp16"`` (CUDA only) or ``"off"``.
        seed: passed to :func:`seed_everything` at the start of :func:`fit`; also seeds evaluation.
        device: ``"auto"`` (cuda, mps, cpu) or anything ``torch.device`` takes.
        eval_every: evaluate (and checkpoint) every this many steps; None: at the end of each
            epoch. Training always ends with an evaluation.
        checkpoint: file written at each evaluation (atomically); None: no checkpoints.
        progress: show a ``tqdm.auto`` bar per epoch.
        time_budget_s: a wall-time budget, e.g. for CPU "quick" runs on machines of unknown speed.
            After a few steps the step time is measured and, if the planned steps would not fit,
            the plan shrinks so that warm-up + cosine *completes* within about 90% of the budget
            (a run cut off mid-schedule would stop at a high learning rate). Training also stops
            cleanly (final evaluation and checkpoint) if the budget runs out anyway. None: no budget.
        log_routing: add ``routing_stats(model)`` to each evaluation record.
        sync_every: copy per-step logs to the host (and check for divergence) every this many
            steps; None: every step on CPU, every 16 steps on GPU.
    """

    epochs: int = 1
    max_steps: Optional[int] = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0
    batch_size: int = 128
    amp: str = "auto"
    seed: int = 0
    device: str = "auto"
    eval_every: Optional[int] = None
    checkpoint: Optional[str] = None
    progress: bool = True
    time_budget_s: Optional[float] = None
    log_routing: bool = True
    sync_every: Optional[int] = None

    def __post_init__(self) -> None:
        # every field is checked (and numbers made plain ints / floats, which safe checkpoint loading
        # accepts); a bad value names its field
        self.epochs = _config_int("epochs", self.epochs, 0 if self.max_steps is not None else 1)
        self.max_steps = _config_int("max_steps", self.max_steps, 1, optional=True)
        self.lr = _config_float("lr", self.lr, "> 0", lambda v: v > 0)
        self.weight_decay = _config_float("weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)
        self.warmup_fraction = _config_float("warmup_fraction", self.warmup_fraction, "in [0, 1)",
                                             lambda v: 0 <= v < 1)
        self.warmup_steps = _config_int("warmup_steps", self.warmup_steps, 0, optional=True)
        self.min_lr_ratio = _config_float("min_lr_ratio", self.min_lr_ratio, "in [0, 1]", lambda v: 0 <= v <= 1)
        self.grad_clip = _config_float("grad_clip", self.grad_clip, "> 0", lambda v: v > 0,
                                       optional=True)
        self.batch_size = _config_int("batch_size", self.batch_size, 1)
        if not isinstance(self.amp, str) or self.amp not in AMP_CHOICES:
            raise ValueError(f"TrainConfig: amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        self.seed = _config_int("seed", self.seed, None)
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"TrainConfig: device must be a string or torch.device, got {self.device!r}")
        self.eval_every = _config_int("eval_every", self.eval_every, 1, optional=True)
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, (str, os.PathLike)):
                raise ValueError(f"TrainConfig: checkpoint must be a path or None, got {self.checkpoint!r}")
            self.checkpoint = str(self.checkpoint)
        self.time_budget_s = _config_float("time_budget_s", self.time_budget_s, "> 0",
                                           lambda v: v > 0, optional=True)
        self.sync_every = _config_int("sync_every", self.sync_every, 1, optional=True)
        for name in ("progress", "log_routing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig: {name} must be True or False, got {getattr(self, name)!r}")

    def total_steps(self, steps_per_epoch: int) -> int:
        """``max_steps`` if given, else ``epochs * steps_per_epoch``."""
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def num_warmup_steps(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round(self.warmup_fraction * total_steps))

    def to_dict(self) -> Dict[str, Any]:
        """Plain values only (a path set after construction becomes a string)."""
        return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in dataclasses.asdict(self).items()}


def _config_int(name: str, value: Any, minimum: Optional[int], optional: bool = False) -> Optional[int]:
    """``value`` as a plain int, or a ValueError naming the TrainConfig field (bools are not ints)."""
    if value is None and optional:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        if minimum is None or value >= minimum:
            return int(value)
    bound = f" >= {minimum}" if minimum is not None else ""
    raise ValueError(f"TrainConfig: {name} must be an int{bound}{' or None' if optional else ''}, got {value!r}")


def _config_float(name: str, value: Any, rule: str, ok: Callable[[float], bool],
                  optional: bool = False) -> Optional[float]:
    """``value`` as a plain float, or a ValueError naming the TrainConfig field (NaN and inf refused)."""
    if value is None and optional:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) \
            and math.isfinite(value) and ok(float(value)):
        return float(value)
    raise ValueError(f"TrainConfig: {name} must be a finite number {rule}{' or None' if optional else ''}, "
                     f"got {value!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the base lr at 0-based optimizer step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` (reaching 1 at the last warm-up step), then a
    half cosine from 1 down to ``min_lr_ratio`` at step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D trainable parameters only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr)


class CosineSchedule:
    """The lr multiplier of :func:`lr_factor` as a callable object, so the planned ``total_steps``
    can shrink during training (a time budget) and is saved with the scheduler's state."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine (:func:`lr_factor`) over ``total_steps``, stepped once per optimizer step;
    its :class:`CosineSchedule` is ``scheduler.lr_lambdas[0]``."""
    schedule = CosineSchedule(total_steps, config.num_warmup_steps(total_steps), config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ================================================================================================
# History
# ================================================================================================


@dataclass
class History:
    """What a run logged.

    Attributes:
        steps: one dict per optimizer step: ``step`` (1-based), ``epoch`` (0-based), ``lr``,
            ``loss`` (task + aux), ``task_loss``, ``aux_loss``, ``aux/<layer>/<loss>`` (unweighted),
            ``grad_norm`` and the task's own logs (e.g. ``acc``).
        evals: one dict per evaluation: ``step``, ``epoch``, ``wall_time_s``, the task's metrics,
            and ``routing`` (layer -> statistics) when the model has MoE layers.
        wall_time_s: training time, summed over resumed runs.
        stop_reason: ``"completed"``, ``"time_budget"`` or ``"callback"`` (empty while running, and in
            the checkpoints written before the last).
        device: where it ran.
        planned_steps: the step count a time budget shrank the plan to (None: not shrunk).
    """

    steps: List[Dict[str, Any]] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    stop_reason: str = ""
    device: str = ""
    planned_steps: Optional[int] = None  # set when a time budget shrank the plan

    def final(self) -> Dict[str, Any]:
        """The last evaluation record ({} if none)."""
        return dict(self.evals[-1]) if self.evals else {}

    def best(self, metric: str = "loss", mode: str = "min") -> Dict[str, Any]:
        """The evaluation record with the lowest (``mode="min"``) or highest (``"max"``) ``metric``."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        scored = [e for e in self.evals if isinstance(e.get(metric), (int, float)) and math.isfinite(e[metric])]
        if not scored:
            raise KeyError(f"no evaluation has a finite {metric!r}; keys: {sorted(self.final())}")
        pick = min if mode == "min" else max
        return dict(pick(scored, key=lambda e: e[metric]))

    def series(self, key: str, source: str = "steps") -> Tuple[List[int], List[float]]:
        """``(steps, values)`` of ``key`` in ``self.steps`` or ``self.evals``, for plotting."""
        records = {"steps": self.steps, "evals": self.evals}[source]
        pairs = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: Optional[PathLike] = None) -> str:
        """The history as JSON text (non-finite floats as ``NaN`` / ``Infinity``); written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "History":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]) -> "History":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint here: empty, truncated, not a moe_lite checkpoint,
    or of another architecture. ``path`` is the file; the message says what is wrong."""

    def __init__(self, message: str, path: PathLike):
        super().__init__(message)
        self.path = Path(path)


class TrainingDiverged(RuntimeError):
    """A loss (or gradient norm) became NaN or inf. Attributes: ``step``, ``part`` (which value),
    ``value``, ``checkpoint`` (path of the last good checkpoint or None), ``checkpoint_step``,
    ``history`` (everything logged up to the divergence)."""

    def __init__(self, message: str, *, step: int, part: str, value: float,
                 checkpoint: Optional[Path], checkpoint_step: Optional[int], history: History):
        super().__init__(message)
        self.step, self.part, self.value = step, part, value
        self.checkpoint, self.checkpoint_step, self.history = checkpoint, checkpoint_step, history


# ================================================================================================
# RNG state
# ================================================================================================


def _rng_state() -> Dict[str, Any]:
    """Every global RNG state, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for index, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, index)


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (``random.setstate`` insists on tuples)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _loader_generators(loader: Any) -> List[torch.Generator]:
    """The distinct ``torch.Generator`` objects that decide a DataLoader's batch order."""
    owners = (loader, getattr(loader, "sampler", None),
              getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    found: List[torch.Generator] = []
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _sampling_state(loader: Any) -> Dict[str, Any]:
    """What decides the next epoch's batch order: the global torch RNG and the loader's generators."""
    return {"torch": torch.get_rng_state(), "loader": [g.get_state() for g in _loader_generators(loader)]}


def _set_loader_state(loader: Any, states: Sequence[Tensor]) -> None:
    generators = _loader_generators(loader)
    if len(generators) != len(states):
        warnings.warn(f"the train loader has {len(generators)} random generators but the checkpoint "
                      f"saved {len(states)}: the resumed batch order will differ", stacklevel=3)
        return
    for generator, state in zip(generators, states):
        generator.set_state(state)


# ================================================================================================
# Checkpoints
# ================================================================================================


def _non_persistent_buffers(model: nn.Module) -> Dict[str, Tensor]:
    """Buffers that ``state_dict`` leaves out (registered with ``persistent=False``)."""
    saved = set(model.state_dict().keys())
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if name not in saved}


STALE_TMP_AGE_S = 3600.0  # a temporary file untouched this long belongs to no running save


def _host_tag() -> str:
    """This machine's name, reduced to characters safe in a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in platform.node()) or "host"


def remove_stale_temporaries(path: PathLike) -> None:
    """Delete the temporary files that killed :func:`atomic_save` calls for ``path`` left behind.

    A temporary is ``.<name>.<host>-<pid>.<random>.tmp``. It is stale when its writer was on this
    machine and that process is gone, or (another machine's, or an unknown writer's) when it has not
    been touched for an hour. Saves in flight in live processes are left alone.
    """
    path, host, now = Path(path), _host_tag(), time.time()
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        writer = tmp.name[len(path.name) + 2:-len(".tmp")].split(".")[0]  # "<host>-<pid>"
        tag, _, pid = writer.rpartition("-")
        try:
            if tag == host and pid.isdigit():
                if int(pid) == os.getpid() or _process_alive(int(pid)):
                    continue
            elif now - tmp.stat().st_mtime < STALE_TMP_AGE_S:
                continue
            tmp.unlink()
        except FileNotFoundError:  # another process cleaned it up, or its save finished
            pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # it exists (another user's) or we cannot tell: keep its file
    return True


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it into place.

    The file gets the permissions a plain ``open(path, "w")`` would (``0o666`` less the umask, and
    the folder's default ACL), so a cache folder can be shared; ``tempfile.mkstemp`` would make it
    ``0o600``. Temporary files of earlier saves of ``path`` that were killed mid-write are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{_host_tag()}-{os.getpid()}."
    while True:
        tmp = path.parent / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            # O_EXCL: never follows or reuses an existing file; mode 0o666 lets the kernel apply the umask
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None, step: int = 0,
                    history: Optional[Union[History, Mapping[str, Any]]] = None,
                    config: Optional[Union[TrainConfig, Mapping[str, Any]]] = None, *,
                    scaler: Optional[Any] = None, extra: Optional[Mapping[str, Any]] = None,
                    planned_steps: Optional[int] = None) -> Path:
    """Write everything needed to resume training, atomically (tmp file + ``os.replace``).

    Holds the model's ``state_dict`` plus its non-persistent buffers (router state such as EMA
    thresholds and balancing biases survives either way), optimizer, scheduler and grad-scaler
    states, ``step``, history, config, every global RNG state, and ``extra`` (free-form). A reader
    never sees a half-written file: a crash leaves the previous checkpoint in place.

    ``planned_steps``: the run's planned step count; the checkpoint records ``completed`` (True
    when ``step >= planned_steps``), so a reader can tell a finished run from an interrupted one.
    None (not part of a planned run): never ``completed``.

    Returns the path written.
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "planned_steps": int(planned_steps) if planned_steps is not None else None,
        "completed": planned_steps is not None and step >= planned_steps,
        "model": model.state_dict(),
        "buffers": _non_persistent_buffers(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history.to_dict() if isinstance(history, History) else history,
        "config": config.to_dict() if isinstance(config, TrainConfig) else config,
        "rng": _rng_state(),
        "extra": dict(extra or {}),
    }
    atomic_save(payload, path)
    return path


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """The payload of a :func:`save_checkpoint` file, checked, without loading it into anything.

    Safe deserialisation (``torch.load(weights_only=True)``) on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated, not a torch file, holds objects that safe
            loading refuses, or is not a moe_lite checkpoint (of a version this moe_lite reads).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise  # the OS error names the file and the problem already
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds objects that safe loading (torch.load weights_only=True) "
                              f"refuses; it was not written by moe_lite.train.save_checkpoint "
                              f"({_first_line(err)})", path) from err
    except (OSError, EOFError, RuntimeError, KeyError, ValueError) as err:
        # torch's errors for a cut-short or foreign file: "[Errno 22]", "EOFError", "KeyError: 101"...
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint file ({path.stat().st_size} "
                              f"bytes; {type(err).__name__}: {_first_line(err)})", path) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a moe_lite checkpoint (written by "
                              f"moe_lite.train.save_checkpoint)", path)
    version = payload.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this moe_lite reads up to "
                              f"{CHECKPOINT_VERSION}: upgrade moe_lite", path)
    if "step" not in payload or not isinstance(payload.get("model"), Mapping):
        raise CheckpointError(f"{path} is a damaged moe_lite checkpoint (no step or model state)", path)
    return payload


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None, *, scaler: Optional[Any] = None,
                    restore_rng: bool = False, strict: bool = True) -> Dict[str, Any]:
    """Load a :func:`save_checkpoint` file into ``model`` (and optimizer / scheduler / scaler if given).

    Parameters and buffers come back bit for bit, on the model's current device. Global RNG states
    are restored only with ``restore_rng=True`` (what resuming training needs; merely loading
    weights into a notebook should not reseed it). A checkpoint that does not fit the model
    (missing or unexpected entries with ``strict``, or a shape that differs) is refused before
    anything is loaded, so the model is left as it was.

    Returns the whole payload: ``step``, ``planned_steps``, ``completed``, ``history`` (dict),
    ``config`` (dict), ``rng``, ``extra``...

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: (a ``ValueError``) the file is not a readable moe_lite checkpoint
            (:func:`read_checkpoint`), or does not fit ``model`` / the optimizer; the message names
            the path and what is wrong.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    buffers = payload.get("buffers") or {}
    problem = _mismatch(model, payload["model"], buffers, strict)
    if problem:
        raise CheckpointError(f"{path} does not fit this model ({type(model).__name__}): {problem}", path)
    try:
        model.load_state_dict(payload["model"], strict=strict)
        _load_buffers(model, buffers, strict)
        for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if target is not None:
                if payload.get(name) is None:
                    raise CheckpointError(f"{path} holds no {name} state", path)
                target.load_state_dict(payload[name])
    except (RuntimeError, ValueError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} does not fit this model or its training state "
                              f"({type(model).__name__}): {type(err).__name__}: {_first_line(err)}", path) from err
    if restore_rng:
        _set_rng_state(payload["rng"])
    return payload


def _mismatch(model: nn.Module, state: Mapping[str, Any], buffers: Mapping[str, Any], strict: bool) -> str:
    """What keeps ``state`` (a state_dict) and ``buffers`` from loading into ``model``; "" if nothing."""
    own = {**model.state_dict(), **dict(model.named_buffers())}
    saved = {**state, **buffers}
    problems = []
    if strict:
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        if missing:
            problems.append(f"missing {_some(missing)}")
        if unexpected:
            problems.append(f"unexpected {_some(unexpected)}")
    shapes = [f"{k} {list(v.shape)} in the file, {list(own[k].shape)} in the model" for k, v in saved.items()
              if k in own and isinstance(v, Tensor) and v.shape != own[k].shape]
    if shapes:
        problems.append("shape of " + _some(shapes))
    return "; ".join(problems)


def _some(items: Sequence[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _load_buffers(model: nn.Module, buffers: Mapping[str, Tensor], strict: bool) -> None:
    own = dict(model.named_buffers())
    for name, value in buffers.items():
        if name not in own:
            if strict:
                raise KeyError(f"checkpoint buffer {name!r} not found in the model")
            continue
        with torch.no_grad():
            own[name].copy_(value)


# ================================================================================================
# Evaluation
# ================================================================================================


def _forked_rng(device: torch.device):
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _seed_forked(seed: int, device: torch.device) -> None:
    """Seed only the generators that :func:`_forked_rng` restores afterwards."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def evaluate(model: nn.Module, task: Task, loader: Iterable[Any], *, device: Optional[torch.device] = None,
             amp: str = "off", log_routing: bool = True, seed: int = 0) -> Dict[str, Any]:
    """``task.evaluate`` over ``loader`` in eval mode, under ``no_grad``, plus routing statistics.

    Runs inside a forked RNG seeded with ``seed``: evaluation is repeatable (e.g. a diffusion task's
    random timesteps are the same each time) and leaves the training randomness untouched.
    With ``log_routing``, adds ``routing``: ``routing_stats(model)`` (layer -> statistics) after
    one forward (``task.loss``) on the first batch of ``loader``; omitted when there are no MoE layers.
    The model's train/eval mode is restored afterwards.
    """
    device = device or next(model.parameters()).device
    dtype = _amp_dtype(amp, device)
    was_training = model.training
    model.eval()
    try:
        with _forked_rng(device), torch.no_grad(), _autocast(device, dtype):
            _seed_forked(seed, device)
            metrics: Dict[str, Any] = dict(task.evaluate(model, (to_device(b, device) for b in loader)))
            if log_routing:
                routing = _first_batch_routing(model, task, loader, device)
                if routing:
                    metrics["routing"] = routing
    finally:
        model.train(was_training)
    return metrics


def _first_batch_routing(model: nn.Module, task: Task, loader: Iterable[Any],
                         device: torch.device) -> Dict[str, Dict[str, float]]:
    first = next(iter(loader), None)
    if first is None:
        return {}
    task.loss(model, to_device(first, device))
    return routing_stats(model)


# ================================================================================================
# The training loop
# ================================================================================================


class _StepLog:
    """Per-step scalars kept on the device until :meth:`flush` copies them to the host at once."""

    def __init__(self) -> None:
        self._pending: List[Tuple[Dict[str, Any], List[str], Tensor]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, host: Dict[str, Any], values: Mapping[str, Union[float, Tensor]]) -> None:
        names, device = list(values), _common_device(values)
        stacked = torch.stack([torch.as_tensor(values[k]).detach().float().reshape(()).to(device) for k in names])
        self._pending.append((host, names, stacked))

    def flush(self) -> List[Dict[str, Any]]:
        if not self._pending:
            return []
        flat = torch.cat([p[2] for p in self._pending]).tolist()  # the one device -> host copy
        records, offset = [], 0
        for host, names, _ in self._pending:
            records.append({**host, **dict(zip(names, flat[offset: offset + len(names)]))})
            offset += len(names)
        self._pending.clear()
        return records


def _common_device(values: Mapping[str, Union[float, Tensor]]) -> torch.device:
    for value in values.values():
        if isinstance(value, Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")


def _non_finite_part(record: Mapping[str, Any], check_grad: bool) -> Optional[str]:
    """The first non-finite value among the loss parts (most specific first), else None."""
    parts = ["task_loss"] + sorted(k for k in record if k.startswith("aux/")) + ["aux_loss", "loss"]
    if check_grad:
        parts.append("grad_norm")
    for part in parts:
        value = record.get(part)
        if isinstance(value, float) and not math.isfinite(value):
            return part
    return None


def _non_finite_tensor(model: nn.Module) -> Optional[Tuple[str, float]]:
    """``("parameter <name>", nan or inf)`` for the first parameter (then buffer) holding NaN or inf."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{kind} {name}", float("nan") if bool(torch.isnan(tensor).any()) else float("inf")
    return None


def _non_finite_metric(metrics: Mapping[str, Any]) -> Optional[str]:
    """The first non-finite loss-like metric (keys containing "loss"; every float metric if none)."""
    floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
    checked = [k for k in floats if "loss" in k] or list(floats)
    return next((k for k in checked if not math.isfinite(floats[k])), None)


class _Loop:
    """The state of one :func:`fit` call, split into small steps."""

    def __init__(self, model: nn.Module, task: Task, train_loader: Iterable[Any],
                 eval_loader: Optional[Iterable[Any]], config: TrainConfig,
                 callbacks: Sequence[Callback]) -> None:
        try:
            self.steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError("fit needs a train loader with a length (a DataLoader over a map-style "
                            "dataset)") from err
        if self.steps_per_epoch < 1:
            raise ValueError("the train loader is empty")
        self.model, self.task, self.config = model, task, config
        self.train_loader, self.eval_loader, self.callbacks = train_loader, eval_loader, list(callbacks)
        self.device = pick_device(config.device)
        self.amp_dtype = _amp_dtype(config.amp, self.device)
        self.sync_every = config.sync_every or (1 if self.device.type == "cpu" else GPU_SYNC_EVERY)
        self.total_steps = config.total_steps(self.steps_per_epoch)
        seed_everything(config.seed)
        self.model.to(self.device)
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.history = History(device=str(self.device))
        self.log = _StepLog()
        self.step, self.last_eval_step, self.stop_reason = 0, -1, ""
        self.saved: Optional[Tuple[int, int]] = None  # (step, file size) of the last checkpoint
        self.saved_completed = False  # whether that checkpoint records a finished run
        # callbacks whose state travels with the checkpoints (e.g. a statistics recorder)
        self.stateful = [cb for cb in self.callbacks if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")]
        self.epoch_start: Optional[Dict[str, Any]] = None
        self.resume_payload: Optional[Dict[str, Any]] = None
        self.bar: Optional[Any] = None
        self.postfix: Dict[str, str] = {}
        self.t0, self.wall_before = time.perf_counter(), 0.0  # this run's start, earlier runs' time

    # ---- resuming ----------------------------------------------------------------------------
    def resume(self, path: Path) -> None:
        payload = load_checkpoint(path, self.model, self.optimizer, self.scheduler, scaler=self.scaler,
                                  restore_rng=True)
        self.step = self.last_eval_step = int(payload["step"])
        self.history = History.from_dict(payload.get("history") or {})
        self.history.device, self.history.stop_reason = str(self.device), ""
        if self.history.planned_steps is not None:  # a time budget had shrunk the plan: keep it
            self.total_steps = self.history.planned_steps
        _set_loader_state(self.train_loader, payload["extra"].get("loader_rng", []))
        _warn_config_changes(payload.get("config") or {}, self.config)
        self._restore_callbacks(payload["extra"].get("callbacks"), path)
        self.resume_payload = payload
        if self.config.checkpoint and Path(self.config.checkpoint).resolve() == path.resolve():
            self.saved = (self.step, path.stat().st_size)
            self.saved_completed = bool(payload.get("completed"))

    def _restore_callbacks(self, states: Optional[Sequence[Any]], path: Path) -> None:
        if states is None:
            if self.stateful:
                warnings.warn(f"{path} holds no callback states: the stateful callbacks restart empty", stacklevel=4)
            return
        if len(states) != len(self.stateful):
            warnings.warn(f"{path} holds the states of {len(states)} callbacks but {len(self.stateful)} "
                          f"stateful callbacks were given: they restart empty", stacklevel=4)
            return
        for callback, state in zip(self.stateful, states):
            callback.load_state_dict(state)

    def _epoch_batches(self, skip: int) -> Iterator[Any]:
        """An iterator over this epoch's batches, positioned after ``skip`` already-trained ones."""
        if skip == 0:
            self.epoch_start = _sampling_state(self.train_loader)
            return iter(self.train_loader)
        payload = self.resume_payload
        if payload is None or "epoch_start_rng" not in payload["extra"]:
            raise RuntimeError("cannot resume mid-epoch without the epoch's sampling state")
        self.epoch_start = payload["extra"]["epoch_start_rng"]
        torch.set_rng_state(self.epoch_start["torch"])  # replay this epoch's batch order ...
        _set_loader_state(self.train_loader, self.epoch_start["loader"])
        batches = iter(self.train_loader)
        for _ in range(skip):
            next(batches)
        _set_rng_state(payload["rng"])  # ... then continue from the saved randomness
        _set_loader_state(self.train_loader, payload["extra"]["loader_rng"])
        return batches

    # ---- running -----------------------------------------------------------------------------
    def run(self) -> History:
        self.model.train()
        self.t0, self.wall_before = time.perf_counter(), self.history.wall_time_s
        self.run_start_step = self.step
        # measure the step time early (but past the first, slower steps) to fit a time budget
        self.budget_probe_step = self.step + min(max(10, self.total_steps // 20), 50)
        try:
            while self.step < self.total_steps and not self.stop_reason:
                self._run_epoch()
            if self.last_eval_step != self.step:
                self._evaluate_and_save()
            if self.config.checkpoint and self.step >= self.total_steps and not self.saved_completed:
                # resumed from a finished run's checkpoint that did not record it (an older moe_lite)
                self._save(Path(self.config.checkpoint))
            self.history.stop_reason = self.stop_reason or "completed"
        finally:
            self.history.wall_time_s = self._wall_time()
        self._call("end", {"history": self.history})
        return self.history

    def _run_epoch(self) -> None:
        epoch = self.step // self.steps_per_epoch
        skip = self.step - epoch * self.steps_per_epoch
        batches = self._epoch_batches(skip)
        num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        end = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        self.bar = tqdm(total=end, initial=skip, desc=f"epoch {epoch + 1}/{num_epochs}",
                        disable=not self.config.progress, dynamic_ncols=True)
        try:
            # zip asks the range first, so the loader is never asked for a batch past the epoch's last
            # step (that request would make a shuffling sampler draw again, after any checkpoint)
            for _, batch in zip(range(skip, end), batches):
                self._train_step(batch, epoch)
                self.bar.update(1)
                self._after_step(epoch)
                if self.stop_reason or self.step >= self.total_steps:
                    break
        finally:
            self.bar.close()
            self.bar = None

    def _train_step(self, batch: Any, epoch: int) -> None:
        batch = to_device(batch, self.device)
        try:
            with _autocast(self.device, self.amp_dtype):
                task_loss, logs = self.task.loss(self.model, batch)
        except NonFiniteError as err:  # e.g. a router given NaN/inf logits: divergence, not a bug
            raise self._forward_diverged(self.step + 1, err) from err
        aux = aux_loss(self.model)
        parts = aux_losses(self.model)
        loss = task_loss.float() + aux.float()
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        values = {"loss": loss, "task_loss": task_loss, "aux_loss": aux,
                  **{f"aux/{k}": v for k, v in parts.items()}, "grad_norm": grad_norm, **logs}
        host = {"step": self.step + 1, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0]}
        self.log.add(host, values)
        if len(self.log) >= self.sync_every:
            self._flush()  # on CPU: before the optimizer step, so a diverged step is never applied
        self._optimizer_step()
        update_biases(self.model)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1

    def _after_step(self, epoch: int) -> None:
        # "step" callbacks first: they see this step's training forward (not the evaluation's), and a
        # checkpoint written at this step holds their state after it (exact resume)
        if self._call("step", {"step": self.step, "epoch": epoch}):
            self.stop_reason = "callback"
        budget = self.config.time_budget_s
        if budget is not None and self.step == self.budget_probe_step:
            self._fit_plan_to_budget(budget)
        if budget is not None and time.perf_counter() - self.t0 >= budget and not self.stop_reason:
            self.stop_reason = "time_budget"
        every = self.config.eval_every or self.steps_per_epoch
        if self.step % every == 0:
            self._evaluate_and_save()

    def _fit_plan_to_budget(self, budget: float) -> None:
        """Shrink the planned steps (and the cosine with them) to what the budget affords."""
        steps_done = self.step - self.run_start_step
        seconds_per_step = (time.perf_counter() - self.t0) / max(steps_done, 1)
        affordable = self.run_start_step + int(0.9 * budget / max(seconds_per_step, 1e-9))  # this run's budget
        if affordable < self.total_steps:
            self.total_steps = max(self.step + 1, affordable)
            self.scheduler.lr_lambdas[0].total_steps = self.total_steps
            self.history.planned_steps = self.total_steps

    def _flush(self) -> None:
        records = self.log.flush()
        for record in records:
            part = _non_finite_part(record, check_grad=self.scaler is None)
            if part is not None:
                self.history.steps.extend(r for r in records if r["step"] < record["step"])
                raise self._diverged(record["step"], part, record[part], record)
        self.history.steps.extend(records)
        if records and self.bar is not None:
            last = records[-1]
            self._postfix(loss=last["task_loss"], acc=last.get("acc"))

    def _postfix(self, **values: Optional[float]) -> None:
        self.postfix.update({k: f"{v:.4g}" for k, v in values.items() if v is not None})
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def _wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    # ---- evaluation and checkpoints --------------------------------------------------------
    def _evaluate_and_save(self) -> None:
        self._flush()
        epoch = max(0, self.step - 1) // self.steps_per_epoch
        record: Dict[str, Any] = {"step": self.step, "epoch": epoch, "wall_time_s": self._wall_time()}
        if self.eval_loader is not None:
            try:
                metrics = evaluate(self.model, self.task, self.eval_loader, device=self.device,
                                   amp=self.config.amp, log_routing=self.config.log_routing, seed=self.config.seed)
            except NonFiniteError as err:
                raise self._forward_diverged(self.step, err, during_eval=True) from err
            bad = _non_finite_metric(metrics)
            if bad is not None:
                raise self._diverged(self.step, f"eval {bad}", metrics[bad], metrics, during_eval=True)
            record.update(metrics)
        self.history.evals.append(record)
        self.last_eval_step = self.step
        if self.config.checkpoint:
            self._save(Path(self.config.checkpoint))
        self._postfix(val_loss=record.get("loss"), val_acc=record.get("accuracy"))
        if self._call("eval", record):
            self.stop_reason = "callback"

    def _save(self, path: Path) -> None:
        self.history.wall_time_s = self._wall_time()
        extra = {"loader_rng": [g.get_state() for g in _loader_generators(self.train_loader)],
                 "epoch_start_rng": self.epoch_start, "callbacks": [cb.state_dict() for cb in self.stateful]}
        completed = self.step >= self.total_steps
        history = self.history.to_dict()
        if completed:  # the final checkpoint: its history says how the run ended
            history["stop_reason"] = self.stop_reason or "completed"
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.step, history,
                        self.config, scaler=self.scaler, extra=extra, planned_steps=self.total_steps)
        self.saved = (self.step, path.stat().st_size)
        self.saved_completed = completed

    def _forward_diverged(self, step: int, err: NonFiniteError, during_eval: bool = False) -> TrainingDiverged:
        """The divergence error for a forward that met NaN/inf (raised by a router or layer)."""
        self._flush()  # with deferred checks an earlier step's non-finite loss is the real start
        found = _non_finite_tensor(self.model)  # host syncs, on this error path only
        if found is not None:
            part, value = found
            detail = f"{part} holds {value}"
        else:
            part, value = "forward", float("nan")
            detail = "the parameters and buffers are finite (an activation overflowed, or the input is not finite)"
        what = f"a non-finite value inside the forward, {type(err).__name__}: {_first_line(err)}; {detail}"
        return self._diverged(step, part, value, {}, during_eval=during_eval, what=what)

    def _diverged(self, step: int, part: str, value: float, record: Mapping[str, Any],
                  during_eval: bool = False, what: Optional[str] = None) -> TrainingDiverged:
        losses = ", ".join(f"{k}={record[k]:.4g}" for k in ("task_loss", "aux_loss", "loss")
                           if isinstance(record.get(k), float) and k != part)
        what = what or f"{part} is {value} ({losses})"
        if during_eval:
            where = "in the evaluation after it, so it was not checkpointed"
        elif self.sync_every == 1:
            where = "before its optimizer step"
        else:
            where = f"(checked every {self.sync_every} steps, so later steps may have run)"
        message = (f"training diverged at step {step}: {what}; stopped {where}. "
                   f"{self._checkpoint_note()} Try a lower lr, a smaller grad_clip, or amp='off'.")
        if self.bar is not None:
            self.bar.close()
        return TrainingDiverged(message, step=step, part=part, value=value,
                                checkpoint=Path(self.config.checkpoint) if self.saved else None,
                                checkpoint_step=self.saved[0] if self.saved else None, history=self.history)

    def _checkpoint_note(self) -> str:
        if not self.config.checkpoint:
            return "No checkpoint was configured (TrainConfig.checkpoint)."
        path = Path(self.config.checkpoint)
        if self.saved is None:
            return f"No checkpoint had been written to {path} yet."
        step, size = self.saved
        if not path.is_file() or path.stat().st_size != size:
            return f"WARNING: the checkpoint of step {step} at {path} was changed or removed by something else."
        return f"The last good checkpoint (step {step}) is intact at {path}."

    def _call(self, event: str, info: Dict[str, Any]) -> bool:
        """Run every callback; True when one of them asks to stop."""
        stop = False
        for callback in self.callbacks:
            stop = bool(callback(event, {**info, "model": self.model, "history": self.history})) or stop
        return stop


RESUME_FREE_FIELDS = ("progress", "checkpoint", "time_budget_s", "device", "sync_every")  # may differ on resume


def _warn_config_changes(saved: Mapping[str, Any], config: TrainConfig) -> None:
    """Warn when a resumed run changes a setting that shapes training (schedule, optimiser, data)."""
    current = config.to_dict()
    changed = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current
               if k in saved and k not in RESUME_FREE_FIELDS and saved[k] != current[k]]
    if changed:
        warnings.warn("resuming with a different config, so training will not continue as it would "
                      "have: " + "; ".join(changed), stacklevel=4)


def _resume_path(resume: Union[bool, PathLike], config: TrainConfig) -> Path:
    if resume is True:
        if not config.checkpoint:
            raise ValueError("resume=True needs TrainConfig.checkpoint (or pass the checkpoint path)")
        return Path(config.checkpoint)
    return Path(resume)  # type: ignore[arg-type]


def fit(model: nn.Module, task: Task, train_loader: Iterable[Any], eval_loader: Optional[Iterable[Any]] = None,
        config: Optional[TrainConfig] = None, callbacks: Optional[Sequence[Callback]] = None, *,
        resume: Union[bool, PathLike, None] = None) -> History:
    """Train ``model`` on ``task`` (see the module docstring for what each step does).

    Args:
        model: any ``nn.Module``; moved to the config's device. MoE layers' aux losses are always
            added to the task loss (their weights are set on the layers).
        task: a :class:`Task` (e.g. :class:`ClassificationTask`, ``models.dit.DiffusionTask``).
        train_loader: a re-iterable loader with a length; its batches go through :func:`to_device`.
        eval_loader: evaluated every epoch (or every ``eval_every`` steps) and at the end; None: the
            evaluation records and checkpoints are still made, without metrics.
        config: a :class:`TrainConfig` (defaults if None).
        callbacks: callables ``cb(event, info)`` with ``event`` in ``"step"`` (after each optimizer
            step, before that step's evaluation), ``"eval"`` (info is the record) and ``"end"``;
            ``info`` also holds ``model`` and ``history``. Returning True stops training cleanly
            (final evaluation and checkpoint). Callbacks with ``state_dict()`` / ``load_state_dict()``
            are saved in every checkpoint and restored on resume.
        resume: a checkpoint path (or True: ``config.checkpoint``) to continue from, with its
            optimizer, scheduler, RNG and data position; the config should match the first run's.

    Returns:
        The :class:`History`.

    Raises:
        TrainingDiverged: a loss became NaN/inf, or the forward met NaN/inf; the last good checkpoint
            is left intact.
        CheckpointError: ``resume`` is not a readable checkpoint of this model.
    """
    config = config if config is not None else TrainConfig()
    loop = _Loop(model, task, train_loader, eval_loader, config, callbacks or ())
    if resume is not None and resume is not False:
        loop.resume(_resume_path(resume, config))
    return loop.run()
