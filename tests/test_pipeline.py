"""End to end: ``mlflow run . --env-manager local`` as a user types it, in subprocesses.

A module-scoped first pipeline (and a failing one) are fixtures; every test asks for what
it needs, so each passes alone and in any order.
"""

from __future__ import annotations

import mlflow
import pytest

from helpers.processes import assert_clean_failure, mlflow_run, run_step
from helpers.store import temporary_store
from steps.tracking.runtime import tags

pytestmark = pytest.mark.slow

STEPS = ("download_data", "train", "evaluate", "register")
DIGITS = ("-P", "dataset=digits", "-P", "epochs=1")
DIVERGING = (*DIGITS, "-P", "learning_rate=1e6", "-P", "optimizer=sgd")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    with temporary_store(root) as uri:
        yield {"root": root, "uri": uri}


def children_of(run_id: str):
    return mlflow.MlflowClient().search_runs(
        ["0"], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
        order_by=["attributes.start_time ASC"])


def main_runs() -> list:
    return mlflow.MlflowClient().search_runs(
        ["0"], filter_string=f"tags.`{tags.STEP}` = 'main'",
        order_by=["attributes.start_time DESC"])


def pipeline(*args: str):
    """(completed process, the main run it created)."""
    before = {r.info.run_id for r in main_runs()}
    result = mlflow_run(*args)
    new = [r for r in main_runs() if r.info.run_id not in before]
    assert len(new) == 1, result.stderr[-3000:]
    return result, new[0]


def version_count() -> int:
    return len(mlflow.MlflowClient().search_model_versions("name = 'mnist-classifier'"))


@pytest.fixture(scope="module")
def first(store):
    result, main = pipeline(*DIGITS)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, main


@pytest.fixture(scope="module")
def failed(first):
    """A pipeline whose train step diverges, after a good one registered a champion; the
    registry (version count, champion) before and right after it. Read here, not in the
    tests: other tests of this module share the store and may register in between."""
    client = mlflow.MlflowClient()

    def registry():
        return (version_count(),
                client.get_model_version_by_alias("mnist-classifier", "champion").version)

    before = registry()
    result, main = pipeline(*DIVERGING)
    return result, main, (before, registry())


def test_full_pipeline_on_digits(first):
    result, main = first
    assert main.info.status == "FINISHED"
    children = children_of(main.info.run_id)
    assert [c.data.tags[tags.STEP] for c in children] == list(STEPS)
    assert all(c.info.status == "FINISHED" for c in children)
    by_step = {c.data.tags[tags.STEP]: c for c in children}
    # Each step consumed what the previous one produced.
    data_uri = by_step["download_data"].data.tags[tags.DATA_URI]
    assert by_step["train"].data.params["data"] == data_uri
    model_uri = by_step["train"].data.tags[tags.MODEL_URI]
    assert by_step["evaluate"].data.params["model_uri"] == model_uri
    assert by_step["register"].data.params["model_uri"] == model_uri
    # One epoch of 23 batches, a third of them warming the rate up: the smoke run shows
    # that the model learned (chance is 0.1), not how well (docs/speed.md#recipes).
    assert by_step["evaluate"].data.metrics["test_accuracy"] > 0.6
    client = mlflow.MlflowClient()
    figures = {f.path for f in client.list_artifacts(by_step["evaluate"].info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix_normalized.png",
            "misclassified.png"} <= figures
    champion = client.get_model_version_by_alias("mnist-classifier", "champion")
    assert champion.tags["model_uri"] == model_uri
    assert main.data.tags[tags.REGISTERED_VERSION] == str(champion.version)
    assert main.data.tags[tags.REUSED_STEPS] == "none"
    assert "main: done. test_accuracy" in result.stderr
    assert "\r" not in result.stderr  # no progress bars when output is not a terminal
    # Every step said why it ran: a fresh store has no earlier run of it.
    for step in STEPS:
        assert f"main: {step} runs: no earlier finished {step} run" in result.stderr


def test_make_run_prints_no_python_warnings(first):
    result, _ = first
    assert "Warning" not in result.stderr, result.stderr
    assert "already exists" not in result.stderr


def test_rerun_reuses_every_step(first):
    _, earlier = first
    versions = version_count()
    result, main = pipeline(*DIGITS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main.data.tags[tags.REUSED_STEPS] == ",".join(STEPS)
    pointers = children_of(main.info.run_id)
    assert [p.data.tags[tags.REUSED_STEP] for p in pointers] == list(STEPS)
    for pointer in pointers:
        step = pointer.data.tags[tags.REUSED_STEP]
        assert pointer.data.tags[tags.REUSED_RUN] == earlier.data.tags[tags.step_run_id(step)]
        assert pointer.info.status == "FINISHED"
        assert f"main: {step} reused from run {pointer.data.tags[tags.REUSED_RUN]}" in \
            result.stderr
    assert version_count() == versions


def test_a_changed_param_reruns_only_downstream_steps_and_says_why(first):
    _, earlier = first
    result, main = pipeline(*DIGITS, "-P", "seed=7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert main.data.tags[tags.REUSED_STEPS] == "download_data"
    assert "main: train runs: since run " in result.stderr
    why = next(line for line in result.stderr.splitlines() if "main: train runs:" in line)
    assert "params: seed 42 -> 7" in why and "changed files" not in why


def test_evaluate_alone_after_a_pipeline_run(first):
    result = mlflow_run("-e", "evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    run = mlflow.MlflowClient().search_runs(
        ["0"], filter_string=f"tags.`{tags.STEP}` = 'evaluate'",
        order_by=["attributes.start_time DESC"])[0]
    champion = mlflow.MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    assert run.data.tags[tags.MODEL_URI] == champion.tags["model_uri"]
    assert "confusion_matrix.png" in result.stderr


def test_a_failing_step_fails_main_and_registers_nothing(failed):
    result, main, (registry_before, registry_after) = failed
    assert result.returncode != 0
    assert "error: step train failed" in result.stderr
    assert "Traceback" not in result.stderr
    assert main.info.status == "FAILED"
    children = children_of(main.info.run_id)
    steps = [c.data.tags.get(tags.STEP) for c in children]
    assert steps == ["reused", "train"]  # download reused; evaluate/register never started
    assert children[1].info.status == "FAILED"
    assert registry_after == registry_before  # no version, the champion unmoved
    client = mlflow.MlflowClient()
    assert not [r for r in client.search_runs(["0"]) if r.info.status == "RUNNING"]


def test_a_rerun_after_a_failure_recomputes_the_failed_step(failed):
    _, failed_main, _ = failed
    failed_train = children_of(failed_main.info.run_id)[1]
    assert failed_train.info.status == "FAILED"
    result, main = pipeline(*DIVERGING)
    assert result.returncode != 0
    children = children_of(main.info.run_id)
    assert children[0].data.tags[tags.REUSED_STEP] == "download_data"
    retried = children[1]
    assert retried.data.tags[tags.STEP] == "train"  # ran again, not reused
    assert retried.info.run_id != failed_train.info.run_id


def test_a_given_run_name_and_experiment_are_kept(tracking_uri):
    """``--run-name`` names main's run (the derived name is only for a run given none), and
    ``--experiment-name`` holds main and its four steps."""
    result = mlflow_run("--run-name", "nightly", "--experiment-name", "nightlies",
                        "-P", "dataset=digits", "-P", "epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("nightlies")
    runs = client.search_runs([experiment.experiment_id])
    (main,) = [r for r in runs if r.data.tags[tags.STEP] == "main"]
    assert main.info.run_name == "nightly"
    assert sorted(r.data.tags[tags.STEP] for r in runs if r is not main) == [
        "download_data", "evaluate", "register", "train"]
    assert client.search_runs(["0"]) == []


def test_a_step_alone_says_in_which_experiment_its_upstream_runs_are(tracking_uri):
    made = run_step("download_data", "--dataset", "digits",
                    MLFLOW_EXPERIMENT_NAME="mnist-pipeline")  # as `make run` leaves it
    assert made.returncode == 0, made.stderr[-3000:]
    result = mlflow_run("-e", "train", "-P", "epochs=1")  # in Default
    assert_clean_failure(result, "no finished download_data run",
                         "download_data runs are in experiment 'mnist-pipeline' (make run's): "
                         "add --experiment-name mnist-pipeline")
