"""End to end: ``mlflow run . --env-manager local`` as a user types it, in subprocesses."""

from __future__ import annotations

import mlflow
import pytest

from conftest import mlflow_run, temporary_store

pytestmark = pytest.mark.slow

STEPS = ("download_data", "train", "evaluate", "register")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    with temporary_store(root) as uri:
        yield {"root": root, "uri": uri}


def children_of(run_id: str):
    return mlflow.MlflowClient().search_runs(
        ["0"], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
        order_by=["attributes.start_time ASC"])


def main_runs():
    return mlflow.MlflowClient().search_runs(
        ["0"], filter_string="tags.`pipeline.step` = 'main'",
        order_by=["attributes.start_time DESC"])


def test_full_pipeline_on_digits(store):
    result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    main = main_runs()[0]
    assert main.info.status == "FINISHED"
    children = children_of(main.info.run_id)
    assert [c.data.tags["pipeline.step"] for c in children] == list(STEPS)
    assert all(c.info.status == "FINISHED" for c in children)
    by_step = {c.data.tags["pipeline.step"]: c for c in children}
    # Each step consumed what the previous one produced.
    data_uri = by_step["download_data"].data.tags["pipeline.data_uri"]
    assert by_step["train"].data.params["data"] == data_uri
    model_uri = by_step["train"].data.tags["pipeline.model_uri"]
    assert by_step["evaluate"].data.params["model_uri"] == model_uri
    assert by_step["register"].data.params["model_uri"] == model_uri
    assert by_step["evaluate"].data.metrics["test_accuracy"] > 0.8
    client = mlflow.MlflowClient()
    figures = {f.path for f in client.list_artifacts(by_step["evaluate"].info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix_normalized.png",
            "misclassified.png"} <= figures
    champion = client.get_model_version_by_alias("mnist-classifier", "champion")
    assert champion.tags["model_uri"] == model_uri
    assert main.data.tags["pipeline.registered_version"] == str(champion.version)
    assert main.data.tags["pipeline.reused_steps"] == "none"
    assert "main: done. test_accuracy" in result.stderr
    assert "\r" not in result.stderr  # no progress bars when output is not a terminal


def test_rerun_reuses_every_step(store):
    first = main_runs()[0]
    result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    main = main_runs()[0]
    assert main.info.run_id != first.info.run_id
    assert main.data.tags["pipeline.reused_steps"] == ",".join(STEPS)
    pointers = children_of(main.info.run_id)
    assert [p.data.tags["pipeline.reused_step"] for p in pointers] == list(STEPS)
    for pointer in pointers:
        step = pointer.data.tags["pipeline.reused_step"]
        assert pointer.data.tags["pipeline.reused_run_id"] == first.data.tags[
            f"pipeline.{step}_run_id"]
        assert pointer.info.status == "FINISHED"
    assert len(mlflow.MlflowClient().search_model_versions("name = 'mnist-classifier'")) == 1


def test_a_changed_param_reruns_only_downstream_steps(store):
    result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1", "-P", "seed=7")
    assert result.returncode == 0, result.stderr[-3000:]
    main = main_runs()[0]
    assert main.data.tags["pipeline.reused_steps"] == "download_data"


def test_evaluate_alone_after_a_pipeline_run(store):
    result = mlflow_run("-e", "evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    run = mlflow.MlflowClient().search_runs(
        ["0"], filter_string="tags.`pipeline.step` = 'evaluate'",
        order_by=["attributes.start_time DESC"])[0]
    champion = mlflow.MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    assert run.data.tags["pipeline.model_uri"] == champion.tags["model_uri"]
    assert "confusion_matrix.png" in result.stderr


def test_a_failing_step_fails_main_and_registers_nothing(store):
    client = mlflow.MlflowClient()
    versions_before = len(client.search_model_versions("name = 'mnist-classifier'"))
    champion_before = client.get_model_version_by_alias("mnist-classifier", "champion").version
    # An absurd learning rate makes training diverge: a real failure inside a step.
    result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1", "-P", "learning_rate=1e6",
                        "-P", "optimizer=sgd")
    assert result.returncode != 0
    assert "error: step train failed" in result.stderr
    assert "Traceback" not in result.stderr
    main = main_runs()[0]
    assert main.info.status == "FAILED"
    children = children_of(main.info.run_id)
    steps = [c.data.tags.get("pipeline.step") for c in children]
    assert steps == ["reused", "train"]  # download reused; evaluate/register never started
    assert children[1].info.status == "FAILED"
    assert len(client.search_model_versions("name = 'mnist-classifier'")) == versions_before
    assert client.get_model_version_by_alias("mnist-classifier", "champion").version == \
        champion_before
    assert not [r for r in client.search_runs(["0"]) if r.info.status == "RUNNING"]


def test_a_rerun_after_a_failure_recomputes_the_failed_step(store):
    client = mlflow.MlflowClient()
    failed = client.search_runs(["0"], "tags.`pipeline.step` = 'train' and "
                                "attributes.status = 'FAILED'")
    assert failed
    result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1", "-P", "learning_rate=1e6",
                        "-P", "optimizer=sgd")
    assert result.returncode != 0
    children = children_of(main_runs()[0].info.run_id)
    assert children[0].data.tags["pipeline.reused_step"] == "download_data"
    retried = children[1]
    assert retried.data.tags["pipeline.step"] == "train"  # ran again, not reused
    assert retried.info.run_id not in {r.info.run_id for r in failed}
