"""moe_lite.gpu_check runs without a GPU: CUDA parts skip, the CPU-capable ones run at their smallest."""
import json

import pytest
import torch

from moe_lite import gpu_check


def test_quick_cpu_run_writes_one_json(tmp_path):
    report = gpu_check.run_checks(tmp_path, budget_s=120, quick_cpu=True, device="cpu")
    saved = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["cuda"] is False and "no CUDA" in saved["environment"]["note"]
    assert saved["environment"]["torch"] == torch.__version__
    status = {name: part["status"] for name, part in saved["parts"].items()}
    assert status == {"pytest_cuda": "skip", "trainer_amp": "pass", "checkpoint": "pass",
                      "race_batch_independence": "pass", "bench": "skip", "experiment": "skip"}
    assert saved["ok"] is True and all(part["seconds"] >= 0 for part in saved["parts"].values())
    assert saved["parts"]["trainer_amp"]["steps"] == 3 and saved["parts"]["race_batch_independence"]["max_abs_diff"] <= 1e-5
    assert not (tmp_path / "checkpoint_check.pt").exists()


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(device, left, out):
        raise RuntimeError("checkpoint broke")

    monkeypatch.setattr(gpu_check, "_checkpoint", broken)
    monkeypatch.setattr(gpu_check, "_trainer_amp", lambda device, left, out: {"steps": 0})
    assert gpu_check.main(["--out", str(tmp_path), "--quick-cpu", "--device", "cpu"]) == 1
    saved = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert saved["ok"] is False
    assert saved["parts"]["checkpoint"]["status"] == "fail" and "checkpoint broke" in saved["parts"]["checkpoint"]["error"]
    assert saved["parts"]["race_batch_independence"]["status"] == "pass"


def test_without_quick_cpu_a_cpu_run_only_records_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert {p["status"] for p in saved["parts"].values()} == {"skip"} and saved["cuda"] is False


def test_pytest_summary_counts_and_cli_errors(tmp_path, monkeypatch):
    assert gpu_check.pytest_counts("12 passed, 3 skipped, 1 failed, 400 deselected in 9.1s") == {
        "passed": 12, "skipped": 3, "failed": 1, "deselected": 400}
    assert gpu_check.pytest_counts("no tests ran in 0.1s") == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--device", "cuda"])
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--budget", "0"])
