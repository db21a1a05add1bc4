"""The tune entry point: nested trials, best params on the parent, a registrable best model."""

from __future__ import annotations

import mlflow
import pytest

from conftest import mlflow_run, temporary_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    with temporary_store(root):
        result = mlflow_run("-e", "tune", "-P", "dataset=digits", "-P", "trials=3",
                            "-P", "epochs=1")
        assert result.returncode == 0, result.stderr[-3000:]
        client = mlflow.MlflowClient()
        parent = client.search_runs(["0"], "tags.`pipeline.step` = 'tune'")[0]
        yield {"parent": parent, "client": client, "stderr": result.stderr}


def test_trials_are_nested_runs_with_params_and_metrics(sweep):
    client, parent = sweep["client"], sweep["parent"]
    children = client.search_runs(
        ["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = [c for c in children if c.data.tags.get("pipeline.step") == "tune_trial"]
    assert len(trials) == 3
    assert [c.data.tags["pipeline.step"] for c in children].count("download_data") == 1
    for trial in trials:
        assert trial.info.status == "FINISHED"  # pruned trials too: pruning is not failing
        assert {"learning_rate", "batch_size", "optimizer", "arch", "hidden"} <= set(
            trial.data.params)
        assert trial.data.params["data"] == parent.data.tags["pipeline.data_uri"]
        assert trial.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")
        assert "val_accuracy" in trial.data.metrics


def test_parent_has_best_params_value_and_figures(sweep):
    client, parent = sweep["client"], sweep["parent"]
    assert parent.info.status == "FINISHED"
    metrics, params = parent.data.metrics, parent.data.params
    assert 0 < metrics["best_val_accuracy"] <= 1
    assert metrics["completed_trials"] + metrics["pruned_trials"] <= 3
    for name in ("learning_rate", "batch_size", "optimizer", "arch", "hidden"):
        assert f"best_{name}" in params
    best_trial = client.get_run(parent.data.tags["pipeline.best_trial_run_id"])
    assert best_trial.data.metrics["best_val_accuracy"] == metrics["best_val_accuracy"]
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert "optimization_history.png" in artifacts
    assert "retrain it through the pipeline" in sweep["stderr"]


def test_the_best_model_can_be_evaluated_and_registered(sweep):
    model_uri = sweep["parent"].data.tags["pipeline.model_uri"]
    assert mlflow_run("-e", "evaluate", "-P", f"model_uri={model_uri}").returncode == 0
    assert mlflow_run("-e", "register", "-P", f"model_uri={model_uri}").returncode == 0
    champion = sweep["client"].get_model_version_by_alias("mnist-classifier", "champion")
    assert champion.tags["model_uri"] == model_uri
