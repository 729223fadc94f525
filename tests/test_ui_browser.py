"""`desctune serve` on non-default ports, seen through its UIs in headless Chromium (Debian's chromium and
chromium-driver): the Prefect UI reaches its own API (no "Can't connect" banner) and lists the four deployments,
with the schedules that cannot run here paused and said so (a tag in the list, the reason in the description); the
finetune form sets each `auto` field to each kind of value and the submitted runs get them; the evaluate-champion
form starts with its two required, described fields; a finetune run's link artifact opens the MLflow run it names;
the model version's page shows its description and the flow run's link on the served port; every link between the
two UIs, clicked, lands on the page it names. Each test keeps the screens the README shows under docs/screens/. The
served stack is the session's (conftest.py's `sqlite_stack`),
which tests/test_servers.py uses too."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient
from test_demo_browser import CHROMEDRIVER, CHROMIUM, browser, save_screen  # noqa: F401  (the browser fixture)

from conftest import ROOT, SAMPLE, head_records, tiny_config
from deployments.deploy import PAUSED_TAG
from test_servers import read_deployment, trigger_and_wait

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)
MODEL = "tiny-ui"
CANT_CONNECT = "Can't connect"


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_text(driver, *texts: str, timeout: float = 180) -> str:
    """The page's text once it shows every one of `texts`; fails naming the ones missing (and a Prefect banner)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(lambda d: all(t in page_text(d) for t in texts))
    except TimeoutException:
        body = page_text(driver)
        pytest.fail(f"{driver.current_url} never showed {[t for t in texts if t not in body]}: {body[:1500]}")
    return page_text(driver)


def follow_link(driver, text: str, timeout: float = 180) -> str:
    """Click the link whose text contains `text` on the current page, as a person does, and stay on the page it opens
    (in this tab, or the tab it opened); returns that page's URL. A click that lands on something drawn over the
    link (a tooltip, a loading overlay, the fade over a long description: its "Show more" is clicked first) is tried
    again."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before, handles, href, blocked = driver.current_url, set(driver.window_handles), [], []

    def click(d) -> bool:
        anchor = d.find_element(By.PARTIAL_LINK_TEXT, text)
        href[:] = [anchor.get_attribute("href")]
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", anchor)
        try:
            anchor.click()
        except ElementClickInterceptedException as exc:
            blocked[:] = [exc.msg.split("\n")[0]]
            for more in d.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']"):
                more.click()  # MLflow fades out a long description below its first lines
            return False
        return True

    try:
        WebDriverWait(driver, timeout, ignored_exceptions=(NoSuchElementException,
                                                           StaleElementReferenceException)).until(click)
    except TimeoutException:
        pytest.fail(f"{before} never showed a clickable link {text!r} ({href or 'none found'}; "
                    f"{blocked or 'never covered'}): {page_text(driver)[:1500]}")
    try:
        WebDriverWait(driver, timeout).until(lambda d: set(d.window_handles) - handles or d.current_url != before)
    except TimeoutException:
        pytest.fail(f"clicking {text!r} ({href}) on {before} went nowhere")
    opened = set(driver.window_handles) - handles
    if opened:
        driver.close()
        driver.switch_to.window(opened.pop())
        WebDriverWait(driver, timeout).until(lambda d: d.current_url not in ("", "about:blank"))
    return driver.current_url


def lands_on(driver, *texts: str) -> str:
    """The page's text once it shows `texts`, after checking it is no "Page not found" (Prefect's answer to a URL it
    has no page for) and no "Can't connect" banner."""
    body = wait_for_text(driver, *texts)
    assert "Page not found" not in body and CANT_CONNECT not in body, (driver.current_url, body[:1500])
    return body


def row_text(driver, deployment: str) -> str:
    """The text of the deployments list's row whose name link is `deployment`."""
    from selenium.webdriver.common.by import By

    link = driver.find_element(By.XPATH, f"//a[normalize-space()='{deployment}']")
    return link.find_element(By.XPATH, "ancestor::tr[1]").text


@pytest.fixture(scope="module")
def stack(sqlite_stack):
    assert {sqlite_stack.prefect_port, sqlite_stack.mlflow_port}.isdisjoint({4200, 5000})
    return sqlite_stack


@pytest.fixture(scope="module")
def finetuned(stack, tiny_model_dir, tmp_path_factory):
    """One tiny finetune run through the served deployment, completed."""
    tmp = tmp_path_factory.mktemp("ui-run")
    records = head_records(SAMPLE, tmp / "records.jsonl", 30)
    cfg = tiny_config(tmp, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15},
                      registry={"model_name": MODEL})
    params = {"config": json.loads(cfg.model_dump_json())}
    [run] = asyncio.run(trigger_and_wait(stack.api_url, "finetune/finetune", params, 1))
    assert run.state.name == "Completed", (run.state.message, stack.artifacts / "serve-logs" / "worker.log")
    return run


async def newest_logs(api_url: str, flow_run_id) -> list[str]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    async with PrefectClient(api_url) as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                      sort=LogSort.TIMESTAMP_DESC, limit=200)
    return [log.message for log in logs]


def wait_for_log(api_url: str, flow_run_id, match, timeout: float = 120) -> list[str]:
    """The run's log lines that `match`, waiting for its last lines to reach the server (they are sent in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in asyncio.run(newest_logs(api_url, flow_run_id)) if match(m)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


async def read_link_artifacts(api_url: str, flow_run_id) -> dict:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with PrefectClient(api_url) as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key in ("mlflow-run", "model-version")}


def test_the_prefect_ui_on_another_port_reaches_its_api_lists_the_deployments_and_unrunnable_schedules_are_paused(
        stack, browser):  # noqa: F811
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.prefect_port}/ui-settings", timeout=10) as r:
        assert json.load(r)["api_url"] == stack.api_url
    said = stack.new_output()
    assert "retrain-weekly schedule paused: " in said and "data/trn.json is not there" in said
    assert "evaluate-champion schedule paused: no desctune-smollm2@champion in the registry yet" in said
    for name in ("finetune/retrain-weekly", "evaluate-champion/evaluate-champion"):
        deployment = asyncio.run(read_deployment(stack.api_url, name))
        assert deployment.schedules and not any(s.active for s in deployment.schedules), name
        assert PAUSED_TAG in deployment.tags and "**Schedule paused**: " in deployment.description, name
    evaluate = asyncio.run(read_deployment(stack.api_url, "evaluate-champion/evaluate-champion"))
    assert (ROOT / evaluate.parameters["dataset"]).is_file()

    browser.get(f"http://127.0.0.1:{stack.prefect_port}/deployments")
    body = wait_for_text(browser, "4 Deployments", "finetune", "finetune-smoke", "retrain-weekly", "evaluate-champion")
    assert CANT_CONNECT not in body
    rows = {name: row_text(browser, name) for name in ("finetune", "retrain-weekly", "evaluate-champion")}
    assert PAUSED_TAG not in rows["finetune"], rows  # the tag marks the paused ones only
    assert PAUSED_TAG in rows["retrain-weekly"] and PAUSED_TAG in rows["evaluate-champion"], rows
    save_screen(browser, "prefect-deployments")
    # the deployment's own page says why, where the console is not seen
    weekly = asyncio.run(read_deployment(stack.api_url, "finetune/retrain-weekly"))
    browser.get(f"http://127.0.0.1:{stack.prefect_port}/deployments/deployment/{weekly.id}?tab=Description")
    wait_for_text(browser, "Schedule paused: ", "data/trn.json is not there", "deploys it active")
    save_screen(browser, "prefect-deployment-paused")

    finetune = asyncio.run(read_deployment(stack.api_url, "finetune/finetune"))
    browser.get(f"http://127.0.0.1:{stack.prefect_port}/deployments/deployment/{finetune.id}/run")
    body = wait_for_text(browser, "Parameters", "Artifacts Dir", "Uid Field", "Max Records", "Lr Scheduler")
    assert CANT_CONNECT not in body
    assert 'Property is type "None"' not in body  # optional numbers open as empty number boxes
    save_screen(browser, "prefect-run-form")


def test_a_flow_runs_links_open_its_mlflow_run_and_the_model_version_shows_its_description_and_flow_run(
        stack, finetuned, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    run = finetuned
    links = asyncio.run(read_link_artifacts(stack.api_url, run.id))
    assert set(links) == {"mlflow-run", "model-version"}
    assert all(a.description for a in links.values())
    mlflow = MlflowClient(stack.mlflow_url, registry_uri=stack.mlflow_url)
    [version] = mlflow.search_model_versions(f"name = '{MODEL}'")
    flow_run_url = f"http://127.0.0.1:{stack.prefect_port}/runs/flow-run/{run.id}"
    assert version.tags["prefect.flow_run_url"] == flow_run_url
    tracked = mlflow.get_run(version.run_id)
    assert f"{stack.mlflow_url}/#/experiments/{tracked.info.experiment_id}/runs/{tracked.info.run_id}" in \
        links["mlflow-run"].data
    assert f"{stack.mlflow_url}/#/models/{MODEL}/versions/{version.version}" in links["model-version"].data
    experiment = mlflow.get_experiment(tracked.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "product description" in mlflow.get_registered_model(MODEL).description
    tags = tracked.data.tags
    assert tags["mlflow.source.name"] == flow_run_url and tags["mlflow.source.type"] == "JOB"
    assert "LoRA fine-tuning" in tags["mlflow.note.content"] and f"Registered as [{MODEL} version" in \
        tags["mlflow.note.content"]
    closing = f"registered {MODEL} version {version.version} (@"
    assert wait_for_log(stack.api_url, run.id, lambda m: m.startswith(closing)), closing
    trained = wait_for_log(stack.api_url, run.id, lambda m: m.startswith("train step "))
    assert trained and all("tokens/s" in m and "elapsed" in m for m in trained), trained
    assert any(m.startswith("train step 1/") for m in trained) and any(m.endswith("done") for m in trained)
    for model in ("base", "fine-tuned"):
        assert wait_for_log(stack.api_url, run.id, lambda m, model=model: m.startswith(f"evaluate: {model} model"))

    browser.get(flow_run_url)
    body = wait_for_text(browser, run.name, "Completed")
    assert CANT_CONNECT not in body
    save_screen(browser, "prefect-flow-run")

    # The Prefect artifact page renders the link; clicking it lands on the MLflow run it names, whose description
    # links back to the flow run.
    run_page = f"{stack.mlflow_url}/#/experiments/{tracked.info.experiment_id}/runs/{tracked.info.run_id}"
    browser.get(f"http://127.0.0.1:{stack.prefect_port}/artifacts/artifact/{links['mlflow-run'].id}")
    wait_for_text(browser, f"MLflow run {tracked.info.run_id}")
    anchor = browser.find_element(By.PARTIAL_LINK_TEXT, f"MLflow run {tracked.info.run_id}")
    assert anchor.get_attribute("href").endswith("?workflowType=machine_learning")
    assert follow_link(browser, f"MLflow run {tracked.info.run_id}").startswith(run_page)
    lands_on(browser, run.name, "Description", "Source")
    save_screen(browser, "mlflow-run")
    assert follow_link(browser, f"Prefect flow run {run.name}") == flow_run_url
    lands_on(browser, run.name, "Completed")
    # the experiment opens on its training runs (MLflow's model-training view), not on the GenAI overview
    browser.get(f"{stack.mlflow_url}/#/experiments/{tracked.info.experiment_id}?workflowType=machine_learning")
    wait_for_text(browser, "Model registry", run.name)
    assert "/runs" in browser.current_url and "Tool calls" not in page_text(browser)

    # The model-version artifact lands on the version, whose description links its MLflow run and its flow run.
    browser.get(f"http://127.0.0.1:{stack.prefect_port}/artifacts/artifact/{links['model-version'].id}")
    version_page = follow_link(browser, f"{MODEL} version {version.version}")
    assert version_page.startswith(f"{stack.mlflow_url}/#/models/{MODEL}/versions/{version.version}")
    assert version_page.endswith("?workflowType=machine_learning")
    lands_on(browser, f"Version {version.version}", "writes a product description", "prefect.flow_run_url",
             flow_run_url)
    save_screen(browser, "mlflow-model-version")
    assert follow_link(browser, f"MLflow run {tracked.info.run_id}").startswith(run_page)
    lands_on(browser, run.name, "Description")
    browser.get(version_page)
    assert follow_link(browser, f"Prefect flow run {run.name}") == flow_run_url
    lands_on(browser, run.name, "Completed")


# (max_tokens_per_batch, gradient_checkpointing, compile) of each submitted run: every field takes each kind of value
# it has (auto, a number or true/false, none) once.
FORM_CHOICES = [("auto", "auto", "auto"), (512, True, False), (None, False, True)]
TRAIN_FIELDS = {"Max Tokens Per Batch": "max_tokens_per_batch", "Gradient Checkpointing": "gradient_checkpointing",
                "Compile": "compile"}


def form_field(driver, label: str):
    """The run form's property whose label is `label` (with or without "(Optional)")."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.XPATH, (
        "//span[contains(@class, 'schema-form-property__label') and "
        f"(normalize-space()='{label}' or normalize-space()='{label} (Optional)')]"
        "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' p-label ')][1]"))


def pick(driver, label: str, value) -> None:
    """Set one of the three fields in the form as a user does: a button per kind for the token budget, then its
    number or its one choice; the auto/true/false list for the others."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def the_list():
        return Select(form_field(driver, label).find_element(
            By.CSS_SELECTOR, "select.p-native-select__control:not(.p-native-select__control--placeholder)"))

    if label != "Max Tokens Per Batch":
        the_list().select_by_visible_text(json.dumps(value).strip('"'))
        return
    kind = "none" if value is None else "auto" if value == "auto" else "tokens"
    form_field(driver, label).find_element(By.XPATH, f".//button[normalize-space()='{kind}']").click()
    if kind == "tokens":
        box = form_field(driver, label).find_element(By.CSS_SELECTOR, "input")
        box.clear()
        box.send_keys(str(value))
    elif kind == "auto":
        the_list().select_by_value("auto")


async def set_pool_paused(api_url: str, paused: bool) -> None:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import WorkPoolUpdate

    async with PrefectClient(api_url) as client:
        await client.update_work_pool("desctune-local", WorkPoolUpdate(is_paused=paused))


async def deployment_runs(api_url: str, deployment_id) -> dict:
    """The deployment's flow runs by id."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with PrefectClient(api_url) as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return {r.id: r for r in runs}


async def delete_runs(api_url: str, flow_run_ids) -> None:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        for i in flow_run_ids:
            await client.delete_flow_run(i)


def submit_run_form(driver, api_url: str, deployment_id, timeout: float = 300):
    """Press Submit; the flow run it created, read from the API once the UI has left the form for the deployment's
    page (nothing polls the server meanwhile)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = set(asyncio.run(deployment_runs(api_url, deployment_id)))
    form = driver.current_url
    driver.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()
    try:
        WebDriverWait(driver, timeout, poll_frequency=1).until(
            lambda d: d.current_url != form or "Something went wrong" in page_text(d))
    except TimeoutException:
        pytest.fail(f"the run form was still submitting after {timeout:.0f} s: {page_text(driver)[-1000:]}")
    new = [r for i, r in asyncio.run(deployment_runs(api_url, deployment_id)).items() if i not in before]
    assert len(new) == 1, f"submitting the run form made {len(new)} flow runs; the page: {page_text(driver)[-1000:]}"
    return new[0]


def test_the_finetune_forms_auto_fields_take_every_kind_of_value_and_the_runs_get_them(stack, browser):  # noqa: F811
    """The three fields whose `auto` Prefect's form showed as a const that cannot be changed: each set in the form to
    auto, to a value of its own type and (the token budget) to none, three runs submitted, and their parameters read
    back from the API. The work pool is paused meanwhile, so the worker starts none of them; they are deleted."""
    finetune = asyncio.run(read_deployment(stack.api_url, "finetune/finetune"))
    form = f"http://127.0.0.1:{stack.prefect_port}/deployments/deployment/{finetune.id}/run"
    asyncio.run(set_pool_paused(stack.api_url, True))
    created = []
    try:
        for choice in FORM_CHOICES:
            browser.get(form)
            body = wait_for_text(browser, "Parameters", *TRAIN_FIELDS)
            assert "is a const and cannot be changed" not in body
            for label, value in zip(TRAIN_FIELDS, choice):
                pick(browser, label, value)
            if choice == FORM_CHOICES[1]:
                save_screen(browser, "prefect-run-form-choices")
            created.append(submit_run_form(browser, stack.api_url, finetune.id))
    finally:
        asyncio.run(delete_runs(stack.api_url, [r.id for r in created]))
        asyncio.run(set_pool_paused(stack.api_url, False))
    assert all(r.state.is_scheduled() for r in created), [r.state.name for r in created]  # none started
    got = [tuple(r.parameters["config"]["train"][name] for name in TRAIN_FIELDS.values()) for r in created]
    assert got == FORM_CHOICES
    # the rest of the form went through as the deployment has it
    assert all(r.parameters["config"]["data"] == finetune.parameters["config"]["data"] for r in created)


def test_the_evaluate_champion_form_starts_with_its_two_described_required_fields(stack, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    evaluate = asyncio.run(read_deployment(stack.api_url, "evaluate-champion/evaluate-champion"))
    browser.get(f"http://127.0.0.1:{stack.prefect_port}/deployments/deployment/{evaluate.id}/run")
    body = wait_for_text(browser, "Parameters", "dataset", "alias", "model_name", "Max New Tokens")
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".schema-form-property__label")]
    assert labels[:2] == ["dataset", "alias"], labels  # first, and not "(Optional)": the run needs them
    assert 'Property is type "None"' not in body
    for absent in ("Lr Scheduler", "Lora", "Max Records", "Test Path", "Metric"):  # not the whole Config
        assert absent not in body, absent
    for label in ("dataset", "alias", "model_name", "generation", "artifacts_dir", "experiment"):
        field = form_field(browser, label)
        assert field.find_element(By.CSS_SELECTOR, ".schema-form-property__description").text, label
    assert form_field(browser, "dataset").find_element(By.CSS_SELECTOR, "textarea, input").get_attribute("value") \
        == "data/amazon_titles_eval.jsonl"
    save_screen(browser, "prefect-evaluate-form")
