"""End to end: every experiment at smoke size through the command line, JSON and HTML written."""
import json

import pytest

from moe_lite.__main__ import main
from moe_lite.experiments import EXPERIMENTS


@pytest.mark.slow
def test_run_all_smoke_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOE_LITE_OFFLINE", "1")
    out = tmp_path / "results"
    assert main(["run", "all", "--size", "smoke", "--data", "embedded", "--out", str(out), "--no-progress"]) == 0
    for name in EXPERIMENTS:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["name"] == name and record["size"] == "smoke"
        assert record["data_source"] == "embedded subset"
        assert record["wall_time_s"] > 0 and record["metrics"] and record["tables"]
        html = (out / f"{name}.html").read_text()
        assert html.count("<script") >= 2 and "plotly" in html.lower()
    # the DiT report says its metric is not Inception FID
    assert "not Inception FID" in (out / "dit.html").read_text()
    # a second run reloads the cached checkpoints instead of training again
    assert main(["run", "adapt", "--size", "smoke", "--data", "embedded", "--out", str(out), "--no-progress"]) == 0
    assert list((tmp_path / "cache" / "runs" / "adapt").glob("*.pt"))


def test_report_renders_tables_and_the_reproducing_command(tmp_path, capsys):
    record = {"name": "vimoe", "size": "quick", "device": "cpu", "data_source": "embedded subset",
              "wall_time_s": 12.5, "config": {"seeds": [0, 1]}, "notes": ["a note"],
              "tables": {"accuracy": [{"variant": "dense", "accuracy": 0.8512}, {"variant": "vimoe", "accuracy": 0.86}]}}
    (tmp_path / "vimoe.json").write_text(json.dumps(record))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "results.md")]) == 0
    page = (tmp_path / "results.md").read_text()
    assert "`python -m moe_lite run vimoe --size quick --data embedded --seeds 0 1`" in page
    assert "| variant | accuracy |" in page and "| dense | 0.8512 |" in page
    assert "wall time: 12 s" in page and "> a note" in page


def test_checkpoint_cache_key_sees_the_data_content():
    import torch
    from torch.utils.data import TensorDataset

    from moe_lite.experiments.common import data_fingerprint

    x, y = torch.zeros(10, 1, 28, 28), torch.arange(10)
    same = data_fingerprint(TensorDataset(x.clone(), y.clone()))
    assert data_fingerprint(TensorDataset(x, y)) == same
    y2 = y.clone()
    y2[0] = 5  # same size, different content
    assert data_fingerprint(TensorDataset(x, y2)) != same
