"""DiT / DiT-MoE and the rectified-flow process (moe_lite.models.dit, moe_lite.models.diffusion)."""
from __future__ import annotations

import io

import pytest
import torch

from moe_lite.inspect import inference_threshold, record_routing, timestep_label
from moe_lite.layers import LinearGate, MLPGate, aux_loss, aux_losses, moe_layers, target_predictions
from moe_lite.losses import per_layer_regression
from moe_lite.models import diffusion as D
from moe_lite.routers import Race
from moe_lite.train import DiffusionTask
from moe_lite.models.dit import (
    MOE_ROUTINGS,
    DiT,
    DiTConfig,
    race_thresholds,
    sample,
    track_experts,
    training_loss,
)

RACE_FAMILY = ["race", "bl", "be", "le"]




def tiny(moe_routing: str = "none", **kw) -> DiTConfig:
    """A 2-block, width-32 DiT with 49 tokens (patch 4): a forward costs about a millisecond."""
    base = dict(dim=32, depth=2, heads=2, mlp_hidden=64, num_experts=4, k=2, moe_routing=moe_routing)
    base.update(kw)
    return DiTConfig(**base)


def make(config: DiTConfig, seed: int = 0, randomize: bool = True) -> DiT:
    """A DiT whose zero-initialised modulation / output layers get small random values, so that
    outputs are not trivially zero."""
    torch.manual_seed(seed)
    model = DiT(config)
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modulation" in name or name.startswith("final."):
                    p.normal_(0.0, 0.1)
    return model


def batch(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)


def warm_up(model: DiT, steps: int = 2) -> None:
    """A few training forwards, so Race's EMA thresholds hold trained values."""
    x0, y = batch(8, seed=1)
    with torch.no_grad():
        for i in range(steps):
            training_loss(model, x0, y, generator=torch.Generator().manual_seed(i))


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        dict(patch_size=5),  # 28 not divisible
        dict(dim=30, heads=4),  # dim % heads
        dict(dim=18, heads=3),  # dim % 4 (sin-cos positions)
        dict(moe_routing="switch"),
        dict(moe_routing="race", gating="relu"),
        dict(moe_routing="race", k=0),
        dict(moe_routing="race", k=5, num_experts=4),
        dict(moe_routing="token_choice", k=1.5),
        dict(moe_routing="race", ema_decay=1.0),
        dict(per_layer_reg=True),  # dense: PLR needs an MoE
        dict(router_similarity=1e-3),
        dict(moe_routing="race", balance_weight=-1.0),
        dict(class_dropout=1.0),
        dict(depth=0),
    ],
)
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        tiny(**{**dict(moe_routing="none"), **bad})


def test_config_defaults_and_expert_width():
    c = DiTConfig()
    assert (c.num_tokens, c.target_dim, c.is_moe) == (49, 16, False)
    moe = DiTConfig(moe_routing="race", num_experts=8, k=2)
    assert moe.hidden_per_expert == c.mlp_hidden // 2  # active FLOPs equal the dense MLP
    assert DiTConfig(moe_routing="race", expert_hidden=50).hidden_per_expert == 50
    assert DiTConfig(moe_routing="race", router_similarity=1e-2).moe_losses == {"router_similarity": 1e-2}


# ---- shapes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", MOE_ROUTINGS)
def test_forward_shapes_every_routing(routing):
    model = make(tiny(routing))
    x, y = batch(3)
    t = torch.rand(3)
    for mode in (True, False):
        model.train(mode)
        out = model(x, t, y)
        assert out.shape == x.shape and torch.isfinite(out).all()
    null = torch.full((3,), 10)
    assert model(x, t, null).shape == x.shape
    if routing != "none":
        assert len(moe_layers(model)) == 2


def test_moe_options_reach_the_layers():
    model = make(tiny("race", per_layer_reg=True, router_similarity=1e-2, balance_weight=1e-3, k=1.5))
    layers = moe_layers(model)
    assert all(isinstance(layer.gate, MLPGate) and layer.gate.target_head is not None for _, layer in layers)
    assert all(layer.hidden == round(64 / 1.5) and isinstance(layer.router, Race) for _, layer in layers)
    assert all(layer.router.k == 1.5 and layer.router.candidates == "BLE" for _, layer in layers)
    x, y = batch(2)
    model(x, torch.rand(2), y)
    assert sorted(aux_losses(model)) == sorted(
        f"{name}/{loss}" for name, _ in layers for loss in ("router_similarity", "load_balance")
    )
    assert aux_loss(model).requires_grad
    plain = make(tiny("token_choice", mlp_router=True, gating="softmax"))
    gate = moe_layers(plain)[0][1].gate
    assert isinstance(gate, MLPGate) and gate.target_head is None
    assert isinstance(moe_layers(make(tiny("expert_choice")))[0][1].gate, LinearGate)


def test_forward_rejects_bad_inputs():
    model = make(tiny())
    x, y = batch(2)
    with pytest.raises(ValueError):
        model(x, torch.rand(3), y)
    with pytest.raises(ValueError):
        model(x, torch.rand(2), y.float())
    with pytest.raises(ValueError):
        model(x[:, :, :20], torch.rand(2), y)


# ---- adaLN-Zero ---------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["none", "race"])
def test_adaln_zero_blocks_are_identities_at_init(routing):
    model = make(tiny(routing, per_layer_reg=routing != "none"), randomize=False)
    seen = []

    def hook(block, inputs, output):
        seen.append(torch.equal(inputs[0], output))

    for block in model.blocks:
        block.register_forward_hook(hook)
    x, y = batch(2)
    out = model(x, torch.rand(2), y)
    assert seen == [True] * len(model.blocks)
    assert torch.count_nonzero(out) == 0


# ---- the flow ---------------------------------------------------------------------------------------
def test_flow_math_on_hand_made_tensors():
    x0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([0.25, 1.0])
    assert torch.allclose(D.interpolate(x0, noise, t), torch.tensor([[0.75, 1.5], [1.0, 1.0]]))
    assert torch.equal(D.interpolate(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(D.velocity_target(x0, noise), torch.tensor([[-1.0, -2.0], [-2.0, 2.0]]))
    # the path moves with velocity v: x_t - x_s = (t - s) * v
    s = torch.tensor([0.1, 0.5])
    diff = D.interpolate(x0, noise, t) - D.interpolate(x0, noise, s)
    assert torch.allclose(diff, (t - s)[:, None] * D.velocity_target(x0, noise))


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 1 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    tokens = D.patchify(x, 4)
    assert tokens.shape == (2, 49, 16)
    assert torch.equal(tokens[0, 1, :4], x[0, 0, 0, 4:8])  # token 1 = second patch of the first row
    assert torch.equal(D.unpatchify(tokens, 4, 1, 28, 28), x)


def test_timesteps_and_label_dropout():
    g = torch.Generator().manual_seed(0)
    for dist in D.T_DISTRIBUTIONS:
        t = D.sample_timesteps(1000, dist, generator=g)
        assert t.shape == (1000,) and (t > 0).all() and (t < 1).all()
    with pytest.raises(ValueError):
        D.sample_timesteps(4, "cosine")
    y = torch.zeros(1000, dtype=torch.long)
    dropped = D.drop_labels(y, 0.3, 10, generator=g)
    assert set(dropped.unique().tolist()) == {0, 10}
    assert 0.2 < (dropped == 10).float().mean() < 0.4
    assert torch.equal(D.drop_labels(y, 0.0, 10), y)


# ---- training ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["none", "race"])
def test_adamw_steps_lower_the_loss(routing):
    torch.manual_seed(0)
    model = DiT(tiny(routing, class_dropout=0.0))
    x0, y = batch(8)
    g = torch.Generator().manual_seed(1)
    t, noise = torch.rand(8, generator=g), torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss, _ = training_loss(model, x0, y, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_per_layer_regression_part():
    config = tiny("race", per_layer_reg=True, per_layer_weight=0.5)
    model = make(config)
    x0, y = batch(4)
    g = torch.Generator().manual_seed(3)
    t, noise = torch.rand(4, generator=g), torch.randn(x0.shape, generator=g)
    loss, parts = training_loss(model, x0, y, t=t, noise=noise)
    assert set(parts) == {"diffusion", "per_layer"}
    preds = target_predictions(model)
    assert len(preds) == 2 and preds[0].shape == (4, 49, config.target_dim)
    expected = per_layer_regression(preds, D.patchify(noise - x0, 4))
    assert torch.allclose(parts["per_layer"], expected)
    assert torch.allclose(loss, parts["diffusion"] + 0.5 * parts["per_layer"])
    loss.backward()  # the target heads get gradient
    assert all(p.grad is not None for n, p in model.named_parameters() if "target" in n)
    _, dense_parts = training_loss(make(tiny("race")), x0, y)
    assert set(dense_parts) == {"diffusion"}


def test_diffusion_task_loss_and_evaluate():
    model = make(tiny("race", per_layer_reg=True))
    task = DiffusionTask()
    loss, logs = task.loss(model, batch(4))
    assert loss.requires_grad and set(logs) == {"diffusion", "per_layer"}
    held_out = [batch(4, seed=5), batch(3, seed=6)]
    first, second = task.evaluate(model, held_out), task.evaluate(model, held_out)
    assert first == second and model.training
    assert "loss" in first and "loss@t=0.50" in first
    with pytest.raises(ValueError):
        task.evaluate(model, [])


# ---- sampling -------------------------------------------------------------------------------------
def a_at(model, labels):
    """Data-range samples of the unit-range check below (2 steps, seed 0)."""
    return sample(model, labels, steps=2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", D.SAMPLERS)
def test_sample_shape_range_and_determinism(method):
    model = make(tiny("race"))
    warm_up(model)
    labels = torch.tensor([0, 3, 9])
    a = sample(model, labels, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0), method=method)
    b = sample(model, labels, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0), method=method)
    c = sample(model, labels, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), method=method)
    assert a.shape == (3, 1, 28, 28) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # the mode is restored
    scale = D.PixelScale(0.2860, 0.3530)
    unit = sample(model, labels, steps=2, generator=torch.Generator().manual_seed(0), unit_range=scale)
    assert unit.min() >= 0 and unit.max() <= 1
    assert torch.equal(unit, D.to_unit_range(a_at(model, labels), scale))
    with pytest.raises(ValueError, match="normalisation"):  # the model code knows no dataset
        sample(model, labels, steps=2, unit_range=True)
    model.pixel_scale = scale  # what DiT(config, pixel_scale=...) sets
    assert torch.equal(sample(model, labels, steps=2, generator=torch.Generator().manual_seed(0), unit_range=True),
                       unit)
    with pytest.raises(ValueError):
        sample(model, torch.tensor([10]))


def test_classifier_free_guidance_scales():
    model = make(tiny("race"))
    warm_up(model)
    model.eval()
    x, y = batch(3)
    t = torch.full((3,), 0.6)
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 10))
        assert torch.allclose(D.guided_velocity(model, x, t, y, 1.0), cond, atol=1e-5)
        assert torch.allclose(D.guided_velocity(model, x, t, y, 0.0), uncond, atol=1e-5)
        assert torch.allclose(D.guided_velocity(model, x, t, y, 3.0), uncond + 3 * (cond - uncond), atol=1e-4)


@pytest.mark.parametrize("routing", RACE_FAMILY)
def test_race_eval_is_batch_independent(routing):
    model = make(tiny(routing))
    warm_up(model)
    model.eval()
    x, y = batch(6)
    t = torch.rand(6)
    with torch.no_grad():
        together = model(x, t, y)
        alone = model(x[2:3], t[2:3], y[2:3])
    assert torch.allclose(together[2:3], alone, atol=1e-5)


# ---- routing analysis -----------------------------------------------------------------------------
def test_routing_by_timestep_bucket():
    model = make(tiny("race"))
    x, y = batch(5)
    with record_routing(model, labels={"timestep": timestep_label(10)}) as rec:
        model(x, torch.tensor([0.05, 0.15, 0.55, 0.95, 1.0]), y)
    stats = rec.by_label("timestep")
    assert list(stats) == [name for name, _ in moe_layers(model)]
    s = next(iter(stats.values()))
    assert s["counts"].shape == (10, 4) and s["experts_per_token"].shape == (10,)
    assert s["tokens"].tolist() == [49, 49, 0, 0, 0, 49, 0, 0, 0, 98]
    with pytest.raises(ValueError):
        with record_routing(make(tiny())):
            pass


def test_track_experts_counts_sampling_compute():
    model = make(tiny("token_choice"))
    with track_experts(model, num_buckets=4) as usage:
        sample(model, torch.tensor([1, 2]), steps=2, method="euler", generator=torch.Generator().manual_seed(0))
    assert usage.experts_per_token == pytest.approx(2.0) and usage.relative_compute == pytest.approx(1.0)
    # 2 Euler steps at t = 1 and 0.5, each one batched guidance forward of 2 * 2 samples * 49 tokens
    assert next(iter(usage.by_label("timestep").values()))["tokens"].tolist() == [0, 0, 196, 196]
    assert usage.experts_per_token_by("timestep").shape == (4,)
    assert not any(layer._forward_hooks for _, layer in moe_layers(model))  # hooks removed


def test_race_threshold_slider_moves_compute_and_restores():
    model = make(tiny("race"))
    warm_up(model, steps=3)
    learned = race_thresholds(model)
    labels = torch.tensor([0, 5])

    def spent(offset):
        with inference_threshold(model, lambda t: t + offset, kind=Race), track_experts(model) as usage:
            sample(model, labels, steps=2, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
        return usage.experts_per_token

    low, mid, high = spent(1e3), spent(0.0), spent(-1e3)
    assert low == 0.0 and high == 4.0 and low <= mid <= high
    assert race_thresholds(model) == learned
    previous = inference_threshold(model, 0.25).previous
    assert previous == learned and set(race_thresholds(model).values()) == {0.25}
    inference_threshold(model, previous)
    assert race_thresholds(model) == learned
    with pytest.raises(ValueError, match="DiT has no MoE layer with a movable threshold"):
        inference_threshold(make(tiny("token_choice")), 0.1)


def test_state_dict_roundtrip_gives_identical_eval_outputs():
    config = tiny("race", per_layer_reg=True)
    model = make(config)
    warm_up(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = make(config, seed=123)
    clone.load_state_dict(torch.load(buffer))
    assert race_thresholds(clone) == race_thresholds(model)
    model.eval(), clone.eval()
    x, y = batch(3)
    t = torch.rand(3)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), clone(x, t, y))


# ---- the EMA ("learnable") threshold switch of the Race study -------------------------------------
def test_ema_threshold_off_routes_by_batch_top_k_and_is_recorded():
    from moe_lite.models.dit import use_ema_threshold

    model = make(tiny("race"))
    warm_up(model)
    model.eval()
    x, y = batch(6)
    t = torch.rand(6)
    # a threshold no score reaches: with it every token gets no expert; without it, exactly k on average
    inference_threshold(model, 1e9)
    use_ema_threshold(model, False)
    assert model.config.ema_threshold is False
    assert all(not r.eval_threshold for r in model.modules() if isinstance(r, Race))
    with torch.no_grad():
        model(x, t, y)
    for layer in [m for _, m in moe_layers(model)]:
        assert layer.routing.experts_per_token.float().mean().item() == pytest.approx(2.0)
    use_ema_threshold(model, True)
    with torch.no_grad():
        model(x, t, y)
    for layer in [m for _, m in moe_layers(model)]:
        assert layer.routing.experts_per_token.float().sum().item() == 0
    # the config knob builds routers the same way
    built = DiT(tiny("race", ema_threshold=False))
    assert all(not r.eval_threshold for r in built.modules() if isinstance(r, Race))
    with pytest.raises(ValueError, match="of kind Race"):
        use_ema_threshold(make(tiny("token_choice")), False)


def test_race_study_variants_share_training_only_across_the_ema_switch():
    from moe_lite.experiments.diffusion import STUDY_TABLES, VARIANTS, training_config, variant_config

    def trained(name):
        return training_config(variant_config(name, "smoke"))

    assert trained("race, identity gating") == trained("race + EMA threshold")
    assert trained("race, softmax gating") != trained("race, identity gating")
    assert trained("race + per-layer reg") != trained("race + EMA threshold")
    assert trained("expert race").router_similarity > 0 and trained("race, balance loss").balance_weight > 0
    assert variant_config("race, identity gating", "smoke").ema_threshold is False
    for _, names in STUDY_TABLES:
        assert set(names) <= set(VARIANTS)
    with pytest.raises(ValueError, match="unknown DiT variant"):
        variant_config("race, relu gating", "smoke")


# ---- the Race study's convergence measure (moe_lite.experiments.diffusion) ----------------------------
def test_smoothed_loss_and_steps_to_reach():
    from moe_lite.experiments.diffusion import smoothed_loss, steps_to_reach

    steps = [{"step": i + 1, "loss": 99.0, "task_loss": float(10 - i)} for i in range(10)]  # task loss 10..1
    curve = smoothed_loss(steps, window=2)
    # the task loss (not the total) averaged over 2 steps, from the 2nd step on
    assert curve[:3] == [(2, 9.5), (3, 8.5), (4, 7.5)] and curve[-1] == (10, 1.5) and len(curve) == 9
    assert steps_to_reach(curve, 7.5) == 4 and steps_to_reach(curve, 9.5) == 2
    assert steps_to_reach(curve, 1.0) is None
    # a short run averages over a fifth of its steps (here 1), so it still has a curve
    assert smoothed_loss(steps[:5], window=50) == [(i + 1, float(10 - i)) for i in range(5)]
    # a DiT's record: the flow-matching part, not the task loss with the per-layer regression in it
    dit_steps = [{"step": 1, "loss": 9.0, "task_loss": 2.0, "diffusion": 0.5}]
    assert smoothed_loss(dit_steps, window=1) == [(1, 0.5)]


def test_race_study_separates_the_mlp_router_from_per_layer_reg():
    from moe_lite.experiments.diffusion import STUDY_TABLES, VARIANTS

    ablation = dict(STUDY_TABLES)["Table 3: cumulative ablation"]
    before, mlp, plr = (VARIANTS[n] for n in ablation[2:5])
    assert mlp == {**before, "mlp_router": True}  # one change per row
    assert plr == {**before, "per_layer_reg": True}  # PLR implies the MLP router (its target head)
    granularity = [VARIANTS[n] for n in dict(STUDY_TABLES)["Table 5: granularity (k-in-E at equal active compute, full recipe)"][1:]]
    assert [(v.get("k", 2), v.get("num_experts", 8)) for v in granularity] == [(1, 4), (2, 8), (4, 16), (8, 32)]
