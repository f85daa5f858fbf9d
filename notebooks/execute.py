"""Execute notebooks in place so their stored outputs come from a real run.

    python notebooks/execute.py                 # every notebook, at $MOE_LITE_SIZE or quick
    python notebooks/execute.py --size smoke 02_router_zoo.ipynb

The outputs policy (tests/test_notebooks.py enforces it): every code cell that has outputs has an
execution count from a real run; no ``metadata.widgets`` (widget state GitHub can't render) and no
Colab metadata are stored.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop widget state and editor-specific metadata; keep kernelspec and language info."""
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("colab", None)
    nb.metadata.pop("accelerator", None)
    for cell in nb.cells:
        for key in ("colab", "id", "outputId", "executionInfo", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    return nb


def execute(path: Path, size: str, timeout: int = 1800) -> float:
    nb = nbformat.read(path, as_version=4)
    os.environ["MOE_LITE_SIZE"] = size
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    nbformat.write(clean(nb), path)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--size", default=os.environ.get("MOE_LITE_SIZE", "quick"),
                        choices=("smoke", "quick", "full"))
    args = parser.parse_args()
    paths = [HERE / n for n in args.notebooks] or sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        seconds = execute(path, args.size)
        print(f"{path.name}: {seconds:.1f} s at size {args.size}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
