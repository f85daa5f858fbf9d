"""Experts: every dispatch backend against a per-token float64 brute force (outputs and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from moe_lite.experts import (
    DISPATCHES,
    PADDED_MAX_WASTE,
    Experts,
    padded_waste_limit,
    FineGrained,
    choose_dispatch,
    grouped_mm_supported,
    x_in_y,
)

from precision_checks import DEVICES, HALF, rel_err

BACKENDS = ["loop", "sorted", "grouped_mm", "padded", "auto"]


def brute_force(m: Experts, x, token, expert, weight):
    """``[N, D]`` in float64, one assignment at a time; returns (y, leaves) with float64 leaves."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    params = {name: p.detach().double().requires_grad_() for name, p in m.named_parameters()}
    rows = [torch.zeros(m.dim, dtype=torch.float64) for _ in range(x.shape[0])]
    for a in range(token.numel()):
        n, e = int(token[a]), int(expert[a])
        h = x64[n] @ params["w_in"][e]
        if "b_in" in params:
            h = h + params["b_in"][e]
        if m.activation == "gelu":
            h = F.gelu(h)
        else:
            gate, up = h[: m.hidden], h[m.hidden :]
            h = gate * torch.sigmoid(gate) * up
        y = h @ params["w_out"][e]
        if "b_out" in params:
            y = y + params["b_out"][e]
        rows[n] = rows[n] + w64[a] * y
    return torch.stack(rows), [x64, w64] + [params[name] for name, _ in m.named_parameters()]


def run_and_grads(m, x, token, expert, weight, dispatch, loss_kind, coef):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = m(x, token, expert, weight, dispatch=dispatch)
    loss = y.sum() if loss_kind == "sum" else (y * coef).sum()
    grads = torch.autograd.grad(loss, [x, weight] + list(m.parameters()))
    return y, grads


def check_against_brute_force(m, x, token, expert, weight, dispatch, loss_kind="random"):
    gen = torch.Generator().manual_seed(123)
    coef = torch.randn(x.shape[0], m.dim, generator=gen)
    y, grads = run_and_grads(m, x, token, expert, weight, dispatch, loss_kind, coef)
    y_ref, leaves = brute_force(m, x, token, expert, weight)
    loss_ref = y_ref.sum() if loss_kind == "sum" else (y_ref * coef.double()).sum()
    grads_ref = torch.autograd.grad(loss_ref, leaves, allow_unused=True)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-4, atol=1e-5)
    names = ["x", "weight"] + [n for n, _ in m.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        g_ref = torch.zeros_like(leaves[names.index(name)]) if g_ref is None else g_ref
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5, msg=lambda s: f"grad {name}: {s}")
    return m.last_dispatch


def small_case(num_tokens=9, dim=8, num_experts=5, seed=0):
    """Repeated tokens, an unassigned token (index 5), and experts 2 and 3 with no token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=gen)
    token = torch.tensor([0, 0, 1, 3, 3, 3, 6, 2, 8, 7, 4, 4])
    expert = torch.tensor([1, 4, 1, 0, 1, 4, 4, 1, 0, 0, 4, 1])
    weight = torch.rand(token.numel(), generator=gen) + 0.1
    return x, token, expert, weight


@pytest.mark.parametrize("dispatch", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dim, hidden", [(8, 12), (12, 8)])  # weight applied after / before w_out
def test_backends_match_brute_force(dispatch, activation, bias, dim, hidden):
    torch.manual_seed(0)
    m = Experts(5, dim, hidden, activation, bias=bias)
    x, token, expert, weight = small_case(dim=dim)
    check_against_brute_force(m, x, token, expert, weight, dispatch)


@pytest.mark.parametrize("dispatch", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dim, hidden", [(8, 12), (12, 8)])
def test_bare_sum_backward(dispatch, activation, dim, hidden):
    """``y.sum().backward()`` hands a stride-0 gradient to the backward: grouped_mm must cope."""
    torch.manual_seed(1)
    m = Experts(5, dim, hidden, activation)
    x, token, expert, weight = small_case(dim=dim, seed=1)
    used = check_against_brute_force(m, x, token, expert, weight, dispatch, loss_kind="sum")
    if dispatch == "grouped_mm":
        assert used == "grouped_mm"


@pytest.mark.parametrize("dispatch", BACKENDS)
def test_no_assignment_at_all(dispatch):
    torch.manual_seed(2)
    m = Experts(4, 8, 12, "swiglu", bias=True)
    x = torch.randn(6, 8, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    weight = torch.zeros(0, requires_grad=True)
    y = m(x, empty, empty, weight, dispatch=dispatch)
    assert y.shape == (6, 8) and torch.equal(y, torch.zeros(6, 8))
    (y * torch.randn_like(y)).sum().backward()  # must not fail: the output stays in the graph
    assert torch.equal(x.grad, torch.zeros_like(x))
    for p in m.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    if dispatch == "grouped_mm":
        assert m.last_dispatch == "sorted"  # grouped_mm cannot take A = 0


@pytest.mark.parametrize("dispatch", BACKENDS)
def test_all_tokens_one_expert(dispatch):
    """Extreme imbalance: every other expert is empty (padded layout with a single full expert)."""
    torch.manual_seed(3)
    m = Experts(6, 8, 8, "gelu")
    x = torch.randn(7, 8)
    token = torch.arange(7)
    expert = torch.full((7,), 5)
    check_against_brute_force(m, x, token, expert, torch.rand(7), dispatch)


@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm", "padded", "auto"])
def test_fast_backends_match_loop_top2(dispatch):
    """A realistic top-2 routing with 64 tokens: fast backends equal the reference loop."""
    torch.manual_seed(4)
    m = Experts(8, 16, 32, "gelu", bias=True)
    x = torch.randn(64, 16)
    probs = torch.randn(64, 8).softmax(-1)
    w, e = probs.topk(2, dim=-1)
    token = torch.arange(64).repeat_interleave(2)
    coef = torch.randn(64, 16)
    ref_y, ref_g = run_and_grads(m, x, token, e.reshape(-1), w.reshape(-1), "loop", "random", coef)
    y, g = run_and_grads(m, x, token, e.reshape(-1), w.reshape(-1), dispatch, "random", coef)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim, hidden", [(8, 12), (12, 8)])
@pytest.mark.parametrize("wrt", ["weight", "x", "w_out", "b_out"])
def test_only_needed_gradients(dim, hidden, wrt):
    """One leaf with grad at a time: the fused backward skips what is not needed and stays right."""
    torch.manual_seed(5)
    m = Experts(5, dim, hidden, "swiglu", bias=True)
    m.requires_grad_(False)
    x, token, expert, weight = small_case(dim=dim)
    grads = []
    for dispatch in ["padded", "loop"]:
        leaves = {"weight": weight.clone(), "x": x.clone(), "w_out": m.w_out, "b_out": m.b_out}
        leaf = leaves[wrt].requires_grad_()
        y = m(leaves["x"], token, expert, leaves["weight"], dispatch=dispatch)
        grads.append(torch.autograd.grad((y * y).sum(), [leaf])[0])
        leaf.requires_grad_(False)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_misaligned_widths_fall_back():
    torch.manual_seed(6)
    m = Experts(5, 6, 10, "gelu")  # 6 and 10 floats: not multiples of 16 bytes
    x, token, expert, weight = small_case(dim=6)
    assert not grouped_mm_supported(x, 6, 10, 10, token.numel())
    assert check_against_brute_force(m, x, token, expert, weight, "grouped_mm") == "sorted"
    m = Experts(5, 8, 10, "swiglu")  # 2H = 20 floats: not aligned either
    x, token, expert, weight = small_case()
    assert check_against_brute_force(m, x, token, expert, weight, "grouped_mm") == "sorted"


def test_float64_falls_back_and_matches():
    torch.manual_seed(7)
    m = Experts(5, 8, 12, "gelu").double()
    x, token, expert, weight = small_case()
    x, weight = x.double(), weight.double()
    y_loop = m(x, token, expert, weight, dispatch="loop")
    for dispatch in ["sorted", "grouped_mm", "padded", "auto"]:
        y = m(x, token, expert, weight, dispatch=dispatch)
        torch.testing.assert_close(y, y_loop, rtol=1e-12, atol=1e-12)
        assert m.last_dispatch != "grouped_mm"


@pytest.mark.parametrize(
    "threads, experts, key",
    [(1, 4, "single_thread"), (1, 64, "single_thread"), (2, 4, "multi_thread"), (2, 64, "multi_thread_many_experts")],
)
def test_auto_rule(threads, experts, key):
    x = torch.zeros(4, 16)
    a = 100 * experts  # assignments; a balanced load is 100 per expert

    def pick(max_load, x=x, hidden=32, num_assign=a):
        return choose_dispatch(x, 16, hidden, hidden, num_assign, experts, max_load, num_threads=threads)

    assert padded_waste_limit(experts, threads) == PADDED_MAX_WASTE[key]
    assert pick(100) == "padded"
    limit = int((1 + PADDED_MAX_WASTE[key]) * 100)
    assert pick(limit) == "padded"
    assert pick(limit + 1) == "grouped_mm"
    assert pick(limit + 1, hidden=30) == "sorted"  # misaligned: no grouped_mm
    assert pick(limit + 1, x=x.double()) == "sorted"
    assert pick(None, num_assign=0) == "padded"


def test_auto_in_the_module():
    # the module applies it: a balanced top-1 routing takes the padded layout, an imbalanced one not
    m = Experts(4, 16, 32)
    token = torch.arange(8)
    m(torch.randn(8, 16), token, torch.arange(8) % 4, torch.ones(8))
    assert m.last_dispatch == "padded"
    m(torch.randn(8, 16), token, torch.tensor([0, 0, 0, 0, 0, 1, 2, 3]), torch.ones(8))
    assert m.last_dispatch == "grouped_mm"


def test_weight_dtype_and_int32_indices():
    torch.manual_seed(8)
    m = Experts(5, 8, 12)
    x, token, expert, weight = small_case()
    y = m(x, token.int(), expert.int(), weight.double(), dispatch="sorted")
    torch.testing.assert_close(y, m(x, token, expert, weight, dispatch="loop"))


def test_validation_errors():
    m = Experts(4, 8, 12)
    x = torch.randn(5, 8)
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dispatch"):
        m(x, t, t, torch.ones(2), dispatch="nope")
    with pytest.raises(ValueError, match=r"x must be \[N, 8\]"):
        m(torch.randn(5, 7), t, t, torch.ones(2))
    with pytest.raises(ValueError, match="same length"):
        m(x, t, t, torch.ones(3))
    with pytest.raises(ValueError, match="integer"):
        m(x, t.float(), t, torch.ones(2))
    with pytest.raises(ValueError, match=r"token indices must lie in \[0, 5\)"):
        m(x, torch.tensor([0, 5]), t, torch.ones(2))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        m(x, t, torch.tensor([0, 4]), torch.ones(2), dispatch="sorted")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        m(x, t, torch.tensor([0, -1]), torch.ones(2), dispatch="auto")
    with pytest.raises(ValueError, match="activation"):
        Experts(4, 8, 12, activation="relu")
    with pytest.raises(ValueError, match="num_experts"):
        Experts(0, 8, 12)
    assert set(BACKENDS) == set(DISPATCHES)


def test_init_like_linear_and_load_dense():
    torch.manual_seed(9)
    m = Experts(3, 16, 64, "swiglu", bias=True)
    assert m.w_in.shape == (3, 16, 128) and m.w_out.shape == (3, 64, 16)
    assert m.w_in.abs().max() <= 1 / 16**0.5 and m.w_out.abs().max() <= 1 / 64**0.5
    assert m.b_in.shape == (3, 128) and m.b_out.shape == (3, 16)
    fc_in, fc_out = torch.nn.Linear(16, 128), torch.nn.Linear(64, 16)
    m.load_dense_(fc_in.weight, fc_out.weight, fc_in.bias, fc_out.bias, experts=[1])
    assert torch.equal(m.w_in[1], fc_in.weight.t()) and torch.equal(m.b_out[1], fc_out.bias)
    assert not torch.equal(m.w_in[0], fc_in.weight.t())
    with pytest.raises(ValueError, match="no bias"):
        Experts(3, 16, 64).load_dense_(fc_in.weight[:64], fc_out.weight, fc_in.bias[:64])


def test_x_in_y():
    assert x_in_y(2, 8, 512) == (8, 256, 2)
    cfg = x_in_y(4, 32, 3072)
    assert isinstance(cfg, FineGrained) and cfg.num_experts == 32 and cfg.hidden == 768 and cfg.k == 4
    assert cfg.k * cfg.hidden == 3072  # active FLOPs of the dense FFN
    assert x_in_y(1, 1, 7) == (1, 7, 1)
    for bad in [(3, 8, 512), (0, 8, 512), (9, 8, 512), (2, 8, 0), (2.0, 8, 512)]:
        with pytest.raises(ValueError):
            x_in_y(*bad)


# ---- errors that the loop backend used to swallow ----------------------------------------------------
@pytest.mark.parametrize("dispatch", BACKENDS)
@pytest.mark.parametrize("bad", [4, -1])
def test_expert_index_out_of_range_raises_on_every_backend(dispatch, bad):
    """The loop used to drop an assignment to expert 4 of 4 (or -1) silently and return the rest."""
    m = Experts(4, 8, 12)
    with pytest.raises(ValueError, match=r"expert indices must lie in \[0, 4\)"):
        m(torch.randn(3, 8), torch.tensor([0, 1, 2]), torch.tensor([0, 1, bad]), torch.ones(3), dispatch=dispatch)


def test_x_dtype_must_match_the_weights_without_autocast():
    m = Experts(4, 8, 12)
    t = torch.tensor([0, 1])
    for dispatch in ["loop", "padded"]:
        with pytest.raises(ValueError, match=r"x is torch.bfloat16 but the expert weights are torch.float32"):
            m(torch.randn(5, 8, dtype=torch.bfloat16), t, t, torch.ones(2), dispatch=dispatch)


# ---- low precision: autocast and half-precision weights ------------------------------------------------
def amp_case(device):
    """An Experts layer whose widths (16, 32, 64) are 16-byte aligned in half precision (grouped_mm runs)."""
    gen = torch.Generator().manual_seed(10)
    m = Experts(6, 16, 32, "swiglu", bias=True)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(24, 16, generator=gen)
    token = torch.arange(24).repeat_interleave(2)
    expert = torch.randint(0, 6, (48,), generator=gen)
    weight = torch.rand(48, generator=gen)
    coef = torch.randn(24, 16, generator=gen)
    return m.to(device), x.to(device), token.to(device), expert.to(device), weight.to(device), coef.to(device)


def grads_of(m, x, token, expert, weight, coef, dispatch, autocast_dtype=None):
    """Output and gradients (x, weight, parameters), optionally under autocast on x's device."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = m(x, token, expert, weight, dispatch=dispatch)
    loss = (y.float() * coef).sum()
    return y, torch.autograd.grad(loss, [x, weight, *m.parameters()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("x_dtype", ["float32", "autocast"])  # fp32 rows (after a LayerNorm) or half rows
@pytest.mark.parametrize("dispatch", BACKENDS)
def test_autocast_matches_float32_loop(device, dtype, x_dtype, dispatch):
    """Under autocast every backend computes in the autocast dtype; fp32 parameters get fp32 gradients."""
    m, x, token, expert, weight, coef = amp_case(device)
    y_ref, g_ref = grads_of(m, x, token, expert, weight, coef, "loop")
    if x_dtype == "autocast":
        x = x.to(dtype)  # what an nn.Linear under autocast hands over
    y, grads = grads_of(m, x, token, expert, weight, coef, dispatch, autocast_dtype=dtype)
    assert y.dtype == dtype and y.device == y_ref.device
    if dispatch == "grouped_mm":
        assert m.last_dispatch == "grouped_mm"
    assert rel_err(y, y_ref) < 2e-2
    names = ["x", "weight"] + [n for n, _ in m.named_parameters()]
    for name, g, g_r, leaf in zip(names, grads, g_ref, [x, weight, *m.parameters()]):
        assert g.dtype == leaf.dtype, name
        assert rel_err(g, g_r) < 3e-2, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dispatch", BACKENDS)
def test_half_precision_weights_match_float32_loop(device, dtype, dispatch):
    """A module converted with ``.to(dtype)`` and inputs of that dtype, no autocast."""
    m, x, token, expert, weight, coef = amp_case(device)
    y_ref, g_ref = grads_of(m, x, token, expert, weight, coef, "loop")
    m = m.to(dtype)
    y, grads = grads_of(m, x.to(dtype), token, expert, weight.to(dtype), coef, dispatch)
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < 2e-2
    for g, g_r in zip(grads, g_ref):
        assert g.dtype == dtype and rel_err(g, g_r) < 3e-2


# ---- double backward ------------------------------------------------------------------------------------
def penalty_grads(m, gate, x, token, expert, dispatch):
    """Gradient penalty ``|d sum(y) / dx|^2`` and its gradients; the weights depend on x like a router's."""
    x = x.detach().requires_grad_()
    weight = gate(x).softmax(-1)[token, expert]
    y = m(x, token, expert, weight, dispatch=dispatch)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)  # constant (stride-0) incoming gradient
    penalty = g.pow(2).sum()
    return penalty, torch.autograd.grad(penalty, [x, *m.parameters(), *gate.parameters()])


@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm", "padded", "auto"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_double_backward_matches_loop(dispatch, activation):
    """The fused backward used to be silently treated as constant: a wrong (tiny) second derivative."""
    torch.manual_seed(11)
    m = Experts(5, 8, 16, activation, bias=True)
    gate = torch.nn.Linear(8, 5)
    x, token, expert, _ = small_case(dim=8)
    p_ref, g_ref = penalty_grads(m, gate, x, token, expert, "loop")
    p, grads = penalty_grads(m, gate, x, token, expert, dispatch)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    for g, g_r in zip(grads, g_ref):
        torch.testing.assert_close(g, g_r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["sorted", "padded"])
def test_gradgradcheck(dispatch):
    torch.manual_seed(12)
    m = Experts(5, 4, 6, "gelu", bias=True).double()
    x, token, expert, weight = small_case(dim=4)
    x = x.double().requires_grad_()
    weight = weight.double().requires_grad_()

    def f(x, weight, w_in, w_out, b_in, b_out):
        params = {"w_in": w_in, "w_out": w_out, "b_in": b_in, "b_out": b_out}
        return torch.func.functional_call(m, params, (x, token, expert, weight), {"dispatch": dispatch})

    inputs = (x, weight, *(p.detach().requires_grad_() for p in m.parameters()))
    assert torch.autograd.gradgradcheck(f, inputs)
