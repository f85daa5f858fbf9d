"""Regenerate the pictures the README shows, from the quick-size models of seed 0 (the shipped ones,
or the user's cache when it has them; trained only when neither does):

    python scripts/readme_figures.py          # writes docs/images/*.png (needs kaleido and a Chrome)

* ``router-explorer.png``: the router explorer in JupyterLab, the screenshot the browser test saves
  (``MOE_LITE_SIZE=smoke python -m pytest tests/test_browser.py`` writes ``.artifacts/browser/``);
* ``class-expert-map.png``: which class's patches each expert of the ViMoE's last MoE layer takes;
* ``top-p-tradeoff.png``: accuracy against experts per token as the top-p threshold moves after training;
* ``dit-samples.png``: samples of the Expert Race DiT-MoE, one row per class.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from moe_lite import viz
from moe_lite.experiments.core import RunContext
from moe_lite.experiments.diffusion import run_dit
from moe_lite.experiments.dynamic import run_dynamic
from moe_lite.experiments.vimoe import run_vimoe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--size", default="quick")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    screenshot = ROOT / ".artifacts" / "browser" / "02_router_zoo-explorer-moved.png"
    if screenshot.is_file():
        shutil.copyfile(screenshot, out / "router-explorer.png")
    else:
        print(f"no {screenshot}: run the browser test first to refresh router-explorer.png")

    ctx = RunContext.create(args.size, [0], "cpu", "embedded", progress=False)
    vimoe = run_vimoe(ctx=ctx, variants=["vimoe"], references=False)
    last = [name for name in vimoe.figures if name.startswith("class x expert: ")][-1]
    vimoe.figures[last].write_image(out / "class-expert-map.png", width=900, height=520, scale=1)
    dynamic = run_dynamic(ctx=ctx)
    sweep = dynamic.metrics["threshold_sweep"]  # seed 0's top-p model at each inference threshold
    tradeoff = viz.tradeoff_curve([point["experts_per_token"]["mean"] for point in sweep],
                                  [point["accuracy"]["mean"] for point in sweep],
                                  labels=[f"p={point['p']:g}" for point in sweep], x_title="experts per token",
                                  y_title="test accuracy", title="moving top-p after training (one model)")
    tradeoff.write_image(out / "top-p-tradeoff.png", width=800, height=450, scale=1)
    dit = run_dit(ctx=ctx, variants=["expert race"])
    dit.figures["samples: expert race"].write_image(out / "dit-samples.png", width=700, height=900, scale=1)
    for path in sorted(out.glob("*.png")):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
