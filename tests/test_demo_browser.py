"""The demo in a real browser: `desctune demo` serves the page on a free loopback port, headless Chromium (Debian's
chromium + chromium-driver, never a downloaded browser) types a title, generates, and finds both columns filled by
the stream, each with its tokens/s; the screen is kept as docs/screens/demo.png for the README.

The README's screen shows the default run's real model, not the tiny test model: after `make run`,
`DESCTUNE_SCREENS=docs/screens DESCTUNE_DEMO_CONFIG=configs/cpu.yaml .venv/bin/python -m pytest
tests/test_demo_browser.py` serves that profile's registered model instead."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_demo import registered_model

from conftest import ROOT, free_port

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)
TITLE = "Stainless Steel Electric Kettle 1.7 Litre with Auto Shut-Off"
# Where the screens go: a temporary folder, or docs/screens/ (the README's images) with DESCTUNE_SCREENS=docs/screens.
SCREENS = Path(os.environ.get("DESCTUNE_SCREENS") or Path(tempfile.gettempdir()) / "desctune-screens")
# The profile whose registered model the demo serves: the tiny model's test registry unless set (e.g. configs/cpu.yaml
# after `make run`, for the README's screen).
DEMO_CONFIG = os.environ.get("DESCTUNE_DEMO_CONFIG")


def save_screen(driver, name: str) -> Path:
    """The browser's viewport as a small PNG (64-colour palette) in SCREENS (docs/screens/ for the README)."""
    from PIL import Image

    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    SCREENS.mkdir(parents=True, exist_ok=True)
    path = SCREENS / f"{name}.png"
    image.quantize(colors=64).save(path, optimize=True)
    return path


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"desctune demo exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


@pytest.fixture
def demo_server(tmp_path_factory, tiny_model_dir, tmp_path):
    config = ROOT / DEMO_CONFIG if DEMO_CONFIG else registered_model(tmp_path_factory, tiny_model_dir)
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "demo", "--config", str(config), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            env={**os.environ, "HOME": str(tmp_path)},
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", proc, log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_type_a_title_generate_and_see_both_descriptions(demo_server, browser, tmp_path):
    """On failure the page is kept as failure.png and failure.html in the test's temp folder."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    # Streamlit re-renders elements while it streams: a predicate that met one mid-replacement just looks again
    wait = WebDriverWait(browser, 240, ignored_exceptions=(StaleElementReferenceException,))
    try:
        browser.get(demo_server)
        title = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, 'input[aria-label="Product title"]')))
        page = browser.find_element(By.TAG_NAME, "body").text
        # the tiny registry has a champion; the default run's version may have stayed challenger (the demo says why)
        aliases = ("@champion", "@challenger") if DEMO_CONFIG else ("@champion",)
        assert any(a in page for a in aliases) and "Adapter loaded, active and non-zero" in page
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')

        wait.until(ec.element_to_be_clickable(
            (By.XPATH, '//div[@data-testid="stRadio"]//label[normalize-space(.)="sample"]'))).click()
        title.send_keys(TITLE, Keys.ENTER)
        generate = wait.until(ec.element_to_be_clickable((By.XPATH, '//button[.//p[text()="Generate"]]')))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'input[aria-label="Product title"]').get_attribute("value")
                   == TITLE)
        generate.click()
        base, tuned = (wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, f".st-key-{key}")))
                       for key in ("base_output", "finetuned_output"))
        # both columns streamed to the end: each shows its tokens, time and tokens/s, and no typing cursor is left
        def streamed_to_the_end(d) -> bool:
            rates = [e.text for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="stCaptionContainer"]')]
            texts = [d.find_element(By.CSS_SELECTOR, f".st-key-{k}").text for k in ("base_output", "finetuned_output")]
            return sum("tokens/s" in r for r in rates) >= 2 and all(t.strip() and "▌" not in t for t in texts)

        wait.until(streamed_to_the_end)
        base, tuned = (browser.find_element(By.CSS_SELECTOR, f".st-key-{k}") for k in ("base_output", "finetuned_output"))
        charts = ".vega-embed canvas, .vega-embed svg.marks"
        try:  # the evaluation charts below, for the screenshot; they are tested without a browser (test_demo.py)
            WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, charts)) >= 3)
        except TimeoutException:
            pass
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", base)
        shot = save_screen(browser, "demo")
        print(f"screenshot: {shot}")
        assert base.text.strip() and tuned.text.strip()
        assert "(empty output)" not in (base.text, tuned.text)
        assert base.text != tuned.text
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')
        assert shot.stat().st_size > 10_000
    except Exception:
        browser.save_screenshot(str(tmp_path / "failure.png"))
        (tmp_path / "failure.html").write_text(browser.page_source)
        raise
