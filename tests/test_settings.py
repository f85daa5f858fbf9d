"""Settings: resolved once at the edge (explicit argument > environment > default), validated with
errors that name the variable, carried down to the code that used to read the environment, and never
written back into the environment."""
import ast
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from moe_lite import data as D
from moe_lite.experiments.core import RunContext, default_size, resolve_size
from moe_lite.experiments.report import published
from moe_lite.settings import Settings, cache_root, default_cache_root, published_results_dir

PACKAGE = Path(__file__).resolve().parents[1] / "moe_lite"


# ---- precedence -------------------------------------------------------------------------------------
def test_defaults_from_an_empty_environment(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = Settings.resolve(environ={})
    assert (s.size, s.device, s.data, s.offline, s.static_figures, s.plotly_inline) == (
        "quick", "auto", "auto", False, None, False)
    assert s.cache_root == default_cache_root() and s.cache_dir == default_cache_root() / "runs"
    assert s.data_root is None and s.results_dir == published_results_dir()


def test_size_default_is_gpu_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings.resolve(environ={}).size == "gpu"
    assert Settings.resolve(device="cpu", environ={}).size == "quick"
    assert Settings.resolve(device="cuda:1", environ={}).size == "gpu"
    assert Settings.resolve(environ={"MOE_LITE_SIZE": "smoke"}).size == "smoke"  # the variable beats it


def test_the_environment_fills_what_the_arguments_leave_open(tmp_path):
    env = {"MOE_LITE_SIZE": " Smoke ", "MOE_LITE_CACHE": str(tmp_path / "c"), "MOE_LITE_DATA": "embedded",
           "MOE_LITE_OFFLINE": "1", "MOE_LITE_STATIC_FIGURES": "0", "MOE_LITE_PLOTLY_INLINE": "yes"}
    s = Settings.resolve(environ=env)
    assert (s.size, s.data, s.offline, s.static_figures, s.plotly_inline) == ("smoke", "embedded", True, False, True)
    assert s.cache_root == tmp_path / "c" and s.cache_dir == tmp_path / "c" / "runs"
    # explicit arguments win
    s = Settings.resolve(size="full", device="cpu", data="auto", cache=tmp_path / "runs", environ=env)
    assert (s.size, s.device, s.data, s.cache_dir) == ("full", "cpu", "auto", tmp_path / "runs")
    assert Settings.resolve(cache=None, environ=env).cache_dir is None


def test_a_data_path_in_the_environment(tmp_path):
    s = Settings.resolve(environ={"MOE_LITE_DATA": str(tmp_path)})
    assert (s.data, s.data_root) == ("auto", tmp_path)
    # data="auto" (e.g. the CLI's --data auto) keeps the path; "embedded" contradicts it and drops it
    assert Settings.resolve(data="auto", environ={"MOE_LITE_DATA": str(tmp_path)}).data_root == tmp_path
    assert Settings.resolve(data="embedded", environ={"MOE_LITE_DATA": str(tmp_path)}).data_root is None


def test_one_cache_root_rule(tmp_path):
    assert cache_root({}) == default_cache_root() == Path.home() / ".cache" / "moe_lite"
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "moe_lite"
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path), "MOE_LITE_CACHE": str(tmp_path / "m")}) == tmp_path / "m"


# ---- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, name", [
    ({"MOE_LITE_SIZE": "huge"}, "MOE_LITE_SIZE"),
    ({"MOE_LITE_OFFLINE": "maybe"}, "MOE_LITE_OFFLINE"),
    ({"MOE_LITE_STATIC_FIGURES": "sometimes"}, "MOE_LITE_STATIC_FIGURES"),
    ({"MOE_LITE_PLOTLY_INLINE": "2"}, "MOE_LITE_PLOTLY_INLINE"),
])
def test_a_bad_variable_is_named(env, name):
    with pytest.raises(ValueError, match=name):
        Settings.resolve(environ=env)


@pytest.mark.parametrize("kwargs, name", [({"size": "huge"}, "size"), ({"device": "gpu"}, "device"),
                                          ({"device": "cuda:x"}, "device"), ({"data": "all"}, "data")])
def test_a_bad_argument_is_named(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        Settings.resolve(environ={}, **kwargs)
    with pytest.raises(ValueError, match=f"{name}="):
        Settings(**{"size": "quick", **kwargs})


def test_settings_are_frozen():
    s = Settings("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.size = "quick"


# ---- passed down, never written ---------------------------------------------------------------------
def test_setup_returns_the_settings_and_writes_no_environment(monkeypatch):
    from moe_lite.notebook import setup

    monkeypatch.delenv("MOE_LITE_SIZE", raising=False)
    before = dict(os.environ)
    nb = setup(size="smoke", device="cpu", threads=torch.get_num_threads(), verbose=False)
    assert dict(os.environ) == before
    assert nb.size == nb.settings.size == "smoke" and nb.settings.device == "cpu" == nb.device.type
    monkeypatch.setenv("MOE_LITE_SIZE", "smoke")
    before = dict(os.environ)
    nb = setup(device="cpu", threads=torch.get_num_threads(), verbose=False)
    assert dict(os.environ) == before and nb.settings.size == "smoke"


def test_run_context_takes_the_settings(tmp_path):
    s = Settings("smoke", device="cpu", data="embedded", cache_dir=tmp_path / "runs", cache_root=tmp_path)
    ctx = RunContext.create(settings=s, progress=False)
    assert (ctx.size, ctx.device.type, ctx.data, ctx.cache_dir, ctx.cache_root) == (
        "smoke", "cpu", "embedded", tmp_path / "runs", tmp_path)
    # an argument given to create() beats the field it names
    ctx = RunContext.create("quick", cache=None, settings=s)
    assert ctx.size == "quick" and ctx.cache_dir is None and ctx.settings.size == "quick"
    assert ctx.splits()[0].source == "embedded subset"


def test_run_context_without_settings_is_its_own_edge(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LITE_CACHE", str(tmp_path))
    monkeypatch.setenv("MOE_LITE_SIZE", "smoke")
    ctx = RunContext.create(device="cpu")
    assert ctx.size == "smoke" and ctx.cache_dir == tmp_path / "runs" and ctx.cache_root == tmp_path
    assert default_size() == resolve_size(None) == "smoke"
    assert default_size(Settings("full")) == resolve_size(None, Settings("full")) == "full"


def test_data_follows_the_settings_not_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LITE_DATA", str(tmp_path / "nope"))  # ignored: only Settings.resolve reads it
    train = D.load_fashion_mnist("test", source="embedded", verbose=False)
    assert train.source == D.SOURCE_EMBEDDED
    with pytest.raises(FileNotFoundError, match="nope"):
        D.load_splits(settings=Settings.resolve(size="smoke"), verbose=False)
    embedded = Settings.resolve(size="smoke", data="embedded")
    assert D.load_splits(settings=embedded, verbose=False)[0].source == D.SOURCE_EMBEDDED
    with pytest.raises(ValueError, match="settings="):
        D.load_splits(tmp_path, settings=embedded)


def test_published_reads_the_results_folder_it_is_given(tmp_path):
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "zoo.json").write_text('{"name": "zoo"}')
    assert published("zoo", results_dir=tmp_path) == {"name": "zoo"}
    with pytest.raises(FileNotFoundError, match="dit"):
        published("dit", results_dir=tmp_path)


def test_only_settings_reads_the_environment_and_nothing_writes_it():
    """No module of the package but settings.py touches ``os.environ`` / ``os.getenv``."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "settings.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


def test_smoke_and_quick_read_the_committed_subset_unless_told_otherwise():
    """The published results, stored outputs and shipped models are on the subset: a learner with a full
    copy (Binder's Debian package, Colab's download) must get the same data at those sizes."""
    from moe_lite.settings import SIZE_DATA

    assert SIZE_DATA == {"smoke": "embedded", "quick": "embedded", "gpu": "auto", "full": "auto"}
    for size, source in [("smoke", "embedded"), ("quick", "embedded"), ("gpu", "auto"), ("full", "auto")]:
        assert Settings.resolve(size=size, environ={}).data_source == source
    # an explicit choice wins, from the argument or the variable, and a path is searched first
    assert Settings.resolve(size="quick", data="full", environ={}).data_source == "full"
    assert Settings.resolve(size="quick", environ={"MOE_LITE_DATA": "full"}).data_source == "full"
    assert Settings.resolve(size="gpu", environ={"MOE_LITE_DATA": "embedded"}).data_source == "embedded"
    s = Settings.resolve(size="quick", environ={"MOE_LITE_DATA": "/some/where"})
    assert (s.data, s.data_source, str(s.data_root)) == ("auto", "auto", "/some/where")


def test_the_data_loader_follows_the_size_default(tmp_path):
    from moe_lite import data as fm

    # a full copy is found (here: a folder named by MOE_LITE_DATA), yet quick size reads the subset
    quick = Settings.resolve(size="quick", environ={})
    train, _ = fm.load_splits(settings=quick)
    assert train.source == fm.SOURCE_EMBEDDED
