"""The tune entry point: nested trials, best params on the parent, a registrable best model;
a study shared by two workers on sqlite and on PostgreSQL, one of them killed mid-trial."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import sqlalchemy

from helpers.data import write_idx_folder
from helpers.processes import (
    PROJECT_DIR,
    VENV_BIN,
    assert_clean_failure,
    mlflow_run,
    run_step,
    start,
    subprocess_env,
)
from helpers.store import temporary_store
from helpers.waiting import wait_until
from steps.tracking.runtime import tags
from steps.tracking.runtime.runs import PROCESS_GONE, WORKER_LOST, ended, records

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
        assert {"learning_rate", "batch_size", "optimizer", "arch", "hidden", "lr_schedule",
                "augment"} <= set(trial.data.params)
        assert trial.data.params["data"] == parent.data.tags["pipeline.data_uri"]
        assert trial.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")
        assert "val_accuracy" in trial.data.metrics


def test_parent_has_best_params_value_and_figures(sweep):
    client, parent = sweep["client"], sweep["parent"]
    assert parent.info.status == "FINISHED"
    metrics, params = parent.data.metrics, parent.data.params
    assert 0 < metrics["best_val_accuracy"] <= 1
    assert metrics["completed_trials"] + metrics["pruned_trials"] == 3
    for name in ("learning_rate", "batch_size", "optimizer", "arch", "hidden", "lr_schedule",
                 "augment"):
        assert f"best_{name}" in params
    best_trial = client.get_run(parent.data.tags["pipeline.best_trial_run_id"])
    assert best_trial.data.metrics["best_val_accuracy"] == metrics["best_val_accuracy"]
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert "optimization_history.png" in artifacts
    assert "retrain it through the pipeline" in sweep["stderr"]
    assert "-P model_name=mnist-classifier" in sweep["stderr"]  # where register will put it
    # No Python warning on the user's console (Optuna's ExperimentalWarning for the
    # heartbeat callback included).
    assert not re.findall(r"\w+Warning\b", sweep["stderr"]), sweep["stderr"][-3000:]


def test_the_best_model_can_be_evaluated_and_registered(sweep):
    model_uri = sweep["parent"].data.tags["pipeline.model_uri"]
    assert mlflow_run("-e", "evaluate", "-P", f"model_uri={model_uri}").returncode == 0
    assert mlflow_run("-e", "register", "-P", f"model_uri={model_uri}").returncode == 0
    champion = sweep["client"].get_model_version_by_alias("mnist-classifier", "champion")
    assert champion.tags["model_uri"] == model_uri


SURVIVOR_TRIALS = 8


def sweep_losing_a_worker(storage: str, study_name: str, root: Path,
                          pause: bool = False) -> dict:
    """Two ``tune`` workers on one study over 6000 images, heartbeats every 2 s. The slow
    one (3 epochs a trial) starts first and is SIGKILLed during its first trial, after that
    trial's first epoch (with ``pause``: stopped, SIGSTOP, as a closed laptop lid does, and
    continued once the other has given its trial up); then the other starts and runs its
    trials to the end. What each left behind."""
    import optuna

    folder = write_idx_folder(root / "idx", n_train=6000, n_test=100)
    common = ["--data-dir", str(folder), "--storage", storage, "--study-name", study_name,
              "--heartbeat-interval", "2"]
    doomed = start([sys.executable, "-m", "steps.tune", *common, "--trials", "3",
                    "--epochs", "3"])
    client = mlflow.MlflowClient()

    def doomed_mid_trial():
        return next((tune for tune in client.search_runs(["0"], "tags.`pipeline.step` = 'tune'")
                     if tune.data.tags.get(tags.PID) == str(doomed.pid) and any(
                         "val_accuracy" in t.data.metrics for t in client.search_runs(
                             ["0"], f"tags.`mlflow.parentRunId` = '{tune.info.run_id}' and "
                                    "attributes.status = 'RUNNING'"))), None)

    def trials():
        """The study's trials, or None while a worker holds sqlite's write lock."""
        try:
            return optuna.load_study(study_name=study_name, storage=storage).trials
        except sqlalchemy.exc.OperationalError:  # "database is locked": look again
            return None

    def reported(tune):
        # Stopped right after MLflow's metrics, the worker would be inside trial.report's
        # commit, and a stopped sqlite writer locks the study for everyone until SIGCONT.
        # Once the report is in, the worker is training its next epoch, not writing.
        return tune if any(t.state.name == "RUNNING" and t.intermediate_values
                           for t in trials() or ()) else None

    doomed_tune = wait_until(
        lambda: (tune := doomed_mid_trial()) and reported(tune), 180,
        "the slow worker to get through a trial's first epoch",
        poll=0.05, give_up=lambda: doomed.poll() is not None and "it ended first")
    os.killpg(doomed.pid, signal.SIGSTOP if pause else signal.SIGKILL)
    # Started after the loss: every one of its trials begins by looking for stale ones.
    survivor = start([sys.executable, "-m", "steps.tune", *common,
                      "--trials", str(SURVIVOR_TRIALS), "--epochs", "2"])
    paused = {}
    if pause:
        def given_up() -> bool:
            lost = [t for t in trials() or () if t.state.name == "FAIL"]
            return bool(lost) and client.get_run(
                lost[0].user_attrs["mlflow_run_id"]).info.status == "KILLED"

        try:
            wait_until(given_up, 180, "the survivor to give the paused worker's trial up",
                       poll=0.5, give_up=lambda: survivor.poll() is not None and "it ended")
        finally:
            os.killpg(doomed.pid, signal.SIGCONT)
        _, paused["stderr"] = doomed.communicate(timeout=600)
        paused["returncode"] = doomed.returncode
    else:
        doomed.communicate(timeout=60)
    _, stderr = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, stderr[-3000:]
    return {"doomed": doomed_tune.info.run_id, "stderr": stderr, "paused": paused}


def assert_the_survivor_finished_the_study(storage: str, study_name: str, swept: dict):
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and "WAITING" not in states
    lost = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(lost) == 1  # the killed worker's trial, failed by the survivor
    client = mlflow.MlflowClient()
    assert not [r for r in client.search_runs(["0"], max_results=1000)
                if r.info.status == "RUNNING"]
    tunes = {r.info.run_id: r for r in client.search_runs(["0"], "tags.`pipeline.step` = 'tune'")}
    doomed = tunes.pop(swept["doomed"])
    (survivor,) = tunes.values()
    assert survivor.info.status == "FINISHED" and doomed.info.status == "KILLED"
    # Closed by whichever came first: the survivor's start, which closes the runs of
    # processes gone from this host, or the trial that found the worker's beats stopped.
    assert ended(doomed).cause in (PROCESS_GONE, WORKER_LOST)
    trial_runs = {tune: client.search_runs(
        ["0"], f"tags.`mlflow.parentRunId` = '{tune}' and tags.`pipeline.step` = 'tune_trial'")
        for tune in (survivor.info.run_id, doomed.info.run_id)}
    kept = trial_runs[survivor.info.run_id]
    # The survivor ran the trials it was asked for, one of them the lost trial's retry.
    assert len(kept) == SURVIVOR_TRIALS and {r.info.status for r in kept} == {"FINISHED"}
    lost_run = lost[0].user_attrs["mlflow_run_id"]
    (retry,) = [r for r in kept if r.data.tags.get(tags.RETRY_OF_RUN) == lost_run]
    retried = next(t for t in study.trials if t.number == int(retry.data.tags["optuna.trial"]))
    assert retried.params == lost[0].params and retried.state.name in ("COMPLETE", "PRUNED")
    assert f"trial {lost[0].number} lost its worker" in swept["stderr"]
    # The killed worker's runs: its finished trials, and the lost one closed KILLED.
    gone = trial_runs[doomed.info.run_id]
    assert [r.info.run_id for r in gone if r.info.status == "KILLED"] == [lost_run]
    assert {r.info.status for r in gone} <= {"FINISHED", "KILLED"}
    # Both counts add up: every Optuna trial is one MLflow trial run, in the same state.
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == len(kept) + len(gone) - 1
    assert len(study.trials) == len(kept) + len(gone)
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    assert survivor.data.tags["pipeline.study_name"] == study_name
    assert survivor.data.metrics["study_best_val_accuracy"] == study.best_value


def test_a_worker_killed_mid_trial_loses_no_trial_of_a_sqlite_study(tmp_path):
    with temporary_store(tmp_path):
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        swept = sweep_losing_a_worker(storage, "shared-sqlite", tmp_path)
        assert_the_survivor_finished_the_study(storage, "shared-sqlite", swept)


def test_a_worker_killed_mid_trial_loses_no_trial_of_a_postgresql_study(tmp_path, postgres):
    with temporary_store(tmp_path):
        swept = sweep_losing_a_worker(postgres, "shared-pg", tmp_path)
        assert_the_survivor_finished_the_study(postgres, "shared-pg", swept)


def test_a_bad_storage_is_one_line(tracking_uri):
    result = run_step("tune", "--dataset", "digits", "--storage", "nosuchdb://x/y")
    assert_clean_failure(result, "storage=", "cannot be opened")
    result = run_step("tune", "--dataset", "digits", "--study-name", "s")
    assert_clean_failure(result, "study_name is only used with storage")


def assert_the_paused_worker_carried_on(storage: str, study_name: str, swept: dict):
    """Stopped during its first trial past the 6 s grace, the slow worker woke to find that trial FAILED by the survivor and its runs closed KILLED: it left them
    so, took its tune run back and ran its other two trials, without a traceback."""
    import optuna

    paused = swept["paused"]
    assert paused["returncode"] == 0, paused["stderr"][-3000:]
    assert "Traceback" not in paused["stderr"]
    assert not re.findall(r"\w+Warning\b", paused["stderr"]), paused["stderr"][-3000:]
    study = optuna.load_study(study_name=study_name, storage=storage)
    (lost,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert f"trial {lost.number} was given up by another worker" in paused["stderr"]
    assert f"trial {lost.number} lost its worker" in swept["stderr"]
    # Every trial either worker was asked for was run: 8 + 3, the lost one among them.
    assert len(study.trials) == SURVIVOR_TRIALS + 3
    assert "RUNNING" not in {t.state.name for t in study.trials}
    client = mlflow.MlflowClient()
    tune = client.get_run(swept["doomed"])
    assert tune.info.status == "FINISHED" and ended(tune).status == "FINISHED"
    assert [r["after"] for r in records(tune.data.tags, tags.RESUMES)] == ["KILLED"]
    trials = client.search_runs(
        ["0"], f"tags.`mlflow.parentRunId` = '{tune.info.run_id}' and "
               "tags.`pipeline.step` = 'tune_trial'", order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in trials] == ["KILLED", "FINISHED", "FINISHED"]
    assert trials[0].info.run_id == lost.user_attrs["mlflow_run_id"]
    assert "marked KILLED by a surviving worker" in trials[0].data.tags[tags.ENDED_BECAUSE]


def test_a_paused_worker_of_a_sqlite_study_carries_on(tmp_path):
    with temporary_store(tmp_path):
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        swept = sweep_losing_a_worker(storage, "paused", tmp_path, pause=True)
        assert_the_paused_worker_carried_on(storage, "paused", swept)


def test_a_paused_worker_of_a_postgresql_study_carries_on(tmp_path, postgres):
    with temporary_store(tmp_path):
        swept = sweep_losing_a_worker(postgres, "paused-pg", tmp_path, pause=True)
        assert_the_paused_worker_carried_on(postgres, "paused-pg", swept)


@pytest.mark.parametrize("way", ["make tune", "mlflow db upgrade, then mlflow run"])
def test_workers_started_together_on_a_new_store_all_finish(tmp_path, way):
    """The documented ways of starting two workers at once, from a new, empty sqlite
    file (docs/sweeps.md)."""
    store = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    params = ["-P", "dataset=digits", "-P", "trials=1", "-P", "epochs=1",
              "-P", f"storage=sqlite:///{tmp_path / 'optuna.db'}", "-P", "study_name=s"]
    env = subprocess_env(MLFLOW_TRACKING_URI=store)
    if way == "make tune":
        command = ["make", "-s", "-C", str(PROJECT_DIR), "tune", "ARGS=" + " ".join(params)]
    else:
        (tmp_path / "new").mkdir()
        created = subprocess.run([os.path.join(VENV_BIN, "mlflow"), "db", "upgrade", store],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stderr[-3000:]
        command = [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "-e", "tune",
                   "--env-manager", "local", *params]
    workers = []
    for _ in range(2):
        workers.append(subprocess.Popen(command, env=env, cwd=tmp_path, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        time.sleep(2)  # "started 2 s apart", as the failure was seen
    said = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, said, strict=True):
        assert worker.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=store)
    tunes = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               "tags.`pipeline.step` = 'tune'")
    assert [t.info.status for t in tunes] == ["FINISHED", "FINISHED"]
