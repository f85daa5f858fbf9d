"""The notebooks where learners open them: JupyterLab in a real headless browser.

Debian's ``chromium`` (apt) driven by ``playwright`` from pip, pointed at that executable (``playwright
install`` is never run: it downloads browsers). A JupyterLab server is started on 127.0.0.1 with a
token on a free port, serving a temporary copy of the notebooks at smoke size; the page may only talk
to that server (every other request is refused and recorded, as on a machine without internet).

For each notebook in ``NOTEBOOKS``: opening it does not mark it modified; Run All finishes with no
error output; each explorer renders its figures; moving a slider by keyboard, as a learner would,
changes the plot in place (the same plot element, new data); a static-mode explorer redraws cleanly;
no JS console errors. Screenshots go to ``.artifacts/browser/`` (not committed).

Skips when chromium or playwright is missing, except under ``CI=true`` (``.ci/run`` installs both),
where a missing browser is a failure.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / ".artifacts" / "browser"
#: 02 holds the router explorer (the richest widget); one notebook keeps the test at about a minute.
NOTEBOOKS = ("02_router_zoo.ipynb",)
SERVER_START_S = 90
RUN_ALL_S = 300


def _chromium() -> str | None:
    """``$MOE_LITE_CHROMIUM`` if set (only it), else Debian's ``chromium``; None when not executable."""
    chosen = os.environ.get("MOE_LITE_CHROMIUM")
    for candidate in [chosen] if chosen else [shutil.which("chromium"), "/usr/bin/chromium"]:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never `playwright install`)"
    if _chromium() is None:
        return "no chromium executable (apt-get install chromium, or set MOE_LITE_CHROMIUM)"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "jupyterlab is not installed"
    return None


def _require_browser() -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the browser test: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a temporary copy of the notebooks: yields (base url, token, folder)."""
    _require_browser()
    root = tmp_path_factory.mktemp("lab")
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, root / name)
    port, token = _free_port(), secrets.token_hex(16)
    home = root / ".home"  # isolated Jupyter settings, workspaces and runtime files
    env = {**os.environ, "MOE_LITE_SIZE": "smoke", "MOE_LITE_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "ws")}
    env.pop("MOE_LITE_STATIC_FIGURES", None)  # the notebook's own choice: live FigureWidgets
    news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false", "checkForUpdates": false}')  # no pop-up over the screenshots
    log = open(root / "jupyter.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--ServerApp.allow_root=True",  # CI containers often run as root
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"JupyterLab did not start (exit code {proc.poll()}, limit {SERVER_START_S} s):\n"
                                + (root / "jupyter.log").read_text(errors="replace")[-3000:])
                time.sleep(0.5)
        yield base, token, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


# ---- JupyterLab, read through the app object (window.jupyterapp, exposed by the server flag) ----
_PANEL = "window.jupyterapp.shell.currentWidget"

_STATE = f"""() => {{
    const panel = {_PANEL};
    if (!panel || !panel.content || !panel.sessionContext) return null;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    const cells = panel.content.widgets.filter(c => c.model.type === 'code');
    return {{
        kernel: kernel ? kernel.status : null,
        dirty: panel.context.model.dirty,
        running: cells.filter(c => c.promptNode && c.promptNode.textContent.includes('*')).length,
        unrun: cells.filter(c => c.model.executionCount === null).length,
        errors: cells.flatMap((c, i) => c.model.outputs.toJSON()
            .filter(o => o.output_type === 'error').map(o => `cell ${{i}}: ${{o.ename}}: ${{o.evalue}}`)),
    }};
}}"""


def _state(page):
    return page.evaluate(_STATE)


def _wait(page, predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while True:
        state = _state(page)
        if state is not None and predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; state {state}")
        page.wait_for_timeout(250)


def _open(browser, base, token, name):
    """A page on notebook ``name`` with its kernel idle; records console errors and outside requests."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.console_errors, page.outside = [], []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(f"uncaught: {e}"))

    def only_local(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:  # no internet here: refuse, and remember who asked
            page.outside.append((route.request.resource_type, route.request.url))
            route.abort("internetdisconnected")

    page.route("**/*", only_local)
    page.goto(f"{base}/lab/tree/{name}?token={token}", wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=60_000)
    _wait(page, lambda s: s["kernel"] == "idle", 60, "the kernel to start")
    return page


def _explorers(page):
    """The explorer boxes: an ipywidgets VBox headed by an <h3>, holding plotly plots."""
    return page.locator(".jp-OutputArea-output .widget-vbox:has(h3):has(.js-plotly-plot)")


def _plot_data(page, plot):
    return page.evaluate("gd => JSON.stringify(gd.data.map(t => [t.z, t.y]))", plot)


_ADD_CELL = f"""async (code) => {{
    const app = window.jupyterapp, nb = {_PANEL}.content;
    nb.activeCellIndex = nb.widgets.length - 1;
    await app.commands.execute('notebook:insert-cell-below');
    nb.activeCell.model.sharedModel.setSource(code);
    await app.commands.execute('notebook:run-cell');
}}"""

#: A static-mode explorer (the fallback where FigureWidget cannot render) on the notebook's logits.
STATIC_CELL = """from moe_lite.widgets import RouterExplorer
static = RouterExplorer(logits, router="topk", mode="static", title="Static explorer")
static"""


def _unexpected(errors):
    # the only errors allowed are the refused outside requests logged by the browser itself
    return [e for e in errors if "net::ERR_INTERNET_DISCONNECTED" not in e]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_explorers_respond_in_jupyterlab(lab, browser, name):
    from playwright.sync_api import expect

    base, token, _ = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stem = Path(name).stem
    page = _open(browser, base, token, name)
    try:
        page.wait_for_timeout(1000)  # a kernelspec rewrite marks the document dirty right after start
        assert not _state(page)["dirty"], "opening the notebook marked it modified (kernelspec metadata?)"

        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        state = _wait(page, lambda s: s["kernel"] == "idle" and s["running"] == 0 and s["unrun"] == 0,
                      RUN_ALL_S, "Run All to finish")
        assert state["errors"] == [], state["errors"]
        page.screenshot(path=str(ARTIFACTS / f"{stem}-page.png"), full_page=False)

        explorers = _explorers(page)
        assert explorers.count() >= 1, "no explorer rendered"
        for i in range(explorers.count()):
            box = explorers.nth(i)
            box.scroll_into_view_if_needed()
            plots = box.locator(".js-plotly-plot")
            assert plots.count() >= 1 and plots.first.is_visible()
            box.screenshot(path=str(ARTIFACTS / f"{stem}-explorer-{i}.png"))

        # a learner moves the first enabled slider of the first explorer one step, by keyboard
        box = explorers.first
        assert box.locator(".widget-output").count() == 0, "expected live FigureWidgets, got static figures"
        plot = box.locator(".js-plotly-plot").first.element_handle()
        before, readout = _plot_data(page, plot), box.locator(".widget-html").nth(1).inner_text()
        handle = box.locator(".widget-slider:not(.mod-disabled) .noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")
        page.wait_for_function("([gd, old]) => JSON.stringify(gd.data.map(t => [t.z, t.y])) !== old",
                               arg=[plot, before], timeout=30_000)
        now = box.locator(".js-plotly-plot").first.element_handle()
        assert page.evaluate("([a, b]) => a === b && a.isConnected", [plot, now]), "the plot was re-created"
        expect(box.locator(".widget-html").nth(1)).not_to_have_text(readout, timeout=30_000)  # the readout too
        box.screenshot(path=str(ARTIFACTS / f"{stem}-explorer-moved.png"))
        # plotly.js draws zero as zero: the colour range is ours (0 .. max), not auto-scaled around it
        heat = page.evaluate("gd => { const t = gd._fullData[0]; return [t.type, t.zauto, t.zmin]; }", plot)
        assert heat == ["heatmap", False, 0], heat

        if name == "02_router_zoo.ipynb":  # the static fallback redraws into an Output, cleanly
            page.evaluate(_ADD_CELL, STATIC_CELL)
            state = _wait(page, lambda s: s["kernel"] == "idle" and s["running"] == 0 and s["unrun"] == 0,
                          60, "the static explorer cell")
            assert state["errors"] == [], state["errors"]
            static = page.locator(".widget-vbox:has(h3:text-is('Static explorer')):has(.js-plotly-plot)")
            static.scroll_into_view_if_needed()
            old = static.locator(".js-plotly-plot").first.element_handle()
            slider = static.locator(".widget-slider:has(.widget-label:text-is('sample')) .noUi-handle")
            slider.focus()
            slider.press("ArrowRight")
            page.wait_for_function("gd => !gd.isConnected", arg=old, timeout=30_000)  # redrawn, as designed
            expect(static.locator(".js-plotly-plot .gtitle").first).to_contain_text("sample 1", timeout=30_000)
            page.wait_for_timeout(1500)  # late resize callbacks of the replaced plot would log now
            static.screenshot(path=str(ARTIFACTS / f"{stem}-static-explorer.png"))
            # redrawn while its tab is hidden (the learner looks at another tab), then shown again
            page.evaluate(f"() => {{ window._nb = {_PANEL}; window.jupyterapp.commands.execute('launcher:create'); }}")
            expect(static).to_be_hidden(timeout=10_000)
            page.evaluate("() => window._nb.sessionContext.session.kernel"
                          ".requestExecute({code: 'static.set(sample=2, k=3)'}).done.then(() => 1)")
            page.evaluate("() => window.jupyterapp.shell.activateById(window._nb.id)")
            expect(static.locator(".js-plotly-plot .gtitle").first).to_contain_text("sample 2", timeout=30_000)
            page.wait_for_timeout(1000)
        assert _state(page)["errors"] == []
        assert _unexpected(page.console_errors) == [], page.console_errors
        # the markdown's Colab/Binder badge images may be missing offline; nothing the page runs may be
        code = [url for kind, url in page.outside if kind != "image"]
        assert code == [], f"scripts or data requested outside the server (a CDN?): {code}"
    finally:
        page.close()
