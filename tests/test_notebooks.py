"""The notebooks' outputs policy and structure (nbval executes them; this checks what is stored)."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _load(path):
    return json.loads(path.read_text())


def test_the_sequence_exists():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(len(numbers))) and len(numbers) >= 9, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_policy(path):
    nb = _load(path)
    assert "widgets" not in nb.get("metadata", {}), "widget state must not be stored"
    assert "colab" not in nb.get("metadata", {}), "Colab metadata must not be stored"
    for i, cell in enumerate(nb["cells"]):
        assert "colab" not in cell.get("metadata", {}), f"cell {i} stores Colab metadata"
        if cell["cell_type"] == "code" and cell.get("outputs"):
            assert cell.get("execution_count") is not None, f"cell {i} has outputs without an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_structure(path):
    nb = _load(path)
    cells = nb["cells"]
    first = "".join(cells[0]["source"])
    assert "colab.research.google.com" in first and "mybinder.org" in first, "badges in the first cell"
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    # a Colab-only install cell that leaves Colab's torch alone
    install = [c for c in code if "google.colab" in c and "pip" in c]
    assert install, "a Colab-only install cell"
    assert not re.search(r"pip[^\n]*install[^\n]*\btorch\b", install[0]), "must not reinstall torch"
    assert any("setup(" in c for c in code), "moe_lite.notebook.setup() sets size and device"
    assert any("NBVAL_CHECK_OUTPUT" in c for c in code), "at least one checked cell"
    last = "".join(cells[-1]["source"]).lower()
    assert "what you saw" in last or "exercises" in last, "ends with what you saw and exercises"


PUBLISHED_CALL = re.compile(r"show_published\((.*)\)\s*$", re.S)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_quoted_results_are_the_published_ones(path):
    """A cell that shows published results stores exactly what ``docs/results`` holds now, so a
    notebook never quotes a number the results page does not (re-run ``notebooks/execute.py``
    after publishing new results)."""
    from moe_lite.experiments.report import show_published

    for i, cell in enumerate(_load(path)["cells"]):
        source = "".join(cell["source"]).strip()
        match = PUBLISHED_CALL.search(source.splitlines()[-1]) if cell["cell_type"] == "code" and source else None
        if match is None:
            continue
        expected = eval(f"show_published({match.group(1)})", {"show_published": show_published})
        stored = [o for o in cell.get("outputs", []) if "text/markdown" in o.get("data", {})]
        assert stored, f"cell {i} shows published results but stores no output"
        assert "".join(stored[0]["data"]["text/markdown"]) == str(expected), f"cell {i} is stale"
