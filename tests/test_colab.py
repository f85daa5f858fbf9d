"""The notebooks' Colab path: the install cell, one repository URL, and declared dependencies.

Colab itself cannot run here, so the Colab-path test stubs ``google.colab``, clones from a local copy of
this repository instead of GitHub, and runs the install cell in fresh Python processes (a "Restart
session" is exactly that: a new process in the same runtime, with the same files and installed packages).
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from moe_lite.notebook import REPOSITORY

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

#: Import name -> distribution name, where they differ.
DISTRIBUTION_OF = {"IPython": "ipython", "PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}
#: Imports that work only with another distribution installed (plotly.express before plotly 6: pandas).
ALSO_NEEDS = {"plotly.express": "pandas"}
#: Imported only on Colab, under ``"google.colab" in sys.modules``: Colab provides it.
COLAB_ONLY = {"google"}


def _install_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    install = [c for c in code if "google.colab" in c and "pip" in c]
    assert len(install) == 1, f"{path.name}: expected one Colab install cell, found {len(install)}"
    return install[0]


# ---- one repository URL -------------------------------------------------------------------------
def test_every_notebook_has_the_same_install_cell():
    cells = {p.name: _install_cell(p) for p in NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the Colab install cells differ: " + ", ".join(cells)


def test_install_cell_and_badges_use_the_one_repository_url():
    owner_name = REPOSITORY.removeprefix("https://github.com/")
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", owner_name), REPOSITORY
    for path in NOTEBOOKS:
        cell = _install_cell(path)
        urls = re.findall(r"https://github\.com/[^\s\"']+", cell)
        assert urls == [REPOSITORY], f"{path.name}: the install cell clones {urls}, not {REPOSITORY}"
    badges = (ROOT / "README.md").read_text()
    badges += "".join("".join(json.loads(p.read_text())["cells"][0]["source"]) for p in NOTEBOOKS)
    colab = re.findall(r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/", badges)
    binder = re.findall(r"mybinder\.org/v2/gh/([^/\s]+/[^/\s]+)/", badges)
    assert len(colab) > len(NOTEBOOKS) and len(binder) > len(NOTEBOOKS), "a badge pair in the README and each notebook"
    assert set(colab) == set(binder) == {owner_name}, (set(colab), set(binder))


def test_readme_says_what_figures_colab_gets(monkeypatch):
    """The README promises static figures on Colab: that is what the kit picks there by default."""
    import types

    from moe_lite.widgets import STATIC_ENV, resolve_mode

    assert "On Colab figures are static" in (ROOT / "README.md").read_text()
    monkeypatch.delenv(STATIC_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert resolve_mode(None) == "static"


# ---- declared dependencies ----------------------------------------------------------------------
def _imports(source: str, where: str) -> set:
    """Absolute module names ``source`` imports (IPython magics and shell lines are skipped)."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    names = set()
    for node in ast.walk(ast.parse("\n".join(lines), where)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def _needed_distributions() -> dict:
    """{distribution: {where it is imported}} for what the package and the notebooks import."""
    found = {}
    for path in sorted((ROOT / "moe_lite").rglob("*.py")):
        found[str(path.relative_to(ROOT))] = _imports(path.read_text(), str(path))
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        found[path.name] = set().union(*(_imports("".join(c["source"]), path.name)
                                         for c in cells if c["cell_type"] == "code"))
    needed = {}
    for where, modules in found.items():
        for module in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in COLAB_ONLY or top == "moe_lite":
                continue
            needed.setdefault(_normal(DISTRIBUTION_OF.get(top, top)), set()).add(where)
            for prefix, extra in ALSO_NEEDS.items():
                if module == prefix or module.startswith(prefix + "."):
                    needed.setdefault(_normal(extra), set()).add(f"{where} ({module})")
    return needed


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(path: Path) -> set:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(_normal(re.split(r"[<>=!~\[;\s]", line)[0]))
    return names


def test_the_scan_sees_the_known_imports():
    needed = _needed_distributions()
    for name in ["torch", "torchvision", "numpy", "tqdm", "plotly", "ipywidgets", "ipython"]:
        assert name in needed, name
    assert "06_dit_moe_expert_race.ipynb" in needed["torch"]  # notebooks are scanned, not only the package
    # nothing imports plotly.express (which would need pandas, see ALSO_NEEDS): pandas is not required
    assert "pandas" not in needed


def test_requirements_declare_everything_the_package_and_notebooks_import():
    needed = _needed_distributions()
    for req in [ROOT / "requirements.txt", ROOT / "binder" / "requirements.txt"]:
        missing = {name: where for name, where in needed.items() if name not in _requirement_names(req)}
        assert not missing, f"{req.relative_to(ROOT)} does not declare {missing}"


def test_binder_requirements_are_the_same_packages():
    assert _requirement_names(ROOT / "binder" / "requirements.txt") == _requirement_names(ROOT / "requirements.txt")


def test_pyproject_declares_everything_the_package_and_notebooks_import():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    declared = {_normal(re.split(r"[<>=!~\[;\s]", s)[0]) for s in specs}
    missing = {name: where for name, where in _needed_distributions().items() if name not in declared}
    assert not missing, f"pyproject.toml does not declare {missing}"


def test_the_install_cell_leaves_colab_widgets_and_plotly_alone():
    """The cell installs the package without extras: the core dependencies must not pull ipywidgets,
    plotly or jupyter, which Colab ships at versions its frontend needs (ipywidgets 7)."""
    tomllib = pytest.importorskip("tomllib")
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [s for s in core if re.match(r"(ipywidgets|plotly|jupyter|anywidget|ipython)", s, re.I)], core
    pip_line = next(line for line in _install_cell(NOTEBOOKS[0]).splitlines() if '"pip"' in line)
    assert not re.search(r'"[^"]*\[|"-U"|upgrade', pip_line), f"no extras, no upgrades: {pip_line}"


# ---- the Colab path, run twice with a restart in between ----------------------------------------
#: A Colab stand-in: run before the cell in every fresh process, as Colab imports google.colab at start.
_DRIVER = textwrap.dedent("""
    import sys, types
    google, colab, output = (types.ModuleType(n) for n in ("google", "google.colab", "google.colab.output"))
    output.enable_custom_widget_manager = lambda: print("custom widget manager enabled")
    google.colab, colab.output = colab, output
    sys.modules.update({"google": google, "google.colab": colab, "google.colab.output": output})
    if sys.argv[1]:
        exec(compile(open(sys.argv[1]).read(), "install cell", "exec"), {"__name__": "__main__"})
        import moe_lite
        from moe_lite.data import denormalize
        print("moe_lite from", moe_lite.__file__)
    else:  # where "import moe_lite" would look, without the seconds importing torch takes
        import importlib.util
        print("moe_lite from", importlib.util.find_spec("moe_lite").origin)
""")

#: What Colab ships and must keep (only their metadata: pip decides from it, imports are unaffected).
_COLAB_PINS = {"ipywidgets": "7.7.1", "plotly": "5.24.1"}


def _git(*args, cwd=None):
    """``git`` with no user config or signing needs; raises with git's own message on failure."""
    cmd = ["git", "-c", "user.name=moe_lite tests", "-c", "user.email=tests@moe-lite.invalid",
           "-c", "commit.gpgsign=false", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


def _colab_like_python(tmp_path: Path) -> tuple:
    """A fresh virtual environment (the test's own one stays untouched) that sees this interpreter's
    packages, with Colab's ipywidgets and plotly versions in its metadata. Returns (python, site-packages)."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    pins = tmp_path / "colab_pins"
    for name, version in _COLAB_PINS.items():
        info = pins / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    here = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    here += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    outer = dict.fromkeys([str(pins), *here])
    (site / "outer.pth").write_text("\n".join(outer) + "\n")  # path lines only: no outer .pth hooks run
    return python, site


@pytest.mark.slow
def test_install_cell_survives_a_restart(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone from")
    # The "GitHub" remote: a clone of this repository's HEAD, at a path ending like the real URL.
    remote = tmp_path / "github" / REPOSITORY.removeprefix("https://github.com/")
    _git("clone", "-q", "--depth", "1", f"file://{ROOT}", str(remote))
    cell = _install_cell(NOTEBOOKS[0])
    assert cell.count(REPOSITORY) == 1
    cell_file = tmp_path / "install_cell.py"
    cell_file.write_text(cell.replace(REPOSITORY, f"file://{remote}"))

    python, site = _colab_like_python(tmp_path)
    content = tmp_path / "content"  # Colab's working directory
    content.mkdir()
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PIP_CACHE_DIR=str(tmp_path / "pip-cache"), PYTHONNOUSERSITE="1")
    env["PIP_NO_BUILD_ISOLATION"] = "0"  # inverted (pip issue 5735): 0 turns build isolation off
    env.pop("PYTHONPATH", None)

    def session(run_cell: bool) -> str:
        done = subprocess.run([str(python), "-c", _DRIVER, str(cell_file) if run_cell else ""], cwd=content,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
        return done.stdout

    first = session(run_cell=True)
    assert "custom widget manager enabled" in first
    clones = [p for p in content.iterdir() if (p / ".git").exists()]
    assert len(clones) == 1 and clones[0].name != "moe_lite", [p.name for p in content.iterdir()]
    clone = clones[0]
    assert f"moe_lite from {clone / 'moe_lite' / '__init__.py'}" in first

    # Upstream moves on; then "Restart session" and run the cell again: the clone is reused and updated.
    (remote / "UPSTREAM_MARK").write_text("new\n")
    _git("add", "UPSTREAM_MARK", cwd=remote)
    _git("commit", "-q", "-m", "upstream change", cwd=remote)
    second = session(run_cell=True)
    assert f"moe_lite from {clone / 'moe_lite' / '__init__.py'}" in second
    assert (clone / "UPSTREAM_MARK").exists(), "the second run did not update the clone"
    assert [p.name for p in content.iterdir()] == [clone.name], "the second run made another clone"

    # Another restart, the cell skipped: the installed package is found from the working directory.
    third = session(run_cell=False)
    assert f"moe_lite from {clone / 'moe_lite' / '__init__.py'}" in third

    # Colab's ipywidgets and plotly are what they were, and none was installed into the environment.
    check = "import importlib.metadata as m; print({n: m.version(n) for n in %r})" % sorted(_COLAB_PINS)
    versions = subprocess.run([str(python), "-c", check], env=env, capture_output=True, text=True, check=True)
    assert ast.literal_eval(versions.stdout.strip()) == _COLAB_PINS
    assert not [p.name for p in site.iterdir() if p.name.lower().startswith(("ipywidgets", "plotly"))]
