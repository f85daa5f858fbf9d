"""The study pieces of moe_lite.experiments: variant selection, per-seed summaries, the results
page's figures and the published results that notebooks quote."""
from __future__ import annotations

import json

import pytest
import torch

from moe_lite.__main__ import main
from moe_lite.experiments.core import Dataset, mean_std
from moe_lite.experiments.registry import UnknownVariant, variant_kwargs


# ---- --variants ------------------------------------------------------------------------------------
def test_variant_selection_maps_to_each_experiments_keyword():
    assert variant_kwargs("race", None) == {}
    assert variant_kwargs("race", ["expert race", "token choice"]) == {"variants": ["expert race", "token choice"]}
    assert variant_kwargs("zoo", ["top-2"]) == {"routers": ["top-2"]}
    assert variant_kwargs("balance", ["load balance"]) == {"methods": ["load balance"]}
    assert variant_kwargs("vimoe-grid", ["dense", "vimoe-all"]) == {"variants": ["dense", "vimoe-all"]}
    with pytest.raises(UnknownVariant, match="has no variant"):
        variant_kwargs("race", ["expert race", "race, relu gating"])
    with pytest.raises(UnknownVariant, match="takes no --variants"):
        variant_kwargs("dynamic", ["top-p"])


def test_cli_rejects_a_bad_variant_before_training(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", "race", "--size", "smoke", "--variants", "nope", "--out", str(out)]) == 2
    assert "has no variant" in capsys.readouterr().err and not out.exists()


def test_report_command_names_the_selected_variants():
    from moe_lite.experiments.report import command_for

    record = {"name": "race", "size": "quick", "data_source": "embedded subset",
              "config": {"seeds": [0, 1, 2], "selected_variants": ["expert race", "dense"]}}
    assert command_for(record) == ("python -m moe_lite run race --size quick --data embedded --seeds 0 1 2 "
                                   "--variants 'expert race' dense")


# ---- dynamic routing: difficulty statistics -----------------------------------------------------------
def test_difficulty_statistics_on_a_hand_made_profile():
    from moe_lite.experiments.dynamic import _difficulty

    # 20 samples, 2 per class; experts rise with the loss, wrong answers take 3 experts, right ones 1
    y = torch.arange(10).repeat_interleave(2)
    loss = torch.arange(20, dtype=torch.float)
    correct = (torch.arange(20) < 14).float()  # classes 7, 8, 9 are all wrong
    experts = torch.where(correct == 1, 1.0, 3.0) + loss * 1e-3
    profile = {"loss": loss, "correct": correct, "experts": experts, "layers": {"blocks.1.mlp": experts}}
    stats = _difficulty(profile, Dataset(torch.zeros(20, 1, 28, 28), y, "test"))
    assert stats["accuracy"] == pytest.approx(0.7)
    assert stats["loss_experts_spearman"] == pytest.approx(1.0)
    assert stats["experts_correct"] == pytest.approx(float(experts[:14].mean()))
    assert stats["experts_wrong"] == pytest.approx(float(experts[14:].mean()))
    # class error ranks (ties averaged): classes 0-6 share rank 3, classes 7-9 rank 8; experts rise
    # with the class index, ranks 0..9: the Pearson correlation of those two rank vectors
    error_ranks = torch.tensor([3.0] * 7 + [8.0] * 3, dtype=torch.float64)
    expert_ranks = torch.arange(10, dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([error_ranks, expert_ranks]))[0, 1].item()
    assert stats["class_error_experts_spearman"] == pytest.approx(expected)
    assert stats["layers"] == {"blocks.1.mlp": pytest.approx(float(experts.mean()))}


# ---- ViMoE grid tables ------------------------------------------------------------------------------
def _cell(n, accs):
    return {"train_images": n, **{v: {"accuracy": mean_std(a)} for v, a in accs.items()}}


def test_grid_spread_rows_pair_shared_and_unshared_variants():
    from moe_lite.experiments.vimoe import _spread_rows

    cells = {"200": _cell(2000, {"vimoe": [0.80, 0.82, 0.84], "vimoe-no-shared": [0.70, 0.80, 0.90],
                                 "dense": [0.8, 0.8, 0.8]})}
    rows = _spread_rows(cells, ["dense", "vimoe", "vimoe-no-shared"])
    assert rows == [{"placement": "last-2", "train_images": 2000, "std, shared": 2.0, "std, no shared": 10.0,
                     "mean, shared": 0.82, "mean, no shared": 0.8}]


# ---- results page figures and published results ---------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_records(tmp_path_factory):
    """A smoke run of every experiment that has summary figures, two seeds (JSON records)."""
    import os

    folder = tmp_path_factory.mktemp("results")
    old = os.environ.get("MOE_LITE_CACHE")
    os.environ["MOE_LITE_CACHE"] = str(folder / "cache")
    try:
        assert main(["run", "dynamic", "vimoe-grid", "adapt", "zoo", "balance", "--size", "smoke", "--data",
                     "embedded", "--seeds", "0", "1", "--no-progress", "--out", str(folder)]) == 0
        assert main(["run", "race", "--size", "smoke", "--data", "embedded", "--seeds", "0", "1", "--no-progress",
                     "--variants", "race + per-layer reg", "race, balance loss", "expert race",
                     "--out", str(folder)]) == 0
    finally:
        if old is None:
            os.environ.pop("MOE_LITE_CACHE")
        else:
            os.environ["MOE_LITE_CACHE"] = old
    return folder


@pytest.mark.slow
def test_every_study_record_has_figures_and_mean_std_over_seeds(smoke_records):
    from moe_lite.experiments.figures import record_figures

    for name in ("race", "dynamic", "vimoe-grid", "adapt", "zoo", "balance"):
        record = json.loads((smoke_records / f"{name}.json").read_text())
        assert record["config"]["seeds"] == [0, 1]
        figures = record_figures(record)
        assert figures, name
        for fig in figures.values():
            assert fig.data and all(len(trace.y) > 0 for trace in fig.data)
    race = json.loads((smoke_records / "race.json").read_text())
    assert list(race["tables"])[1].startswith("Table 2")  # the selection completes Table 2 only
    assert race["metrics"]["expert race"]["max_vio"]["n"] == 2
    assert race["config"]["selected_variants"] == ["race + per-layer reg", "race, balance loss", "expert race"]
    # the real-vs-real FD at the same sample count stands under every FD table
    floor = race["metrics"]["real_fd_floor"]
    assert floor["draws"] == 3 and floor["num_samples"] == 20 and floor["mean"] > 0
    for rows in race["tables"].values():
        assert rows[-1]["variant"].startswith("real images (FD noise floor")
    grid = json.loads((smoke_records / "vimoe-grid.json").read_text())
    assert set(grid["metrics"]["cells"]) == {"8", "all"}
    dynamic = json.loads((smoke_records / "dynamic.json").read_text())
    assert {"top-p", "top-2", "top-p, no entropy loss"} <= set(dynamic["metrics"])


@pytest.mark.slow
def test_report_writes_figures_and_links_them(smoke_records, tmp_path):
    out = tmp_path / "docs" / "results.md"
    intro = tmp_path / "intro.md"
    intro.write_text("# Findings\n\nRace wins.\n")
    assert main(["report", str(smoke_records), "--out", str(out), "--intro", str(intro),
                 "--figures", str(tmp_path / "docs" / "figures"), "--figure-format", "html"]) == 0
    page = out.read_text()
    assert page.startswith("# Findings") and "![race: table-2](figures/race-table-2.html)" in page
    assert (tmp_path / "docs" / "figures" / "vimoe-grid-accuracy.html").is_file()
    assert page.index("## race") < page.index("## dynamic") < page.index("## zoo")


def test_published_results_are_read_from_the_repository(tmp_path):
    from moe_lite.experiments.report import published, show_published

    folder = tmp_path / "docs" / "results" / "quick"
    folder.mkdir(parents=True)
    record = {"name": "zoo", "size": "quick", "device": "cpu", "data_source": "embedded subset",
              "wall_time_s": 3.0, "config": {"seeds": [0, 1, 2]},
              "tables": {"comparison": [{"router": "top-2", "accuracy": "0.70 ± 0.01"}], "other": []}}
    (folder / "zoo.json").write_text(json.dumps(record))
    assert published("zoo", root=tmp_path) == record
    with pytest.raises(FileNotFoundError, match="python -m moe_lite run dit"):
        published("dit", root=tmp_path)
    # the repository's own published results: every experiment of the registry is there
    from moe_lite.experiments import EXPERIMENTS

    for name in EXPERIMENTS:
        assert published(name)["name"] == name


def test_show_published_picks_tables_by_title(monkeypatch):
    from moe_lite.experiments import report

    record = {"name": "zoo", "size": "quick", "device": "cpu", "data_source": "embedded subset",
              "wall_time_s": 3.0, "config": {"seeds": [0, 1, 2]},
              "tables": {"comparison": [{"router": "top-2", "accuracy": "0.70 ± 0.01"}],
                         "other": [{"x": 1}]}}
    monkeypatch.setattr(report, "published", lambda name, size="quick": record)
    text = report.show_published("zoo", ["comp"])
    assert "python -m moe_lite run zoo --size quick --data embedded --seeds 0 1 2" in text
    assert "| top-2 | 0.70 ± 0.01 |" in text and "**other**" not in text
