"""The experiments' checkpoint cache (``cached_fit``): only a run that finished its schedule is served;
an interrupted one resumes bit for bit, an old or unreadable file retrains, and each case says which."""
import pytest
import torch

from moe_lite.data import make_loader
from moe_lite.experiments.common import StepStats, cached_fit
from moe_lite.experiments.core import Dataset, RunContext
from moe_lite.train import ClassificationTask, TrainConfig, TrainingDiverged

from tiny_race_model import Tiny

STEPS = 12
KILLED_SAVE = """
import os, sys, torch
from moe_lite.train import atomic_save
def killed(obj, file):  # the process dies half-way through writing
    file.write(b"partial")
    os._exit(9)
torch.save = killed
atomic_save({"a": 1}, sys.argv[1])
"""


class Counting(ClassificationTask):
    """Counts training losses; NaN from the ``nan_from``-th one on (None: never)."""

    def __init__(self, nan_from=None):
        super().__init__()
        self.calls, self.nan_from = 0, nan_from

    def loss(self, model, batch):
        loss, logs = super().loss(model, batch)
        self.calls += int(model.training)
        if self.nan_from is not None and self.calls >= self.nan_from:
            loss = loss * float("nan")
        return loss, logs


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = 0.3 * torch.randn(40, 1, 8, 8, generator=g) + y[:, None, None, None].float()
    return Dataset(x, y, "synthetic")


def context(root):
    ds = data()
    return RunContext(size="smoke", seeds=[0], device=torch.device("cpu"), progress=False,
                      cache_dir=root, _splits=(ds, ds))


def run(ctx, model, task=None, callbacks=()):
    ds = data()
    train = make_loader((ds.x, ds.y), batch_size=8, shuffle=True, seed=0)  # 5 steps per epoch
    test = make_loader((ds.x, ds.y), batch_size=20, shuffle=False)
    config = TrainConfig(max_steps=STEPS, lr=1e-2, warmup_steps=2, eval_every=4, device="cpu", progress=False)
    return cached_fit("test", "tiny run", model, task or Counting(), train, test, config, ctx,
                      callbacks=list(callbacks))


def kill_a_save(path):
    """Run a save of ``path`` in a process that dies mid-write; returns the temporary file it left."""
    import subprocess
    import sys

    before = set(path.parent.iterdir())
    assert subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)]).returncode == 9
    (left,) = set(path.parent.iterdir()) - before
    return left


def interrupt_at(step):
    def callback(event, info):
        if event == "step" and info["step"] == step:
            raise KeyboardInterrupt  # what a notebook user's "stop" does
    return callback


def without_time(record):
    return {k: v for k, v in record.items() if k != "wall_time_s"}


def state(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def assert_same(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: model, history, the StepStats records."""
    stats = StepStats(every=1)
    model = Tiny(0)
    history = run(context(tmp_path_factory.mktemp("ref")), model, callbacks=[stats])
    return model, history, stats.records


def the_file(root):
    files = list(root.rglob("*.pt"))
    assert len(files) == 1, files
    return files[0]


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, capsys, reference):
    ref_model, ref_history, ref_records = reference
    ctx = context(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(ctx, Tiny(0), callbacks=[StepStats(every=1), interrupt_at(6)])  # checkpoint of step 4 on disk
    capsys.readouterr()
    stats, model, task = StepStats(every=1), Tiny(1), Counting()
    history = run(ctx, model, task, callbacks=[stats])
    out = capsys.readouterr().out
    assert f"resuming the interrupted run in {the_file(tmp_path)} from step 4 of {STEPS}" in out
    assert task.calls == STEPS - 4
    assert_same(model, ref_model)
    assert history.steps == ref_history.steps
    assert [without_time(e) for e in history.evals] == [without_time(e) for e in ref_history.evals]
    assert history.stop_reason == "completed"
    assert stats.records == ref_records  # the callback's records before the interruption are kept too


def test_a_finished_run_is_loaded_and_says_so(tmp_path, capsys, reference):
    ref_model, ref_history, ref_records = reference
    ctx = context(tmp_path)
    run(ctx, Tiny(0), callbacks=[StepStats(every=1)])
    path = the_file(tmp_path)
    stray = kill_a_save(path)
    capsys.readouterr()
    stats, model, task = StepStats(every=1), Tiny(1), Counting()
    history = run(ctx, model, task, callbacks=[stats])
    assert f"loaded the finished run ({STEPS} steps) from {path}" in capsys.readouterr().out
    assert task.calls == 0 and not stray.exists()
    assert_same(model, ref_model)
    assert history.steps == ref_history.steps and history.stop_reason == "completed"
    assert stats.records == ref_records


def test_a_cache_file_without_a_completion_record_is_retrained(tmp_path, capsys, reference):
    # a file an older moe_lite wrote: it says nothing about completion, so it is never served as done
    ref_model = reference[0]
    ctx = context(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(ctx, Tiny(0), callbacks=[interrupt_at(6)])
    path = the_file(tmp_path)
    payload = torch.load(path, weights_only=True)
    for key in ("planned_steps", "completed"):
        payload.pop(key, None)
    payload["version"] = 1
    torch.save(payload, path)
    capsys.readouterr()
    model, task = Tiny(0), Counting()  # retrained from its initial weights
    run(ctx, model, task)
    assert f"{path} has no completion record (an older moe_lite wrote it): retraining" in capsys.readouterr().out
    assert task.calls == STEPS
    assert_same(model, ref_model)


def test_an_unreadable_cache_file_is_retrained_and_named(tmp_path, capsys, reference):
    ctx = context(tmp_path)
    run(ctx, Tiny(0))
    path = the_file(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    model, task = Tiny(0), Counting()
    run(ctx, model, task)
    out = capsys.readouterr().out
    assert f"cannot use the cached checkpoint: {path} is truncated" in out and "retraining from scratch" in out
    assert task.calls == STEPS
    assert_same(model, reference[0])


def test_a_diverged_run_is_never_served_as_done(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(TrainingDiverged, match="step 7"):
        run(ctx, Tiny(0), Counting(nan_from=7))  # the step-4 checkpoint stays
    with pytest.raises(TrainingDiverged, match="step 7"):
        run(ctx, Tiny(0), Counting(nan_from=3))  # resumed from step 4, diverges again at step 4 + 3
