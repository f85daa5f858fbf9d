"""Execute notebooks in place so their stored outputs come from a real run.

    python notebooks/execute.py                 # every notebook, at $MOE_LITE_SIZE or quick
    python notebooks/execute.py --size smoke 02_router_zoo.ipynb

The outputs policy (tests/test_notebooks.py and tests/test_repo.py enforce it): every code cell that
has outputs has an execution count from a real run; no ``metadata.widgets`` (widget state GitHub can't
render) and no Colab metadata are stored; the kernelspec is the one JupyterLab writes (else opening a
notebook marks it modified); outputs carry no trace of the machine they ran on (:func:`scrub`).

Each notebook runs with a fresh, empty cache root (``MOE_LITE_CACHE`` set to a temporary folder for its
kernel, shown as ``~/.cache/moe_lite`` in the outputs), so its stored outputs are what a learner sees on
first opening it: the shipped models loaded (``moe_lite/checkpoints``), anything else trained, never a
model from this machine's own cache (``tests/test_shipped.py`` checks that).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import nbformat
from nbclient import NotebookClient

from moe_lite.experiments.core import SIZES

HERE = Path(__file__).resolve().parent
#: ipykernel's python3 spec, exactly as JupyterLab stores it when it opens a notebook.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
PLOTLY_MIME = "application/vnd.plotly.v1+json"
_TORCH_BUILD = re.compile(r"(torch \d+\.\d+(?:\.\d+)?)\+\w+")  # "torch 2.15.0+cu132" -> "torch 2.15.0"


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop widget state and editor-specific metadata; store JupyterLab's kernelspec; keep language info."""
    nb["metadata"].pop("widgets", None)
    nb["metadata"].pop("colab", None)
    nb["metadata"].pop("accelerator", None)
    nb["metadata"]["kernelspec"] = dict(KERNELSPEC)
    for cell in nb["cells"]:
        for key in ("colab", "id", "outputId", "executionInfo", "collapsed", "scrolled"):
            cell["metadata"].pop(key, None)
    return nb


def _scrub_text(text, replacements):
    """``text`` (a str or nbformat's list of lines) with the machine's folders and torch build tag removed."""
    if isinstance(text, list):
        return [_scrub_text(t, replacements) for t in text]
    if not isinstance(text, str):
        return text
    for old, new in replacements:
        text = text.replace(old, new)
    return _TORCH_BUILD.sub(r"\1", text)


def _is_plotly_loader(output) -> bool:
    """An output that only loads plotly.js (a renderer's first-use script), showing nothing."""
    data = output.get("data", {})
    html = data.get("text/html", "")
    html = "".join(html) if isinstance(html, list) else html
    return set(data) == {"text/html"} and "window.PlotlyConfig" in html and "Plotly.newPlot" not in html


def scrub(nb: nbformat.NotebookNode, root: Path = HERE.parent,
          cache_root: Optional[Path] = None) -> nbformat.NotebookNode:
    """Stored outputs say what a learner needs, not where the notebook ran.

    Paths inside the project ``root`` become relative to it, the ``cache_root`` the notebook ran with
    becomes the default ``~/.cache/moe_lite`` and the home folder becomes ``~``; a torch
    local build tag (``+cu132``) is dropped; a plotly figure keeps only its JSON, which JupyterLab,
    Notebook 7 and VS Code draw offline (an HTML copy beside it would load plotly.js from a CDN), and
    plotly's loader outputs (plotly.js itself, or a CDN import) are removed.
    """
    replacements = [(str(cache_root), "~/.cache/moe_lite")] if cache_root is not None else []
    replacements += [(str(root) + os.sep, ""), (str(root), ".")]
    home = str(Path.home())
    if len(home) > 1:
        replacements += [(home + os.sep, "~/"), (home, "~")]
    for cell in nb["cells"]:
        if "outputs" in cell:  # plotly's one-off loader of plotly.js (from a CDN): the JSON needs none
            cell["outputs"] = [o for o in cell["outputs"] if not _is_plotly_loader(o)]
        for out in cell.get("outputs", []):
            for key in ("text", "traceback", "evalue"):
                if key in out:
                    out[key] = _scrub_text(out[key], replacements)
            data = out.get("data", {})
            if PLOTLY_MIME in data:
                data.pop("text/html", None)
            for mime, value in data.items():
                data[mime] = _scrub_text(value, replacements)
    return nb


def execute(path: Path, size: str, timeout: int = 1800) -> float:
    """Run notebook ``path`` at ``size`` with an empty cache root and store its scrubbed outputs."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="moe_lite-first-open-") as cache_root:
        # the kernel inherits this script's environment: the only way to hand it the size and cache
        os.environ["MOE_LITE_SIZE"] = size
        os.environ["MOE_LITE_CACHE"] = cache_root
        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
        nbformat.write(clean(scrub(nb, cache_root=Path(cache_root))), path)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--size", default=os.environ.get("MOE_LITE_SIZE", "quick"), choices=SIZES)
    args = parser.parse_args()
    paths = [HERE / n for n in args.notebooks] or sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        seconds = execute(path, args.size)
        print(f"{path.name}: {seconds:.1f} s at size {args.size}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
