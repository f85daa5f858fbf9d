"""Repository-level promises: CI runs the README's test command, installs stay Colab/Binder friendly."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert match, "README.md must mark its test command with <!-- test-command -->"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_requirements_have_lower_bounds_only():
    # Colab and Binder must keep their own torch: no pins, no upper bounds.
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-e"):
            continue
        assert "==" not in line and "<" not in line and "~=" not in line, line
    assert "-e ." in (ROOT / "requirements.txt").read_text()


def test_requirements_name_every_package_the_kit_needs():
    names = {re.split(r"[<>=!~\[ ]", l.strip())[0].lower()
             for l in (ROOT / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith(("#", "-"))}
    for pkg in ["torch", "torchvision", "jupyterlab", "ipywidgets", "plotly", "anywidget", "nbval", "pytest", "tqdm"]:
        assert pkg in names, pkg


def test_binder_builds_cpu_torch_with_the_dataset():
    req = (ROOT / "binder" / "requirements.txt").read_text()
    assert "whl/cpu" in req and "torchvision" in req and "-e ." in req
    assert "dataset-fashion-mnist" in (ROOT / "binder" / "apt.txt").read_text().split()
    assert re.match(r"python-3\.(1[0-3])\s*$", (ROOT / "binder" / "runtime.txt").read_text())


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md should show the core in a runnable example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_cli_lists_every_experiment(capsys):
    from moe_lite.__main__ import main
    from moe_lite.experiments import EXPERIMENTS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in out
    assert main(["run", "no-such-experiment"]) == 2


# ---- notebooks as stored: open clean in JupyterLab, render offline, carry no machine ----------------
import importlib.util
import json

import pytest

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
#: What JupyterLab (ipykernel's python3 spec) writes on opening a notebook: anything else is rewritten
#: at once, which marks the notebook modified and asks to save on close.
JUPYTERLAB_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
#: Where a run happened: absolute home/work/temp folders, and a torch local build tag ("+cu132").
MACHINE = re.compile(r"(/work/|/home/|/root/|/Users/|/tmp/|[A-Z]:\\\\|torch \d+\.\d+(\.\d+)?\+\w+)")


def _execute_module():
    spec = importlib.util.spec_from_file_location("nb_execute", ROOT / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _output_texts(nb):
    """(cell index, text) of every stored output: stream text, error traceback, every mime entry."""
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            parts = [out.get("text", "")] + list(out.get("traceback", []))
            parts += [v if isinstance(v, str) else "".join(v) if isinstance(v, list) else json.dumps(v)
                      for v in out.get("data", {}).values()]
            for part in parts:
                yield i, "".join(part) if isinstance(part, list) else part


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_kernelspec_is_what_jupyterlab_writes(path):
    assert json.loads(path.read_text())["metadata"].get("kernelspec") == JUPYTERLAB_KERNELSPEC


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_carry_no_machine_and_no_cdn(path):
    for i, text in _output_texts(json.loads(path.read_text())):
        found = MACHINE.search(text)
        assert not found, f"{path.name} cell {i} stores {found.group(0)!r}: {text[:200]!r}"
        assert "cdn.plot.ly" not in text and "cdnjs.cloudflare.com" not in text, \
            f"{path.name} cell {i} loads a script from a CDN (fails offline)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_that_drive_an_explorer_put_it_back(path):
    # a learner scrolling to an explorer after Run All must find it as it was first shown
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        source = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
        for name in set(re.findall(r"(\w+)\.set\(", source)):
            last_set = source.rfind(f"{name}.set(")
            assert source.find(f"{name}.reset()", last_set) > last_set, \
                f"{path.name} cell {i} moves {name} from code but does not end with {name}.reset()"


def test_executor_scrubs_machine_details():
    ex = _execute_module()
    nb = {"metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "cells": [{"cell_type": "code", "metadata": {}, "source": "", "outputs": [
              {"output_type": "stream", "name": "stdout",
               "text": f"from embedded subset ({ROOT}/data/x.npz)\nmoe_lite: torch 2.15.0+cu132, 1 thread\n"
                       f"saved to /tmp/moe_lite-first-open-x/fmnist.pt\n"},
              {"output_type": "display_data", "metadata": {},
               "data": {"application/vnd.plotly.v1+json": {"data": []},
                        "text/html": '<script src="https://cdn.plot.ly/plotly-4.1.1.min.js"></script>'}},
              {"output_type": "display_data", "metadata": {}, "data": {"text/html": [
                  "<script>window.PlotlyConfig = {};</script>",
                  '<script type="module">import "https://cdn.plot.ly/plotly-4.1.1.min"</script>']}},
              {"output_type": "error", "ename": "E", "evalue": "",
               "traceback": [f"File {Path.home()}/x.py, line 1"]}]}]}
    nb = ex.clean(ex.scrub(nb, ROOT, cache_root=Path("/tmp/moe_lite-first-open-x")))
    outs = nb["cells"][0]["outputs"]
    assert outs[0]["text"] == ("from embedded subset (data/x.npz)\nmoe_lite: torch 2.15.0, 1 thread\n"
                               "saved to ~/.cache/moe_lite/fmnist.pt\n")  # the notebook's empty cache root
    assert set(outs[1]["data"]) == {"application/vnd.plotly.v1+json"}  # the CDN page is dropped
    assert len(outs) == 3, "plotly's CDN loader output is dropped"
    assert outs[2]["traceback"] == ["File ~/x.py, line 1"]
    assert nb["metadata"]["kernelspec"] == JUPYTERLAB_KERNELSPEC


def test_data_source_line_shows_no_machine_path(capsys):
    from moe_lite import data

    data.load_fashion_mnist("test", source="embedded", verbose=True)
    out = capsys.readouterr().out
    assert "data/fashion_mnist_subset.npz" in out and str(ROOT) not in out and not MACHINE.search(out)


def test_hosted_ci_runs_exactly_ci_run():
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    commands = re.findall(r"^\s*(?:-\s+)?run:\s*(.*?)\s*$", workflow, re.M)
    assert commands == [".ci/run"], f"the workflow must run .ci/run and nothing else, runs {commands}"
    assert "steps:" in workflow and "uses: actions/checkout" in workflow
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def test_ci_installs_what_the_browser_test_needs():
    ci = "\n".join(line.split("#")[0] for line in (ROOT / ".ci" / "run").read_text().splitlines())
    assert "apt-get install" in ci and "chromium" in ci and "pip install --quiet playwright" in ci
    assert "playwright install" not in ci  # it downloads browsers; the system chromium is used
    assert "export CI=true" in ci  # so a missing browser fails the test instead of skipping it
    assert ".artifacts/" in (ROOT / ".gitignore").read_text().split()  # screenshots are not committed
