"""ViT / ViMoE / dynamic top-p: shapes, placements, parameter accounting, routing helpers."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import moe_lite
from moe_lite.inspect import inference_threshold
from moe_lite.layers import FFN, MoE, SoftMoE
from moe_lite.models.vit import (
    ViT,
    ViTConfig,
    count_parameters,
    dense_equivalent,
    dynamic_config,
    experts_per_sample,
    experts_per_token,
    nominal_active_experts,
    patch_experts,
    resolve_placement,
    top2_config,
    vimoe_config,
)
from moe_lite.routers import ROUTERS, Race, TopK, TopP

B = 3




def tiny(**kw) -> ViTConfig:
    """4 blocks of width 16, patch 7 -> 16 tokens, 4 experts of width 16."""
    base = dict(dim=16, depth=4, heads=2, mlp_hidden=32, patch_size=7, num_experts=4, expert_hidden=16)
    base.update(kw)
    return ViTConfig(**base)


def images(n: int = B, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ---- placements and shapes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "placement, depth, expected",
    [
        ("none", 4, []),
        ("all", 3, [0, 1, 2]),
        ("every-2", 4, [1, 3]),
        ("every-2", 5, [0, 2, 4]),
        ("every-3", 6, [2, 5]),
        ("last-1", 4, [3]),
        ("last-2", 4, [2, 3]),
        ("last-4", 4, [0, 1, 2, 3]),
        ([2, 0], 4, [0, 2]),
        ((3,), 4, [3]),
    ],
)
def test_resolve_placement(placement, depth, expected):
    assert resolve_placement(placement, depth) == expected


@pytest.mark.parametrize("placement", ["none", "all", "every-2", "last-2", [0, 2]])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_forward_shapes_and_moe_blocks(placement, pooling):
    torch.manual_seed(0)
    config = tiny(moe_layers=placement, pooling=pooling)
    model = ViT(config)
    logits = model(images())
    assert logits.shape == (B, 10)
    assert torch.isfinite(logits).all()
    expected = resolve_placement(placement, 4)
    assert list(model.moe_block_indices) == expected
    for i, block in enumerate(model.blocks):
        assert block.is_moe == (i in expected)
        assert isinstance(block.mlp, MoE if i in expected else FFN)
    names = [name for name, _ in moe_lite.moe_layers(model)]
    assert names == [f"blocks.{i}.mlp" for i in expected]
    assert model.features(images()).shape == (B, config.seq_len, 16)


@pytest.mark.parametrize("patch, tokens", [(4, 49), (7, 16), (14, 4)])
def test_patch_sizes(patch, tokens):
    config = tiny(patch_size=patch)
    assert config.num_patches == tokens
    assert ViT(config).features(images(2)).shape == (2, tokens, 16)


@pytest.mark.parametrize("patch", [4, 7])
def test_conv_stem_keeps_tokens_and_adds_a_3x3_conv(patch):
    # stem="conv": a 3x3 conv (stem_channels maps) + GELU before the patch conv; same token grid
    config = tiny(patch_size=patch, stem="conv", stem_channels=5)
    model = ViT(config)
    assert model.features(images(2)).shape == (2, config.num_patches, 16)
    embed = model.patch_embed
    assert embed.stem[0].weight.shape == (5, 1, 3, 3)
    hand = (1 * 5 * 9 + 5) + (5 * 16 * patch * patch + 16)  # stem conv, then the patch conv on 5 maps
    assert sum(p.numel() for p in embed.parameters()) == hand
    plain = ViT(tiny(patch_size=patch)).patch_embed
    assert plain.stem is None  # the default keeps the linear patch embedding
    assert sum(p.numel() for p in plain.parameters()) == 1 * 16 * patch * patch + 16


@pytest.mark.parametrize("stem, sees_neighbour", [("patch", False), ("conv", True)])
def test_conv_stem_tokens_see_the_next_patch(stem, sees_neighbour):
    # change one pixel just right of patch 0: only a conv stem lets token 0 see it
    torch.manual_seed(0)
    embed = ViT(tiny(patch_size=7, stem=stem)).patch_embed
    x = images(1)
    y = x.clone()
    y[0, 0, 3, 7] += 1.0
    with torch.no_grad():
        a, b = embed(x), embed(y)  # [1, 16, 16]
    assert torch.equal(a[0, 2:], b[0, 2:])  # patches 2.. are more than one pixel away
    assert (not torch.equal(a[0, 0], b[0, 0])) == sees_neighbour
    assert not torch.equal(a[0, 1], b[0, 1])  # the pixel's own patch


def test_default_config_builds():
    config = ViTConfig()
    assert (config.dim, config.depth, config.heads, config.patch_size, config.num_patches) == (64, 4, 4, 4, 49)
    assert ViT(config)(images(2)).shape == (2, 10)


def test_each_moe_layer_has_its_own_router():
    model = ViT(tiny(moe_layers="all", router=lambda: Race(2), router_kwargs={}))
    routers = [layer.router for _, layer in moe_lite.moe_layers(model)]
    assert len({id(r) for r in routers}) == 4
    assert all(isinstance(r, Race) for r in routers)


# name -> (router_kwargs, nominal active experts per token)
ROUTER_CASES = {
    "topk": ({"k": 2}, 2),
    "switch": ({}, 1),
    "expert_choice": ({"k": 2}, 2),
    "topp": ({"p": 0.5}, 2),  # dynamic: 2 by convention
    "race": ({"k": 2}, 2),
    "hash": ({}, 1),  # num_experts filled in from the config
    "balanced": ({}, 1),
    "bias_balanced": ({"k": 2}, 2),  # num_experts filled in
    "learned_threshold": ({}, 2),  # dim and num_experts filled in; dynamic: 2 by convention
    "fixed_threshold": ({"threshold": 0.3}, 1),  # at least the top expert (no k: counted as 1)
}


def test_router_cases_cover_every_router():
    assert set(ROUTER_CASES) == set(ROUTERS)


@pytest.mark.parametrize("name", sorted(ROUTER_CASES))
def test_every_router_by_name(name):
    torch.manual_seed(0)
    kwargs, k = ROUTER_CASES[name]
    model = ViT(tiny(moe_layers="last-1", router=name, router_kwargs=kwargs))
    layer = model.blocks[3].mlp
    assert isinstance(layer.router, ROUTERS[name])
    assert nominal_active_experts(layer.router) == k
    counts = count_parameters(model)
    assert counts["active_per_token"] == pytest.approx(counts["total"] - counts["routed_expert_params"] * (1 - k / 4))
    model(images()).sum().backward()
    assert layer.routing.num_experts == 4
    model.eval()
    with torch.no_grad():
        assert model(images()).shape == (B, 10)


def test_router_kwargs_default_per_router():
    assert ViT(tiny(moe_layers="last-1")).blocks[3].mlp.router.k == 2  # topk: k=2
    assert ViT(tiny(moe_layers="last-1", router="topp")).blocks[3].mlp.router.p == 0.4  # TopP's own default
    assert ViT(tiny(moe_layers="last-1", router_kwargs={"k": 3})).blocks[3].mlp.router.k == 3


def test_shared_expert_present_when_asked():
    with_shared = ViT(vimoe_config(tiny(), num_experts=4, k=2, num_shared=1))
    without = ViT(vimoe_config(tiny(), num_experts=4, k=2, num_shared=0))
    for model, shared in ((with_shared, True), (without, False)):
        layers = [layer for _, layer in moe_lite.moe_layers(model)]
        assert len(layers) == 2  # last-2
        for layer in layers:
            assert (layer.shared is not None) == shared
            assert isinstance(layer.router, TopK) and layer.router.k == 2
            if shared:
                assert layer.shared.hidden == 16  # shared_hidden defaults to expert_hidden


def test_vimoe_defaults():
    config = vimoe_config(tiny())
    assert config.num_experts == 8 and config.num_shared == 1 and config.moe_layers == "last-2"
    assert config.moe_losses == {"load_balance": 1e-2}


# ---- parameter accounting ----------------------------------------------------------------------------
def test_count_parameters_hand_count():
    config = tiny(moe_layers="last-1", num_experts=4, expert_hidden=16, num_shared=1, shared_hidden=8)
    model = ViT(config)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    routed = 4 * 2 * 16 * 16  # E * (w_in + w_out), no biases
    assert counts["routed_expert_params"] == routed
    assert counts["active_per_token"] == pytest.approx(counts["total"] - routed + routed * 2 / 4)


@pytest.mark.parametrize(
    "config",
    [
        vimoe_config(tiny(), num_experts=4, k=2),  # mixed placement, shared expert
        tiny(moe_layers="all", router="topk", router_kwargs={"k": 1}),
        dynamic_config(tiny(moe_layers="all")),  # top-p: k = 2 by convention
        tiny(moe_layers="every-2", router="topk", router_kwargs={"k": 3}, activation="swiglu"),
    ],
)
def test_dense_equivalent_matches_active_parameters(config):
    moe_model, dense_config = ViT(config), dense_equivalent(config)
    assert dense_config.moe_block_indices == []
    dense_model = ViT(dense_config)
    active = count_parameters(moe_model)["active_per_token"]
    dense_total = count_parameters(dense_model)["total"]
    # The FFN matrices match exactly; the MoE only adds its gates (dim * E per MoE layer).
    gates = sum(layer.gate.proj.weight.numel() for _, layer in moe_lite.moe_layers(moe_model))
    assert active == pytest.approx(dense_total + gates)
    k = nominal_active_experts(moe_lite.moe_layers(moe_model)[0][1].router)
    for i, block in enumerate(dense_model.blocks):
        want = k * config.expert_width + config.num_shared * config.shared_width if i in config.moe_block_indices else config.mlp_hidden
        assert block.mlp.hidden == want


def test_dense_equivalent_uniform_when_all_moe():
    config = tiny(moe_layers="all", router="topk", router_kwargs={"k": 2}, num_shared=1)
    dense = dense_equivalent(config)
    assert dense.block_hidden is None and dense.mlp_hidden == 2 * 16 + 16
    assert dense_equivalent(tiny()) == tiny()  # dense stays dense


def test_top2_and_dynamic_have_same_parameters():
    base = tiny()
    dyn, top2 = dynamic_config(base), top2_config(base)
    assert dyn.moe_block_indices == top2.moe_block_indices == [1, 3]  # every-2 when base is dense
    assert dyn.moe_losses == {"entropy": 1e-4, "load_balance": 1e-2}
    assert top2.moe_losses == {"load_balance": 1e-2}
    m_dyn, m_top2 = ViT(dyn), ViT(top2)
    assert count_parameters(m_dyn)["total"] == count_parameters(m_top2)["total"]
    assert all(isinstance(layer.router, TopP) for _, layer in moe_lite.moe_layers(m_dyn))
    # placement of a MoE base is kept
    assert dynamic_config(tiny(moe_layers="last-1")).moe_block_indices == [3]


# ---- training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: tiny(), lambda: vimoe_config(tiny(), num_experts=4), lambda: dynamic_config(tiny())])
def test_adamw_steps_lower_the_loss(make):
    torch.manual_seed(0)
    model = ViT(make())
    x, y = images(16, seed=1), torch.arange(16) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(15):
        loss = F.cross_entropy(model(x), y)
        if step == 0:
            first = loss.item()
        opt.zero_grad()
        (loss + moe_lite.aux_loss(model)).backward()
        opt.step()
    with torch.no_grad():
        last = F.cross_entropy(model(x), y).item()
    assert last < first - 0.3


# ---- routing analysis ----------------------------------------------------------------------------------
def test_experts_per_token_and_sample_shapes():
    torch.manual_seed(0)
    model = ViT(dynamic_config(tiny(pooling="cls")))
    with pytest.raises(ValueError, match="forward"):
        experts_per_token(model)
    model(images())
    ept, eps = experts_per_token(model), experts_per_sample(model)
    assert list(ept) == list(eps) == ["blocks.1.mlp", "blocks.3.mlp"]
    for name in ept:
        assert ept[name].shape == (B, 17)  # 16 patches + cls
        assert ept[name].dtype == torch.long and (ept[name] >= 1).all()  # top-p keeps >= 1
        assert eps[name].shape == (B,)
        assert torch.allclose(eps[name], ept[name].float().mean(1))


def test_set_threshold_changes_routing_live():
    torch.manual_seed(0)
    model = ViT(dynamic_config(tiny(), p=0.4)).eval()
    x = images()
    means = {}
    for p in (0.05, 0.5, 0.99):
        assert len(inference_threshold(model, p, kind=TopP).previous) == 2
        with torch.no_grad():
            model(x)
        assert all(float(layer.router.p) == pytest.approx(p) for _, layer in moe_lite.moe_layers(model))
        means[p] = torch.cat([v.float() for v in experts_per_token(model).values()]).mean().item()
    assert means[0.05] == pytest.approx(1.0)  # the top expert alone crosses 0.05
    assert means[0.05] < means[0.5] < means[0.99]
    with pytest.raises(ValueError):
        inference_threshold(model, 0.0, kind=TopP)
    with pytest.raises(ValueError, match="TopP"):
        inference_threshold(ViT(tiny()), 0.5, kind=TopP)


def test_patch_experts():
    torch.manual_seed(0)
    model = ViT(vimoe_config(tiny(pooling="cls"), num_experts=4, k=2))
    model(images())
    top1 = patch_experts(model, "blocks.3.mlp")
    assert top1.shape == (B, 16, 1) and top1.dtype == torch.long
    top3 = patch_experts(model, 3, k=3)
    assert top3.shape == (B, 16, 3)
    assert torch.equal(top3[..., :1], top1)
    assert (top3[..., :2] >= 0).all() and (top3[..., 2] == -1).all()  # top-2: third slot empty
    # the first slot is the highest-weight expert of that patch (cls token at position 0 left out)
    r = model.blocks[3].mlp.routing
    dense = r.dense_weight.reshape(B, 17, 4)[:, 1:]
    assert torch.equal(top1[..., 0], dense.argmax(-1))
    with pytest.raises(ValueError):
        patch_experts(model, "blocks.0.mlp")


# ---- state --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", [lambda: Race(2), lambda: TopP(0.3)])
def test_state_dict_round_trip(router):
    torch.manual_seed(0)
    config = tiny(moe_layers="every-2", router=router, router_kwargs={})
    model = ViT(config)
    for seed in range(3):  # training forwards move Race's EMA thresholds
        model(images(seed=seed))
    if isinstance(model.blocks[1].mlp.router, TopP):
        inference_threshold(model, 0.6, kind=TopP)
    torch.manual_seed(1)
    clone = ViT(config)
    clone.load_state_dict(model.state_dict())  # TopP's p travels in the state dict (a buffer)
    for (_, a), (_, b) in zip(moe_lite.moe_layers(model), moe_lite.moe_layers(clone)):
        for name, buf in a.router.named_buffers():
            assert torch.equal(buf, dict(b.router.named_buffers())[name])  # Race: threshold, initialized
    model.eval(), clone.eval()
    x = images(seed=7)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
    for (_, a), (_, b) in zip(moe_lite.moe_layers(model), moe_lite.moe_layers(clone)):
        assert torch.equal(a.routing.mask, b.routing.mask)


# ---- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=5), "divisible"),
        (dict(dim=15, heads=2), "heads"),
        (dict(pooling="max"), "pooling"),
        (dict(moe_layers="last-9"), "depth"),
        (dict(moe_layers="every-0"), "N must be"),
        (dict(moe_layers="first-2"), "unknown"),
        (dict(moe_layers=[4]), "out of range"),
        (dict(moe_layers=[-1]), "out of range"),
        (dict(moe_layers=[1, 1]), "duplicate"),
        (dict(router=TopK(2)), "instance"),
        (dict(router=lambda: TopK(2), router_kwargs={"k": 2}), "factory"),
        (dict(moe_losses={"nope": 1.0}), "unknown"),
        (dict(router="nope"), "unknown router"),
        (dict(router_kwargs=[("k", 2)]), "dict"),
        (dict(depth=0), "positive"),
        (dict(dropout=1.5), "dropout"),
        (dict(block_hidden=[8, 8]), "block_hidden"),
        (dict(stem="resnet"), "stem"),
        (dict(stem="conv", stem_channels=0), "stem_channels"),
        (dict(moe_type="sparse"), "moe_type"),
        (dict(moe_type="soft", moe_layers="last-2", slots_per_expert=0), "slots_per_expert"),
        (dict(moe_type="soft", moe_layers="last-2", num_shared=1), "shared"),
        (dict(moe_type="soft", moe_layers="last-2", moe_losses={"load_balance": 0.01}), "loss"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_bad_input_shape():
    model = ViT(tiny())
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 28, 28))
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 3, 28, 28))


def test_replace_revalidates():
    with pytest.raises(ValueError):
        dataclasses.replace(tiny(), patch_size=3)


def test_set_threshold_survives_a_state_dict_round_trip():
    # issue 9's reproducer: p moved after training used to be a plain attribute, lost on load
    torch.manual_seed(0)
    cfg = dynamic_config(ViTConfig(dim=32, depth=2, heads=2, mlp_hidden=64))
    a = ViT(cfg)
    inference_threshold(a, 0.9, kind=TopP)
    b = ViT(cfg)
    b.load_state_dict(a.state_dict())
    assert all(layer.router.p == 0.9 for _, layer in moe_lite.moe_layers(b))
    a.eval(), b.eval()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # a state dict from before p was a buffer still loads (each router keeps its configured p)
    old = {k: v for k, v in a.state_dict().items() if not k.endswith("router.threshold")}
    c = ViT(cfg)
    c.load_state_dict(old)
    assert all(layer.router.p == cfg.router_kwargs["p"] for _, layer in moe_lite.moe_layers(c))


@pytest.mark.parametrize("bad", [-1, 0.0, 1.5, float("nan"), "0.5", True])
def test_set_threshold_rejects_a_bad_p_and_changes_nothing(bad):
    model = ViT(dynamic_config(tiny()))
    with pytest.raises(ValueError, match="p must be in"):
        inference_threshold(model, bad, kind=TopP)
    assert all(layer.router.p == 0.4 for _, layer in moe_lite.moe_layers(model))


# ---- Soft MoE blocks ----------------------------------------------------------------------------------
def test_soft_moe_blocks_replace_the_routed_ones():
    config = tiny(moe_layers="last-2", moe_type="soft", slots_per_expert=2)
    model = ViT(config)
    for i, block in enumerate(model.blocks):
        assert block.is_moe == (i in (2, 3))
        assert isinstance(block.mlp, SoftMoE if i in (2, 3) else FFN)
    layer = model.blocks[3].mlp
    assert (layer.num_experts, layer.slots_per_expert, layer.hidden) == (4, 2, 16)
    out = model(images())
    assert out.shape == (B, 10) and torch.isfinite(out).all()
    # every slot is a convex mix of the 16 tokens; every token a convex mix of the 8 slots
    assert layer.dispatch_weights.shape == (B, 16, 8) and layer.combine_weights.shape == (B, 16, 8)
    assert torch.allclose(layer.dispatch_weights.sum(1), torch.ones(B, 8))
    # no discrete routing: the collectors skip it, nothing is dropped, no aux loss
    assert moe_lite.routing_stats(model) == {} and float(moe_lite.aux_loss(model)) == 0.0
    # it trains: gradients reach the slot parameters
    F.cross_entropy(out, torch.arange(B)).backward()
    assert layer.phi.grad is not None and layer.phi.grad.abs().sum() > 0


def test_soft_moe_default_is_routed_and_round_trips():
    assert ViTConfig().moe_type == "routed"
    assert isinstance(ViT(tiny(moe_layers="last-1")).blocks[3].mlp, MoE)
    config = tiny(moe_layers=[1], moe_type="soft")
    a, b = ViT(config), ViT(config)
    b.load_state_dict(a.state_dict())
    x = images()
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_zoo_soft_entry_builds_soft_blocks():
    from moe_lite.experiments.zoo import SOFT, ZOO, backbone, entry_config

    soft = [name for name, (router, _, _) in ZOO.items() if router == SOFT]
    assert len(soft) == 1
    config = entry_config(backbone("smoke"), *ZOO[soft[0]])
    model = ViT(config)
    assert [type(b.mlp) for b in model.blocks] == [SoftMoE, SoftMoE]  # smoke: depth 2, MoE in the last 2
    assert model(images(2)).shape == (2, 10)
    # a routed entry is unchanged
    assert isinstance(ViT(entry_config(backbone("smoke"), *ZOO["top-2"])).blocks[-1].mlp, MoE)
