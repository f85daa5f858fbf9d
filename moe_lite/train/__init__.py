"""One small trainer for every moe_lite model (ViMoE classifiers, DiT-MoE diffusion, adapters).

The package, one job per file::

    config.py      TrainConfig (checked fields), AdamW, warm-up + cosine schedule
    tasks.py       the Task protocol, ClassificationTask, DiffusionTask
    loop.py        fit: the training loop, resuming, time budget
    evaluation.py  evaluate: task metrics + routing statistics in a forked RNG
    checkpoint.py  atomic checkpoint files: save, read (checked), load
    history.py     History: what a run logged
    divergence.py  TrainingDiverged and the NaN/inf checks behind it
    device.py      pick_device, to_device, autocast precision
    rng.py         seed_everything; the RNG and loader states a checkpoint carries
    step_log.py    per-step scalars copied to the host in one transfer

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
therefore reproduces uninterrupted training bit for bit, even from the middle of an epoch (the
loader must give the same batches for the same generator state, as :func:`moe_lite.data.make_loader`
does).

Divergence: a non-finite loss (task, any aux part, or the total), without a grad scaler a
non-finite gradient norm, or a :class:`moe_lite.NonFiniteError` raised inside the forward (a router
given NaN/inf logits), in training or evaluation, stops training with :class:`TrainingDiverged`
(naming the step, and the first parameter or buffer holding NaN/inf when there is one). It is
detected before the optimizer step on CPU (a non-finite loss on a GPU up to ``sync_every`` steps
later), and the checkpoint written at the last good evaluation is never overwritten.

Files: checkpoints are written atomically with the permissions of any new file (umask); a save
killed mid-write leaves a temporary file that the next save of that checkpoint removes. A file
that is not a readable checkpoint of the model raises :class:`CheckpointError` naming it.

Task protocol (any object with these two methods; :mod:`.tasks`)::

    task.loss(model, batch) -> (loss: scalar Tensor, logs: dict[str, float | scalar Tensor])
    task.evaluate(model, batches: Iterable) -> dict[str, float]     # "loss" if it has one
"""
from .checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from .config import TrainConfig, build_optimizer, build_scheduler, lr_factor
from .device import pick_device, to_device
from .divergence import TrainingDiverged
from .evaluation import evaluate
from .history import History
from .loop import fit
from .rng import seed_everything
from .tasks import ClassificationTask, DiffusionTask, Task

# constants, types and the schedule object, importable from here as they always were (not in __all__)
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, STALE_TMP_AGE_S  # noqa: F401
from .config import CosineSchedule, PathLike  # noqa: F401
from .device import AMP_CHOICES  # noqa: F401
from .loop import GPU_SYNC_EVERY, RESUME_FREE_FIELDS, Callback  # noqa: F401

__all__ = [
    "Task",
    "ClassificationTask",
    "DiffusionTask",
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
