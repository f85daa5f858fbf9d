"""The study pieces of moe_lite.experiments: variant selection, per-seed summaries, the results
page's figures and the published results that notebooks quote."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moe_lite.__main__ import main
from moe_lite.experiments.core import Dataset, mean_std
from moe_lite.experiments.registry import EXPERIMENTS, UnknownVariant, check_variants, pairing_of


# ---- --variants ------------------------------------------------------------------------------------
def test_every_experiment_selects_its_variants_by_one_keyword():
    assert EXPERIMENTS["race"].select(None) == list(EXPERIMENTS["race"].variants)
    assert EXPERIMENTS["dit"].select(None) == ["dense", "token choice", "expert choice", "expert race"]
    assert EXPERIMENTS["race"].select(["expert race", "token choice"]) == ["expert race", "token choice"]
    check_variants(["zoo"], ["top-2"])
    check_variants(["balance"], ["load balance"])
    check_variants(["adapt"], ["linear probe"])
    check_variants(["dynamic"], ["top-p", "top-1"])
    check_variants(["vimoe-grid"], ["dense", "vimoe-all"])
    with pytest.raises(UnknownVariant, match="has no variant"):
        check_variants(["race"], ["expert race", "race, relu gating"])
    with pytest.raises(UnknownVariant, match="zoo has no variant"):
        check_variants(["dit", "zoo"], ["dense"])


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
    folder = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:  # the CLI (an edge) reads it through Settings.resolve
        mp.setenv("MOE_LITE_CACHE", str(folder / "cache"))
        assert main(["run", "dynamic", "vimoe-grid", "adapt", "zoo", "balance", "--size", "smoke", "--data",
                     "embedded", "--seeds", "0", "1", "--no-progress", "--out", str(folder)]) == 0
        assert main(["run", "race", "--size", "smoke", "--data", "embedded", "--seeds", "0", "1", "--no-progress",
                     "--variants", "race + per-layer reg", "race, balance loss", "expert race",
                     "--out", str(folder)]) == 0
    return folder


@pytest.mark.slow
def test_every_study_record_has_figures_and_mean_std_over_seeds(smoke_records):
    from moe_lite.experiments.registry import record_figures

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
    for title, rows in race["tables"].items():
        if "fd_fmnist_classifier" in rows[0]:  # every table of FDs, not the routing / convergence ones
            assert rows[-1]["variant"].startswith("real images (FD noise floor")
    # every record: provenance, and per-seed values carry their seed ids, paired against the baseline
    # (none for this race selection: its baseline, dense, did not run)
    for name in ("race", "dynamic", "vimoe-grid", "adapt", "zoo", "balance"):
        record = json.loads((smoke_records / f"{name}.json").read_text())
        assert record["provenance"]["seeds"] == [0, 1] and record["provenance"]["torch"] == torch.__version__
        paired = [rows for title, rows in record["tables"].items() if title.startswith("paired comparisons")]
        if name == "race":
            assert not paired
        else:
            assert paired and paired[0] and all(row["seeds"] == 2 for row in paired[0]), name
    assert race["metrics"]["expert race"]["fd_fmnist_classifier"]["seeds"] == [0, 1]
    grid = json.loads((smoke_records / "vimoe-grid.json").read_text())
    assert set(grid["metrics"]["cells"]) == {"8", "all"}
    # class specialisation is measured on every seed's model, not the first seed's only
    spec = grid["metrics"]["specialisation"]
    assert "dense" not in spec and spec
    assert all(layer["seeds"] == [0, 1] for entry in spec.values() for layer in entry.values())
    spec_table = next(rows for title, rows in grid["tables"].items() if title.startswith("class specialisation"))
    assert all(" ± " in cell for row in spec_table for key, cell in row.items() if key != "variant" and cell != "-")
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
    from moe_lite.experiments.report import published

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
    monkeypatch.setattr(report, "published", lambda name, size="quick", **_: record)
    text = report.show_published("zoo", ["comp"])
    assert "python -m moe_lite run zoo --size quick --data embedded --seeds 0 1 2" in text
    assert "| top-2 | 0.70 ± 0.01 |" in text and "**other**" not in text


# ---- paired comparisons, provenance, evaluation noise ----------------------------------------------------
def test_mean_std_stores_the_seed_ids_beside_the_values():
    assert mean_std([0.5, 0.7], seeds=[3, 1])["seeds"] == [3, 1]
    assert "seeds" not in mean_std([0.5, 0.7])
    with pytest.raises(ValueError, match="2 values but 3 seeds"):
        mean_std([0.5, 0.7], seeds=[0, 1, 2])


def _acc(values, seeds):
    return {"accuracy": mean_std(values, seeds=seeds)}


def test_paired_comparisons_pair_by_seed_id_against_the_baseline():
    from moe_lite.experiments.core import paired_comparisons

    # vimoe wins by 0.02 in every seed; stored in another seed order than dense: pairing is by id
    metrics = {"variants": {"dense": _acc([0.80, 0.70, 0.75], [0, 1, 2]),
                            "vimoe": _acc([0.77, 0.82, 0.72], [2, 0, 1])}}
    title, rows = paired_comparisons(pairing_of("vimoe"), metrics, seeds=[0, 1, 2])
    assert title.startswith("paired comparisons against dense")
    (row,) = rows
    assert row["variant"] == "vimoe" and row["metric"] == "accuracy" and row["seeds"] == 3
    assert row["difference"] == pytest.approx(0.02) and row["CI low"] == pytest.approx(0.02)
    assert row["verdict"] == "vimoe better"
    # without stored seed ids the config's order pairs them: the same values now differ by seed
    plain = {"variants": {k: {"accuracy": {key: v["accuracy"][key] for key in ("mean", "std", "n", "values")}}
                          for k, v in metrics["variants"].items()}}
    assert paired_comparisons(pairing_of("vimoe"), plain, seeds=[0, 1, 2])[1][0]["verdict"] == "not separable"
    # one seed, a missing baseline or an experiment without a pairing: no rows
    assert paired_comparisons(pairing_of("vimoe"), {"variants": {"dense": _acc([0.8], [0]), "vimoe": _acc([0.9], [0])}}, [0])[1] == []
    assert paired_comparisons(pairing_of("vimoe"), {"variants": {"vimoe": _acc([0.8, 0.9], [0, 1])}}, [0, 1])[1] == []
    assert paired_comparisons(pairing_of("sequence"), metrics, [0, 1, 2])[1] == []


def test_paired_comparisons_follow_each_metrics_direction_and_the_grid_cells():
    from moe_lite.experiments.core import paired_comparisons

    fd = lambda values: {"fd_fmnist_classifier": mean_std(values, seeds=[0, 1, 2])}  # noqa: E731
    _, rows = paired_comparisons(pairing_of("race"), {"dense": fd([39.0, 45.6, 35.0]), "expert race": fd([36.0, 42.0, 31.0]),
                                          "real_fd_floor": {"mean": 3.0}, "curves": {}}, [0, 1, 2])
    assert [(r["variant"], r["better"], r["verdict"]) for r in rows] == [("expert race", "lower", "expert race better")]
    cells = {"cells": {"8": {"train_images": 80, "dense": _acc([0.5, 0.6], [0, 1]), "vimoe": _acc([0.4, 0.5], [0, 1])},
                       "all": {"train_images": 800, "dense": _acc([0.7, 0.8], [0, 1]),
                               "vimoe": _acc([0.71, 0.8], [0, 1])}}}
    _, rows = paired_comparisons(pairing_of("vimoe-grid"), cells, [0, 1])
    assert [(r["train images"], r["verdict"]) for r in rows] == [("80", "dense better"), ("800", "not separable")]


def test_dynamic_compares_top_p_with_both_top_1_and_top_2():
    from moe_lite.experiments.core import paired_comparisons

    acc = lambda values: _acc(values, [0, 1, 2])  # noqa: E731
    metrics = {"top-p": acc([0.80, 0.81, 0.82]), "top-1": acc([0.70, 0.72, 0.71]), "top-2": acc([0.79, 0.80, 0.81])}
    title, rows = paired_comparisons(pairing_of("dynamic"), metrics, [0, 1, 2])
    assert title.startswith("paired comparisons against top-2, top-1 (")
    pairs = [(r["variant"], r["baseline"]) for r in rows if r["metric"] == "accuracy"]
    # every pair once: top-1 against top-2, and top-p against both
    assert pairs == [("top-p", "top-2"), ("top-1", "top-2"), ("top-p", "top-1")]
    # a record without top-1 (published before it trained) is titled and compared as before
    del metrics["top-1"]
    title, rows = paired_comparisons(pairing_of("dynamic"), metrics, [0, 1, 2])
    assert title.startswith("paired comparisons against top-2 (") and {r["baseline"] for r in rows} == {"top-2"}


def test_result_json_records_provenance_without_the_host_name(tmp_path):
    import socket
    import subprocess
    from pathlib import Path

    from moe_lite.experiments.core import ExperimentResult

    result = ExperimentResult("vimoe", "smoke", "cpu", "embedded subset", config={"seeds": [0, 1]})
    json_path, _ = result.save(tmp_path)
    record = json.loads(json_path.read_text())
    p = record["provenance"]
    assert p["seeds"] == [0, 1] and p["torch"] == torch.__version__ and p["device"] == "cpu"
    assert p["threads"] == torch.get_num_threads() and p["device_name"] and p["python"].count(".") == 2
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert p["git_commit"] == head.stdout.strip() and isinstance(p["git_dirty"], bool)
    assert socket.gethostname() not in json_path.read_text()


def test_provenance_outside_a_git_checkout_is_unknown(monkeypatch):
    from moe_lite.experiments import core

    monkeypatch.setattr(core, "_git", lambda *args: None)
    p = core.provenance("cpu", [0])
    assert p["git_commit"] == "unknown" and p["git_dirty"] is None


def _vimoe_record(**extra):
    metrics = {"variants": {"dense": {"accuracy": {"mean": 0.75, "std": 0.05, "n": 3, "values": [0.80, 0.70, 0.75]}},
                            "vimoe": {"accuracy": {"mean": 0.77, "std": 0.05, "n": 3, "values": [0.82, 0.72, 0.77]}}}}
    return {"name": "vimoe", "size": "quick", "device": "cpu", "data_source": "embedded subset",
            "wall_time_s": 5.0, "config": {"seeds": [0, 1, 2], "test_images": 2000}, "metrics": metrics,
            "tables": {"accuracy": [{"variant": "dense", "accuracy": 0.75}]}, **extra}


def test_report_section_adds_paired_comparisons_noise_and_provenance():
    from moe_lite.experiments.report import section

    text = section(_vimoe_record())
    assert "**paired comparisons against dense" in text
    assert "| vimoe | dense | accuracy | higher | 0.02 | 0.02 | 0.02 | 3 | vimoe better |" in text
    assert "no seed ids, so seeds are paired in the config's seed order (0 1 2)" in text
    assert "measured on 2,000 test images: the binomial standard error of one accuracy is 0.97 points" in text
    assert "Provenance: not recorded" in text
    prov = {"git_commit": "0123456789abcdef0123", "git_dirty": True, "torch": "2.1", "python": "3.11.2",
            "device": "cpu", "device_name": "Some CPU", "threads": 1, "seeds": [0, 1, 2]}
    own = [{"variant": "vimoe", "verdict": "from the run"}]
    text = section(_vimoe_record(provenance=prov, tables={"paired comparisons against dense (x)": own}))
    assert ("Provenance: git 0123456789ab with uncommitted changes to moe_lite/; torch 2.1, Python 3.11.2; cpu (Some CPU), "
            "1 threads; seeds 0 1 2.") in text
    # the run's own table is printed once and not recomputed
    assert text.count("paired comparisons against dense") == 1 and "from the run" in text
    assert "config's seed order" not in text


def test_a_page_sentence_must_agree_with_the_json_it_cites():
    from moe_lite.experiments.report import check_record_sentence, record_comparison
    from moe_lite.stats import compare_sentence

    record = _vimoe_record()
    result = record_comparison(record, "vimoe", "dense", "accuracy")
    sentence = compare_sentence("vimoe", "dense", result, "accuracy")
    assert sentence.startswith("vimoe beats dense on accuracy by 0.02 (95% CI [0.02, 0.02], 3 seeds")
    check_record_sentence(sentence, record, "vimoe", "dense", "accuracy")
    with pytest.raises(AssertionError, match="claims 'not separable'"):
        check_record_sentence("vimoe and dense are not separable.", record, "vimoe", "dense", "accuracy")
    # when the numbers change, the same sentence fails
    record["metrics"]["variants"]["vimoe"]["accuracy"]["values"] = [0.82, 0.68, 0.77]
    with pytest.raises(AssertionError, match="the numbers give 'not separable'"):
        check_record_sentence(sentence, record, "vimoe", "dense", "accuracy")
    with pytest.raises(KeyError, match="no per-seed 'accuracy' for 'vimoe-all'"):
        record_comparison(record, "vimoe-all", "dense", "accuracy")


def test_published_records_get_paired_tables_and_show_published_is_unchanged():
    from moe_lite.experiments.report import load_records, record_paired_table, section, show_published

    records = {r["name"]: r for r in load_records(Path(__file__).resolve().parents[1] / "docs/results/quick")}
    for name in ("race", "dit", "vimoe", "vimoe-grid", "dynamic", "zoo", "balance", "adapt"):
        title, rows, _ = record_paired_table(records[name])
        seeds = len(records[name]["config"]["seeds"])  # 3, or 5 where a study is cheap (zoo, balance)
        assert seeds >= 3 and rows and all(r["seeds"] == seeds for r in rows), name
        assert title in section(records[name])
    # the notebooks quote show_published: it shows the stored tables only (no table or provenance the
    # page's renderer adds)
    for name in ("race", "vimoe-grid"):
        shown = show_published(name)
        assert re.findall(r"^\*\*(.+)\*\*$", shown, flags=re.M) == list(records[name]["tables"]), name
        assert "Provenance" not in shown


def test_every_experiment_defines_every_size():
    """smoke / quick / gpu / full exist for every experiment, so `--size gpu` never fails half-way."""
    from moe_lite.experiments import SIZES, adapt, diffusion, dynamic, sequence, vimoe, zoo

    for module in (adapt, diffusion, dynamic, sequence, vimoe, zoo):
        assert tuple(module.SIZES) == SIZES, module.__name__
    assert tuple(vimoe.GRID_TRAIN_SIZES) == SIZES


def test_quick_vit_recipe_is_the_measured_one():
    """The quick ViT recipe of docs/recipes.md: 7x7 patches after a conv stem, a class token, mirrors
    only, label smoothing, 1200 steps; and the classification task the trainer gets follows it."""
    from moe_lite.experiments import vimoe
    from moe_lite.experiments.common import QUICK_MODEL

    quick = vimoe.SIZES["quick"]
    assert quick.model == QUICK_MODEL == {"patch_size": 7, "stem": "conv", "stem_channels": 8, "pooling": "cls"}
    assert (quick.max_steps, quick.augment, quick.shift, quick.label_smoothing) == (1200, True, 0, 0.1)


def test_reference_classifiers():
    import torch

    from moe_lite.models.reference import PixelClassifier

    x = torch.randn(3, 1, 28, 28)
    assert PixelClassifier()(x).shape == (3, 10)
    assert sum(p.numel() for p in PixelClassifier().parameters()) == 784 * 10 + 10
    assert sum(p.numel() for p in PixelClassifier(256).parameters()) == 784 * 256 + 256 + 256 * 10 + 10
    with pytest.raises(ValueError, match="hidden"):
        PixelClassifier(0)


def test_upcycled_variant_at_equal_total_steps(tmp_path):
    """vimoe-upcycled: dense for half the steps, then upcycled and trained the other half; its control
    is the same MoE from scratch for all the steps. Both end with the same step count."""
    from moe_lite.experiments.core import RunContext
    from moe_lite.experiments.vimoe import UPCYCLE_VARIANTS, run_vimoe

    ctx = RunContext.create("smoke", [0], "cpu", "embedded", False, cache=tmp_path)
    result = run_vimoe(ctx=ctx, variants=UPCYCLE_VARIANTS, routing_views=False, references=False)
    up, scratch = (result.metrics["variants"][v] for v in UPCYCLE_VARIANTS)
    assert up["steps"] == scratch["steps"] > 1
    assert up["params_total"] == scratch["params_total"]
    assert result.models["vimoe-upcycled"].config == result.models["vimoe-upcycled-scratch"].config


def test_svg_figures_render_with_the_bundled_plotlyjs_and_restore_plotlys_setting(tmp_path, monkeypatch):
    """kaleido fetches plotly.js from a CDN unless told otherwise, so offline SVG export failed
    ("kaleido_scopes is not defined"). write_figures points it at plotly's own copy while it writes,
    and leaves plotly's setting as it found it."""
    import plotly.io as pio
    from plotly.basedatatypes import BaseFigure
    from moe_lite.experiments import registry

    if not hasattr(getattr(pio, "defaults", None), "plotlyjs"):
        pytest.skip("this plotly has no plotlyjs setting")
    seen = []
    monkeypatch.setattr(BaseFigure, "write_image", lambda self, path, *a, **k: seen.append(pio.defaults.plotlyjs))
    record = json.loads((Path(__file__).resolve().parents[1] / "docs/results/quick/vimoe-grid.json").read_text())
    before = pio.defaults.plotlyjs
    paths = registry.write_figures(record, tmp_path)
    assert paths and len(seen) == len(paths)
    assert all(value and value.endswith("plotly.min.js") and Path(value).is_file() for value in seen)
    assert pio.defaults.plotlyjs == before
