"""The README's UI tour, checked in a real browser: ``mlflow ui`` on 127.0.0.1 over the store
of a digits pipeline, driven by headless Chromium (Debian's ``chromium`` through Playwright).

``UI_SCREENSHOTS=docs/images`` (``make screenshots``) also writes the tour's pictures there.
"""

from __future__ import annotations

import os
import shutil
import signal

import mlflow
import pytest

from helpers.processes import (
    PROJECT_DIR,
    VENV_BIN,
    mlflow_run,
    start_listening,
)
from helpers.store import temporary_store
from steps.tracking.runtime import tags

pytestmark = pytest.mark.slow

EXPERIMENT = "mnist-pipeline"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STEPS = ("download_data", "train", "evaluate", "register")
# MLflow 3.17's UI has a global GenAI / Model training switch; the address sets it.
TRAINING_VIEW = "workflowType=machine_learning"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A digits pipeline in the named experiment, and ``mlflow ui`` over its store."""
    root = tmp_path_factory.mktemp("ui")
    with temporary_store(root) as uri:
        result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1",
                            MLFLOW_EXPERIMENT_NAME=EXPERIMENT)
        assert result.returncode == 0, result.stderr[-3000:]
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = {r.data.tags[tags.STEP]: r for r in client.search_runs([experiment.experiment_id])}
        server, port = start_listening(
            lambda port: [os.path.join(VENV_BIN, "mlflow"), "ui", "--backend-store-uri", uri,
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            root / "ui.log", "/health", cwd=root)
        try:
            yield {"url": f"http://127.0.0.1:{port}/", "experiment": experiment, "runs": runs}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(30_000)
    yield page
    page.close()


def screenshot(page, name: str) -> None:
    folder = os.environ.get("UI_SCREENSHOTS")
    if folder:
        target = PROJECT_DIR / folder  # relative to the project: the tests change folder
        target.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target / f"ui-{name}.png"))


def test_the_experiment_is_marked_as_model_training_and_described(ui):
    experiment_tags = ui["experiment"].tags
    assert experiment_tags[tags.EXPERIMENT_KIND] == tags.TRAINING_EXPERIMENT
    assert "mnist-pipeline MLflow Project" in experiment_tags[tags.EXPERIMENT_NOTE]


def test_the_experiment_opens_on_its_named_runs_which_expand_to_the_steps(ui, page):
    main = ui["runs"]["main"]
    assert main.info.run_name == "digits cnn e1 lr=0.003"
    page.goto(f"{ui['url']}#/experiments/{ui['experiment'].experiment_id}/runs?{TRAINING_VIEW}")
    name = page.get_by_text(main.info.run_name, exact=True)
    name.wait_for()
    page.get_by_text("digits-train", exact=False).first.wait_for()  # the Dataset column
    assert page.get_by_text("Training runs").count() == 0  # not the GenAI overview
    row = name.locator("xpath=ancestor::div[contains(@class,'ag-cell')][1]")
    row.locator("button[data-component-id*='runnamecellrenderer']").click()
    for step in STEPS:
        page.get_by_text(step, exact=True).first.wait_for()
    screenshot(page, "runs")


def test_the_evaluate_run_lists_the_confusion_matrix(ui, page):
    evaluate = ui["runs"]["evaluate"]
    page.goto(f"{ui['url']}#/experiments/{ui['experiment'].experiment_id}/runs/"
              f"{evaluate.info.run_id}/artifacts?{TRAINING_VIEW}")
    page.get_by_text("confusion_matrix.png", exact=True).first.wait_for()
    page.get_by_text("confusion_matrix.png", exact=True).first.click()
    # The preview drew: MLflow shows the artifact as an image named after it, once loaded.
    page.wait_for_function("() => [...document.querySelectorAll("
                           "\"img[alt='confusion_matrix.png']\")].some(i => i.naturalWidth > 0)")
    screenshot(page, "evaluate-artifacts")


def test_the_model_page_shows_the_champion_and_the_version_tags(ui, page):
    version = mlflow.MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    page.goto(f"{ui['url']}#/models/mnist-classifier/versions/{version.version}?{TRAINING_VIEW}")
    page.get_by_text("champion").first.wait_for()
    for key in ("model_uri", "data_digest", "train_run_id", "evaluate_run_id",
                "test_accuracy"):
        page.get_by_text(key, exact=True).first.wait_for()
    page.get_by_text(version.tags["data_digest"]).first.wait_for()
    screenshot(page, "model-version")
