"""Every notebook through its Colab path, in a Colab-like environment, at smoke size.

``.ci/run`` builds ``.venv-colab``: Colab's ipywidgets 7, plotly 5, kernel (ipykernel 6.17, IPython 7.34)
and pandas at the versions ``.ci/colab-requirements.txt`` pins (from googlecolab/backend-info), in
front of the CI environment, whose torch it reuses. Here each notebook runs under nbval in a fresh
environment on top of it, with a stand-in ``google.colab`` imported at interpreter start (as Colab
does), so the notebooks' install cell runs for real: it clones "GitHub" (git redirects the repository
URL to a local repository made from this working tree), ``pip install``s the clone (no index) and enables
the "custom widget manager". The checkpoint cache starts empty, as on a fresh Colab runtime.

What is decided, and checked here: the install cell upgrades nothing Colab ships (ipywidgets and plotly
stay at Colab's versions while the notebooks run), and the kit works with them (figures are static on
Colab, see the README). Skips where ``.venv-colab`` is missing, except under ``CI=true``.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moe_lite.notebook import REPOSITORY

ROOT = Path(__file__).resolve().parents[1]
COLAB_VENV = ROOT / ".venv-colab"
PINS = ROOT / ".ci" / "colab-requirements.txt"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
#: Colab imports google.colab at start; ``output.enable_custom_widget_manager`` logs what the kernel
#: then has (the install cell calls it last, after its pip install)
STUB = textwrap.dedent("""
    import importlib.metadata, os

    def enable_custom_widget_manager():
        versions = {name: importlib.metadata.version(name) for name in ("ipywidgets", "plotly", "moe_lite")}
        with open(os.environ["COLAB_STUB_LOG"], "a") as log:
            log.write(repr(versions) + "\\n")
""")


def _pins() -> dict:
    pins = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def _colab_python() -> Path:
    python = COLAB_VENV / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{COLAB_VENV.name} is missing: .ci/run builds it before the tests")
        pytest.skip(f"no {COLAB_VENV.name} (.ci/run builds it)")
    return python


def _run(cmd, **kwargs):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd}:\nstdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done.stdout


def test_pins_are_colabs_widget_and_plotting_stack():
    pins = _pins()
    assert pins["ipywidgets"].startswith("7.") and pins["plotly"].startswith("5."), pins
    assert not {"torch", "torchvision", "moe_lite"} & set(pins), "the CI's torch is reused, never pinned"
    assert ".ci/colab-requirements.txt" in (ROOT / ".ci" / "run").read_text()


def test_the_colab_env_has_colabs_versions():
    python = _colab_python()
    names = sorted(_pins())
    out = _run([python, "-c", f"import importlib.metadata as m; print({{n: m.version(n) for n in {names!r}}})"])
    assert ast.literal_eval(out.strip()) == _pins()


#: Run in a kernel as nbval does (jupyter_client, no front end: nbclient would emulate one): a static
#: LiveFigure redrawn from another cell (as a notebook's driving cell does) must land in its Output, not
#: in that cell (ipywidgets 7 leaves ``with output: display(...)`` to the front end).
REDRAW = textwrap.dedent("""
    import json
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")

    def run(code):
        msg_id, outputs = kc.execute(code), []
        while True:
            msg = kc.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return outputs
            if msg["msg_type"] in ("display_data", "execute_result", "stream", "error", "clear_output"):
                outputs.append(msg["content"])

    try:
        run("from moe_lite.notebook import configure_plotly\\nconfigure_plotly(colab=%r)\\n"
            "from moe_lite.widgets import LiveFigure\\nlive = LiveFigure({'data': [{'y': [1, 2]}]}, mode='static')")
        update = run("live.update({'data': [{'y': [3, 4, 5]}]})")
        shown = run("import json\\nprint(json.dumps([sorted(o['data']) for o in live.output.outputs]))")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(json.dumps({"update_cell": update, "output": shown[0]["text"]}))
""")


@pytest.mark.parametrize("where", ["this environment", "colab"])
def test_a_static_redraw_lands_in_its_output_not_in_the_driving_cell(where):
    import json

    python = sys.executable if where == "this environment" else _colab_python()
    out = _run([python, "-c", REDRAW % (where == "colab")], cwd=ROOT, timeout=300,
               env={**os.environ, "MOE_LITE_STATIC_FIGURES": "1"})
    result = json.loads(out.strip().splitlines()[-1])
    assert result["update_cell"] == [], "the redraw leaked into the cell that moved the figure"
    expected = "text/html" if where == "colab" else "application/vnd.plotly.v1+json"
    assert expected in json.loads(result["output"])[0], result["output"]


def _remote_from_working_tree(tmp_path: Path) -> Path:
    """A git repository holding this working tree's files (tracked, and new ones git does not ignore),
    at a path ending like the real URL: what GitHub would serve after a push."""
    remote = tmp_path / "github" / REPOSITORY.removeprefix("https://github.com/")
    files = _run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, remote / name)
    git = ["git", "-c", "user.name=moe_lite tests", "-c", "user.email=tests@moe-lite.invalid",
           "-c", "commit.gpgsign=false"]
    _run([*git, "init", "-q", "-b", "main"], cwd=remote)
    _run([*git, "add", "-A"], cwd=remote)
    _run([*git, "commit", "-q", "-m", "working tree"], cwd=remote)
    return remote


def _session_python(tmp_path: Path, colab_python: Path) -> Path:
    """A fresh environment over .venv-colab (so what the install cell installs lands here, not there),
    with the google.colab stand-in imported at start."""
    env = tmp_path / "runtime"
    _run([colab_python, "-m", "venv", "--without-pip", env])
    python = env / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    outer = _run([colab_python, "-c", "import sys; print('\\n'.join(p for p in sys.path if p.endswith('site-packages')))"])
    stub = tmp_path / "colab_stub"
    (stub / "google" / "colab").mkdir(parents=True)
    (stub / "google" / "__init__.py").write_text("")
    (stub / "google" / "colab" / "__init__.py").write_text("from . import output\n")
    (stub / "google" / "colab" / "output.py").write_text(STUB)
    (site / "00-outer.pth").write_text(f"{stub}\n{outer}")  # path lines: outer .pth hooks do not run
    (site / "zz-colab.pth").write_text("import google.colab\n")  # after the paths are in place
    return python


@pytest.mark.slow
def test_every_notebook_runs_its_colab_path_in_the_colab_env(tmp_path):
    colab_python = _colab_python()
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    remote = _remote_from_working_tree(tmp_path)
    python = _session_python(tmp_path, colab_python)
    content = tmp_path / "content"  # Colab's working directory
    content.mkdir()
    for path in NOTEBOOKS:
        shutil.copy2(path, content / path.name)
    (content / "pytest.ini").write_text("[pytest]\n")  # not the repository's options
    log = tmp_path / "colab.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MOE_LITE_"))}
    env.update(MOE_LITE_SIZE="smoke", MOE_LITE_OFFLINE="1", MOE_LITE_CACHE=str(tmp_path / "cache"),
               COLAB_STUB_LOG=str(log), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1",
               # git fetches "GitHub" from the local repository
               GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0=f"url.file://{remote}.insteadOf",
               GIT_CONFIG_VALUE_0=REPOSITORY,
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PIP_CACHE_DIR=str(tmp_path / "pip-cache"), PIP_NO_BUILD_ISOLATION="0")  # "0": isolation off
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", *[p.name for p in NOTEBOOKS]],
                          cwd=content, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-8000:]}\nstderr:\n{done.stderr[-2000:]}"
    assert re.search(r"\d+ passed", done.stdout) and "failed" not in done.stdout, done.stdout[-2000:]

    # the install cell ran in every notebook and upgraded nothing Colab ships
    calls = [ast.literal_eval(line) for line in log.read_text().splitlines()]
    pins = _pins()
    assert len(calls) == len(NOTEBOOKS), calls
    assert all(c["ipywidgets"] == pins["ipywidgets"] and c["plotly"] == pins["plotly"] for c in calls), calls
    assert [p.name for p in content.iterdir() if (p / ".git").exists()] == ["moe_lite_repo"]
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    assert not [p.name for p in site.iterdir() if p.name.lower().startswith(("ipywidgets", "plotly"))]
