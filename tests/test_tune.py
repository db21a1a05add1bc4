"""The tune entry point: nested trials, best params on the parent, a registrable best model."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from helpers.processes import assert_clean_failure, mlflow_run, run_step, subprocess_env
from helpers.store import temporary_store

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
    assert "-P model_name=mnist-classifier" in sweep["stderr"]  # where register will put it


def test_the_best_model_can_be_evaluated_and_registered(sweep):
    model_uri = sweep["parent"].data.tags["pipeline.model_uri"]
    assert mlflow_run("-e", "evaluate", "-P", f"model_uri={model_uri}").returncode == 0
    assert mlflow_run("-e", "register", "-P", f"model_uri={model_uri}").returncode == 0
    champion = sweep["client"].get_model_version_by_alias("mnist-classifier", "champion")
    assert champion.tags["model_uri"] == model_uri


def sweep_with_two_workers(storage: str, study_name: str, cwd) -> list[str]:
    """Two ``tune`` processes started together on one study; their stderr."""
    cmd = [sys.executable, "-m", "steps.tune", "--dataset", "digits", "--trials", "3",
           "--epochs", "1", "--storage", storage, "--study-name", study_name]
    workers = [subprocess.Popen(cmd, env=subprocess_env(), cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    for proc in workers:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        outputs.append(stderr)
    return outputs


def assert_one_shared_study(storage: str, study_name: str, outputs: list[str]) -> None:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    assert sorted(t.number for t in study.trials) == list(range(6))  # 3 + 3, all distinct
    client = mlflow.MlflowClient()
    tunes = client.search_runs(["0"], "tags.`pipeline.step` = 'tune'")
    assert len(tunes) == 2 and {r.info.status for r in tunes} == {"FINISHED"}
    assert not [r for r in client.search_runs(["0"], max_results=1000)
                if r.info.status == "RUNNING"]
    trial_runs = set()
    for tune in tunes:
        assert tune.data.tags["pipeline.study_name"] == study_name
        children = client.search_runs(
            ["0"], f"tags.`mlflow.parentRunId` = '{tune.info.run_id}' and "
                   "tags.`pipeline.step` = 'tune_trial'")
        assert len(children) == 3
        trial_runs |= {c.info.run_id for c in children}
        # Each worker reports the study's best as it was at its end, over both workers.
        own_best = max(c.data.metrics.get("best_val_accuracy", 0) for c in children)
        assert own_best <= tune.data.metrics["study_best_val_accuracy"] <= study.best_value
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == trial_runs
    last = max(tunes, key=lambda r: r.info.end_time)
    assert last.data.metrics["study_best_val_accuracy"] == study.best_value
    assert last.data.tags["pipeline.study_best_run_id"] == study.best_trial.user_attrs[
        "mlflow_run_id"]
    assert all(f"study {study_name} (shared): " in out for out in outputs)


def test_two_workers_share_one_study_in_a_sqlite_file(tmp_path):
    with temporary_store(tmp_path):
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        outputs = sweep_with_two_workers(storage, "shared-sqlite", tmp_path)
        assert_one_shared_study(storage, "shared-sqlite", outputs)


def test_two_workers_share_one_study_on_postgresql(tmp_path, postgres):
    with temporary_store(tmp_path):
        outputs = sweep_with_two_workers(postgres, "shared-pg", tmp_path)
        assert_one_shared_study(postgres, "shared-pg", outputs)


def test_a_bad_storage_is_one_line(tracking_uri):
    result = run_step("tune", "--dataset", "digits", "--storage", "nosuchdb://x/y")
    assert_clean_failure(result, "storage=", "cannot be opened")
    result = run_step("tune", "--dataset", "digits", "--study-name", "s")
    assert_clean_failure(result, "study_name is only used with storage")
