"""What every experiment shares: sizes, the run context (data, device, seeds), and the result record."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

#: smoke: CI, seconds; quick: a CPU, minutes; gpu: a free Colab GPU (T4), minutes; full: a paper-style
#: study on a datacenter GPU
SIZES = ("smoke", "quick", "gpu", "full")
DATA_CHOICES = ("auto", "embedded")
SIZE_ENV = "MOE_LITE_SIZE"
#: trained models that ship with the package (read-only): ``<size>/<experiment>/<cache file name>``,
#: written by ``python -m moe_lite.experiments.ship``, found by the same keys as the user's cache
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "checkpoints"


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
    shipped: bool = True
    #: every cache file this context's runs looked up, in order (what ``moe_lite.experiments.ship`` copies)
    checkpoints_used: List[Path] = field(default_factory=list, repr=False)
    _splits: Optional[Tuple[Dataset, Dataset]] = field(default=None, repr=False)

    @classmethod
    def create(cls, size: Optional[str] = None, seeds: Optional[Sequence[int]] = None, device: str = "auto",
               data: str = "auto", progress: bool = True, default_seeds: Sequence[int] = (0,),
               cache: Optional[str | Path] = "default", reuse: bool = True,
               shipped: bool = True) -> "RunContext":
        """``cache``: folder of trained checkpoints ("default": ``$MOE_LITE_CACHE/runs`` or
        ``~/.cache/moe_lite/runs``; None: no caching). ``reuse=False`` retrains even when a matching
        checkpoint exists (and overwrites it). ``shipped=False``: never load the trained models that
        ship with moe_lite (:data:`SHIPPED_DIR`), train instead (the user's own cache is still used)."""
        from ..train import pick_device

        if data not in DATA_CHOICES:
            raise ValueError(f"data must be one of {DATA_CHOICES}, got {data!r}")
        if cache == "default":
            root = os.environ.get("MOE_LITE_CACHE") or Path.home() / ".cache" / "moe_lite"
            cache = Path(root) / "runs"
        return cls(size=resolve_size(size), seeds=list(seeds or default_seeds), device=pick_device(device),
                   data=data, progress=progress, cache_dir=Path(cache) if cache is not None else None,
                   reuse=reuse, shipped=shipped)

    def checkpoint_path(self, experiment: str, name: str, *key_parts: Any) -> Optional[Path]:
        """Where a trained model of ``experiment``/``name`` is cached: the file name carries a hash
        of everything that defines the run (configs, size, seed, data), so a change retrains."""
        if self.cache_dir is None:
            return None
        from ..data import SOURCE_DEBIAN, SOURCE_DOWNLOAD, SOURCE_LOCAL

        train, test = self.splits()
        # the data actually used (not the option that chose it), so a CLI run with --data embedded
        # and a notebook under MOE_LITE_DATA=embedded share their checkpoints; every full copy of
        # Fashion-MNIST is one data set wherever it came from (Binder's Debian package, Colab's download,
        # then its local copy), so those share keys, and the shipped models, too
        full = (SOURCE_LOCAL, SOURCE_DEBIAN, SOURCE_DOWNLOAD)
        data = ("full Fashion-MNIST" if train.source in full else train.source, len(train), len(test))
        key = repr((self.size, data, str(self.device.type)) + tuple(repr(p) for p in key_parts))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        return self.cache_dir / experiment / f"{slug}-{digest}.pt"

    def shipped_path(self, path: Path) -> Optional[Path]:
        """Where moe_lite ships a trained model for the cache file ``path`` (from :meth:`checkpoint_path`):
        ``SHIPPED_DIR/<size>/<experiment>/<same file name>``, the same key. None when ``shipped`` is off
        or ``path`` is not in the cache folder."""
        if not self.shipped or self.cache_dir is None:
            return None
        try:
            relative = Path(path).relative_to(self.cache_dir)
        except ValueError:
            return None
        return SHIPPED_DIR / self.size / relative

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
    #: where the numbers came from (:func:`provenance`); filled on the first :meth:`to_dict`
    provenance: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        if not self.provenance:
            self.provenance = provenance(self.device, self.config.get("seeds"))
        return jsonable({
            "name": self.name, "size": self.size, "device": self.device, "data_source": self.data_source,
            "wall_time_s": round(self.wall_time_s, 2), "metrics": self.metrics, "tables": self.tables,
            "config": self.config, "notes": self.notes, "provenance": self.provenance,
        })

    def save(self, out: str | Path) -> Tuple[Path, Path]:
        """Write ``<out>/<name>.json`` and ``<out>/<name>.html``; returns both paths."""
        from ..viz import figures_to_html

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / f"{self.name}.json"
        record = self.to_dict()
        json_path.write_text(json.dumps(record, indent=2))
        html_path = out / f"{self.name}.html"
        header = {"experiment": self.name, "size": self.size, "device": self.device,
                  "data": self.data_source, "wall time (s)": round(self.wall_time_s, 1)}
        tables = {"run": header, "provenance": record["provenance"],
                  **{k: jsonable(v) for k, v in self.tables.items()}}
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


def mean_std(values: Sequence[float], seeds: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Mean and (sample) standard deviation over seeds; std is 0 for a single value. ``values``
    are kept, and with ``seeds`` (aligned with ``values``) the seed ids too, so two variants can be
    compared paired by seed (:func:`paired_comparisons`)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    std = float(t.std()) if t.numel() > 1 else 0.0
    out = {"mean": float(t.mean()), "std": std, "n": int(t.numel()), "values": [float(v) for v in values]}
    if seeds is not None:
        if len(seeds) != len(out["values"]):
            raise ValueError(f"mean_std: {len(out['values'])} values but {len(seeds)} seeds ({list(seeds)})")
        out["seeds"] = list(seeds)
    return out


# ---- paired comparisons against each experiment's baseline ---------------------------------------------
@dataclass(frozen=True)
class Pairing:
    """What an experiment's variants are compared with: the ``baseline`` variant, the ``metrics``
    (a key of a variant's entry, dotted for a nested one, e.g. ``"routing_seeds.max_vio"`` ->
    ``"higher"`` or ``"lower"`` is better), and where the variants' entries are in ``metrics``:
    ``""`` (at its top), ``"variants"`` (``metrics["variants"]``) or ``"cells"`` (one group of
    variants per ``metrics["cells"]`` entry, e.g. per training-set size)."""

    baseline: str
    metrics: Dict[str, str]
    where: str = ""

    def groups(self, metrics: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
        """``{group label: {variant: entry}}`` ("" labels the only group)."""
        if self.where == "cells":
            return {str(cell.get("train_images")): cell for cell in (metrics.get("cells") or {}).values()}
        return {"": (metrics.get(self.where) or {}) if self.where else metrics}


#: experiment name -> its pairing; "seeds" of :func:`mean_std` make the pairs
PAIRINGS: Dict[str, Pairing] = {
    "vimoe": Pairing("dense", {"accuracy": "higher"}, "variants"),
    "vimoe-grid": Pairing("dense", {"accuracy": "higher"}, "cells"),
    "dynamic": Pairing("top-2", {"accuracy": "higher", "experts_per_token": "lower"}),
    "zoo": Pairing("top-2", {"accuracy": "higher"}),
    "balance": Pairing("no balancing", {"accuracy": "higher", "routing_seeds.max_vio": "lower"}),
    "adapt": Pairing("LoRA (matched params)", {"accuracy": "higher"}),
    "dit": Pairing("dense", {"fd_fmnist_classifier": "lower", "conditional_accuracy": "higher"}),
    "race": Pairing("dense", {"fd_fmnist_classifier": "lower", "conditional_accuracy": "higher"}),
}
#: the title of the paired table starts with this
PAIRED_TABLE = "paired comparisons"


def _lookup(entry: Any, path: str) -> Any:
    for part in path.split("."):
        entry = entry.get(part) if isinstance(entry, Mapping) else None
    return entry


def seed_values(summary: Mapping[str, Any], seeds: Sequence[Any]) -> Dict[Any, float]:
    """``{seed: value}`` of a :func:`mean_std` summary; ``seeds`` stand in for its own seed ids
    when it has none (records written before they were stored)."""
    from ..stats import by_seed

    return by_seed(summary["values"], summary.get("seeds") or seeds)


def paired_comparisons(name: str, metrics: Mapping[str, Any], seeds: Sequence[Any],
                       confidence: float = 0.95) -> Tuple[str, List[Dict[str, Any]]]:
    """(table title, rows): every variant of experiment ``name`` against its baseline
    (:data:`PAIRINGS`), per metric: the mean paired difference (variant − baseline) over seeds,
    its Student-t interval and the verdict. Per-seed values are paired by their stored seed ids,
    or by ``seeds`` (the config's seed order) where a summary has none. No rows when the
    experiment has no pairing, the baseline did not run, or fewer than 2 seeds ran."""
    from ..stats import paired_difference

    pairing = PAIRINGS.get(name)
    title = (f"{PAIRED_TABLE} against {pairing.baseline if pairing else '-'} (variant − baseline per seed; "
             f"{confidence * 100:g}% t-interval over seeds)")
    if pairing is None:
        return title, []
    rows = []
    for label, entries in pairing.groups(metrics).items():
        base = entries.get(pairing.baseline)
        if not isinstance(base, Mapping):
            continue
        for variant, entry in entries.items():
            if variant == pairing.baseline or not isinstance(entry, Mapping):
                continue
            for metric, direction in pairing.metrics.items():
                a, b = _lookup(entry, metric), _lookup(base, metric)
                if not (isinstance(a, Mapping) and isinstance(b, Mapping) and "values" in a and "values" in b):
                    continue
                if min(len(a["values"]), len(b["values"])) < 2:
                    continue
                row = {"train images": label} if label else {}
                row.update({"variant": variant, "baseline": pairing.baseline, "metric": metric,
                            "better": direction})
                try:
                    r = paired_difference(seed_values(a, seeds), seed_values(b, seeds), confidence, direction)
                except ValueError as err:
                    rows.append({**row, "difference": None, "CI low": None, "CI high": None,
                                 "seeds": len(a["values"]), "verdict": f"n/a: {err}"})
                    continue
                verdict = {"A better": f"{variant} better", "B better": f"{pairing.baseline} better"}.get(
                    r.verdict, r.verdict)
                rows.append({**row, "difference": r.mean, "CI low": r.low, "CI high": r.high, "seeds": r.n,
                             "verdict": verdict})
    return title, rows


def add_paired_comparisons(result: "ExperimentResult") -> None:
    """Add the :func:`paired_comparisons` table of ``result`` (from its metrics and seeds) to its
    tables, when there is one."""
    title, rows = paired_comparisons(result.name, result.metrics, result.config.get("seeds") or [])
    if rows:
        result.tables[title] = rows


# ---- provenance -------------------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    """Output of a git command in the repository this package lives in; None outside a checkout
    (e.g. a pip-installed copy) or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_name(device: str) -> str:
    """The model name of ``device``: the GPU's for CUDA, else the CPU's (``/proc/cpuinfo`` on
    Linux, else :func:`platform.processor`)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def provenance(device: str, seeds: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Where a result came from: git commit (``"unknown"`` outside a git checkout) and whether
    tracked files differed from it, torch and Python versions, device and its model name, CPU
    threads, seeds. No host name or user (results are published)."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or "unknown", "git_dirty": bool(dirty) if commit else None,
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": device_name(str(device)), "threads": torch.get_num_threads(),
            "seeds": list(seeds) if seeds is not None else None}
