"""The trainer: schedule, aux-loss logging, routing statistics, checkpoints, exact resume, divergence.

Models here are tiny: a patch embedding, a Race MoE layer and a BiasBalanced MoE layer and a head,
on 8x8 synthetic images, so each test trains in well under a second.
"""
import json
import math
import os
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moe_lite.layers import MoE, MoELayer, moe_layers
from moe_lite.routers import BiasBalanced, Race, TopK
from moe_lite.train import (
    ClassificationTask,
    History,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    fit,
    load_checkpoint,
    lr_factor,
    pick_device,
    save_checkpoint,
    seed_everything,
)

NUM_CLASSES = 4




class TinyMoEClassifier(nn.Module):
    """8x8 image -> 4 patch tokens of 16 pixels -> width 16 -> two MoE layers -> concat -> logits.

    Router state that checkpoints must carry: Race's EMA ``threshold`` (+ ``initialized``),
    BiasBalanced's ``bias`` and ``load``, and a non-persistent buffer counting training forwards.
    """

    def __init__(self, dim=16, dropout=0.1):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.race = MoE(dim, 16, 4, Race(k=1), losses={"load_balance": 0.01})
        self.balanced = MoE(dim, 16, 4, BiasBalanced(4, 1, update_rate=0.01))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4 * dim, NUM_CLASSES)
        self.register_buffer("forwards", torch.zeros(()), persistent=False)

    def forward(self, x):
        if self.training:
            self.forwards += 1
        b = x.shape[0]
        patches = x.reshape(b, 1, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, 4, 16)
        h = self.embed(patches)
        h = h + self.race(h)
        h = h + self.balanced(h)
        return self.head(self.drop(h.flatten(1)))


def synthetic(n=192, seed=0):
    """Separable 4-class 8x8 images: a bright quadrant per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(NUM_CLASSES):
        r, col = divmod(c, 2)
        x[y == c, :, 4 * r: 4 * r + 4, 4 * col: 4 * col + 4] += 1.0
    return x, y


def loaders(batch_size=32, shuffle=True):
    x, y = synthetic()
    gen = torch.Generator().manual_seed(0) if shuffle else None
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)
    xe, ye = synthetic(64, seed=1)
    return train, DataLoader(TensorDataset(xe, ye), batch_size=32)


def config(**changes):
    base = dict(epochs=2, lr=1e-2, warmup_steps=2, device="cpu", progress=False, seed=0)
    return TrainConfig(**{**base, **changes})


def model_state(model):
    """Every parameter and buffer, persistent or not."""
    return {**dict(model.named_parameters()), **{f"buffer:{k}": v for k, v in model.named_buffers()}}


def assert_same_state(a, b):
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def new_model(seed):
    torch.manual_seed(seed)
    return TinyMoEClassifier()


# ---- small pieces -------------------------------------------------------------------------------
def test_pick_device_auto_and_explicit():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert pick_device().type == "cuda"
    else:
        assert pick_device().type in ("mps", "cpu")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pick_device("cuda")


def test_lr_factor_warmup_then_cosine_to_min():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)
    assert TrainConfig(epochs=3).total_steps(10) == 30 and TrainConfig(max_steps=7).total_steps(10) == 7


@pytest.mark.parametrize("field, value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0), ("lr", "1e-3"), ("lr", True),
    ("max_steps", 2.5), ("max_steps", 3.0), ("max_steps", 0), ("max_steps", True),
    ("epochs", 1.5), ("epochs", 0), ("epochs", "2"),
    ("weight_decay", float("inf")), ("weight_decay", float("nan")), ("weight_decay", -0.1),
    ("warmup_fraction", float("nan")), ("warmup_fraction", 1.0), ("warmup_steps", 2.5), ("warmup_steps", -1),
    ("min_lr_ratio", float("nan")), ("grad_clip", float("inf")), ("grad_clip", float("nan")), ("grad_clip", 0),
    ("batch_size", 0.5), ("batch_size", 0), ("amp", None), ("seed", 1.5), ("seed", "0"), ("seed", None),
    ("device", 3), ("eval_every", 2.0), ("eval_every", 0), ("checkpoint", 5), ("progress", "yes"),
    ("time_budget_s", float("inf")), ("time_budget_s", float("nan")), ("time_budget_s", 0),
    ("log_routing", 1), ("sync_every", 1.5), ("sync_every", 0),
])
def test_config_rejects_each_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig: {field} must be .*got {re.escape(repr(value))}"):
        TrainConfig(**{field: value})


def test_config_accepts_numpy_numbers_as_plain_python_values(tmp_path):
    import numpy as np

    cfg = TrainConfig(max_steps=np.int64(3), lr=np.float32(0.5), seed=np.int64(7), batch_size=np.int32(4))
    assert (cfg.max_steps, cfg.lr, cfg.seed, cfg.batch_size) == (3, 0.5, 7, 4)
    assert all(type(v) in (int, float) for v in (cfg.max_steps, cfg.lr, cfg.seed, cfg.batch_size))
    # plain values are what safe (weights_only) loading of a checkpoint's config accepts
    path = save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), config=cfg)
    assert load_checkpoint(path, nn.Linear(2, 2))["config"]["max_steps"] == 3
    assert TrainConfig(epochs=0, max_steps=5).total_steps(10) == 5  # epochs is ignored with max_steps


def test_classification_task_loss_and_evaluate():
    class Fixed(nn.Module):  # predicts class 0 for every input
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.tensor([5.0, 0.0, 0.0]).expand(x.shape[0], 3) + self.w

    y = torch.tensor([0, 0, 1, 2])
    task = ClassificationTask(per_class=True)
    loss, logs = task.loss(Fixed(), (torch.zeros(4, 1), y))
    assert loss.requires_grad and float(logs["acc"]) == 0.5
    metrics = task.evaluate(Fixed(), [(torch.zeros(2, 1), y[:2]), (torch.zeros(2, 1), y[2:])])
    assert metrics["accuracy"] == 0.5
    assert (metrics["accuracy/0"], metrics["accuracy/1"], metrics["accuracy/2"]) == (1.0, 0.0, 0.0)
    expected = torch.nn.functional.cross_entropy(Fixed()(torch.zeros(4, 1)), y)
    assert metrics["loss"] == pytest.approx(expected.item())
    with pytest.raises(TypeError, match="(images, labels)"):
        task.loss(Fixed(), torch.zeros(4, 1))


# ---- fit -----------------------------------------------------------------------------------------
def test_fit_learns_and_logs_aux_losses_and_routing():
    model = new_model(0)
    train, test = loaders()
    history = fit(model, ClassificationTask(), train, test, config(epochs=3))
    assert len(history.steps) == 3 * len(train) and len(history.evals) == 3
    assert history.stop_reason == "completed" and history.wall_time_s > 0
    step = history.steps[-1]
    for key in ("loss", "task_loss", "aux_loss", "aux/race/load_balance", "lr", "grad_norm", "acc", "epoch"):
        assert isinstance(step[key], (int, float)), key
    # the aux loss is always in the optimised loss: total = task + weight * unweighted part
    for s in history.steps:
        assert s["loss"] == pytest.approx(s["task_loss"] + 0.01 * s["aux/race/load_balance"], rel=1e-5)
        assert s["aux_loss"] == pytest.approx(0.01 * s["aux/race/load_balance"], rel=1e-5)
    final = history.final()
    assert final["accuracy"] > 0.9 and final["step"] == 3 * len(train)
    assert set(final["routing"]) == {"race", "balanced"}
    assert {"load_cv", "experts_per_token", "dropped_fraction"} <= set(final["routing"]["race"])
    assert history.best("accuracy", "max")["accuracy"] >= final["accuracy"] - 1e-12
    # update_biases ran after every optimizer step (it also empties the load counter)
    assert model.balanced.router.bias.abs().sum() > 0 and model.balanced.router.load.sum() == 0


def test_fit_without_moe_layers_and_max_steps_cycle_the_loader():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, NUM_CLASSES))
    train, test = loaders()
    history = fit(model, ClassificationTask(), train, test, config(max_steps=len(train) + 3, eval_every=5))
    assert [e["step"] for e in history.evals] == [5, len(train) + 3]
    assert history.steps[-1]["aux_loss"] == 0.0 and "routing" not in history.final()
    assert history.steps[-1]["epoch"] == 1


def test_history_json_round_trip(tmp_path):
    train, test = loaders()
    history = fit(new_model(0), ClassificationTask(), train, test, config(max_steps=3))
    text = history.to_json(tmp_path / "h.json")
    again = History.from_json(tmp_path / "h.json")
    assert again == History.from_json(text) and json.loads(text)["steps"][0]["step"] == 1
    assert again.series("task_loss")[0] == [1, 2, 3]


def test_time_budget_and_callback_stop_cleanly(tmp_path):
    train, test = loaders()
    h = fit(new_model(0), ClassificationTask(), train, test, config(epochs=50, time_budget_s=1e-6))
    assert h.stop_reason == "time_budget" and len(h.steps) == 1 and h.final()["step"] == 1
    events = []

    def stop_at_2(event, info):
        events.append(event)
        return event == "step" and info["step"] == 2

    h = fit(new_model(0), ClassificationTask(), train, test, config(checkpoint=tmp_path / "c.pt"), [stop_at_2])
    assert h.stop_reason == "callback" and len(h.steps) == 2 and h.final()["step"] == 2
    assert events[-2:] == ["eval", "end"]
    assert load_checkpoint(tmp_path / "c.pt", new_model(1))["step"] == 2


def test_progress_false_is_silent(capsys):
    train, test = loaders()
    fit(new_model(0), ClassificationTask(), train, test, config(max_steps=2))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_evaluate_leaves_training_randomness_and_mode_alone():
    model = new_model(0)
    _, test = loaders()
    model(synthetic(8)[0])  # Race's eval threshold needs one training batch
    state = torch.get_rng_state()
    first = evaluate(model, ClassificationTask(), test)
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert evaluate(model, ClassificationTask(), test) == first and "race" in first["routing"]


# ---- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_bit_for_bit(tmp_path):
    model = new_model(0)
    train, test = loaders()
    cfg = config(max_steps=5)
    fit(model, ClassificationTask(), train, test, cfg)
    assert model.race.router.threshold != 0 and model.balanced.router.bias.abs().sum() > 0
    assert model.forwards == 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, step=5, config=cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind

    other = new_model(1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    payload = load_checkpoint(path, other, other_opt)
    assert payload["step"] == 5 and payload["config"]["max_steps"] == 5
    assert_same_state(model, other)
    for sa, sb in zip(optimizer.state.values(), other_opt.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    model.eval(), other.eval()
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(model(x), other(x))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = new_model(0)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, step=1)
    before = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new_model(1), step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_load_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a moe_lite checkpoint"):
        load_checkpoint(tmp_path / "x.pt", new_model(0))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", new_model(0))


def _checkpoint_bytes(tmp_path):
    return save_checkpoint(tmp_path / "good.pt", new_model(0), step=1).read_bytes()


@pytest.mark.parametrize("kind, expected", [
    ("empty", "is empty"), ("truncated", "truncated or not a torch checkpoint"),
    ("text", "truncated or not a torch checkpoint"), ("json", "refuses"), ("list", "not a moe_lite checkpoint"),
])
def test_bad_checkpoint_files_name_the_path_and_the_problem(tmp_path, kind, expected):
    import moe_lite.train as train_mod

    good = _checkpoint_bytes(tmp_path)
    path = tmp_path / f"{kind}.pt"
    if kind == "list":
        torch.save([1, 2], path)
    else:
        path.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "text": b"hello world\n",
                          "json": b"".join([b"\x80\x02c", b"os\nsystem\n", b"q\x00."])}[kind])
    for load in (lambda: load_checkpoint(path, new_model(0)),
                 lambda: fit(new_model(0), ClassificationTask(), *loaders(), config(max_steps=2), resume=path)):
        with pytest.raises(train_mod.CheckpointError) as info:
            load()
        assert str(path) in str(info.value) and expected in str(info.value)
        assert isinstance(info.value, ValueError)


def test_checkpoint_of_another_architecture_is_named_and_leaves_the_model_alone(tmp_path):
    import moe_lite.train as train_mod

    path = save_checkpoint(tmp_path / "small.pt", nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), step=1)
    other = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 3))  # same keys, one shape differs
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(train_mod.CheckpointError, match=r"small\.pt.*does not fit.*1\.weight.*\[2, 2\].*\[3, 2\]"):
        load_checkpoint(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing half-loaded
    with pytest.raises(train_mod.CheckpointError, match=r"small\.pt.*does not fit.*missing.*2\.weight"):
        load_checkpoint(path, nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(train_mod.CheckpointError, match=r"small\.pt.*does not fit.*unexpected.*1\.weight"):
        load_checkpoint(path, nn.Sequential(nn.Linear(3, 2)))
    # non-strict loading still skips missing / unexpected keys
    assert load_checkpoint(path, nn.Sequential(nn.Linear(3, 2)), strict=False)["step"] == 1


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


KILLED_SAVE = """
import os, sys, torch
from moe_lite.train import atomic_save
def killed(obj, file):  # the process dies half-way through writing
    file.write(b"partial")
    file.flush()
    os._exit(9)
torch.save = killed
atomic_save({"a": 1}, sys.argv[1])
"""


def kill_a_save(path):
    """Run a save of ``path`` in a process that dies mid-write; returns the temporary file it left."""
    import subprocess
    import sys

    before = set(path.parent.iterdir()) if path.parent.exists() else set()
    assert subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)]).returncode == 9
    (left,) = set(path.parent.iterdir()) - before
    return left


def test_saving_removes_temporary_files_of_killed_saves(tmp_path):
    from moe_lite.train import atomic_save

    stray = kill_a_save(tmp_path / "c.pt")
    assert stray.name.startswith(".c.pt.") and stray.name.endswith(".tmp")
    other = tmp_path / (".d.pt." + stray.name[len(".c.pt."):])  # another checkpoint's: left to its saves
    old = tmp_path / ".c.pt.x1y2z3.tmp"  # an unknown writer's, untouched for two days
    live = tmp_path / stray.name.replace(stray.name.split("-")[-1].split(".")[0], str(os.getppid()))
    for p in (old, live, other):
        p.write_bytes(b"partial")
    os.utime(old, (0, 0))
    assert live != stray  # a save in flight in a live process (pytest's parent): left alone
    atomic_save({"a": 1}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.pt", live.name, other.name])


@pytest.mark.parametrize("stop_step", [4, 6])  # mid-epoch and at an epoch boundary (6 steps/epoch)
def test_resume_reproduces_uninterrupted_training(tmp_path, stop_step):
    train, test = loaders()
    assert len(train) == 6
    cfg = config(epochs=2, eval_every=3)
    reference = new_model(0)
    full = fit(reference, ClassificationTask(), train, test, cfg)

    path = tmp_path / "ckpt.pt"
    stop = lambda event, info: event == "step" and info["step"] == stop_step  # noqa: E731
    train1, test1 = loaders()  # a loader's generator advances with use: each run gets a fresh one
    fit(new_model(0), ClassificationTask(), train1, test1, config(epochs=2, eval_every=3, checkpoint=path), [stop])

    seed_everything(123)  # resuming must not depend on the state of the session
    resumed_model = new_model(7)
    train2, test2 = loaders()
    resumed = fit(resumed_model, ClassificationTask(), train2, test2,
                  config(epochs=2, eval_every=3, checkpoint=path), resume=True)

    assert_same_state(reference, resumed_model)
    assert resumed.steps == full.steps  # every logged step, before and after the interruption
    assert resumed.evals[-1]["accuracy"] == full.evals[-1]["accuracy"]


# ---- divergence ----------------------------------------------------------------------------------
class NaNAfter(ClassificationTask):
    """Classification whose loss becomes NaN from training step ``at`` on."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def loss(self, model, batch):
        loss, logs = super().loss(model, batch)
        self.calls += int(model.training)  # evaluation runs task.loss too (for routing statistics)
        return (loss * float("nan") if self.calls >= self.at else loss), logs


def test_divergence_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    train, test = loaders()
    path = tmp_path / "ckpt.pt"
    model = new_model(0)
    with pytest.raises(TrainingDiverged, match=r"step 8: task_loss is nan") as info:
        fit(model, NaNAfter(at=8), train, test, config(eval_every=3, checkpoint=path))
    err = info.value
    assert err.step == 8 and err.part == "task_loss" and err.checkpoint_step == 6
    assert "last good checkpoint (step 6) is intact" in str(err)
    assert [s["step"] for s in err.history.steps] == list(range(1, 8))
    # the diverged step was never applied, and the checkpoint is the step-6 state
    assert all(torch.isfinite(p).all() for p in model.parameters())
    restored = new_model(1)
    assert load_checkpoint(path, restored)["step"] == 6
    assert all(torch.isfinite(v).all() for v in model_state(restored).values())


class ExplodingAux(MoELayer):
    """A layer whose unweighted aux loss is inf (the trainer must name it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        self.aux_losses = {"boom": torch.tensor(float("inf"))}
        self.aux_loss = torch.zeros(())
        return self.lin(x.flatten(1))


def test_divergence_names_the_aux_part():
    train, test = loaders()
    model = nn.Sequential(ExplodingAux())
    assert moe_layers(model)
    with pytest.raises(TrainingDiverged, match=r"step 1: aux/0/boom is inf") as info:
        fit(model, ClassificationTask(), train, test, config())
    assert "No checkpoint was configured" in str(info.value)


class NaNEval(ClassificationTask):
    def evaluate(self, model, batches):
        return {**super().evaluate(model, batches), "loss": float("nan")}


def test_non_finite_evaluation_is_divergence_and_is_not_checkpointed(tmp_path):
    train, test = loaders()
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingDiverged, match=r"step 3: eval loss is nan.*not checkpointed") as info:
        fit(new_model(0), NaNEval(), train, test, config(eval_every=3, checkpoint=path))
    assert info.value.checkpoint is None and not path.exists()
    assert "No checkpoint had been written" in str(info.value)


class Routed(nn.Module):
    """8x8 image -> 4 patch tokens -> one MoE layer with the given router -> logits."""

    def __init__(self, router):
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.moe = MoE(16, 16, 4, router)
        self.head = nn.Linear(4 * 16, NUM_CLASSES)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], 1, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], 4, 16))
        return self.head((h + self.moe(h)).flatten(1))


def routed(name):
    torch.manual_seed(0)
    return Routed(Race(k=1) if name == "race" else TopK(2))


def poison_at(event_name, step):
    """A callback that makes one weight of the embedding infinite at ``event_name`` of ``step``."""
    def callback(event, info):
        if event == event_name and info["step"] == step:
            with torch.no_grad():
                info["model"].embed.weight[0, 0] = float("inf")
    return callback


@pytest.mark.parametrize("router", ["race", "topk"])
def test_non_finite_weights_inside_the_forward_are_divergence(tmp_path, router):
    # the router sees non-finite logits and raises NonFiniteError: the trainer reports the step and the
    # broken parameter, keeps the step-2 checkpoint, and advises
    path = tmp_path / "ckpt.pt"
    model = routed(router)
    with pytest.raises(TrainingDiverged, match=r"step 3: .*non-finite.*embed\.weight.*lower lr") as info:
        fit(model, ClassificationTask(), *loaders(), config(eval_every=2, checkpoint=path), [poison_at("eval", 2)])
    err = info.value
    assert err.step == 3 and err.checkpoint_step == 2 and "embed.weight" in err.part
    assert "last good checkpoint (step 2) is intact" in str(err)
    assert [s["step"] for s in err.history.steps] == [1, 2]
    restored = routed(router)
    assert load_checkpoint(path, restored)["step"] == 2
    assert all(torch.isfinite(p).all() for p in restored.parameters())


@pytest.mark.parametrize("router", ["race", "topk"])
def test_a_huge_lr_is_divergence_for_every_router(router):
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+") as info:
        fit(routed(router), ClassificationTask(), *loaders(), config(lr=1e30, warmup_steps=0))
    assert info.value.step >= 2 and "lower lr" in str(info.value)


def test_non_finite_forward_in_the_evaluation_is_divergence_and_is_not_checkpointed(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingDiverged, match=r"step 2: .*embed\.weight.*not checkpointed") as info:
        fit(routed("race"), ClassificationTask(), *loaders(), config(eval_every=2, checkpoint=path),
            [poison_at("step", 2)])
    assert info.value.checkpoint is None and not path.exists()


def test_resume_warns_when_the_schedule_changes(tmp_path):
    train, test = loaders()
    path = tmp_path / "ckpt.pt"
    fit(new_model(0), ClassificationTask(), train, test, config(max_steps=2, checkpoint=path))
    with pytest.warns(UserWarning, match=r"max_steps: 2 -> 4"):
        history = fit(new_model(0), ClassificationTask(), train, test, config(max_steps=4, checkpoint=path),
                      resume=path)
    assert [s["step"] for s in history.steps] == [1, 2, 3, 4]


def test_deferred_checks_still_protect_the_checkpoint(tmp_path):
    # sync_every > 1 is the GPU default: divergence is found at the next flush, at the latest at the
    # evaluation, which must not checkpoint the poisoned model
    train, test = loaders()
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingDiverged, match=r"step 6: task_loss is nan.*checked every 4 steps") as info:
        fit(new_model(0), NaNAfter(at=6), train, test, config(eval_every=3, sync_every=4, checkpoint=path))
    assert info.value.checkpoint_step == 3 and load_checkpoint(path, new_model(1))["step"] == 3


def test_time_budget_shrinks_the_plan_so_the_cosine_completes(monkeypatch):
    """A run that cannot afford its planned steps ends its cosine inside the budget (low final lr)."""
    import moe_lite.train.loop as loop_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: clock["t"])

    class Tick(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            clock["t"] += 1.0  # every forward costs one "second"
            return x @ self.w[:, None].expand(3, 2)

    x, y = torch.randn(400, 3), torch.randint(0, 2, (400,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    config = TrainConfig(epochs=2, lr=1e-2, time_budget_s=100.0, progress=False, log_routing=False,
                         min_lr_ratio=0.0)
    history = fit(Tick(), ClassificationTask(), loader, None, config)
    # 200 planned steps at ~1 s each cannot fit in 100 s: the plan shrinks to ~90 steps
    assert history.planned_steps is not None and 80 <= history.planned_steps <= 92
    assert history.steps[-1]["step"] == history.planned_steps
    assert history.steps[-1]["lr"] < 0.05 * 1e-2  # the cosine reached its end
    assert history.stop_reason == "completed"


def test_a_resumed_run_keeps_the_plan_its_budget_shrank(monkeypatch, tmp_path):
    import moe_lite.train.loop as loop_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: clock["t"])

    class Tick(torch.nn.Linear):
        def forward(self, x):
            clock["t"] += 1.0  # every forward costs one "second"
            return super().forward(x)

    x, y = torch.randn(400, 3), torch.randint(0, 2, (400,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    cfg = TrainConfig(epochs=2, lr=1e-2, time_budget_s=100.0, progress=False, log_routing=False,
                      checkpoint=tmp_path / "c.pt")
    stop = lambda event, info: event == "step" and info["step"] == 85  # noqa: E731
    first = fit(Tick(3, 2), ClassificationTask(), loader, None, cfg, [stop])
    planned = first.planned_steps
    assert planned is not None and 85 < planned < 200 and first.stop_reason == "callback"
    resumed = fit(Tick(3, 2), ClassificationTask(), loader, None, cfg, resume=True)
    # the resumed run ends where the shrunk cosine ends, not past it at the minimum lr
    assert resumed.steps[-1]["step"] == planned and resumed.stop_reason == "completed"
    assert load_checkpoint(tmp_path / "c.pt", Tick(3, 2))["completed"] is True


def test_without_a_budget_the_plan_is_kept():
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    history = fit(torch.nn.Linear(3, 2), ClassificationTask(), loader, None,
                  TrainConfig(epochs=2, progress=False, log_routing=False))
    assert history.planned_steps is None and history.steps[-1]["step"] == 20


def test_the_package_exports_its_api_from_the_files_that_define_it():
    """``moe_lite.train`` re-exports the trainer's public names; each is defined in one submodule
    (config, tasks, loop, evaluation, checkpoint, history, divergence, device, rng)."""
    import moe_lite.train as train_mod
    from moe_lite.train.tasks import DiffusionTask

    assert train_mod.DiffusionTask is DiffusionTask
    for name in train_mod.__all__:
        obj = getattr(train_mod, name)
        assert obj.__module__.startswith("moe_lite.train."), (name, obj.__module__)
    assert train_mod.CHECKPOINT_FORMAT == "moe_lite.checkpoint" and train_mod.CHECKPOINT_VERSION == 2
