"""moe_lite.routers.RouterSpec: a router described and built in one place.

The registry (name -> class) and each class's declarations (``needs``, ``defaults``, ``knobs``,
``explorable``) are the only source: configs, the DiT presets, adapters, the explorer and the bench
read them. The old build paths are kept here, verbatim, as the reference the new ones must match.
"""
import dataclasses
import json
import pickle

import pytest
import torch

from moe_lite import bench
from moe_lite import routers as R
from moe_lite import widgets as W
from moe_lite.models import dit
from moe_lite.models.adapters import LoRAExperts, adapt, threshold_routing
from moe_lite.models.lm import CausalLM, LMConfig
from moe_lite.models.vit import ViT, ViTConfig, build_router, dynamic_config, vimoe_config
from moe_lite.routers import (LAYER_FACTS, PRESETS, ROUTERS, ExpertChoice, FixedThreshold, Hash, Knob, Race, Router,
                              RouterSpec, TopK, make_router)
from moe_lite.routing import Routing


# ---- the spec ------------------------------------------------------------------------------------
def test_spec_is_frozen_hashable_and_round_trips():
    spec = RouterSpec("topk", k=3, renormalize=True)
    assert spec == RouterSpec("topk", renormalize=True, k=3) and hash(spec) == hash(RouterSpec("topk", k=3, renormalize=True))
    assert spec != RouterSpec("topk", k=2) and spec != RouterSpec("topk") and len({spec, RouterSpec("topk", k=3, renormalize=True)}) == 1
    assert repr(spec) == "RouterSpec('topk', k=3, renormalize=True)"
    data = spec.to_dict()
    assert data == {"name": "topk", "kwargs": {"k": 3, "renormalize": True}}
    assert RouterSpec.from_dict(json.loads(json.dumps(data))) == spec
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(AttributeError, match="frozen"):
        spec.name = "topp"
    with pytest.raises(TypeError):
        spec.kwargs["k"] = 1  # read-only
    with pytest.raises(ValueError, match="RouterSpec dict"):
        RouterSpec.from_dict({"router": "topk"})
    assert spec.replace(k=1) == RouterSpec("topk", k=1, renormalize=True) and spec.kwargs["k"] == 3


def test_unknown_name_and_keyword_errors_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown router 'TopK'; choose one of \[.*'topk'"):
        RouterSpec("TopK")
    with pytest.raises(ValueError, match=r"takes no keyword 'kk'; valid keywords: \['k', 'renormalize'"):
        RouterSpec("topk", kk=2)
    with pytest.raises(ValueError, match="takes no keyword 'k'"):
        RouterSpec("switch", k=2)
    with pytest.raises(ValueError, match="unknown router preset"):
        RouterSpec.preset("nope")


def test_defaults_apply_to_a_bare_spec():
    for name in ("topk", "expert_choice", "race", "bias_balanced"):
        assert ROUTERS[name].defaults == {"k": 2}
        assert RouterSpec(name).build(8, 4).k == 2
    assert RouterSpec("topp").build().p == 0.4  # no declared default: the constructor's
    assert RouterSpec("topk", k=3).build().k == 3
    # a spec that gives keywords builds with exactly those (as router_kwargs always did)
    with pytest.raises(ValueError, match="gives no k.*defaults"):
        RouterSpec("topk", renormalize=True).build()
    assert RouterSpec("expert_choice", capacity_factor=0.5).build().k == 0.5  # k's alternative
    assert make_router("topk").k == 2 and make_router("topk", k=1).k == 1
    # the declared defaults: the old ViT table of router keywords, plus fixed_threshold
    assert {n: dict(cls.defaults) for n, cls in ROUTERS.items() if cls.defaults} == {
        "topk": {"k": 2}, "expert_choice": {"k": 2}, "race": {"k": 2}, "bias_balanced": {"k": 2},
        "fixed_threshold": {"threshold": 0.5}}


def test_build_passes_the_layer_facts_a_router_needs():
    assert isinstance(RouterSpec("hash").build(dim=16, num_experts=4), Hash)
    assert RouterSpec("hash").build(num_experts=5).num_experts == 5
    bb = RouterSpec("bias_balanced", k=1).build(16, 4)
    assert bb.num_experts == 4 and bb.bias.shape == (4,)
    lt = RouterSpec("learned_threshold").build(16, 4)
    assert (lt.dim, lt.num_experts) == (16, 4)
    assert RouterSpec("hash", num_experts=3).build(16, 4).num_experts == 3  # the spec's own value wins
    topk = RouterSpec("topk", k=2).build(16, 4)
    assert topk.dim is None and topk.noise_proj is None  # plain top-k needs nothing from the layer
    noisy = RouterSpec("topk", k=2, noise="learned").build(16, 4)
    assert noisy.noise_proj.in_features == 16 and noisy.noise_proj.out_features == 4
    assert RouterSpec("topk").needs == () and RouterSpec("hash").needs == ("num_experts",)
    assert RouterSpec("topk", k=2, noise="learned").needs == ("dim", "num_experts")
    with pytest.raises(ValueError, match="needs num_experts"):
        RouterSpec("hash").build()
    with pytest.raises(ValueError, match="needs dim"):
        RouterSpec("learned_threshold").build(num_experts=4)
    a, b = RouterSpec("race").build(), RouterSpec("race").build()
    assert a is not b  # fresh every time


def test_every_class_declaration_is_consistent():
    for name, cls in ROUTERS.items():
        spec = RouterSpec(name)
        assert set(cls.needs) <= set(LAYER_FACTS), name
        assert all(spec.accepts(key) for key in cls.defaults), name
        for knob in cls.knobs:
            assert isinstance(knob, Knob)
            # a knob is a constructor keyword, or moves on a built router after training
            assert spec.accepts(knob.name) or (knob.inference and hasattr(cls, "set_inference_threshold")), (name, knob)
    # the knobs the explorer shows under one slider agree on range (Race's k differs only in its phase)
    shown = {}
    for name in W.router_names():
        for knob in W.router_knobs(name):
            first = shown.setdefault(knob.name, knob)
            assert dataclasses.replace(knob, phase=None) == dataclasses.replace(first, phase=None), (name, knob)


# ---- configs ---------------------------------------------------------------------------------------
# computed before RouterSpec existed: repr(config) is the checkpoint cache key, it must not move
OLD_REPRS = {
    "default": "ViTConfig(image_size=28, patch_size=4, in_channels=1, num_classes=10, dim=64, depth=4, heads=4, "
               "mlp_hidden=128, block_hidden=None, dropout=0.0, pooling='mean', activation='gelu', stem='patch', "
               "stem_channels=8, moe_layers='none', moe_type='routed', num_experts=8, slots_per_expert=1, "
               "expert_hidden=None, router='topk', router_kwargs=None, num_shared=0, shared_hidden=None, "
               "moe_losses={}, dispatch='auto')",
    "vimoe": "ViTConfig(image_size=28, patch_size=4, in_channels=1, num_classes=10, dim=64, depth=4, heads=4, "
             "mlp_hidden=128, block_hidden=None, dropout=0.0, pooling='mean', activation='gelu', stem='patch', "
             "stem_channels=8, moe_layers='last-2', moe_type='routed', num_experts=8, slots_per_expert=1, "
             "expert_hidden=None, router='topk', router_kwargs={'k': 2}, num_shared=1, shared_hidden=None, "
             "moe_losses={'load_balance': 0.01}, dispatch='auto')",
    "dynamic": "ViTConfig(image_size=28, patch_size=4, in_channels=1, num_classes=10, dim=64, depth=4, heads=4, "
               "mlp_hidden=128, block_hidden=None, dropout=0.0, pooling='mean', activation='gelu', stem='patch', "
               "stem_channels=8, moe_layers='every-2', moe_type='routed', num_experts=8, slots_per_expert=1, "
               "expert_hidden=None, router='topp', router_kwargs={'p': 0.4}, num_shared=0, shared_hidden=None, "
               "moe_losses={'entropy': 0.0001, 'load_balance': 0.01}, dispatch='auto')",
    "race": "ViTConfig(image_size=28, patch_size=4, in_channels=1, num_classes=10, dim=64, depth=4, heads=4, "
            "mlp_hidden=128, block_hidden=None, dropout=0.0, pooling='mean', activation='gelu', stem='patch', "
            "stem_channels=8, moe_layers='all', moe_type='routed', num_experts=8, slots_per_expert=1, "
            "expert_hidden=None, router='race', router_kwargs={'k': 1.5}, num_shared=0, shared_hidden=None, "
            "moe_losses={}, dispatch='auto')",
}
OLD_LM_REPR = ("LMConfig(vocab_size=22, max_len=24, dim=64, depth=4, heads=4, mlp_hidden=128, dropout=0.0, "
               "activation='gelu', moe_layers='none', num_experts=8, expert_hidden=None, router='topk', "
               "router_kwargs=None, num_shared=0, shared_hidden=None, moe_losses={}, dispatch='auto')")


def test_config_reprs_are_unchanged_by_name_or_by_spec():
    race = ViTConfig(moe_layers="all", router="race", router_kwargs={"k": 1.5})
    for key, config in (("default", ViTConfig()), ("vimoe", vimoe_config()), ("dynamic", dynamic_config()),
                        ("race", race)):
        assert repr(config) == OLD_REPRS[key], key
        same = dataclasses.replace(config, router=config.router_spec, router_kwargs=None)
        assert repr(same) == OLD_REPRS[key], key  # the spec lands in the same two fields
    assert repr(ViTConfig(router=RouterSpec("topk"))) == OLD_REPRS["default"]
    assert repr(LMConfig()) == OLD_LM_REPR == repr(LMConfig(router=RouterSpec("topk")))
    assert ViTConfig(moe_layers="all", router=RouterSpec("race", k=1.5)) == race


def test_configs_take_a_spec_and_give_it_back():
    config = ViTConfig(dim=16, heads=2, depth=2, moe_layers="all", num_experts=4, router=RouterSpec("hash"))
    assert (config.router, config.router_kwargs) == ("hash", None)
    assert config.router_spec == RouterSpec("hash")
    assert ViTConfig(router="topp", router_kwargs={"p": 0.3}).router_spec == RouterSpec("topp", p=0.3)
    assert ViTConfig(router=lambda: TopK(1), router_kwargs={}).router_spec is None  # a factory has no spec
    assert all(isinstance(build_router(config), Hash) for _ in range(2))
    assert build_router(config) is not build_router(config)
    lm = LMConfig(dim=16, heads=2, depth=2, moe_layers="all", num_experts=4, router=RouterSpec("topk", k=1))
    assert (lm.router, lm.router_kwargs) == ("topk", {"k": 1}) and lm.router_spec == RouterSpec("topk", k=1)
    model = CausalLM(lm)
    assert all(isinstance(m.router, TopK) and m.router.k == 1 for m in model.modules() if hasattr(m, "router"))
    with pytest.raises(ValueError, match="router_kwargs must be None when router is a RouterSpec"):
        ViTConfig(router=RouterSpec("topk", k=1), router_kwargs={"k": 3})
    with pytest.raises(ValueError, match="ViTConfig: router 'topk' .* takes no keyword 'kk'"):
        ViTConfig(router="topk", router_kwargs={"kk": 1})  # caught when the config is made
    with pytest.raises(ValueError, match="takes no keyword"):
        LMConfig(router="topp", router_kwargs={"k": 1})


# ---- DiT presets -------------------------------------------------------------------------------------
def old_dit_build_router(config):
    """models/dit.py's build_router before RouterSpec, verbatim: the reference."""
    candidates = {"race": "BLE", "bl": "BL", "be": "BE", "le": "LE"}
    routing = config.moe_routing
    if routing == "token_choice":
        return TopK(int(config.k), renormalize=False, gating=config.gating)
    if routing == "expert_choice":
        return ExpertChoice(config.k, gating=config.gating)
    if routing in candidates:
        return Race(config.k, ema_decay=config.ema_decay, candidates=candidates[routing], gating=config.gating,
                    eval_threshold=config.ema_threshold)
    raise ValueError(f"moe_routing {routing!r} has no router (dense model?)")


def _state(router):
    """Everything that defines a built router: class, public attributes, buffers."""
    public = {k: v for k, v in vars(router).items() if not k.startswith("_") and k != "training"}
    return type(router), public, router.extra_repr(), {k: v.tolist() for k, v in router.state_dict().items()}


def test_dit_vocabulary_is_presets_and_builds_what_it_built():
    assert dit.MOE_ROUTINGS == ("none", "token_choice", "expert_choice", "race", "bl", "be", "le")
    assert dit.RACE_CANDIDATES == {"race": "BLE", "bl": "BL", "be": "BE", "le": "LE"}
    assert tuple(PRESETS) == dit.MOE_ROUTINGS[1:]
    checked = 0
    for routing in dit.MOE_ROUTINGS[1:]:
        for gating in R.GATINGS:
            for k in (1, 2, 2.0, 1.5):
                if routing == "token_choice" and k == 1.5:
                    continue  # token choice takes an integer k (the config refuses 1.5)
                for ema_threshold, ema_decay in ((True, 0.95), (False, 0.8)):
                    config = dit.DiTConfig(moe_routing=routing, gating=gating, k=k, num_experts=4, mlp_hidden=48,
                                           ema_threshold=ema_threshold, ema_decay=ema_decay)
                    new, old = dit.build_router(config), old_dit_build_router(config)
                    assert _state(new) == _state(old), (routing, gating, k, ema_threshold)
                    assert config.router_spec.build() is not None and config.router_spec == dit.router_spec(config)
                    checked += 1
    assert checked == 6 * 3 * 4 * 2 - 3 * 2
    assert RouterSpec.preset("bl", k=1.5) == RouterSpec("race", candidates="BL", k=1.5)
    with pytest.raises(ValueError, match="no router"):
        dit.router_spec(dit.DiTConfig())
    assert repr(dit.DiTConfig(moe_routing="race")).startswith("DiTConfig(image_size=28")  # fields unchanged
    assert "router_spec" not in {f.name for f in dataclasses.fields(dit.DiTConfig)}


# ---- the fixed-threshold router (was adapters.threshold_routing) -------------------------------------
def test_fixed_threshold_rule_on_a_hand_made_input():
    # probabilities of token 0: [0.5, 0.3, 0.2]; token 1: [0.1, 0.1, 0.8]
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])
    logits = probs.log()
    routing = FixedThreshold(0.25)(logits)
    assert routing.token.tolist() == [0, 0, 1] and routing.expert.tolist() == [0, 1, 2]
    assert torch.allclose(routing.weight, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 1.0]))
    assert routing.info == {"threshold": 0.25}
    raw = FixedThreshold(0.9, renormalize=False)(logits)  # nobody reaches 0.9: each token's top one
    assert raw.expert.tolist() == [0, 2] and torch.allclose(raw.weight, torch.tensor([0.5, 0.8]))
    # the old function name still routes the same way
    old = threshold_routing(logits, 0.25)
    assert torch.equal(old.expert, routing.expert) and torch.equal(old.weight, routing.weight)
    router = RouterSpec("fixed_threshold").build()
    assert router.inference_threshold == 0.5
    router.set_inference_threshold(0.05)
    assert router(logits).num_assignments == 6
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            FixedThreshold(bad)
    half = FixedThreshold(0.25)(logits.half())
    assert half.weight.dtype == torch.float16 and half.expert.tolist() == [0, 1, 2]


def test_lora_experts_eval_threshold_is_the_fixed_threshold_router():
    torch.manual_seed(0)
    layer = LoRAExperts(torch.nn.Linear(6, 6), 3, 2, TopK(2, renormalize=True), inference_threshold=0.3).eval()
    x = torch.randn(2, 4, 6)
    layer(x)
    want = FixedThreshold(0.3)(layer.gate(x))
    assert torch.equal(layer.routing.expert, want.expert) and torch.equal(layer.routing.weight, want.weight)


def test_adapters_take_a_spec_and_keep_their_defaults():
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=8, depth=2, heads=2, mlp_hidden=16, patch_size=7))
    by_default = adapt(model, "lora_experts", 3, num_experts=4, rank=2)
    routers = [m.router for m in by_default.modules() if isinstance(m, LoRAExperts)]
    assert all(isinstance(r, TopK) and r.k == 2 and r.renormalize for r in routers)  # MixLoRA's top-2, renormalised
    spec = RouterSpec("bias_balanced", k=1)
    adapted = adapt(model, "lora_experts", 3, num_experts=4, rank=2, router=spec)
    routers = [m.router for m in adapted.modules() if isinstance(m, LoRAExperts)]
    assert len(routers) == 4 and all(r.num_experts == 4 and r.k == 1 for r in routers)
    raced = adapt(model, "lora_experts", 3, num_experts=4, router="race")  # other names: the class defaults
    assert all(isinstance(m.router, Race) and m.router.k == 2 for m in raced.modules() if isinstance(m, LoRAExperts))
    with pytest.raises(ValueError, match="RouterSpec"):
        adapt(model, "lora_experts", 3, router=spec, router_kwargs={"k": 2})


# ---- explorer and bench read the declarations --------------------------------------------------------
def test_explorer_knobs_come_from_the_classes():
    assert W.ROUTER_NAMES == ("topk", "switch", "expert_choice", "topp", "race", "hash", "balanced", "bias_balanced")
    assert W.ROUTER_NAMES == W.router_names()
    for name in W.ROUTER_NAMES:
        declared = [knob.name for knob in ROUTERS[name].knobs]
        names = [knob.name for knob in W.router_knobs(name)]
        assert names == declared + ([] if "capacity_factor" in declared else ["capacity_factor"])
        for phase in ("train", "eval"):
            assert W.applicable_knobs(name, phase) == tuple(k.name for k in W.router_knobs(name) if k.applies(phase))
    assert [k.phase for k in Race.knobs] == ["train", "eval"]
    ex = W.RouterExplorer(torch.randn(2, 5, 4), mode="static")
    p = ROUTERS["topp"].knobs[0]
    assert (ex.controls["p"].min, ex.controls["p"].max, ex.controls["p"].step) == (p.low, p.high, p.step)
    cap = R.CAPACITY_KNOB
    c = ex.controls["capacity_factor"]
    assert (c.min, c.max, c.step, c.description) == (cap.low, cap.high, cap.step, cap.title)
    assert (ex.controls["k"].min, ex.controls["k"].max) == (1, 4)
    assert list(ex.controls) == ["router", "phase", "k", "p", "capacity_factor", "groups", "top_groups", "threshold",
                                 "sample"]


def test_bench_names_are_specs():
    specs = bench.router_specs(2)
    assert list(specs) == ["TopK", "Race", "ExpertChoice", "TopP"]
    assert specs["TopP"] == RouterSpec("topp", p=0.5, max_k=2)
    assert bench.router_spec("hash", 2) == RouterSpec("hash")
    assert bench.router_spec("topk", 1) == RouterSpec("topk", k=1)
    assert isinstance(bench.router_factories(2)["Race"](), Race)
    with pytest.raises(ValueError, match="unknown router"):
        bench.router_spec("nope", 2)
    with pytest.raises(SystemExit):
        bench.main(["--sections", "layers", "--routers", "nope"])


# ---- a new router: one class, and everything sees it -------------------------------------------------
class FirstExperts(Router):
    """A toy router for the test: every token takes experts ``0..k-1`` with weight ``scale``."""

    needs = ("num_experts",)
    defaults = {"k": 1}
    knobs = (Knob("k", 1, "E", 1, 1, label="k"), Knob("scale", 0.5, 2.0, 0.5, 1.0, label="weight scale"))

    def __init__(self, num_experts, k, scale=1.0):
        super().__init__()
        self.num_experts, self.k, self.scale = num_experts, k, scale

    def route(self, logits, x=None, key=None):
        b, l, e = logits.shape
        token = torch.arange(b * l).repeat_interleave(self.k)
        expert = torch.arange(self.k).repeat(b * l)
        weight = logits.reshape(b * l, e)[token, expert] * 0 + self.scale
        return Routing(logits, token, expert, weight, e)


@pytest.fixture
def first_experts():
    R.register("first_experts", FirstExperts)
    try:
        yield FirstExperts
    finally:
        R.unregister("first_experts")
    assert "first_experts" not in ROUTERS


def test_a_registered_router_appears_everywhere(first_experts):
    assert "first_experts" in W.ROUTER_NAMES and W.applicable_knobs("first_experts", "eval") == (
        "k", "scale", "capacity_factor")
    logits = torch.randn(2, 5, 4)
    ex = W.RouterExplorer(logits, mode="static")
    assert "first_experts" in ex.controls["router"].options
    slider = ex.controls["scale"]  # its own knob gets a slider from the declaration
    assert (slider.min, slider.max, slider.step, slider.value, slider.description) == (0.5, 2.0, 0.5, 1.0,
                                                                                         "weight scale")
    assert ex.set(router="topk")["router"] == "topk" and ex.controls["scale"].disabled
    result = ex.set(router="first_experts", k=2, scale=1.5)
    assert not ex.controls["scale"].disabled and result["params"] == {"k": 2, "scale": 1.5}
    assert ex.routing.expert.tolist() == [0, 1] * 10 and torch.all(ex.routing.weight == 1.5)
    assert ex.router_kwargs("first_experts", **ex.values) == {"k": 2, "scale": 1.5, "num_experts": 4}
    # configs by name or by spec, with E from the config
    config = ViTConfig(dim=8, depth=2, heads=2, mlp_hidden=16, patch_size=7, moe_layers="all", num_experts=4,
                       router=RouterSpec("first_experts", k=2, scale=0.5))
    assert (config.router, config.router_kwargs) == ("first_experts", {"k": 2, "scale": 0.5})
    model = ViT(config)
    model(torch.randn(3, 1, 28, 28))
    layers = [m for m in model.modules() if isinstance(m, FirstExperts)]
    assert len(layers) == 2 and all(r.num_experts == 4 and r.k == 2 for r in layers)
    assert isinstance(build_router(ViTConfig(router="first_experts")), FirstExperts)  # its defaults
    assert bench.router_spec("first_experts", 2) == RouterSpec("first_experts", k=2)
    with pytest.raises(ValueError, match="taken"):
        R.register("first_experts", FirstExperts)
    with pytest.raises(ValueError, match="built-in"):
        R.unregister("topk")


def test_register_checks_the_declarations():
    class Bad(Router):
        needs = ("width",)

    with pytest.raises(ValueError, match="a layer gives only"):
        R.register("bad_needs", Bad)
    with pytest.raises(ValueError, match="lowercase"):
        R.register("Bad", FirstExperts)
    with pytest.raises(ValueError, match="Router subclass"):
        R.register("not_a_router", torch.nn.Linear)
    assert "bad_needs" not in ROUTERS
