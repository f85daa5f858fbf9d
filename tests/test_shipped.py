"""Shipped trained models (``moe_lite/checkpoints``): found by the user cache's key after it misses,
loaded without training, never used when their stored key or training configuration does not match
(one printed line says so), and bypassed with ``shipped=False`` / ``reuse=False``."""
import dataclasses
import fnmatch
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

import moe_lite.experiments.core as core
from moe_lite.data import SOURCE_DEBIAN, SOURCE_DOWNLOAD, SOURCE_EMBEDDED, SOURCE_LOCAL, make_loader
from moe_lite.experiments.common import StepStats, cached_fit, shipped_key
from moe_lite.experiments.core import Dataset, RunContext
from moe_lite.experiments.registry import EXPERIMENTS
from moe_lite.experiments.runner import run as run_experiment
from moe_lite.experiments.ship import NOTEBOOK_RUNS, SMALL_TENSOR, ship_runs, slim
from moe_lite.settings import Settings
from moe_lite.train import ClassificationTask, TrainConfig, atomic_save, read_checkpoint

from tiny_race_model import Tiny

ROOT = Path(__file__).resolve().parents[1]


class Counting(ClassificationTask):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, model, batch):
        self.calls += int(model.training)
        return super().loss(model, batch)


def data(source="synthetic"):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    return Dataset(0.3 * torch.randn(40, 1, 8, 8, generator=g) + y[:, None, None, None].float(), y, source)


def context(cache, **kwargs):
    ds = data()
    return RunContext(size="smoke", seeds=[0], device=torch.device("cpu"), progress=False, cache_dir=cache,
                      _splits=(ds, ds), **kwargs)


def run(ctx, model, lr=1e-2, callbacks=None):
    """A 12-step cached run with a :class:`StepStats` (its state travels in the checkpoint); returns
    (history, training steps taken)."""
    callbacks = [StepStats(every=4)] if callbacks is None else callbacks
    ds = data()
    train = make_loader((ds.x, ds.y), batch_size=8, shuffle=True, seed=0)
    test = make_loader((ds.x, ds.y), batch_size=20, shuffle=False)
    config = TrainConfig(max_steps=12, lr=lr, warmup_steps=2, eval_every=4, device="cpu", progress=False)
    task = Counting()
    history = cached_fit("test", "tiny run", model, task, train, test, config, ctx, callbacks=list(callbacks))
    return history, task.calls


def outputs(model):
    model.eval()
    with torch.no_grad():
        return model(data().x)


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch):
    """The package's shipped folder, pointed at an empty temporary one."""
    folder = tmp_path / "shipped"
    monkeypatch.setattr(core, "SHIPPED_DIR", folder)
    return folder


@pytest.fixture
def trained(tmp_path):
    """A finished run in a user cache: (its context, its checkpoint file, the trained model, StepStats)."""
    ctx = context(tmp_path / "user")
    stats = StepStats(every=4)
    model = Tiny()
    run(ctx, model, callbacks=[stats])
    (path,) = ctx.checkpoints_used
    return ctx, path, model, stats


def ship_one(trained, shipped_dir, dtype=torch.float32, key=None, small=SMALL_TENSOR):
    """Write ``trained``'s checkpoint into ``shipped_dir`` as ``moe_lite.experiments.ship`` does."""
    ctx, path, _, _ = trained
    key = key or shipped_key(path, ctx)
    target = shipped_dir / shipped_key(path, ctx)
    atomic_save(slim(read_checkpoint(path), key, dtype, small), target)
    return target


def test_a_shipped_model_is_found_by_its_key_and_loads_without_training(trained, shipped_dir, tmp_path, capsys):
    ctx, path, reference, stats = trained
    target = ship_one(trained, shipped_dir)
    assert target.relative_to(shipped_dir).as_posix() == f"smoke/test/{path.name}"  # the same file name
    capsys.readouterr()

    fresh = context(tmp_path / "learner")  # a learner's empty cache
    model, loaded = Tiny(seed=1), StepStats(every=4)
    history, steps = run(fresh, model, callbacks=[loaded])
    out = capsys.readouterr().out
    assert steps == 0, "a shipped model must not be retrained"
    assert "loaded the shipped smoke-size model (12 steps) from" in out and "shipped=False" in out
    assert str(tmp_path) not in out  # the package path is shown as moe_lite/..., not the machine's
    assert torch.equal(outputs(model), outputs(reference))  # fp32: exactly the trained model
    assert history.evals == read_checkpoint(path)["history"]["evals"] and loaded.records == stats.records
    assert not (tmp_path / "learner").exists() or not list((tmp_path / "learner").rglob("*.pt"))


def test_slimming_drops_the_training_state_and_fp16_keeps_the_outputs(trained, shipped_dir, tmp_path):
    ctx, path, reference, _ = trained
    full = read_checkpoint(path)
    fp32 = read_checkpoint(ship_one(trained, shipped_dir))
    assert full["optimizer"] is not None and fp32["optimizer"] is None and fp32["rng"] is None
    assert "loader_rng" in full["extra"] and not {"loader_rng", "epoch_start_rng"} & set(fp32["extra"])
    assert fp32["config"]["checkpoint"] is None  # no path of the machine that trained it
    # the tiny model's tensors are all small: cast them all (the one-value EMA threshold too) to see
    # that fp16 weights keep the outputs
    target = ship_one(trained, shipped_dir, dtype=torch.float16, small=2)
    fp16 = read_checkpoint(target)
    assert all(v.dtype == torch.float16 for v in fp16["model"].values() if v.is_floating_point() and v.numel() >= 2)
    assert target.stat().st_size < path.stat().st_size / 2

    model = Tiny(seed=1)
    _, steps = run(context(tmp_path / "learner"), model)
    assert steps == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # loaded into the model's own dtype
    torch.testing.assert_close(outputs(model), outputs(reference), atol=2e-2, rtol=2e-2)
    assert torch.equal(outputs(model).argmax(-1), outputs(reference).argmax(-1))


def test_slimming_keeps_a_tensor_fp16_cannot_hold():
    big = torch.ones(4096)
    big[7] = 1e6  # beyond fp16's 65504
    payload = {"model": {"w": big, "n": torch.tensor([3])}, "extra": {}, "config": {}}
    out = slim(payload, "k")
    assert out["model"]["w"].dtype == torch.float32 and out["model"]["n"].dtype == torch.int64


def test_slimming_keeps_thresholds_and_routing_biases_exact():
    """A top-p LoRA expert's inference threshold of 0.2 came back as 0.199951171875 from fp16, which is
    no longer the trained setting (notebook 07's explorer refused it). Small tensors (settings the
    routers compare against: thresholds, bias-balancing biases, EMA states) stay as they were."""
    weights = torch.randn(64, 64)
    payload = {"model": {"threshold": torch.tensor(0.2, dtype=torch.float64), "bias": torch.tensor([0.1] * 8),
                         "weight": weights}, "extra": {}, "config": {}}
    out = slim(payload, "k")["model"]
    assert out["threshold"].item() == 0.2 and out["threshold"].dtype == torch.float64
    assert torch.equal(out["bias"], torch.tensor([0.1] * 8))
    assert out["weight"].dtype == torch.float16 and torch.equal(out["weight"], weights.half())


@pytest.mark.parametrize("damage", ["another key", "corrupted", "not shipped", "other config"])
def test_a_shipped_file_that_does_not_match_is_ignored_with_a_line_and_the_run_trains(
        damage, trained, shipped_dir, tmp_path, capsys):
    ctx, path, _, _ = trained
    if damage == "another key":  # e.g. copied under another run's name
        target = ship_one(trained, shipped_dir, key="smoke/test/tiny-run-0000000000000000.pt")
        reason = "it was shipped for 'smoke/test/tiny-run-0000000000000000.pt'"
    elif damage == "corrupted":
        target = ship_one(trained, shipped_dir)
        target.write_bytes(target.read_bytes()[:200])
        reason = "is truncated or not a torch checkpoint file"
    elif damage == "not shipped":  # a user checkpoint dropped in, with its optimizer state
        target = shipped_dir / shipped_key(path, ctx)
        target.parent.mkdir(parents=True)
        target.write_bytes(path.read_bytes())
        reason = "it has no shipped record"
    else:
        target = ship_one(trained, shipped_dir)
        payload = read_checkpoint(target)
        payload["config"]["lr"] = 0.5
        atomic_save(payload, target)
        reason = "its training configuration differs in lr (0.5 there, 0.01 here)"
    capsys.readouterr()
    model = Tiny(seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    _, steps = run(context(tmp_path / "learner"), model)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "shipped" in line]
    assert len(lines) == 1 and "ignoring the shipped checkpoint" in lines[0] and reason in lines[0], out
    assert "training instead" in lines[0]
    assert steps > 0 and not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert list((tmp_path / "learner").rglob("*.pt")), "the trained run is cached for next time"


@pytest.mark.parametrize("option", [{"shipped": False}, {"reuse": False}])
def test_shipped_false_or_reuse_false_retrains(option, trained, shipped_dir, tmp_path, capsys):
    ship_one(trained, shipped_dir)
    capsys.readouterr()
    _, steps = run(context(tmp_path / "learner", **option), Tiny(seed=1))
    assert steps > 0 and "shipped" not in capsys.readouterr().out


def test_create_takes_shipped():
    assert RunContext.create("smoke", cache=None).shipped is True
    assert RunContext.create("smoke", cache=None, shipped=False).shipped is False


def test_the_user_cache_comes_first_and_a_missing_shipped_folder_is_fine(trained, shipped_dir, capsys):
    ctx, path, reference, _ = trained
    assert not shipped_dir.exists()
    model = Tiny(seed=1)
    _, steps = run(context(ctx.cache_dir), model)
    assert steps == 0 and "loaded the finished run" in capsys.readouterr().out
    ship_one(trained, shipped_dir)
    _, steps = run(context(ctx.cache_dir), Tiny(seed=1))
    out = capsys.readouterr().out
    assert steps == 0 and "loaded the finished run" in out and "shipped" not in out.replace("shipped=", "")


def test_every_full_copy_of_fashion_mnist_shares_the_keys(tmp_path):
    """Binder reads Debian's package, Colab downloads and then finds its local copy: one key, so one
    shipped model serves them all; the embedded subset is other data and keys apart."""
    def key(source):
        ds = data(source)
        ctx = RunContext(size="quick", seeds=[0], device=torch.device("cpu"), cache_dir=tmp_path, _splits=(ds, ds))
        return ctx.checkpoint_path("vimoe", "dense", "config")

    assert key(SOURCE_DEBIAN) == key(SOURCE_DOWNLOAD) == key(SOURCE_LOCAL)
    assert key(SOURCE_EMBEDDED) != key(SOURCE_DEBIAN)


def test_the_package_ships_what_the_tool_writes():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moe_lite"]
    assert any(fnmatch.fnmatch("checkpoints/quick/vimoe/dense-0123456789abcdef.pt", p) for p in patterns)
    assert (ROOT / "moe_lite" / "checkpoints" / "README.md").is_file()
    assert core.SHIPPED_DIR == ROOT / "moe_lite" / "checkpoints"
    # every file shipped (if any yet) is a slimmed, keyed checkpoint at the place its key names
    for path in core.SHIPPED_DIR.rglob("*.pt"):
        payload = read_checkpoint(path)
        assert payload["extra"]["shipped"]["key"] == path.relative_to(core.SHIPPED_DIR).as_posix(), path
        assert payload["optimizer"] is None and re.fullmatch(r".+-[0-9a-f]{16}\.pt", path.name)


# ------------------------------------------------------------------------------------------------
# what ships: every model the notebooks show, and nothing else

SHIPPED_LINE = re.compile(r"\[(?P<name>[^\]\n]+)\] loaded the shipped quick-size model \(\d+ steps\) from "
                          r"(?P<path>moe_lite/checkpoints/quick/\S+?\.pt)")


def stored_text(notebook: Path) -> str:
    """Every text a notebook's stored outputs print (streams and plain-text results)."""
    texts = []
    for cell in json.loads(notebook.read_text())["cells"]:
        for out in cell.get("outputs", []):
            texts.append("".join(out.get("text", "")))
            texts.append("".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def test_the_notebooks_stored_outputs_show_the_shipped_models_and_every_shipped_file_is_shown():
    """The stored outputs are what a learner sees on opening: every trained model in them is a shipped
    one (none from the executing machine's cache, none trained), the notebooks that run experiments are
    exactly those of NOTEBOOK_RUNS, and the shipped folder holds exactly the files they name."""
    shown = set()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        text = stored_text(notebook)
        assert "loaded the finished run" not in text and "resuming the interrupted run" not in text, notebook.name
        paths = {m["path"] for m in SHIPPED_LINE.finditer(text)}
        assert bool(paths) == (notebook.stem in NOTEBOOK_RUNS), notebook.name
        experiments = {Path(p).parts[3] for p in paths}
        assert experiments == {name for name, _ in NOTEBOOK_RUNS.get(notebook.stem, [])}, notebook.name
        shown |= paths
    files = {p.relative_to(ROOT).as_posix() for p in core.SHIPPED_DIR.rglob("*.pt")}
    assert files == shown


def test_shipped_models_are_fp16_slimmed_and_a_few_mb(capsys):
    total = 0
    for path in core.SHIPPED_DIR.rglob("*.pt"):
        payload = read_checkpoint(path)
        assert payload["completed"] is True and payload["extra"]["shipped"]["dtype"] == "float16", path
        assert all(v.dtype != torch.float32 for v in payload["model"].values() if v.numel() >= SMALL_TENSOR), path
        assert not {"optimizer", "scheduler", "scaler", "rng"} & {k for k, v in payload.items() if v is not None}
        assert payload["config"]["checkpoint"] is None  # no path of the machine that trained it
        total += path.stat().st_size
    assert total < 40e6, f"{total / 1e6:.1f} MB shipped"  # a clone for Binder or Colab downloads them


def no_training(*args, **kwargs):
    raise AssertionError("a run of a notebook trained a model: its shipped checkpoint is missing or stale "
                         "(python -m moe_lite.experiments.ship --notebooks)")


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_RUNS))
def test_each_notebooks_runs_load_the_shipped_models_without_training(notebook, tmp_path, monkeypatch, capsys):
    """A learner's first quick-size run on a CPU: an empty cache, the embedded subset. The current
    code must find a shipped model under every key it computes (a changed config changes the key)."""
    monkeypatch.setattr("moe_lite.experiments.common.fit", no_training)
    settings = Settings.resolve(size="quick", device="cpu", environ={"MOE_LITE_CACHE": str(tmp_path),
                                                                    "MOE_LITE_OFFLINE": "1"})
    ctx = RunContext.create(settings=settings, progress=False)
    for name, variants in NOTEBOOK_RUNS[notebook]:
        run_experiment(EXPERIMENTS[name], ctx, variants=variants)
    out = capsys.readouterr().out
    assert ctx.checkpoints_used and len(ctx.checkpoints_loaded) == len(ctx.checkpoints_used)
    assert all(core.SHIPPED_DIR in p.parents for p in ctx.checkpoints_loaded)
    assert len(SHIPPED_LINE.findall(out)) == len(ctx.checkpoints_used), out
    assert not list((tmp_path / "runs").rglob("*.pt")), "nothing was written to the learner's cache"


def test_run_takes_shipped_false_and_leaves_the_callers_context_as_it_was(trained, shipped_dir, tmp_path,
                                                                         monkeypatch):
    """``run_vimoe(..., shipped=False)`` is the one argument that retrains a shipped model."""
    seen = []
    experiment = EXPERIMENTS["zoo"]
    fake = dataclasses.replace(experiment, train=lambda name, variant, seed, run: seen.append(run.ctx.shipped) or {},
                               summarise=lambda records, run: None, prepare=None, pairing=None,
                               data_source="none")
    ctx = context(tmp_path / "user")
    run_experiment(fake, ctx, variants=["top-2"], shipped=False)
    run_experiment(fake, ctx, variants=["top-2"])
    assert seen == [False, True] and ctx.shipped is True


@pytest.mark.parametrize("module, function", [("adapt", "run_adapt"), ("diffusion", "run_dit"), ("diffusion", "run_race"),
                                              ("dynamic", "run_dynamic"), ("sequence", "run_sequence"),
                                              ("vimoe", "run_vimoe"), ("vimoe", "run_vimoe_grid"), ("zoo", "run_zoo"),
                                              ("zoo", "run_balance")])
def test_every_run_function_passes_shipped_on(module, function, monkeypatch):
    mod = importlib.import_module(f"moe_lite.experiments.{module}")
    calls = []
    monkeypatch.setattr(mod, "run", lambda *args, **kwargs: calls.append(kwargs))
    getattr(mod, function)("smoke")
    getattr(mod, function)("smoke", shipped=False)
    assert [c["shipped"] for c in calls] == [True, False]


def test_shipping_the_notebooks_prunes_files_no_run_wrote(trained, tmp_path, monkeypatch, capsys):
    """``ship --notebooks`` ships everything at its size: a file left from a key that changed goes."""
    ctx, path, _, _ = trained
    monkeypatch.setattr("moe_lite.experiments.ship.run", lambda experiment, run_ctx, variants=None:
                        run_ctx.checkpoints_used.append(path))
    dest = tmp_path / "dest"
    stale = dest / "smoke" / "test" / "tiny-run-0000000000000000.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    other_size = dest / "quick" / "test" / "kept-0000000000000000.pt"
    other_size.parent.mkdir(parents=True)
    other_size.write_bytes(b"another size")
    written = ship_runs([("zoo", None)], size="smoke", cache=ctx.cache_dir, dest=dest, prune=True)
    assert [target for target, _ in written] == [dest / "smoke" / "test" / path.name]
    assert not stale.exists() and other_size.exists() and (dest / "smoke" / "test" / path.name).is_file()
    assert "removed" in capsys.readouterr().out
    stale.write_bytes(b"old")
    ship_runs([("zoo", None)], size="smoke", cache=ctx.cache_dir, dest=dest)  # no prune: left alone
    assert stale.exists()
