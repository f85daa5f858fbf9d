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
