"""The trainer: schedule, aux-loss logging, routing statistics, checkpoints, exact resume, divergence.

Models here are tiny: a patch embedding, a Race MoE layer and a BiasBalanced MoE layer and a head,
on 8x8 synthetic images, so each test trains in well under a second.
"""
import json
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moe_lite.layers import MoE, MoELayer, moe_layers
from moe_lite.routers import BiasBalanced, Race
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
    import moe_lite.train as train_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: clock["t"])

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


def test_without_a_budget_the_plan_is_kept():
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    history = fit(torch.nn.Linear(3, 2), ClassificationTask(), loader, None,
                  TrainConfig(epochs=2, progress=False, log_routing=False))
    assert history.planned_steps is None and history.steps[-1]["step"] == 20
