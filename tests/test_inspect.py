"""moe_lite.inspect: routing of the last forward, the recorder over many forwards, top experts, and the
one inference-threshold setter / context manager."""
from __future__ import annotations

import pytest
import torch

from moe_lite import inspect as I
from moe_lite.analysis import top_expert
from moe_lite.experiments.core import Dataset
from moe_lite.models.adapters import LoRAExperts, adapt
from moe_lite.models.dit import DiT, DiTConfig, sample
from moe_lite.models.vit import ViT, ViTConfig, dynamic_config, vimoe_config
from moe_lite.routers import Race, TopK, TopP
from moe_lite.routing import Routing, by_label


def tiny_vit(**kw) -> ViTConfig:
    base = dict(dim=16, depth=4, heads=2, mlp_hidden=32, patch_size=7, num_experts=4, expert_hidden=16)
    base.update(kw)
    return ViTConfig(**base)


def tiny_dit(moe_routing: str = "token_choice", **kw) -> DiTConfig:
    return DiTConfig(dim=32, depth=2, heads=2, mlp_hidden=64, num_experts=4, k=2, moe_routing=moe_routing, **kw)


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def dataset(n: int = 12) -> Dataset:
    g = torch.Generator().manual_seed(5)
    return Dataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "test")


def topp_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(dynamic_config(tiny_vit(pooling="cls"), p=0.5)).eval()


def warm_race_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(tiny_dit("race"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, generator=g), torch.randint(0, 10, (4,), generator=g))
    return model


# ---- the last forward ---------------------------------------------------------------------------------
def test_last_routings_and_experts_per_token_and_sample():
    model = topp_vit()
    with pytest.raises(ValueError, match="forward"):
        I.last_routings(model)
    with torch.no_grad():
        model(images())
    routings = I.last_routings(model)
    assert list(routings) == ["blocks.1.mlp", "blocks.3.mlp"]
    ept, eps = I.experts_per_token(model), I.experts_per_sample(model)
    for name, r in routings.items():
        assert torch.equal(ept[name], r.experts_per_token.reshape(3, 17))
        assert torch.equal(eps[name], ept[name].float().mean(1))
    with pytest.raises(ValueError, match="ViT has no routed MoE layer"):
        I.last_routings(ViT(tiny_vit()))


def hand_routing() -> Routing:
    # B=2, L=3, E=3; token 5 has no expert; token 1 has two experts
    token = torch.tensor([0, 1, 1, 2, 3, 4])
    expert = torch.tensor([0, 1, 2, 2, 0, 1])
    weight = torch.tensor([0.9, 0.7, 0.2, 0.5, 0.6, 0.4])
    return Routing(logits=torch.zeros(2, 3, 3), token=token, expert=expert, weight=weight, num_experts=3)


def test_top_experts_by_hand():
    r = hand_routing()
    assert I.top_experts(r, 1)[..., 0].tolist() == [[0, 1, 2], [0, 1, -1]]
    assert I.top_experts(r, 2).tolist() == [[[0, -1], [1, 2], [2, -1]], [[0, -1], [1, -1], [-1, -1]]]
    assert I.top_experts(r, 5).shape == (2, 3, 5)  # more slots than experts: -1 filled
    assert torch.equal(I.primary_expert(r), top_expert(r).reshape(2, 3))
    with pytest.raises(ValueError, match="k"):
        I.top_experts(r, 0)
    with pytest.raises(TypeError):
        I.top_experts("not a routing", 1)


def test_top_experts_matches_primary_expert_on_a_model():
    torch.manual_seed(0)
    model = ViT(vimoe_config(tiny_vit(), num_experts=4, k=2))
    with torch.no_grad():
        model(images())
    for r in I.last_routings(model).values():
        assert torch.equal(I.primary_expert(r), top_expert(r).reshape(r.batch_size, r.seq_len))
        top2 = I.top_experts(r, 2)
        dense = r.dense_weight.reshape(r.batch_size, r.seq_len, -1)
        assert torch.equal(top2[..., 0], dense.argmax(-1))


# ---- the recorder -------------------------------------------------------------------------------------
def test_one_forward_reproduces_by_label():
    model = topp_vit()
    y = torch.tensor([3, 0, 3])
    with I.record_routing(model, labels={"class": 10, "position": I.position_label(17)}) as rec:
        rec.set_labels({"class": y})
        with torch.no_grad():
            model(images())
    for name, r in I.last_routings(model).items():
        for label, values, c in (("class", y, 10), ("position", torch.arange(17), 17)):
            expected, got = by_label(r, values, c), rec.by_label(label)[name]
            for key in expected:
                assert torch.equal(got[key], expected[key], ) or torch.allclose(
                    got[key], expected[key], equal_nan=True), (label, key)
        assert rec.tokens[name] == r.num_tokens
        assert torch.equal(rec.tokens_per_expert()[name], r.tokens_per_expert.long())
        assert rec.per_layer()[name] == pytest.approx(r.experts_per_token.float().mean().item())
    assert rec.layers == ["blocks.1.mlp", "blocks.3.mlp"]
    assert not any(layer._forward_hooks for _, layer in I.moe_layers(model)) and not model._forward_hooks


def test_labels_must_be_given_for_each_forward():
    model = topp_vit()
    with I.record_routing(model, labels={"class": 10}) as rec:
        rec.set_labels({"class": torch.tensor([1, 2, 3])})
        with torch.no_grad():
            model(images())
        with pytest.raises(ValueError, match="set_labels"):  # cleared after that forward
            with torch.no_grad():
                model(images())
        with pytest.raises(ValueError, match="unknown label"):
            rec.set_labels(task=torch.tensor([0]))
    with pytest.raises(ValueError, match="Label"):
        with I.record_routing(model, labels={"class": "ten"}):
            pass
    with pytest.raises(ValueError, match="no routed MoE layer"):
        with I.record_routing(ViT(tiny_vit())):
            pass


def captured_routings(model):
    """A hand reference: every routed layer's Routing of every forward, via plain forward hooks."""
    seen = []
    handles = [layer.register_forward_hook(lambda m, i, o, name=name: seen.append((name, m.routing)))
               for name, layer in I.moe_layers(model)]
    return seen, handles


def test_recorder_matches_per_forward_by_label_sums_and_the_experiment_wrappers():
    """Checked, before the old collectors were removed, to give exactly their numbers (routing_by_class:
    counts, fraction, tokens; expert_profile: per-sample experts); now against a hand accumulation."""
    from moe_lite.experiments.common import routing_by_class
    from moe_lite.experiments.dynamic import expert_profile

    model, data = topp_vit(), dataset(12)
    seen, handles = captured_routings(model)
    with I.record_routing(model, labels={"class": 10}) as rec:
        for start in range(0, 12, 5):
            rec.set_labels({"class": data.y[start:start + 5]})
            with torch.no_grad():
                model(data.x[start:start + 5])
    for h in handles:
        h.remove()
    new = rec.by_label("class")
    for name in new:
        parts = [(r, data.y[5 * i:5 * i + 5]) for i, r in enumerate(r for n, r in seen if n == name)]
        counts = sum(by_label(r, y, 10)["counts"] for r, y in parts)
        tokens = sum(by_label(r, y, 10)["tokens"] for r, y in parts)
        assert torch.equal(new[name]["counts"], counts) and torch.equal(new[name]["tokens"], tokens)
        assert torch.equal(new[name]["fraction"], counts / tokens.clamp_min(1)[:, None])
        samples = torch.cat([r.experts_per_token.reshape(r.batch_size, -1).float().mean(1) for r, _ in parts])
        assert torch.equal(rec.experts_per_sample()[name], samples)
    old = routing_by_class(model, data, torch.device("cpu"), batch_size=5)
    for name in new:
        for key in ("counts", "fraction", "tokens"):
            assert torch.equal(old[name][key], new[name][key]), key
    profile = expert_profile(model, data, torch.device("cpu"), batch_size=5)
    assert all(torch.equal(v, rec.experts_per_sample()[n]) for n, v in profile["layers"].items())
    assert torch.equal(profile["experts"], rec.mean_experts_per_sample())


def test_recorder_over_dit_sampling_matches_a_hand_accumulation():
    from moe_lite.models.dit import track_experts

    torch.manual_seed(0)
    model = DiT(tiny_dit("token_choice"))
    labels = torch.tensor([1, 2, 7])
    seen, handles = captured_routings(model)
    times = []
    handles.append(model.register_forward_hook(lambda m, i, o: times.append(m.last_timesteps)))
    with track_experts(model, num_buckets=4) as usage:
        sample(model, labels, steps=3, method="heun", generator=torch.Generator().manual_seed(0))
    for h in handles:
        h.remove()
    layers = [n for n, _ in I.moe_layers(model)]
    per_layer = {n: [r for m, r in seen if m == n] for n in layers}
    assignments = sum(r.num_assignments for _, r in seen)
    assert usage.experts_per_token == assignments / sum(r.num_tokens for _, r in seen) == 2.0
    assert usage.relative_compute == 1.0
    by_t = usage.by_label("timestep")
    for name in layers:
        counts = sum(by_label(r, I.timestep_buckets(t, 4), 4)["counts"] for r, t in zip(per_layer[name], times))
        assert torch.equal(by_t[name]["counts"], counts)
    overall = usage.experts_per_token_by("timestep")
    seen_buckets = ~torch.isnan(overall)  # Heun at t = 1, 2/3, 1/3: bucket 0 is never visited
    assert overall.shape == (4,) and not seen_buckets[0] and (overall[seen_buckets] == 2.0).all()


def test_recorder_removes_hooks_on_an_exception():
    model = topp_vit()
    with pytest.raises(RuntimeError, match="boom"):
        with I.record_routing(model):
            raise RuntimeError("boom")
    assert not any(layer._forward_hooks for _, layer in I.moe_layers(model)) and not model._forward_hooks


# ---- inference thresholds -----------------------------------------------------------------------------
def test_inference_threshold_sets_and_restores_topp():
    model = topp_vit()
    assert I.inference_thresholds(model) == {"blocks.1.mlp.router": 0.5, "blocks.3.mlp.router": 0.5}
    x = images()
    with torch.no_grad():
        model(x)
    before = {n: r.mask.clone() for n, r in I.last_routings(model).items()}
    with I.inference_threshold(model, 0.99) as previous:
        assert previous == {"blocks.1.mlp.router": 0.5, "blocks.3.mlp.router": 0.5}
        assert set(I.inference_thresholds(model).values()) == {0.99}
    assert set(I.inference_thresholds(model).values()) == {0.5}
    with torch.no_grad():
        model(x)
    assert all(torch.equal(before[n], r.mask) for n, r in I.last_routings(model).items())
    change = I.inference_threshold(model, 0.2)  # a plain setter
    assert change.previous == {"blocks.1.mlp.router": 0.5, "blocks.3.mlp.router": 0.5}
    assert set(I.inference_thresholds(model).values()) == {0.2}


def test_inference_threshold_restores_on_an_exception_and_rejects_bad_values():
    model = topp_vit()
    with pytest.raises(RuntimeError):
        with I.inference_threshold(model, 0.9):
            raise RuntimeError("interrupted")
    assert set(I.inference_thresholds(model).values()) == {0.5}
    with pytest.raises(ValueError, match="p"):
        I.inference_threshold(model, 0.0)
    with pytest.raises(ValueError, match="p"):  # the second router rejects it: the first is put back
        I.inference_threshold(model, {"blocks.1.mlp.router": 0.3, "blocks.3.mlp.router": 2.0})
    assert set(I.inference_thresholds(model).values()) == {0.5}
    with pytest.raises(ValueError, match="no value for"):
        I.inference_threshold(model, {"blocks.1.mlp.router": 0.3})
    with pytest.raises(ValueError, match="ViT has no MoE layer with a movable threshold"):
        I.inference_threshold(ViT(vimoe_config(tiny_vit())), 0.5)
    with pytest.raises(ValueError, match="of kind Race"):
        I.inference_threshold(model, 0.5, kind=Race)


def test_inference_threshold_shifts_race_and_restores_exactly():
    model = warm_race_dit()
    learned = I.inference_thresholds(model, kind=Race)
    raw = {n: m.threshold.clone() for n, m in I.threshold_modules(model, kind=Race)}
    with I.inference_threshold(model, lambda t: t + 0.25) as previous:
        assert previous == learned
        for n, v in I.inference_thresholds(model).items():
            assert v == pytest.approx(learned[n] + 0.25)
    assert all(torch.equal(m.threshold, raw[n]) for n, m in I.threshold_modules(model))
    fresh = DiT(tiny_dit("race"))  # no threshold trained yet: a shift is refused, a value is not
    with pytest.raises(ValueError, match="no inference threshold to shift"):
        I.inference_threshold(fresh, lambda t: t + 1.0)
    with I.inference_threshold(fresh, 0.5):
        assert set(I.inference_thresholds(fresh).values()) == {0.5}
    assert set(I.inference_thresholds(fresh).values()) == {None}  # "not set yet" comes back too


def test_inference_threshold_on_lora_experts_skips_the_inner_router():
    torch.manual_seed(0)
    base = ViT(tiny_vit(num_classes=5))
    model = adapt(base, num_classes=5, rank=2, num_experts=4, method="lora_experts", router="topp",
                  inference_threshold=0.2)
    modules = I.threshold_modules(model)
    assert modules and all(isinstance(m, LoRAExperts) for _, m in modules)  # not their TopP routers
    with I.inference_threshold(model, None):
        assert set(I.inference_thresholds(model).values()) == {None}
    assert set(I.inference_thresholds(model).values()) == {0.2}
    assert all(isinstance(m, TopP) for _, m in I.threshold_modules(model, kind=TopP))
