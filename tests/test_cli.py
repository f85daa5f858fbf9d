"""The command line: every experiment at smoke size end to end, one-line refusals (exit 2) of user
mistakes before any work, the results page; and `import moe_lite` reaching its public modules."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_lite.__main__ import main
from moe_lite.experiments import EXPERIMENTS, registry

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_smoke_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOE_LITE_OFFLINE", "1")
    out = tmp_path / "results"
    assert main(["run", "all", "--size", "smoke", "--data", "embedded", "--out", str(out), "--no-progress"]) == 0
    for name in EXPERIMENTS:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["name"] == name and record["size"] == "smoke"
        # the sequence study generates its data; every image study read the embedded subset
        expected = "generated (moe_lite.sequences)" if name == "sequence" else "embedded subset"
        assert record["data_source"] == expected
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


def test_import_moe_lite_reaches_its_public_modules_without_heavy_imports():
    """``import moe_lite`` makes every public submodule an attribute; plotly, ipywidgets and
    torchvision (notebook/report only) are imported on first use, not by ``import moe_lite``."""
    code = textwrap.dedent("""
        import inspect
        import sys
        import moe_lite
        heavy = ("plotly", "ipywidgets", "torchvision", "moe_lite.train", "moe_lite.viz", "moe_lite.experiments")
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        inspect.getmembers(moe_lite)  # as pydoc does: must not import the notebook modules
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        assert moe_lite.routers.TopK and moe_lite.losses.load_balance and moe_lite.routing.Routing
        assert moe_lite.experts.Experts and moe_lite.layers.MoE and moe_lite.models.ViT
        assert moe_lite.train.fit and moe_lite.data.DataError and moe_lite.metrics
        assert moe_lite.bench and moe_lite.page.figures_to_html and moe_lite.experiments.EXPERIMENTS
        assert moe_lite.widgets and moe_lite.notebook
        assert {"routers", "losses", "viz", "experiments"} <= set(dir(moe_lite))  # once used
        try:
            moe_lite.no_such_module
        except AttributeError as err:
            assert "no_such_module" in str(err)
        else:
            raise AssertionError("no AttributeError")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


# ---- user mistakes: one line on stderr naming the problem, exit code 2, no work done ----------------
def usage_error(argv, capsys) -> str:
    """Run the CLI in-process, check it refused with exit code 2; returns its one-line message."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Any data loading or experiment started by the CLI fails the test."""
    from moe_lite.experiments.core import RunContext

    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(RunContext, "splits", started)
    monkeypatch.setattr(registry, "run", started)  # the one runner of every experiment


def smoke_run(tmp_path, *extra):
    return ["run", "vimoe", "--size", "smoke", "--data", "embedded", "--no-progress",
            "--out", str(tmp_path / "results"), *extra]


def test_run_out_not_writable_fails_before_any_work(tmp_path, capsys, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "results"  # a folder that cannot be created: its parent is a file
    argv = smoke_run(tmp_path)
    argv[argv.index("--out") + 1] = str(bad)
    assert str(bad) in usage_error(argv, capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_run_out_read_only_folder_fails_before_any_work(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    argv = smoke_run(tmp_path)
    argv[argv.index("--out") + 1] = str(locked)
    try:
        assert str(locked) in usage_error(argv, capsys)
    finally:
        locked.chmod(0o700)


def test_run_out_probe_leaves_no_file(tmp_path, monkeypatch, capsys):
    """A good --out is checked with a probe file that is removed again (the run itself then fails
    here on purpose, after the checks)."""
    from moe_lite.experiments.core import RunContext

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunContext, "splits", stop)
    monkeypatch.setattr(registry, "run", stop)
    with pytest.raises(KeyboardInterrupt):
        main(smoke_run(tmp_path))
    assert (tmp_path / "results").is_dir() and not list((tmp_path / "results").iterdir())


@pytest.mark.parametrize("device, message", [("bogus", "bogus"), ("cuda", "CUDA is not available"),
                                             ("cuda:x", "cuda:x")])
def test_run_bad_device(tmp_path, capsys, monkeypatch, no_training, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = usage_error(smoke_run(tmp_path, "--device", device), capsys)
    assert message in err and "device" in err
    assert not (tmp_path / "results").exists()


def test_run_bad_size_in_the_environment(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.setenv("MOE_LITE_SIZE", "huge")
    argv = smoke_run(tmp_path)
    del argv[argv.index("--size"):argv.index("--size") + 2]
    err = usage_error(argv, capsys)
    assert "MOE_LITE_SIZE" in err and "huge" in err


@pytest.mark.parametrize("seed", [str(2**70), str(2**32), "-1", "2**70", "1.5"])
def test_run_seeds_out_of_range_or_not_integers(tmp_path, capsys, no_training, seed):
    err = usage_error(smoke_run(tmp_path, "--seeds", "0", seed), capsys)
    assert "seed" in err and seed in err


def test_run_seed_range_is_what_every_rng_accepts():
    import numpy as np

    from moe_lite.experiments.registry import MAX_SEED
    from moe_lite.train import seed_everything

    seed_everything(MAX_SEED)
    torch.Generator().manual_seed(MAX_SEED)
    np.random.default_rng(MAX_SEED)
    np.random.RandomState(MAX_SEED)


def test_run_unknown_argument_and_unknown_experiment(tmp_path, capsys, no_training):
    assert "--bogus" in usage_error(smoke_run(tmp_path, "--bogus"), capsys)
    assert "nope" in usage_error(["run", "nope", "--out", str(tmp_path / "r")], capsys)
    assert "--size" in usage_error(["run", "vimoe", "--size", "huge"], capsys)


def write_record(folder, name="vimoe", **changes):
    record = {"name": name, "size": "quick", "device": "cpu", "data_source": "embedded subset",
              "wall_time_s": 1.0, "config": {"seeds": [0]}, "tables": {"accuracy": [{"a": 1}]}}
    record.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record))
    return folder / f"{name}.json"


def test_report_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    assert str(missing) in usage_error(["report", str(missing)], capsys)
    a_file = write_record(tmp_path / "r")
    assert str(a_file) in usage_error(["report", str(a_file)], capsys)


def test_report_corrupt_json_names_the_file(tmp_path, capsys):
    write_record(tmp_path)
    (tmp_path / "zoo.json").write_text('{"name": "zoo", "tables": ')
    err = usage_error(["report", str(tmp_path)], capsys)
    assert str(tmp_path / "zoo.json") in err and "JSON" in err
    (tmp_path / "zoo.json").write_bytes(b"\xff\xfe{}")
    assert str(tmp_path / "zoo.json") in usage_error(["report", str(tmp_path)], capsys)


@pytest.mark.parametrize("content, message", [
    ([1, 2], "object"),
    ({"tables": {}}, "name"),
    ({"name": "zoo", "size": "quick"}, "tables"),
    ({"name": "zoo", "size": "quick", "tables": [1]}, "tables"),
    ({"name": 3, "size": "quick", "tables": {}}, "name"),
    ({"name": "zoo", "size": "quick", "tables": {}, "config": []}, "config"),
    ({"name": "zoo", "size": "quick", "tables": {}, "notes": "text"}, "notes"),
    ({"name": "zoo", "size": "quick", "tables": {}, "wall_time_s": "long"}, "wall_time_s"),
])
def test_report_json_of_the_wrong_shape_names_the_file(tmp_path, capsys, content, message):
    write_record(tmp_path)
    (tmp_path / "zoo.json").write_text(json.dumps(content))
    err = usage_error(["report", str(tmp_path)], capsys)
    assert str(tmp_path / "zoo.json") in err and message in err


def test_report_missing_intro(tmp_path, capsys):
    write_record(tmp_path)
    intro = tmp_path / "intro.md"
    err = usage_error(["report", str(tmp_path), "--intro", str(intro), "--out", str(tmp_path / "page.md")], capsys)
    assert str(intro) in err and not (tmp_path / "page.md").exists()


def test_report_bad_out(tmp_path, capsys):
    write_record(tmp_path / "r")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for bad in (blocker / "page.md", tmp_path / "r"):  # parent is a file; out is a folder
        assert str(bad) in usage_error(["report", str(tmp_path / "r"), "--out", str(bad)], capsys)
    bad_figures = blocker / "figures"
    assert str(bad_figures) in usage_error(["report", str(tmp_path / "r"), "--figures", str(bad_figures),
                                            "--figure-format", "html"], capsys)


def test_report_figures_without_kaleido(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("kaleido") is not None:
        pytest.skip("kaleido is installed")
    write_record(tmp_path / "r")
    err = usage_error(["report", str(tmp_path / "r"), "--figures", str(tmp_path / "f")], capsys)
    assert "kaleido" in err and "html" in err


def test_report_accepts_every_published_record():
    from moe_lite.experiments.report import load_records

    folder = REPO / "docs" / "results" / "quick"
    if not folder.is_dir():
        pytest.skip("no published results in this copy")
    assert len(load_records(folder)) == len(list(folder.glob("*.json"))) > 0


def test_costs_prints_one_row_per_representative_model(capsys):
    assert main(["costs", "--size", "smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("experiment | model | params")
    assert [line.split(" | ")[:2] for line in lines[1:]] == [
        ["vimoe", "dense"], ["vimoe", "vimoe"], ["dit", "dense"], ["dit", "expert race"], ["sequence", "top-2"]]


def test_size_costs_count_the_planned_steps():
    from moe_lite.experiments import vimoe
    from moe_lite.experiments.costs import size_costs

    rows = {(r["experiment"], r["model"]): r for r in size_costs("quick")}
    assert rows[("vimoe", "dense")]["steps"] == vimoe.SIZES["quick"].max_steps == 1200
    # total = per step x steps (the table rounds each)
    r = rows[("dit", "dense")]
    assert abs(r["PFLOP total"] - r["GFLOP/step"] * r["steps"] / 1e6) < 1e-3
