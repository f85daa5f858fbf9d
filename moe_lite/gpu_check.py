"""One GPU check that writes one JSON: run it once on any machine with CUDA and keep the file.

    python -m moe_lite.gpu_check --out DIR [--budget 480] [--size SIZE] [--experiment NAME] [--quick-cpu]

Parts, each timed and marked ``pass`` / ``fail`` / ``skip`` (with the reason) in ``DIR/gpu_check.json``:

``pytest_cuda``
    the CUDA-parametrised tests (``pytest tests -q -k cuda``: every test id naming cuda, e.g. each
    dispatch backend against the loop reference in fp32 and under bf16/fp16 autocast); counts and the
    output's tail are recorded.
``trainer_amp``
    three :func:`~moe_lite.train.fit` steps of a small ViMoE with ``amp="auto"``; the loss must be finite.
``checkpoint``
    :func:`~moe_lite.train.save_checkpoint` then :func:`~moe_lite.train.load_checkpoint` into a fresh
    model: every parameter and buffer bit for bit, the same eval outputs.
``race_batch_independence``
    an MoE with a Race router, after one training batch (its EMA threshold), in eval: a sample's output
    is the same alone as inside a batch of 6.
``bench``
    ``python -m moe_lite.bench --device cuda --quick`` (its rows go in the JSON and ``DIR/bench.json``).
``experiment``
    ``python -m moe_lite run NAME --size SIZE --seeds 0`` with its wall time (results under ``DIR``).

The whole check aims at ``--budget`` seconds (default 480 = 8 min): the pytest run and the experiment
run in subprocesses with the time left as their timeout. Without CUDA the JSON says ``"no CUDA"``
and the CUDA parts are skipped; ``--quick-cpu`` runs the rest on the CPU in a few seconds (what
``tests/test_gpu_check.py`` does), so the script itself is tested where there is no GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import bench
from .data import make_loader
from .layers import MoE
from .models.vit import ViT, ViTConfig, vimoe_config
from .routers import Race
from .train import ClassificationTask, TrainConfig, fit, load_checkpoint, save_checkpoint
from .train.device import _amp_dtype

__all__ = ["main", "run_checks", "pytest_counts", "JSON_NAME"]

JSON_NAME = "gpu_check.json"
#: the repository root (where ``tests/`` lives when running from a checkout)
REPO = Path(__file__).resolve().parent.parent


class _Skip(Exception):
    """A part that does not apply here (the reason is its message)."""


def _environment(device: torch.device) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cuda"] = torch.version.cuda
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        env["note"] = "no CUDA: the CUDA parts are skipped"
    return env


def _tiny_vimoe(size: str = "smoke"):
    base = ViTConfig(dim=32, depth=2, heads=2, mlp_hidden=64) if size == "smoke" else ViTConfig()
    return ViT(vimoe_config(base, num_experts=4, placement="all"))


def _loader(n: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return make_loader((images, labels), batch_size=batch, shuffle=False)


def pytest_counts(summary: str) -> Dict[str, int]:
    """``"12 passed, 3 skipped, 400 deselected in 9.1s"`` -> ``{"passed": 12, "skipped": 3, "deselected": 400}``."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)\b", summary)}


# ---- the parts ----------------------------------------------------------------------------------
def _pytest_cuda(device: torch.device, left: float, out: Path) -> Dict[str, Any]:
    if device.type != "cuda":
        raise _Skip("no CUDA")
    if not (REPO / "tests").is_dir():
        raise _Skip(f"no tests/ folder next to the package ({REPO})")
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-k", "cuda", "-p", "no:cacheprovider", "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, left))
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
    counts = pytest_counts(tail[-1] if tail else "")
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise AssertionError(f"pytest exit {proc.returncode}: " + (tail[-1] if tail else ""))
    return {"command": " ".join(cmd[2:]), "returncode": proc.returncode, "counts": counts, "tail": tail}


def _trainer_amp(device: torch.device, left: float, out: Path) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = _tiny_vimoe()
    config = TrainConfig(max_steps=3, amp="auto", device=str(device), progress=False, warmup_steps=1)
    history = fit(model, ClassificationTask(), _loader(24, 8), None, config)
    losses = [r["loss"] for r in history.steps]
    if len(losses) != 3 or not all(isinstance(v, float) and v == v and abs(v) < float("inf") for v in losses):
        raise AssertionError(f"expected 3 finite losses, got {losses}")
    amp = _amp_dtype("auto", device)
    return {"steps": len(losses), "losses": losses, "amp_dtype": str(amp) if amp is not None else "off"}


def _checkpoint(device: torch.device, left: float, out: Path) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = _tiny_vimoe().to(device)
    model.train()
    x = torch.randn(4, 1, 28, 28, device=device)
    model(x)  # routers with state (none here) and lazily set buffers see one batch
    model.eval()
    with torch.no_grad():
        before = model(x)
    path = save_checkpoint(out / "checkpoint_check.pt", model, step=1)
    torch.manual_seed(1)
    fresh = _tiny_vimoe().to(device)
    load_checkpoint(path, fresh)
    fresh.eval()
    state, loaded = model.state_dict(), fresh.state_dict()
    differ = [k for k in state if not torch.equal(state[k], loaded[k])]
    if differ:
        raise AssertionError(f"entries differ after the round trip: {differ[:4]}")
    with torch.no_grad():
        after = fresh(x)
    if not torch.equal(before, after):
        raise AssertionError(f"eval outputs differ by {float((before - after).abs().max()):.3g}")
    size = path.stat().st_size
    path.unlink()
    return {"entries": len(state), "file_bytes": size}


def _race_batch_independence(device: torch.device, left: float, out: Path) -> Dict[str, Any]:
    torch.manual_seed(0)
    moe = MoE(32, 64, 8, Race(2, candidates="BLE")).to(device)
    moe.train()
    moe(torch.randn(8, 16, 32, device=device))  # one training batch sets the EMA threshold
    moe.eval()
    x = torch.randn(6, 16, 32, device=device)
    with torch.no_grad():
        together, alone = moe(x)[2:3], moe(x[2:3])
    diff = float((together - alone).abs().max())
    if diff > 1e-5:
        raise AssertionError(f"sample 2 alone differs from sample 2 in a batch of 6 by {diff:.3g}")
    return {"max_abs_diff": diff, "dispatch": moe.experts.last_dispatch}


def _bench(device: torch.device, left: float, out: Path) -> Dict[str, Any]:
    if device.type != "cuda":
        raise _Skip("no CUDA (the CPU figures come from `python -m moe_lite.bench --threads 1`)")
    text = io.StringIO()
    budget = max(10.0, min(90.0, left / 3))
    with contextlib.redirect_stdout(text):
        rows = bench.main(["--device", str(device), "--quick", "--budget", f"{budget:.0f}",
                           "--json", str(out / "bench.json")])
    keep = ("section", "config", "router", "backend", "used", "dense_ms", "moe_ms", "ratio")
    return {"rows": [{k: r.get(k) for k in keep if k in r} for r in rows], "output": text.getvalue().splitlines()}


def _experiment(name: str, size: str) -> Callable[[torch.device, float, Path], Dict[str, Any]]:
    def part(device: torch.device, left: float, out: Path) -> Dict[str, Any]:
        if device.type != "cuda":
            raise _Skip("no CUDA")
        cmd = [sys.executable, "-m", "moe_lite", "run", name, "--size", size, "--seeds", "0", "--device",
               str(device), "--no-progress", "--out", str(out / "results")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, left))
        wall = time.perf_counter() - t0
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        if proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}: " + (tail[-1] if tail else ""))
        return {"command": " ".join(cmd[2:]), "experiment": name, "size": size, "wall_s": round(wall, 1),
                "tail": tail}

    return part


def _default_size() -> str:
    return "gpu"  # this check runs on a GPU machine: the size made for a free Colab GPU


# ---- runner -------------------------------------------------------------------------------------------
def run_checks(out: Path, budget_s: float = 480.0, quick_cpu: bool = False, size: Optional[str] = None,
               experiment: str = "vimoe", device: Optional[str] = None) -> Dict[str, Any]:
    """Run every part (see the module docstring), write ``out/gpu_check.json`` and return its content.

    ``device``: default cuda when available, else cpu. ``quick_cpu``: on a CPU, run the parts that can
    run there (trainer, checkpoint, Race) at their smallest; without it a CPU run skips everything
    but records the environment.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: CUDA is not available")
    start = time.perf_counter()
    parts: List[tuple] = [
        ("pytest_cuda", _pytest_cuda),
        ("trainer_amp", _trainer_amp),
        ("checkpoint", _checkpoint),
        ("race_batch_independence", _race_batch_independence),
        ("bench", _bench),
        ("experiment", _experiment(experiment, size or _default_size())),
    ]
    results: Dict[str, Any] = {}
    for name, fn in parts:
        left = budget_s - (time.perf_counter() - start)
        t0 = time.perf_counter()
        if dev.type != "cuda" and not quick_cpu:
            entry: Dict[str, Any] = {"status": "skip", "reason": "no CUDA (use --quick-cpu to run the CPU parts)"}
        elif left <= 5:
            entry = {"status": "skip", "reason": f"budget of {budget_s:.0f} s used up"}
        else:
            try:
                entry = {"status": "pass", **fn(dev, left, out)}
            except _Skip as why:
                entry = {"status": "skip", "reason": str(why)}
            except subprocess.TimeoutExpired:
                entry = {"status": "fail", "error": f"timed out after {left:.0f} s (the budget left)"}
            except Exception as err:  # noqa: BLE001  (a failed part must not stop the others)
                entry = {"status": "fail", "error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc().splitlines()[-6:]}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = entry
        print(f"{name:<26}{entry['status']:<6}{entry['seconds']:>8.1f} s  "
              f"{entry.get('reason') or entry.get('error') or ''}", flush=True)
    report = {
        "environment": _environment(dev),
        "cuda": dev.type == "cuda",
        "budget_s": budget_s,
        "wall_s": round(time.perf_counter() - start, 1),
        "ok": all(r["status"] != "fail" for r in results.values()),
        "parts": results,
    }
    (out / JSON_NAME).write_text(json.dumps(report, indent=2))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lite.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help=f"folder for {JSON_NAME} (and bench.json, results/)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds to aim for in total (default 480)")
    parser.add_argument("--size", default=None, help="size of the experiment (default: gpu if defined, else quick)")
    parser.add_argument("--experiment", default="vimoe", help="the experiment to time (default vimoe)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--quick-cpu", action="store_true",
                        help="without CUDA, still run the CPU-capable parts at their smallest (a test of this script)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be positive")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    report = run_checks(Path(args.out), args.budget, args.quick_cpu, args.size, args.experiment, args.device)
    print(f"{'ok' if report['ok'] else 'FAILED'} in {report['wall_s']} s: {Path(args.out) / JSON_NAME}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
