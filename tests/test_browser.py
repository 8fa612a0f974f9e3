"""The mask browser in a real JupyterLab, driven by headless Chromium (Playwright).

JupyterLab serves a copy of notebooks/01_data_inspection.ipynb on 127.0.0.1; Chromium opens it,
runs every cell, and the test asserts that the browser widget's image and controls render and
react to a click. The screenshot is saved in the test's tmp dir. `.ci/run` installs Debian's
chromium so this runs in CI.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "cellkit-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_notebook(dst: Path) -> Path:
    """The data-inspection notebook with a small synthetic dataset in its parameters cell."""
    nb = json.loads((REPO / "notebooks" / "01_data_inspection.ipynb").read_text())
    params = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(params["source"]).replace(
        "overrides = {}", 'overrides = {"data.synth_train": 6, "data.synth_max_size": 192}'
    )
    assert "data.synth_train" in source
    params["source"] = source
    path = dst / "01_data_inspection.ipynb"
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture
def jupyterlab(tmp_path: Path):
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    labconfig = tmp_path / "config" / "labconfig"
    labconfig.mkdir(parents=True)  # no "get notified about Jupyter news?" toast over the widget
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    root = tmp_path / "lab"
    root.mkdir()
    _small_notebook(root)
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--allow-root"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 90:
                    raise AssertionError("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


NOTEBOOK_STATE = """() => {
    if (document.querySelector('.cellkit-mask-browser')) return 'widget';
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
    const idle = document.querySelector(".jp-Notebook-ExecutionIndicator[data-status='idle']") !== null;
    if (prompts.some(t => t.includes('[*]')) || !idle) return 'running';
    if (!prompts.some(t => /\\[\\d+\\]/.test(t))) return 'not started';
    return prompts.some(t => /\\[\\s*\\]/.test(t)) ? 'stalled' : 'done';
}"""
"""What the notebook page shows: the widget, cells running (or queued), none started, or a
stall (the kernel idle, some cells run and others not)."""


def dismiss_dialogs(page) -> list[str]:
    """Accept every JupyterLab dialog on the page and return their texts. A modal dialog (a
    kernel chooser when the kernel connection lags, a "kernel busy" notice) intercepts every click
    on the menus, which made this test time out on the Run menu now and then (CI included)."""
    texts = []
    for dialog in page.query_selector_all(".jp-Dialog"):
        texts.append(" ".join(dialog.inner_text().split())[:200])
        button = dialog.query_selector("button.jp-mod-accept") or dialog.query_selector("button")
        if button is not None:
            button.click()
    if texts:
        page.wait_for_timeout(500)
    return texts


def click_menu(page, names: tuple[str, ...], deadline: float) -> list[str]:
    """Click the menu items ``names`` in turn, accepting any dialog that intercepts a click (one can
    open between the dismissal and the click: a kernel chooser took a Run menu click for 30 s under
    make test), and then the whole path again; returns the dialogs' texts."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    texts = []
    while True:
        texts += dismiss_dialogs(page)
        try:
            for name in names:
                page.get_by_role("menuitem", name=name, exact=True).click(timeout=5_000)
            return texts
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise
            page.keyboard.press("Escape")  # close a menu left open


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_mask_browser_renders_in_jupyterlab(jupyterlab: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"{jupyterlab}/lab/tree/01_data_inspection.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
            # wait for the kernel, then Run > Run All Cells until the widget shows. The indicator can
            # read idle before the kernel connection is up, and on a busy machine the requests of
            # all but the first cell were seen lost (the kernel idle, the other cells never run):
            # a kernel idle for 15 s with cells not run is a stall, and Run All Cells is clicked again
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            dialogs: list[str] = []
            clicks, stalled_since, deadline = 0, None, time.monotonic() + 360
            while True:
                state = page.evaluate(NOTEBOOK_STATE)
                if state == "widget":
                    break
                stalled_since = (stalled_since or time.monotonic()) if state in ("stalled", "not started") else None
                again = clicks == 0 or (stalled_since is not None and time.monotonic() - stalled_since > 15)
                if (again and clicks == 5) or time.monotonic() > deadline:
                    page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                    outputs = [o.inner_text()[:800] for o in page.query_selector_all(".jp-OutputArea-output")]
                    raise AssertionError(f"the browser widget did not render after Run All Cells {clicks} times "
                                         f"({state}); screenshot {tmp_path / 'failure.png'}; dialogs seen: {dialogs}; "
                                         f"cell outputs: {outputs}")
                if again:
                    dialogs += click_menu(page, ("Run", "Run All Cells"), deadline)
                    clicks, stalled_since = clicks + 1, None
                page.wait_for_timeout(500)
            widget = page.query_selector(".cellkit-mask-browser")
            img = page.wait_for_selector(".cellkit-mask-browser img", timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=img, timeout=60_000)
            assert widget.query_selector("select") is not None  # the image picker
            toggles = widget.query_selector_all("button")
            labels = [b.inner_text() for b in toggles]
            assert {"class 1", "class 2", "class 3", "class 4"} <= set(labels), labels
            assert {"outline", "fill", "both"} <= set(labels), labels
            assert widget.query_selector_all(".widget-slider")  # zoom / pan sliders
            before = img.get_attribute("src")
            widget.query_selector("button:has-text('fill')").click()
            page.wait_for_function("([img, before]) => img.getAttribute('src') !== before", arg=[img, before],
                                   timeout=30_000)
            widget.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "mask_browser.png"), full_page=True)
            assert (tmp_path / "mask_browser.png").stat().st_size > 20_000
            if os.environ.get("CELLKIT_SCREENSHOT_DIR"):  # docs/make_figures.py browser
                widget.screenshot(path=str(Path(os.environ["CELLKIT_SCREENSHOT_DIR"]) / "tour_browser.png"))
            errors = page.query_selector_all(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] .ansi-red-fg")
            assert not errors, [e.inner_text()[:500] for e in errors]
        finally:
            browser.close()
