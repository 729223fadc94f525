"""After `desctune run` (conftest.py's `local_run`: its own process, no Prefect API or database configured),
`desctune ui` shows that very run in the Prefect UI and the MLflow UI, at the addresses the run's links name, and in
headless Chromium every link between them, clicked, lands on the page it names: the MLflow run's description ->
the Prefect flow run; the flow run's link artifacts -> the MLflow run and the model version; the version's
description -> the MLflow run and the flow run. SIGTERM then stops `desctune ui` with every process it started."""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient
from test_demo_browser import CHROMEDRIVER, CHROMIUM, browser  # noqa: F401  (the browser fixture)
from test_ui_browser import follow_link, lands_on, read_link_artifacts

from conftest import ROOT, process_family

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)
READY_TIMEOUT = 300  # two servers starting on two loaded cores
STOP_TIMEOUT = 60


class UI:
    """`desctune ui` in a process of its own, its output collected as it comes."""

    def __init__(self, run):
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ui", *run.args], env=run.env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                self.output.append(self.lines.get(timeout=1))
            except queue.Empty:
                continue
            if self.output[-1].startswith("desctune ui: ready"):
                return
        pytest.fail(f"desctune ui was not ready within {READY_TIMEOUT} s (exit code {self.proc.poll()}): "
                    f"{''.join(self.output)[-2000:]}")

    def family(self) -> list[psutil.Process]:
        return process_family(self.proc.pid)


@pytest.fixture(scope="module")
def ui(local_run):
    """`desctune ui` on `local_run`'s profile and ports; the SIGTERM test, last in this file, stops it."""
    started = UI(local_run)
    try:
        started.wait_ready()
        yield started
    finally:
        if started.proc.poll() is None:
            for p in started.family():
                p.kill()


def test_desctune_ui_shows_the_run_and_every_link_between_prefect_and_mlflow_works(local_run, ui, browser):  # noqa: F811
    prefect, mlflow_ui = (f"http://127.0.0.1:{local_run.prefect_port}",
                          f"http://127.0.0.1:{local_run.mlflow_port}")
    assert (local_run.artifacts / "prefect.db").is_file()
    store = f"sqlite:///{local_run.artifacts.resolve() / 'mlflow.db'}"
    mlflow = MlflowClient(store, registry_uri=store)
    [version] = mlflow.search_model_versions("name = 'cli-tiny'")
    run = mlflow.get_run(version.run_id)
    flow_run_id, flow_run_name = run.data.tags["prefect.flow_run_id"], run.data.tags["prefect.flow_run_name"]
    flow_run_url = f"{prefect}/runs/flow-run/{flow_run_id}"
    run_url = f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert version.tags["prefect.flow_run_url"] == run.data.tags["mlflow.source.name"] == flow_run_url
    assert f"Prefect UI:  {flow_run_url}" in local_run.stdout

    # MLflow run -> its Prefect flow run (the description's link)
    browser.get(f"{run_url}?workflowType=machine_learning")
    lands_on(browser, run.info.run_name, "Description", "Source")
    assert follow_link(browser, f"Prefect flow run {flow_run_name}") == flow_run_url
    lands_on(browser, flow_run_name, "Completed")

    # Prefect flow run's link artifacts -> the MLflow run and the model version
    links = asyncio.run(read_link_artifacts(f"{prefect}/api", flow_run_id))
    assert set(links) == {"mlflow-run", "model-version"}
    browser.get(f"{prefect}/artifacts/artifact/{links['mlflow-run'].id}")
    assert follow_link(browser, f"MLflow run {run.info.run_id}").startswith(run_url)
    lands_on(browser, run.info.run_name, "Description")
    browser.get(f"{prefect}/artifacts/artifact/{links['model-version'].id}")
    assert follow_link(browser, f"cli-tiny version {version.version}").startswith(
        f"{mlflow_ui}/#/models/cli-tiny/versions/{version.version}")

    # Model version -> the MLflow run and the flow run (the description's links)
    lands_on(browser, f"Version {version.version}", "writes a product description")
    version_page = browser.current_url
    assert follow_link(browser, f"MLflow run {run.info.run_id}").startswith(run_url)
    lands_on(browser, run.info.run_name, "Description")
    browser.get(version_page)
    lands_on(browser, f"Version {version.version}")
    assert follow_link(browser, f"Prefect flow run {flow_run_name}") == flow_run_url
    lands_on(browser, flow_run_name, "Completed")


def test_sigterm_stops_desctune_ui_and_every_process_it_started(ui):
    family = ui.family()
    assert len(family) >= 3, [p.cmdline() for p in family]  # desctune ui, the Prefect and the MLflow server
    ui.proc.send_signal(signal.SIGTERM)
    assert ui.proc.wait(STOP_TIMEOUT) == 0
    gone, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT)
    assert not alive, f"{STOP_TIMEOUT} s after SIGTERM, still running: {[p.cmdline() for p in alive]}"
