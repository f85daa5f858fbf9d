"""Where and how moe_lite runs, resolved once at the edge (the CLI, ``notebook.setup()``) and passed down.

:meth:`Settings.resolve` is the only place in the package that reads the environment, and nothing in
the package writes it. Library code takes the values it needs from a :class:`Settings` (or an explicit
argument), never from ``os.environ``.

Environment variables (each overridden by an explicit argument to :meth:`Settings.resolve`):

==============================  =====================================================================
``MOE_LITE_SIZE``               smoke | quick | gpu | full (default: gpu on CUDA, else quick)
``MOE_LITE_CACHE``              the cache root (default ``$XDG_CACHE_HOME/moe_lite`` or
                                ``~/.cache/moe_lite``): trained runs in ``<root>/runs``, the feature
                                classifier and downloads in ``<root>``
``MOE_LITE_DATA``               ``embedded`` (the committed subset), ``full`` (a full copy), or a path to
                                Fashion-MNIST; unset: the size's default (:data:`SIZE_DATA`)
``MOE_LITE_OFFLINE``            1: never try a dataset download
``MOE_LITE_STATIC_FIGURES``     1: static figures; 0: live FigureWidgets (even in Colab); unset: auto
``MOE_LITE_PLOTLY_INLINE``      1: also inline plotly.js in notebooks (classic Notebook, HTML export)
==============================  =====================================================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

#: smoke: CI, seconds; quick: a CPU, minutes; gpu: a free Colab GPU (T4), minutes; full: a paper-style
#: study on a datacenter GPU
SIZES = ("smoke", "quick", "gpu", "full")
DEVICES = ("auto", "cpu", "cuda", "mps")
#: "auto": the size's default (:data:`SIZE_DATA`); "embedded": the committed subset; "full": the best full
#: copy of Fashion-MNIST (a local or Debian copy, else a download; an error if there is none)
DATA_CHOICES = ("auto", "embedded", "full")
#: the data each size reads when nothing names one. Smoke and quick read the committed subset everywhere:
#: the published results, the notebooks' stored outputs and the shipped trained models were made on it,
#: so a learner on a laptop, Binder or Colab sees the same numbers and loads the same models (their
#: cache keys name the data). gpu and full take the best full copy ("auto" in :mod:`moe_lite.data`).
SIZE_DATA = {"smoke": "embedded", "quick": "embedded", "gpu": "auto", "full": "auto"}

ENV_SIZE = "MOE_LITE_SIZE"
ENV_CACHE = "MOE_LITE_CACHE"
ENV_DATA = "MOE_LITE_DATA"
ENV_OFFLINE = "MOE_LITE_OFFLINE"
ENV_STATIC_FIGURES = "MOE_LITE_STATIC_FIGURES"
ENV_PLOTLY_INLINE = "MOE_LITE_PLOTLY_INLINE"
ENV_XDG_CACHE = "XDG_CACHE_HOME"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
#: the repository checkout this package lives in (``docs/results`` is there, not in a pip install)
_REPOSITORY = Path(__file__).resolve().parents[1]


def default_cache_root() -> Path:
    """``~/.cache/moe_lite``: the cache root when no variable names one."""
    return Path.home() / ".cache" / "moe_lite"


def published_results_dir() -> Optional[Path]:
    """``docs/results`` of the checkout this package lives in (``<size>/<experiment>.json`` inside);
    None when absent (a pip install). The one place that knows where the published results are."""
    folder = _REPOSITORY / "docs" / "results"
    return folder if folder.is_dir() else None


@dataclass(frozen=True)
class Settings:
    """One resolved set of run settings; build it with :meth:`resolve` at the edge, pass it down."""

    size: str                     # "smoke" | "quick" | "gpu" | "full"
    device: str = "auto"          # "auto" | "cpu" | "cuda" (or "cuda:N") | "mps"
    data: str = "auto"            # "auto" (the size's default) | "embedded" | "full"
    cache_dir: Optional[Path] = None   # folder of trained checkpoints (None: no cache)
    #: where the published results live: ``docs/results`` of a checkout, holding
    #: ``<size>/<experiment>.json`` (notebooks at any size quote the quick ones); None if absent
    results_dir: Optional[Path] = None
    offline: bool = False         # never try a dataset download
    #: True: static figures; False: live FigureWidgets forced (e.g. Colab with its widget manager);
    #: None: automatic (see :func:`moe_lite.widgets.can_use_figurewidget`)
    static_figures: Optional[bool] = None
    #: a Fashion-MNIST path (``$MOE_LITE_DATA`` when it is not ``embedded``); None: search (see moe_lite.data)
    data_root: Optional[Path] = None
    #: the cache root: the feature classifier and dataset downloads live here, runs in ``cache_dir``
    cache_root: Path = field(default_factory=lambda: default_cache_root())
    plotly_inline: bool = False   # also inline plotly.js in notebook figures

    def __post_init__(self) -> None:
        _check_choice("size", self.size, SIZES)
        _check_device("device", self.device)
        _check_choice("data", self.data, DATA_CHOICES)

    @property
    def data_source(self) -> str:
        """The ``source`` :mod:`moe_lite.data` loads: ``data`` when it names one; under ``"auto"``, the
        size's default (:data:`SIZE_DATA`), unless a path (``data_root``) was given, which is searched
        first ("auto")."""
        if self.data != "auto":
            return self.data
        return "auto" if self.data_root is not None else SIZE_DATA[self.size]

    @classmethod
    def resolve(cls, size: Optional[str] = None, device: Optional[str] = None, data: Optional[str] = None,
                cache: Union[str, Path, None] = "default",
                environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """The settings from explicit arguments, else the environment, else the defaults.

        ``cache``: the folder of trained checkpoints; ``"default"``: ``<cache root>/runs``; None: no
        checkpoint cache. ``environ``: the variables to read (default :data:`os.environ`; tests pass a
        dict). A bad value raises ``ValueError`` naming the argument or the variable.
        """
        env = os.environ if environ is None else environ
        device = _pick("device", device, None, env, DEVICES, "auto", check=_check_device)
        if size is None and not env.get(ENV_SIZE, "").strip():
            size = "gpu" if _is_cuda(device) else "quick"
        size = _pick("size", size, ENV_SIZE, env, SIZES, "quick")
        data_value, data_root = _data(data, env)
        root = cache_root(env)
        if isinstance(cache, str) and cache == "default":
            cache_dir: Optional[Path] = root / "runs"
        else:
            cache_dir = Path(cache).expanduser() if cache is not None else None
        return cls(size=size, device=device, data=data_value, cache_dir=cache_dir,
                   results_dir=published_results_dir(), offline=_flag(env, ENV_OFFLINE),
                   static_figures=_tristate(env, ENV_STATIC_FIGURES), data_root=data_root, cache_root=root,
                   plotly_inline=_flag(env, ENV_PLOTLY_INLINE))


def cache_root(environ: Optional[Mapping[str, str]] = None) -> Path:
    """The cache root: ``$MOE_LITE_CACHE``, else ``$XDG_CACHE_HOME/moe_lite``, else ``~/.cache/moe_lite``.
    The one rule for it; :meth:`Settings.resolve` calls it."""
    env = os.environ if environ is None else environ
    if env.get(ENV_CACHE, "").strip():
        return Path(env[ENV_CACHE].strip()).expanduser()
    if env.get(ENV_XDG_CACHE, "").strip():
        return Path(env[ENV_XDG_CACHE].strip()).expanduser() / "moe_lite"
    return default_cache_root()


# ---- parsing and validation ---------------------------------------------------------------------------
def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {choices}")


def _check_device(name: str, value: object) -> None:
    ok = isinstance(value, str) and (value in DEVICES or (value.startswith("cuda:") and value[5:].isdigit()))
    if not ok:
        raise ValueError(f"{name}={value!r}; expected one of {DEVICES} (or cuda:N)")


def _pick(name: str, given: Optional[str], variable: Optional[str], env: Mapping[str, str], choices: tuple,
          default: str, check=None) -> str:
    """``given`` (validated under ``name``), else ``$variable`` (validated under the variable's name), else
    ``default``. Environment values are case- and space-insensitive."""
    if given is not None:
        where, value = name, given
    elif variable is not None and env.get(variable, "").strip():
        where, value = variable, env[variable].strip().lower()
    else:
        return default
    if check is not None:
        check(where, value)
    else:
        _check_choice(where, value, choices)
    return value


def _data(data: Optional[str], env: Mapping[str, str]) -> tuple:
    """(data choice, data path): ``data`` when given, else ``$MOE_LITE_DATA`` (``embedded``, ``full``, or a path,
    which makes the choice ``auto`` with that path searched first). A path in the variable also
    applies under an explicit ``data="auto"`` (it refines where "auto" looks, it does not contradict it)."""
    raw = env.get(ENV_DATA, "").strip()
    named = raw.lower() in ("embedded", "full")
    path = Path(raw).expanduser() if raw and not named else None
    if data is not None:
        _check_choice("data", data, DATA_CHOICES)
        return data, path if data == "auto" else None
    if named:
        return raw.lower(), None
    return "auto", path


def _flag(env: Mapping[str, str], variable: str) -> bool:
    value = env.get(variable, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{variable}={env[variable]!r}; expected 1 or 0 (true/false, yes/no, on/off)")


def _tristate(env: Mapping[str, str], variable: str) -> Optional[bool]:
    """True / False when the variable forces one (``static``/``widget`` also accepted), None when unset."""
    value = env.get(variable, "").strip().lower()
    if not value:
        return None
    if value in _TRUE + ("static",):
        return True
    if value in _FALSE[1:] + ("widget",):
        return False
    raise ValueError(f"{variable}={env[variable]!r}; expected 1 (static) or 0 (widget)")


def _is_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")
