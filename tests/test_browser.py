"""One real-browser check: JupyterLab in headless Chromium, the pipeline-bubble widget of lesson 13.

The test starts its own JupyterLab server (127.0.0.1, a free port, a random token) on a copy of
notebook 13 in a temporary folder (so autosave cannot touch the course), opens it in Debian's
``chromium`` driven by Playwright, runs the widget cell, moves the micro-batches slider one step with
the keyboard, and checks that the bubble text and the chart both change. It skips, saying why, when
``chromium`` or ``playwright`` is missing. Run it alone with ``pytest -m browser``.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.lesson13, pytest.mark.timeout(170)]
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "13_pipeline_parallel.ipynb"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDGET_CELL = "pipeline_widget(n_stages=4, n_microbatches=4)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of notebook 13; yields (url, token); stopped afterwards."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    root = tmp_path / "root"
    root.mkdir()
    # A copy without outputs or saved widget state: what the browser shows comes from this run.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, root / NOTEBOOK.name)
    # Render every cell (no windowing), so the widget cell can be found by its text.
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), MPLBACKEND="module://matplotlib_inline.backend_inline")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)     # the server and the kernels it started
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _accept_kernel_dialog(page) -> None:
    """JupyterLab may ask which kernel to start: take the notebook's own, ``python3``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    dialog = page.locator(".jp-Dialog").filter(has_text="Select Kernel")
    try:
        dialog.wait_for(timeout=8_000)
    except PlaywrightTimeout:
        return
    select = dialog.locator("select")
    if select.count():
        for value in select.locator("option").evaluate_all("os => os.map(o => o.value)"):
            if "python3" in value:
                select.select_option(value)
                break
    dialog.locator("button.jp-mod-accept").click()
    dialog.wait_for(state="detached", timeout=10_000)


def _chart_png(cell, tries: int = 20) -> bytes:
    """A screenshot of the widget's chart, once it has settled (redraws replace the <img>)."""
    from playwright.sync_api import Error

    for _ in range(tries):
        img = cell.locator(".widget-output img").first
        try:
            img.wait_for(timeout=30_000)
            cell.page.wait_for_timeout(300)
            return img.screenshot(timeout=5_000)
        except Error:
            continue
    raise AssertionError("the chart image never settled")


def test_moving_the_microbatch_slider_redraws_the_bubble_view(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, token = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        try:
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            cell = page.locator(".jp-CodeCell").filter(has_text=WIDGET_CELL)
            cell.wait_for(timeout=60_000)
            _accept_kernel_dialog(page)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first \
                .wait_for(timeout=60_000)
            cell.locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")

            bubble = cell.locator(".pipeline-bubble")
            bubble.wait_for(timeout=60_000)
            before_text, before_png = bubble.inner_text(), _chart_png(cell)
            before_src = cell.locator(".widget-output img").first.get_attribute("src")
            assert "m=4 micro-batches" in before_text

            slider = cell.locator(".widget-slider").filter(has_text="micro-batches m")
            slider.locator(".noUi-handle").focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.pipeline-bubble')]"
                ".some(e => e.textContent.includes('m=5 micro-batches'))", timeout=30_000)
            after_text = bubble.inner_text()
            # The text changes first; the new chart follows once the kernel has drawn it.
            page.wait_for_function(
                "src => [...document.querySelectorAll('.widget-output img')]"
                ".some(img => img.src && img.src !== src)", arg=before_src, timeout=30_000)
            after_png = _chart_png(cell)
        except Exception:
            page.screenshot(path=str(tmp_path / "page.png"))   # for the failure report
            print(f"screenshot of the page: {tmp_path / 'page.png'}")
            raise
        finally:
            browser.close()
    assert "3/7 = 0.429" in before_text and "3/8 = 0.375" in after_text
    assert after_png != before_png, "the Gantt chart did not change when the slider moved"
