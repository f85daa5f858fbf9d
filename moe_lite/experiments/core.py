"""What every experiment shares: sizes, the run context (data, device, seeds), and the result record."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import data as fm
from ..data import SOURCE_DEBIAN, SOURCE_DOWNLOAD, SOURCE_LOCAL
from ..settings import DATA_CHOICES, ENV_SIZE, SIZES, Settings
from ..stats import by_seed, paired_difference
from ..train import pick_device
from ..page import figures_to_html

SIZE_ENV = ENV_SIZE  # the old name
#: trained models that ship with the package (read-only): ``<size>/<experiment>/<cache file name>``,
#: written by ``python -m moe_lite.experiments.ship``, found by the same keys as the user's cache
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "checkpoints"


def default_size(settings: Optional[Settings] = None) -> str:
    """``settings.size``; without settings, what :meth:`Settings.resolve` picks: ``$MOE_LITE_SIZE``
    when set (CI sets ``smoke``), else ``gpu`` on CUDA, else ``quick``."""
    return (settings or Settings.resolve()).size


def resolve_size(size: Optional[str], settings: Optional[Settings] = None) -> str:
    """``size`` (checked), else :func:`default_size`."""
    if size is None:
        return default_size(settings)
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
    #: those of them whose finished run was loaded (from the cache or a shipped file), not trained
    checkpoints_loaded: List[Path] = field(default_factory=list, repr=False)
    #: the settings this context was made from (data path, offline, cache root...); None: the defaults
    settings: Optional[Settings] = field(default=None, repr=False)
    _splits: Optional[Tuple[Dataset, Dataset]] = field(default=None, repr=False)

    @classmethod
    def create(cls, size: Optional[str] = None, seeds: Optional[Sequence[int]] = None, device: str = "auto",
               data: str = "auto", progress: bool = True, default_seeds: Sequence[int] = (0,),
               cache: Optional[str | Path] = "default", reuse: bool = True,
               shipped: bool = True, settings: Optional[Settings] = None) -> "RunContext":
        """A context from ``settings`` (resolved at the edge: the CLI, ``notebook.setup()``); an
        argument given here (not its default) wins over the field it names. Without ``settings``
        this call is the edge: :meth:`Settings.resolve` reads the environment once.

        ``cache``: folder of trained checkpoints ("default": ``settings.cache_dir``, i.e.
        ``<cache root>/runs``; None: no caching). ``reuse=False`` retrains even when a matching
        checkpoint exists (and overwrites it). ``shipped=False``: never load the trained models that
        ship with moe_lite (:data:`SHIPPED_DIR`), train instead (the user's own cache is still used)."""
        if data not in DATA_CHOICES:
            raise ValueError(f"data must be one of {DATA_CHOICES}, got {data!r}")
        if settings is None:
            settings = Settings.resolve(size=size, device=None if device == "auto" else device,
                                        data=None if data == "auto" else data, cache=cache)
        else:
            changes = {"size": resolve_size(size, settings), "device": settings.device if device == "auto" else device,
                       "data": settings.data if data == "auto" else data}
            if cache != "default":
                changes["cache_dir"] = Path(cache) if cache is not None else None
            settings = dataclasses.replace(settings, **changes)
        resolve_size(settings.size)  # a clear ValueError for a bad size
        return cls(size=settings.size, seeds=list(seeds or default_seeds), device=pick_device(settings.device),
                   data=settings.data, progress=progress, cache_dir=settings.cache_dir, reuse=reuse,
                   shipped=shipped, settings=settings)

    @property
    def cache_root(self) -> Path:
        """The cache root of this context's settings (the feature classifier lives there)."""
        return (self.settings or Settings(self.size)).cache_root

    def checkpoint_path(self, experiment: str, name: str, *key_parts: Any) -> Optional[Path]:
        """Where a trained model of ``experiment``/``name`` is cached: the file name carries a hash
        of everything that defines the run (configs, size, seed, data), so a change retrains."""
        if self.cache_dir is None:
            return None
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
            # ``data`` may have been set apart from the settings (a RunContext built by hand)
            settings = dataclasses.replace(self.settings or Settings(self.size), data=self.data)
            train, test = fm.load_splits(settings=settings)
            out = []
            for ds in (train, test):
                x, y = fm.to_tensors(ds, normalize=True)
                out.append(Dataset(x, y, source=ds.source))
            self._splits = (out[0], out[1])
        return self._splits


class UsageError(ValueError):
    """A bad argument or input file, found before any work; the message names it (the command line
    prints it as one line and exits with code 2)."""


def check_output_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` (and its parents) if needed and check a file can be written there, with a
    probe file that is removed again; raises :class:`UsageError` naming ``what`` (the argument,
    e.g. ``"out results/"``) and the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".moe_lite-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "a file of that name is in the way" if folder.is_file() else err.strerror or str(err)
        raise UsageError(f"{what}: cannot create or write the folder {folder} ({reason})") from None
    return folder


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
    #: each named table's title: ``tables`` is keyed by title (what the results page prints),
    #: :meth:`table` finds one by its stable short name
    table_names: Dict[str, str] = field(default_factory=dict)

    def add_table(self, name: str, title: str, rows: Any) -> None:
        """Add (or replace) the table with the short ``name`` under its human ``title``."""
        if name in self.table_names and self.table_names[name] != title:
            self.tables.pop(self.table_names[name], None)
        self.table_names[name] = title
        self.tables[title] = rows

    def table(self, name: str) -> Any:
        """The rows of the table named ``name`` (see :meth:`add_table`; a title works too)."""
        if name in self.table_names:
            return self.tables[self.table_names[name]]
        if name in self.tables:
            return self.tables[name]
        raise KeyError(f"{self.name} has no table {name!r}; its tables: {list(self.table_names)}")

    def to_dict(self) -> Dict[str, Any]:
        if not self.provenance:
            self.provenance = provenance(self.device, self.config.get("seeds"))
        record = {
            "name": self.name, "size": self.size, "device": self.device, "data_source": self.data_source,
            "wall_time_s": round(self.wall_time_s, 2), "metrics": self.metrics, "tables": self.tables,
            "config": self.config, "notes": self.notes, "provenance": self.provenance,
        }
        if self.table_names:
            record["table_names"] = self.table_names
        return jsonable(record)

    def save(self, out: str | Path) -> Tuple[Path, Path]:
        """Write ``<out>/<name>.json`` and ``<out>/<name>.html``; returns both paths."""
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
    """What an experiment's variants are compared with: the ``baseline`` variant (or several, in
    order: each variant is compared with each baseline it does not come before), the ``metrics``
    (a key of a variant's entry, dotted for a nested one, e.g. ``"routing_seeds.max_vio"`` ->
    ``"higher"`` or ``"lower"`` is better), and where the variants' entries are in ``metrics``:
    ``""`` (at its top), ``"variants"`` (``metrics["variants"]``) or ``"cells"`` (one group of
    variants per ``metrics["cells"]`` entry, e.g. per training-set size)."""

    baseline: str | Sequence[str]
    metrics: Dict[str, str]
    where: str = ""

    @property
    def baselines(self) -> Tuple[str, ...]:
        return (self.baseline,) if isinstance(self.baseline, str) else tuple(self.baseline)

    @property
    def first(self) -> str:
        """The main baseline (the one the evaluation noise is quoted at)."""
        return self.baselines[0]

    def groups(self, metrics: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
        """``{group label: {variant: entry}}`` ("" labels the only group)."""
        if self.where == "cells":
            return {str(cell.get("train_images")): cell for cell in (metrics.get("cells") or {}).values()}
        return {"": (metrics.get(self.where) or {}) if self.where else metrics}


#: the title of the paired table starts with this
PAIRED_TABLE = "paired comparisons"


def _lookup(entry: Any, path: str) -> Any:
    for part in path.split("."):
        entry = entry.get(part) if isinstance(entry, Mapping) else None
    return entry


def seed_values(summary: Mapping[str, Any], seeds: Sequence[Any]) -> Dict[Any, float]:
    """``{seed: value}`` of a :func:`mean_std` summary; ``seeds`` stand in for its own seed ids
    when it has none (records written before they were stored)."""
    return by_seed(summary["values"], summary.get("seeds") or seeds)


def paired_comparisons(pairing: Optional[Pairing], metrics: Mapping[str, Any], seeds: Sequence[Any],
                       confidence: float = 0.95) -> Tuple[str, List[Dict[str, Any]]]:
    """(table title, rows): every variant against the ``pairing``'s baseline(s) (an experiment's
    :attr:`~moe_lite.experiments.runner.Experiment.pairing`), per metric: the mean paired difference
    (variant − baseline) over seeds, its Student-t interval and the verdict. Per-seed values are
    paired by their stored seed ids, or by ``seeds`` (the config's seed order) where a summary has
    none. No rows when there is no pairing, no baseline ran, or fewer than 2 seeds ran. The title
    names the baselines that ran."""
    groups = pairing.groups(metrics) if pairing else {}
    present = [b for b in (pairing.baselines if pairing else ()) if any(b in g for g in groups.values())]
    title = (f"{PAIRED_TABLE} against {', '.join(present) or (pairing.first if pairing else '-')} "
             f"(variant − baseline per seed; {confidence * 100:g}% t-interval over seeds)")
    if pairing is None:
        return title, []
    rows = []
    for label, entries in groups.items():
        for i, baseline in enumerate(pairing.baselines):
            base = entries.get(baseline)
            if not isinstance(base, Mapping):
                continue
            for variant, entry in entries.items():
                # each pair once: not against itself, nor against a baseline listed before this one
                if variant in pairing.baselines[:i + 1] or not isinstance(entry, Mapping):
                    continue
                for metric, direction in pairing.metrics.items():
                    a, b = _lookup(entry, metric), _lookup(base, metric)
                    if not (isinstance(a, Mapping) and isinstance(b, Mapping) and "values" in a and "values" in b):
                        continue
                    if min(len(a["values"]), len(b["values"])) < 2:
                        continue
                    row = {"train images": label} if label else {}
                    row.update({"variant": variant, "baseline": baseline, "metric": metric,
                                "better": direction})
                    try:
                        r = paired_difference(seed_values(a, seeds), seed_values(b, seeds), confidence, direction)
                    except ValueError as err:
                        rows.append({**row, "difference": None, "CI low": None, "CI high": None,
                                     "seeds": len(a["values"]), "verdict": f"n/a: {err}"})
                        continue
                    verdict = {"A better": f"{variant} better", "B better": f"{baseline} better"}.get(
                        r.verdict, r.verdict)
                    rows.append({**row, "difference": r.mean, "CI low": r.low, "CI high": r.high, "seeds": r.n,
                                 "verdict": verdict})
    return title, rows


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
    """Where a result came from: git commit (``"unknown"`` outside a git checkout) and whether the
    package's tracked files (``moe_lite/``) differed from it, torch and Python versions, device and its
    model name, CPU threads, seeds. No host name or user (results are published)."""
    commit = _git("rev-parse", "HEAD")
    # the package's own files: a results JSON or a notebook being rewritten does not change the numbers
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", str(Path(__file__).resolve().parents[1])) \
        if commit else None
    return {"git_commit": commit or "unknown", "git_dirty": bool(dirty) if commit else None,
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": device_name(str(device)), "threads": torch.get_num_threads(),
            "seeds": list(seeds) if seeds is not None else None}
