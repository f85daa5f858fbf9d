"""The training loop: :func:`fit` and the :class:`_Loop` that holds one run's state.

One run, top to bottom (each line one short method of :class:`_Loop`)::

    run():        epochs until the planned steps are done or something stops the run, a final evaluation
    _run_epoch(): this epoch's batches (replayed up to the saved position on resume), one step each
    _train_step(): forward (task loss + aux losses), backward + clip, log, optimizer + scheduler step,
                   then update_biases
    _after_step(): "step" callbacks, the time budget, an evaluation every ``eval_every`` steps
    _evaluate_and_save(): flush the step logs, evaluate, checkpoint, "eval" callbacks

Resuming (:meth:`_Loop.resume`) loads model, optimizer, scheduler, scaler, history, every RNG and the
loader's sampling state, then :meth:`_Loop._epoch_batches` replays the interrupted epoch's batch
order up to the saved step. Divergence is raised through :mod:`.divergence`; the checkpoint written
at the last good evaluation is never overwritten.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..layers import aux_loss, aux_losses, update_biases
from ..routing import NonFiniteError
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PathLike, TrainConfig, build_optimizer, build_scheduler
from .device import _amp_dtype, _autocast, pick_device, to_device
from .divergence import (TrainingDiverged, _diverged_error, _forward_failure, _non_finite_metric,
                         _non_finite_part, _stopped_where)
from .evaluation import evaluate
from .history import History
from .rng import _loader_generators, _sampling_state, _set_loader_state, _set_rng_state, seed_everything
from .step_log import _StepLog
from .tasks import Task

__all__ = ["fit", "Callback", "GPU_SYNC_EVERY", "RESUME_FREE_FIELDS"]

GPU_SYNC_EVERY = 16  # default host-copy interval of per-step logs off the CPU
RESUME_FREE_FIELDS = ("progress", "checkpoint", "time_budget_s", "device", "sync_every")  # may differ on resume

Callback = Callable[[str, Dict[str, Any]], Optional[bool]]


def fit(model: nn.Module, task: Task, train_loader: Iterable[Any], eval_loader: Optional[Iterable[Any]] = None,
        config: Optional[TrainConfig] = None, callbacks: Optional[Sequence[Callback]] = None, *,
        resume: Union[bool, PathLike, None] = None) -> History:
    """Train ``model`` on ``task`` (see :mod:`moe_lite.train` for what each step does).

    Args:
        model: any ``nn.Module``; moved to the config's device. MoE layers' aux losses are always
            added to the task loss (their weights are set on the layers).
        task: a :class:`Task` (e.g. :class:`ClassificationTask`, :class:`DiffusionTask`).
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


def _resume_path(resume: Union[bool, PathLike], config: TrainConfig) -> Path:
    """The checkpoint that ``fit(..., resume=...)`` continues from."""
    if resume is True:
        if not config.checkpoint:
            raise ValueError("resume=True needs TrainConfig.checkpoint (or pass the checkpoint path)")
        return Path(config.checkpoint)
    return Path(resume)  # type: ignore[arg-type]


def _warn_config_changes(saved: Mapping[str, Any], config: TrainConfig) -> None:
    """Warn when a resumed run changes a setting that shapes training (schedule, optimiser, data)."""
    current = config.to_dict()
    changed = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current
               if k in saved and k not in RESUME_FREE_FIELDS and saved[k] != current[k]]
    if changed:
        # stacklevel 4: the warning names the line that called fit (fit -> resume -> here)
        warnings.warn("resuming with a different config, so training will not continue as it would "
                      "have: " + "; ".join(changed), stacklevel=4)


def _steps_per_epoch(train_loader: Iterable[Any]) -> int:
    """The train loader's length: a loader without one, or an empty one, cannot be planned."""
    try:
        steps = len(train_loader)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError("fit needs a train loader with a length (a DataLoader over a map-style "
                        "dataset)") from err
    if steps < 1:
        raise ValueError("the train loader is empty")
    return steps


class _Loop:
    """The state of one :func:`fit` call, split into small steps."""

    def __init__(self, model: nn.Module, task: Task, train_loader: Iterable[Any],
                 eval_loader: Optional[Iterable[Any]], config: TrainConfig,
                 callbacks: Sequence[Callback]) -> None:
        self.steps_per_epoch = _steps_per_epoch(train_loader)
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
        self.epoch_start: Optional[Dict[str, Any]] = None  # the sampling state this epoch began with
        self.resume_payload: Optional[Dict[str, Any]] = None
        self.bar: Optional[Any] = None
        self.postfix: Dict[str, str] = {}
        self.t0, self.wall_before = time.perf_counter(), 0.0  # this run's start, earlier runs' time

    # ---- resuming ----------------------------------------------------------------------------
    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: every state, the plan, the data position."""
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
        """Train to the end of the plan (or a stop), evaluate and checkpoint; the "end" callbacks."""
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
        """The rest of the current epoch (all of it, unless resumed mid-epoch), under a progress bar."""
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
        """One optimizer step on ``batch``: forward, backward, log, step, bias updates."""
        task_loss, logs = self._forward(to_device(batch, self.device))
        aux = aux_loss(self.model)
        parts = aux_losses(self.model)
        loss = task_loss.float() + aux.float()
        grad_norm = self._backward(loss)
        values = {"loss": loss, "task_loss": task_loss, "aux_loss": aux,
                  **{f"aux/{k}": v for k, v in parts.items()}, "grad_norm": grad_norm, **logs}
        self._log_step(epoch, values)
        self._optimizer_step()
        update_biases(self.model)

    def _forward(self, batch: Any) -> Tuple[Tensor, Dict[str, Union[float, Tensor]]]:
        """The task's loss and logs under autocast; NaN/inf met inside the forward is divergence."""
        try:
            with _autocast(self.device, self.amp_dtype):
                return self.task.loss(self.model, batch)
        except NonFiniteError as err:  # e.g. a router given NaN/inf logits: divergence, not a bug
            raise self._forward_diverged(self.step + 1, err) from err

    def _backward(self, loss: Tensor) -> Tensor:
        """Gradients of ``loss`` (scaled under fp16), unscaled and clipped; returns their global norm."""
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        return nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _log_step(self, epoch: int, values: Mapping[str, Union[float, Tensor]]) -> None:
        """Queue this step's values (with the lr it trains at); flush every ``sync_every`` steps."""
        host = {"step": self.step + 1, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0]}
        self.log.add(host, values)
        if len(self.log) >= self.sync_every:
            self._flush()  # on CPU: before the optimizer step, so a diverged step is never applied

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1

    def _after_step(self, epoch: int) -> None:
        """Callbacks, the time budget, then an evaluation when one is due."""
        # "step" callbacks first: they see this step's training forward (not the evaluation's), and a
        # checkpoint written at this step holds their state after it (exact resume)
        if self._call("step", {"step": self.step, "epoch": epoch}):
            self.stop_reason = "callback"
        self._check_budget()
        every = self.config.eval_every or self.steps_per_epoch
        if self.step % every == 0:
            self._evaluate_and_save()

    def _check_budget(self) -> None:
        """At the probe step, fit the plan to the budget; once the budget is spent, stop."""
        budget = self.config.time_budget_s
        if budget is None:
            return
        if self.step == self.budget_probe_step:
            self._fit_plan_to_budget(budget)
        if time.perf_counter() - self.t0 >= budget and not self.stop_reason:
            self.stop_reason = "time_budget"

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
        """Copy the queued step logs to the history, raising on the first non-finite loss part."""
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
        """An evaluation record (metrics if there is an eval loader), a checkpoint, "eval" callbacks."""
        self._flush()
        epoch = max(0, self.step - 1) // self.steps_per_epoch
        record: Dict[str, Any] = {"step": self.step, "epoch": epoch, "wall_time_s": self._wall_time()}
        if self.eval_loader is not None:
            record.update(self._eval_metrics())
        self.history.evals.append(record)
        self.last_eval_step = self.step
        if self.config.checkpoint:
            self._save(Path(self.config.checkpoint))
        self._postfix(val_loss=record.get("loss"), val_acc=record.get("accuracy"))
        if self._call("eval", record):
            self.stop_reason = "callback"

    def _eval_metrics(self) -> Dict[str, Any]:
        """:func:`evaluate` on the eval loader; NaN/inf in a loss-like metric (or the forward) diverges."""
        try:
            metrics = evaluate(self.model, self.task, self.eval_loader, device=self.device,
                               amp=self.config.amp, log_routing=self.config.log_routing, seed=self.config.seed)
        except NonFiniteError as err:
            raise self._forward_diverged(self.step, err, during_eval=True) from err
        bad = _non_finite_metric(metrics)
        if bad is not None:
            raise self._diverged(self.step, f"eval {bad}", metrics[bad], metrics, during_eval=True)
        return metrics

    def _save(self, path: Path) -> None:
        """Checkpoint now, with the loader's sampling state and the stateful callbacks' states."""
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

    # ---- divergence and callbacks -------------------------------------------------------------
    def _forward_diverged(self, step: int, err: NonFiniteError, during_eval: bool = False) -> TrainingDiverged:
        """The divergence error for a forward that met NaN/inf (raised by a router or layer)."""
        self._flush()  # with deferred checks an earlier step's non-finite loss is the real start
        part, value, what = _forward_failure(self.model, err)
        return self._diverged(step, part, value, {}, during_eval=during_eval, what=what)

    def _diverged(self, step: int, part: str, value: float, record: Mapping[str, Any],
                  during_eval: bool = False, what: Optional[str] = None) -> TrainingDiverged:
        """The divergence error (see :mod:`.divergence`); closes the progress bar first."""
        error = _diverged_error(step, part, value, record, where=_stopped_where(during_eval, self.sync_every),
                                checkpoint=self.config.checkpoint, saved=self.saved, history=self.history,
                                what=what)
        if self.bar is not None:
            self.bar.close()
        return error

    def _call(self, event: str, info: Dict[str, Any]) -> bool:
        """Run every callback; True when one of them asks to stop."""
        stop = False
        for callback in self.callbacks:
            stop = bool(callback(event, {**info, "model": self.model, "history": self.history})) or stop
        return stop
