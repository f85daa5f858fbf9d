"""What a run logged: :class:`History`, one record per optimizer step and one per evaluation.

Plain dicts of floats (JSON round trip with :meth:`History.to_json` / :meth:`History.from_json`), so a
checkpoint holds it under safe loading and a notebook plots it with :meth:`History.series`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .config import PathLike

__all__ = ["History"]


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
