"""What every experiment shares: sizes, the run context (data, device, seeds), and the result record."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

SIZES = ("smoke", "quick", "full")
DATA_CHOICES = ("auto", "embedded")
SIZE_ENV = "MOE_LITE_SIZE"


def default_size() -> str:
    """``$MOE_LITE_SIZE`` when set (CI sets ``smoke``), else ``quick``."""
    size = os.environ.get(SIZE_ENV, "quick").strip().lower() or "quick"
    if size not in SIZES:
        raise ValueError(f"{SIZE_ENV}={size!r}; expected one of {SIZES}")
    return size


def resolve_size(size: Optional[str]) -> str:
    if size is None:
        return default_size()
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return size


@dataclass
class Dataset:
    """Normalised tensors of one split: ``x`` float ``[N, 1, 28, 28]``, ``y`` long ``[N]``."""

    x: Tensor
    y: Tensor
    source: str

    def __len__(self) -> int:
        return int(self.y.numel())

    def take(self, n_per_class: Optional[int], seed: int = 0) -> "Dataset":
        """A stratified subset with ``n_per_class`` images of every class (all when None)."""
        if n_per_class is None:
            return self
        gen = torch.Generator().manual_seed(seed)
        keep = []
        for c in torch.unique(self.y).tolist():
            idx = torch.nonzero(self.y == c).flatten()
            keep.append(idx[torch.randperm(idx.numel(), generator=gen)[:n_per_class]])
        order = torch.cat(keep).sort().values
        return Dataset(self.x[order], self.y[order], self.source)


@dataclass
class RunContext:
    """Where and how an experiment runs. Data is loaded once and shared by every experiment."""

    size: str
    seeds: List[int]
    device: torch.device
    data: str = "auto"
    progress: bool = True
    cache_dir: Optional[Path] = None
    reuse: bool = True
    _splits: Optional[Tuple[Dataset, Dataset]] = field(default=None, repr=False)

    @classmethod
    def create(cls, size: Optional[str] = None, seeds: Optional[Sequence[int]] = None, device: str = "auto",
               data: str = "auto", progress: bool = True, default_seeds: Sequence[int] = (0,),
               cache: Optional[str | Path] = "default", reuse: bool = True) -> "RunContext":
        """``cache``: folder of trained checkpoints ("default": ``$MOE_LITE_CACHE/runs`` or
        ``~/.cache/moe_lite/runs``; None: no caching). ``reuse=False`` retrains even when a matching
        checkpoint exists (and overwrites it)."""
        from ..train import pick_device

        if data not in DATA_CHOICES:
            raise ValueError(f"data must be one of {DATA_CHOICES}, got {data!r}")
        if cache == "default":
            root = os.environ.get("MOE_LITE_CACHE") or Path.home() / ".cache" / "moe_lite"
            cache = Path(root) / "runs"
        return cls(size=resolve_size(size), seeds=list(seeds or default_seeds), device=pick_device(device),
                   data=data, progress=progress, cache_dir=Path(cache) if cache is not None else None,
                   reuse=reuse)

    def checkpoint_path(self, experiment: str, name: str, *key_parts: Any) -> Optional[Path]:
        """Where a trained model of ``experiment``/``name`` is cached: the file name carries a hash
        of everything that defines the run (configs, size, seed, data), so a change retrains."""
        if self.cache_dir is None:
            return None
        train, test = self.splits()
        # the data actually used (not the option that chose it), so a CLI run with --data embedded
        # and a notebook under MOE_LITE_DATA=embedded share their checkpoints
        data = (train.source, len(train), len(test))
        key = repr((self.size, data, str(self.device.type)) + tuple(repr(p) for p in key_parts))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        return self.cache_dir / experiment / f"{slug}-{digest}.pt"

    def splits(self) -> Tuple[Dataset, Dataset]:
        """(train, test) Fashion-MNIST as normalised tensors, from the source ``data`` asks for."""
        if self._splits is None:
            from .. import data as fm

            source = "embedded" if self.data == "embedded" else "auto"
            train, test = fm.load_splits(source=source)
            out = []
            for ds in (train, test):
                x, y = fm.to_tensors(ds, normalize=True)
                out.append(Dataset(x, y, source=ds.source))
            self._splits = (out[0], out[1])
        return self._splits


def jsonable(value: Any) -> Any:
    """Tensors, numpy scalars and nested containers as plain JSON values (nan -> None)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        return jsonable(value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass
class ExperimentResult:
    """Everything one experiment produced.

    ``metrics`` and ``tables`` are JSON-ready; ``figures`` are plotly figures (name -> figure);
    ``models`` are the trained modules (kept in memory for notebooks, never written to JSON).
    """

    name: str
    size: str
    device: str
    data_source: str
    metrics: Dict[str, Any] = field(default_factory=dict)
    tables: Dict[str, Any] = field(default_factory=dict)
    figures: Dict[str, Any] = field(default_factory=dict)
    models: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    wall_time_s: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return jsonable({
            "name": self.name, "size": self.size, "device": self.device, "data_source": self.data_source,
            "wall_time_s": round(self.wall_time_s, 2), "metrics": self.metrics, "tables": self.tables,
            "config": self.config, "notes": self.notes,
        })

    def save(self, out: str | Path) -> Tuple[Path, Path]:
        """Write ``<out>/<name>.json`` and ``<out>/<name>.html``; returns both paths."""
        from ..viz import figures_to_html

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / f"{self.name}.json"
        json_path.write_text(json.dumps(self.to_dict(), indent=2))
        html_path = out / f"{self.name}.html"
        header = {"experiment": self.name, "size": self.size, "device": self.device,
                  "data": self.data_source, "wall time (s)": round(self.wall_time_s, 1)}
        tables = {"run": header, **{k: jsonable(v) for k, v in self.tables.items()}}
        if self.notes:
            tables["notes"] = {f"{i + 1}": note for i, note in enumerate(self.notes)}
        figures_to_html(self.figures, title=f"moe_lite: {self.name} ({self.size})", tables=tables, path=html_path)
        return json_path, html_path


@dataclass
class Experiment:
    name: str
    description: str
    fn: Callable[..., ExperimentResult]


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def format_mean_std(summary: Dict[str, Any], digits: int) -> Any:
    """A table cell from :func:`mean_std`: ``"mean ± std"`` over several seeds, the rounded mean
    (a number) for one."""
    if summary["n"] > 1:
        return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
    return round(summary["mean"], digits)


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and (sample) standard deviation over seeds; std is 0 for a single value."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    std = float(t.std()) if t.numel() > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "n": int(t.numel()), "values": [float(v) for v in values]}
