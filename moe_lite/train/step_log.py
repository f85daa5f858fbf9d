"""Per-step scalars kept on the device and copied to the host in one transfer every few steps.

A host copy per value per step would make a GPU wait on every step; the loop adds each step's values
(a dict of scalar tensors and floats) to a :class:`_StepLog` and flushes it every ``sync_every`` steps
(every step on CPU, where it costs nothing and catches a NaN before its optimizer step).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
from torch import Tensor

class _StepLog:
    """Per-step scalars kept on the device until :meth:`flush` copies them to the host at once."""

    def __init__(self) -> None:
        self._pending: List[Tuple[Dict[str, Any], List[str], Tensor]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, host: Dict[str, Any], values: Mapping[str, Union[float, Tensor]]) -> None:
        """Queue one step: ``host`` (plain values, kept as they are) and ``values`` (scalars, stacked
        into one float tensor on their device)."""
        names, device = list(values), _common_device(values)
        stacked = torch.stack([torch.as_tensor(values[k]).detach().float().reshape(()).to(device) for k in names])
        self._pending.append((host, names, stacked))

    def flush(self) -> List[Dict[str, Any]]:
        """One record per queued step, ``{**host, **values as floats}``, in order; empties the queue."""
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
    """The first non-CPU device among the tensors in ``values`` (cpu if none)."""
    for value in values.values():
        if isinstance(value, Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")
