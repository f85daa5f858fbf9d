"""Every random state the trainer seeds, saves, restores or forks.

:func:`seed_everything` at the start of a run; ``_rng_state`` / ``_set_rng_state`` carry the global
Python, NumPy, torch and CUDA states through a checkpoint (in types that safe loading accepts); the
train loader's ``torch.Generator`` objects (``_loader_generators``) decide the batch order, so their
states travel too, which is what lets a resumed run replay an epoch's order exactly; evaluation runs
inside a forked, seeded RNG (``_forked_rng`` + ``_seed_forked``) and so never moves the training
randomness.
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- global RNG states, as a checkpoint holds them ----------------------------------------------
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
    """Restore what :func:`_rng_state` captured (CUDA states only for the devices present)."""
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


# ---- the train loader's sampling state ----------------------------------------------------------
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
    """Put the loader's generators back in ``states``; warns (and changes nothing) on a count mismatch."""
    generators = _loader_generators(loader)
    if len(generators) != len(states):
        warnings.warn(f"the train loader has {len(generators)} random generators but the checkpoint "
                      f"saved {len(states)}: the resumed batch order will differ", stacklevel=3)
        return
    for generator, state in zip(generators, states):
        generator.set_state(state)


# ---- evaluation's private randomness ------------------------------------------------------------
def _forked_rng(device: torch.device):
    """A context that restores the torch CPU RNG (and ``device``'s CUDA RNG) when it exits."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _seed_forked(seed: int, device: torch.device) -> None:
    """Seed only the generators that :func:`_forked_rng` restores afterwards."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
