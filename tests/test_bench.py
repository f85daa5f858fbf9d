"""moe_lite.bench (layer rows, the model row, the CLI) and the speed paths it measures stay exact.

Speed goals live in the bench's output, never here: these tests only check that it runs and reports.
"""
import io
import json

import pytest
import torch

from moe_lite import bench
from moe_lite.routers import TopK, _topk_indices, check_logits
from moe_lite.routing import NonFiniteError


def test_model_row_compares_vimoe_all_blocks_with_its_dense_equivalent():
    out = io.StringIO()
    row = bench.run_model(repeats=2, warmup=0, size="smoke", out=out)
    assert row["repeats"] == 2 and row["ratio"] > 0 and row["dense_ms"] > 0 and row["moe_ms"] > 0
    assert row["target"] == bench.MODEL_TARGET and isinstance(row["pass"], bool)
    assert "ViMoE all blocks (smoke)" in out.getvalue() and "dense_equivalent" in row["dense"]
    moe, dense, moe_cfg, dense_cfg, batch = bench.model_pair("smoke")
    assert moe_cfg.moe_block_indices == list(range(moe_cfg.depth))  # MoE in every block
    assert dense_cfg.moe_block_indices == [] and batch > 0
    # equal active parameters up to the gates (dim * E per MoE layer)
    assert row["moe_active_params"] - row["dense_params"] == moe_cfg.depth * moe_cfg.dim * moe_cfg.num_experts
    with pytest.raises(ValueError, match="size"):
        bench.model_pair("huge")


def test_cpu_clock_and_bad_clock():
    moe = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    timing = bench.time_pair(moe, moe, x, torch.ones(3, 4), repeats=2, warmup=0, clock="cpu")
    assert timing["repeats"] == 2 and timing["ratio"] > 0
    with pytest.raises(ValueError, match="clock"):
        bench.time_pair(moe, moe, x, torch.ones(3, 4), repeats=1, warmup=0, clock="gpu")


def test_cli_sections_json_and_errors(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rows = bench.main(["--sections", "model", "--model-size", "smoke", "--repeats", "1", "--quick",
                       "--threads", "1", "--clock", "cpu", "--json", str(path)])
    assert [r["section"] for r in rows] == ["model"]
    saved = json.loads(path.read_text())
    assert saved["rows"] == [] and saved["model"]["config"] == "ViMoE all blocks (smoke)"
    assert saved["environment"]["clock"] == "cpu"
    for bad in (["--sections", "nope"], ["--clock", "gpu"], ["--sections", "model", "--model-size", "huge"]):
        with pytest.raises(SystemExit):
            bench.main(bad)
    assert "model-size" in capsys.readouterr().err


# ---- the speed paths are exact ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_topk_indices_equal_topk(dtype):
    g = torch.Generator().manual_seed(0)
    for e in (1, 2, 8, 16, 33, 64):
        for k in range(1, min(e, 9) + 1):
            scores = torch.randn(3, 7, e, generator=g, dtype=dtype)
            before = scores.clone()
            assert torch.equal(_topk_indices(scores, k), scores.topk(k, dim=-1).indices.sort(-1).values), (e, k)
            assert torch.equal(scores, before)  # the input is not masked in place


def test_fast_topk_indices_ties_and_minus_inf():
    ties = torch.tensor([[[1.0, 3.0, 0.0, 3.0] + [3.0] + [0.0] * 11]])  # E = 16: the amax path
    assert _topk_indices(ties, 2).tolist() == [[[1, 3]]]  # ties: the lower indices
    masked = torch.full((1, 1, 16), float("-inf"))
    masked[0, 0, [5, 9]] = torch.tensor([0.2, 0.1])  # group-limited scores: -inf outside the kept groups
    assert _topk_indices(masked, 2).tolist() == [[[5, 9]]]


def test_topk_router_routing_unchanged_with_the_fast_path():
    logits = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    routing = TopK(2)(logits)
    scores = logits.softmax(-1).reshape(20, 64)
    idx = scores.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(routing.expert, idx.reshape(-1))
    assert torch.equal(routing.token, torch.arange(20).repeat_interleave(2))
    assert torch.allclose(routing.weight, scores.gather(1, idx).reshape(-1))


def test_check_logits_fast_sum_path_keeps_its_answers():
    check_logits(torch.full((1, 2, 2), 3e38))  # finite, but the sum overflows: the full check decides
    for bad in (float("nan"), float("inf"), float("-inf")):
        logits = torch.zeros(1, 2, 3)
        logits[0, 1, 2] = bad
        with pytest.raises(NonFiniteError):
            check_logits(logits)
    both = torch.zeros(1, 1, 2)
    both[0, 0] = torch.tensor([float("inf"), float("-inf")])  # sums to nan
    with pytest.raises(NonFiniteError):
        check_logits(both)
