"""Checkpoint files: everything needed to resume a run bit for bit, written so a reader never sees half.

A checkpoint is a dict (``format`` ``"moe_lite.checkpoint"``, ``version`` 2) of plain types and
tensors, read back with safe loading (``torch.load(weights_only=True)``): the model's state dict plus
its non-persistent buffers (router state such as EMA thresholds and balancing biases), optimizer,
scheduler and grad-scaler states, ``step``, ``planned_steps`` / ``completed``, history, config, every
global RNG state, and ``extra`` (the loop puts the loader's sampling state and callback states there).

:func:`atomic_save` writes a temporary file in the same folder, then ``os.replace`` s it into place,
with the permissions of any new file (umask); a save killed mid-write leaves a temporary that the next
save of that path removes (:func:`remove_stale_temporaries`). :func:`read_checkpoint` checks a file
without loading it into anything; :func:`load_checkpoint` refuses a file that does not fit the model
before touching it. Every problem is a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import os
import pickle
import platform
import secrets
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .config import PathLike, TrainConfig
from .history import History
from .rng import _rng_state, _set_rng_state

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "STALE_TMP_AGE_S",
    "CheckpointError",
    "atomic_save",
    "remove_stale_temporaries",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
]

CHECKPOINT_FORMAT = "moe_lite.checkpoint"
CHECKPOINT_VERSION = 2  # 2: planned_steps and completed


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint here: empty, truncated, not a moe_lite checkpoint,
    or of another architecture. ``path`` is the file; the message says what is wrong."""

    def __init__(self, message: str, path: PathLike):
        super().__init__(message)
        self.path = Path(path)


# ---- writing files atomically ----------------------------------------------------------------
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


# ---- the checkpoint payload --------------------------------------------------------------------
def _non_persistent_buffers(model: nn.Module) -> Dict[str, Tensor]:
    """Buffers that ``state_dict`` leaves out (registered with ``persistent=False``)."""
    saved = set(model.state_dict().keys())
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if name not in saved}


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
