"""The experiment runner: a declaration is all an experiment needs. A tiny experiment declared here is
registered and runs through the runner, ``run_experiments`` and the CLI's ``run`` and ``list``."""
from __future__ import annotations

import json
from typing import Any, Dict

import plotly.graph_objects as go
import pytest

from moe_lite.__main__ import main
from moe_lite.experiments import EXPERIMENTS, Experiment, ExperimentResult, Pairing, Run, RunContext, run
from moe_lite.experiments.registry import register, record_figures
from moe_lite.experiments.runner import UnknownVariant

# ---- a whole experiment: one declaration ------------------------------------------------------------------
#: variant name -> what defines it: here a number the "model" adds to its score
TOY_VARIANTS = {"baseline": 0.0, "better": 0.1, "worse": -0.1}


def _toy_prepare(run: Run) -> Dict[str, Any]:
    run.state["offset"] = run.spec["offset"]
    return {"variants": list(run.variants), "seeds": run.seeds, "scale": run.options["scale"]}


def _toy_train(name: str, shift: float, seed: int, run: Run) -> Dict[str, Any]:
    score = run.options["scale"] * (run.state["offset"] + shift + 0.01 * seed)
    return {"score": score, "model": f"model {name}/{seed}",
            "figures": {f"curve: {name}": go.Figure(go.Scatter(x=[0, 1], y=[0, score]))}}


def _toy_summarise(records, run: Run) -> None:
    rows = []
    for name, per_seed in records.items():
        summary = run.over_seeds(per_seed, "score")
        run.result.metrics[name] = {"score": summary}
        rows.append({"variant": name, "score": round(summary["mean"], 4), "seeds": summary["n"]})
    run.table("scores", "scores of every variant (mean over seeds)", rows)


def _toy_figures(record):
    names = [n for n in record["metrics"] if n in TOY_VARIANTS]
    return {"scores": go.Figure(go.Bar(x=names, y=[record["metrics"][n]["score"]["mean"] for n in names]))}


TOY = Experiment("toy", "a toy experiment of the runner's tests", {"smoke": {"offset": 1.0}, "quick": {"offset": 2.0}},
                 TOY_VARIANTS, _toy_train, _toy_summarise, prepare=_toy_prepare, default_variants=("baseline", "better"),
                 options={"scale": 1.0}, figures=_toy_figures, pairing=Pairing("baseline", {"score": "higher"}),
                 data_source="made up")


@pytest.fixture
def toy(monkeypatch):
    """TOY registered for one test (last in the registry, so last on the page), removed after it."""
    monkeypatch.setitem(EXPERIMENTS, "toy", TOY)  # what register(TOY) does, undone at teardown
    return TOY


def _ctx(seeds=(0, 1, 2)) -> RunContext:
    return RunContext.create("smoke", list(seeds), "cpu", progress=False, cache=None)


def test_the_runner_owns_the_loop_statistics_tables_and_pairing():
    result = run(TOY, _ctx(), scale=2.0)
    assert isinstance(result, ExperimentResult) and result.name == "toy" and result.data_source == "made up"
    assert result.config == {"variants": ["baseline", "better"], "seeds": [0, 1, 2], "scale": 2.0}
    # mean_std over seeds, seed ids kept
    assert result.metrics["better"]["score"]["values"] == pytest.approx([2.2, 2.22, 2.24])
    assert result.metrics["better"]["score"]["seeds"] == [0, 1, 2]
    # the first seed's model and figures, in variant order
    assert result.models == {"baseline": "model baseline/0", "better": "model better/0"}
    assert list(result.figures) == ["curve: baseline", "curve: better"]
    # named tables; JSON keeps tables by title
    assert result.table("scores")[1] == {"variant": "better", "score": 2.22, "seeds": 3}
    paired = result.table("paired")
    assert [(r["variant"], r["baseline"], r["verdict"]) for r in paired] == [("better", "baseline", "better better")]
    record = result.to_dict()
    assert list(record["tables"]) == ["scores of every variant (mean over seeds)", result.table_names["paired"]]
    assert record["table_names"]["scores"] == "scores of every variant (mean over seeds)"
    assert result.wall_time_s > 0
    with pytest.raises(KeyError, match="no table 'nope'"):
        result.table("nope")


def test_one_variants_keyword_checked_before_any_work():
    result = run(TOY, _ctx([0]), variants=["worse"])
    assert list(result.models) == ["worse"] and "paired" not in result.table_names  # one seed, no baseline
    with pytest.raises(UnknownVariant, match="toy has no variant"):
        run(TOY, _ctx(), variants=["nope"])
    with pytest.raises(UnknownVariant, match="at least one"):
        run(TOY, _ctx(), variants=[])
    with pytest.raises(TypeError, match="no option"):
        run(TOY, _ctx(), shift=1)


def test_the_runner_makes_its_context_from_size_arguments():
    result = run(TOY, size="smoke", seeds=[3], device="cpu", progress=False)
    assert result.size == "smoke" and result.config["seeds"] == [3]


def test_progress_line_per_variant_and_seed(capsys):
    run(TOY, RunContext.create("smoke", [0, 1], "cpu", progress=True, cache=None))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[toy]")]
    assert lines == ["[toy] baseline, seed 0 (1/4)", "[toy] baseline, seed 1 (2/4)", "[toy] better, seed 0 (3/4)",
                     "[toy] better, seed 1 (4/4)"]


def test_a_registered_experiment_runs_from_the_cli_and_is_listed(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOE_LITE_CACHE", str(tmp_path / "cache"))
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "toy        a toy experiment of the runner's tests" in listed and "baseline | better | worse" in listed
    out = tmp_path / "results"
    assert main(["run", "toy", "--size", "smoke", "--seeds", "0", "1", "--variants", "baseline", "worse",
                 "--no-progress", "--out", str(out)]) == 0
    record = json.loads((out / "toy.json").read_text())
    assert record["config"]["selected_variants"] == ["baseline", "worse"]
    assert record["tables"]["scores of every variant (mean over seeds)"][1]["variant"] == "worse"
    assert list(record_figures(record)["scores"].data[0].x) == ["baseline", "worse"]
    # the results page: in registry order, with the paired table computed by the runner
    from moe_lite.experiments.report import load_records, render

    page = render(load_records(out))
    assert "## toy (smoke)" in page and "paired comparisons against baseline" in page


def test_registry_order_is_the_report_order_and_names_are_unique(toy):
    assert list(EXPERIMENTS) == ["race", "dit", "dynamic", "sequence", "vimoe-grid", "vimoe", "adapt", "zoo",
                                 "balance", "toy"]
    with pytest.raises(ValueError, match="already registered"):
        register(Experiment("toy", "another", {}, {}, _toy_train, _toy_summarise))


def test_register_into_another_registry():
    own: Dict[str, Experiment] = {}
    assert register(TOY, own) is TOY and own == {"toy": TOY} and "toy" not in EXPERIMENTS


def test_every_registered_experiment_declares_sizes_variants_and_defaults():
    for name, experiment in EXPERIMENTS.items():
        assert experiment.name == name and experiment.description
        assert set(experiment.sizes) >= {"smoke", "quick"}, name
        assert experiment.select(None) and all(v in experiment.variants for v in experiment.select(None)), name
        if experiment.pairing is not None:
            assert all(b in experiment.variants for b in experiment.pairing.baselines), name
