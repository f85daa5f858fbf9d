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
