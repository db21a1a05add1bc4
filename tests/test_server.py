"""A team's set-up under load: four pipelines started at once against a real ``mlflow
server`` on 127.0.0.1 with proxied artifacts, on sqlite and on PostgreSQL, all finishing
with the alias on the best version. Also: a relative sqlite URI keeps every child run in the
same store as ``main`` (from the project folder: tests/test_reliability.py), and fails in
one line from another folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from helpers.data import write_idx_folder
from helpers.processes import PROJECT_DIR, VENV_BIN, copy_project, subprocess_env
from helpers.store import TrackingServer

pytestmark = pytest.mark.slow


@pytest.fixture
def use_server(tmp_path, monkeypatch):
    """Point this process and its subprocesses at ``server`` (working dir: tmp_path)."""
    def point(server: TrackingServer) -> mlflow.MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.chdir(tmp_path / "work")
        mlflow.set_tracking_uri(server.url)
        return mlflow.MlflowClient()

    (tmp_path / "work").mkdir()
    previous = mlflow.get_tracking_uri()
    yield point
    mlflow.set_tracking_uri(previous)


def pipeline_children(client, main) -> list:
    """The runs a ``main`` run launched or reused, in its own experiment."""
    return client.search_runs([main.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{main.info.run_id}'")


PIPELINES_AT_ONCE = 4


def pipelines_at_once(server: TrackingServer, cwd: Path, *params: str) -> list[tuple]:
    """``PIPELINES_AT_ONCE`` pipelines started together against ``server``, in the named
    experiment (which none of them finds there: their launchers would race to create it),
    each with its own seed, all on one dataset (``data_dir``: a folder of IDX files);
    (exit code, stderr) of each."""
    env = subprocess_env(MLFLOW_EXPERIMENT_NAME="mnist-pipeline")
    data = write_idx_folder(cwd / "idx", n_train=1000, n_test=200)
    cmd = [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "--env-manager",
           "local", "-P", f"data_dir={data}", "-P", "epochs=1", *params]
    runs = [subprocess.Popen([*cmd, "-P", f"seed={seed}"], env=env, cwd=cwd,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for seed in range(1, PIPELINES_AT_ONCE + 1)]
    return [(proc.wait(timeout=900), proc.stderr.read()) for proc in runs]


def assert_all_finished_on_the_best(client, results: list[tuple]) -> list:
    """Every pipeline finished, said so, and left only FINISHED runs; the alias is on the
    best version; the main runs, in start order."""
    for code, stderr in results:
        assert code == 0 and "main: done." in stderr, stderr[-3000:]
        assert "Traceback" not in stderr and "already exists" not in stderr, stderr[-3000:]
    experiment = client.get_experiment_by_name("mnist-pipeline")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert {r.info.status for r in runs} == {"FINISHED"}
    mains = [r for r in runs if r.data.tags.get("pipeline.step") == "main"]
    assert len(mains) == PIPELINES_AT_ONCE
    versions = client.search_model_versions("name = 'mnist-classifier'")
    assert len(versions) == PIPELINES_AT_ONCE  # one per pipeline, none twice
    passed = [v for v in versions if v.tags["validation_status"] == "passed"]
    best = max(passed, key=lambda v: (float(v.tags["test_accuracy"]), -int(v.version)))
    assert client.get_model_version_by_alias("mnist-classifier", "champion").version == \
        best.version
    return mains


def test_pipelines_at_once_against_a_sqlite_server_with_proxied_artifacts(tmp_path,
                                                                          use_server):
    server = TrackingServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    try:
        client = use_server(server)
        results = pipelines_at_once(server, tmp_path / "work")
        mains = assert_all_finished_on_the_best(client, results)
        children = pipeline_children(client, mains[0])
        # Each of the four steps once: run, or reused through a pointer run.
        assert sorted(c.data.tags.get("pipeline.reused_step", c.data.tags["pipeline.step"])
                      for c in children) == ["download_data", "evaluate", "register", "train"]
        assert all(c.info.artifact_uri.startswith("mlflow-artifacts:") for c in children)
        # Nothing went to a local store: every byte went through the server.
        work = tmp_path / "work"
        assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()
        assert list((tmp_path / "artifacts").rglob("dataset.npz"))
        assert all(f"{server.url}/#/experiments/" in stderr for _, stderr in results)
    finally:
        server.stop()


def test_pipelines_at_once_on_postgres_leave_the_alias_on_the_best(
        tmp_path, postgres, use_server):
    server = TrackingServer(postgres, tmp_path)
    try:
        client = use_server(server)
        results = pipelines_at_once(server, tmp_path / "work", "-P", "learning_rate=0.0003")
        assert_all_finished_on_the_best(client, results)
    finally:
        server.stop()


@pytest.fixture
def project_copy(tmp_path) -> Path:
    return copy_project(tmp_path / "project")


def test_a_relative_sqlite_uri_from_another_folder_fails_clearly(tmp_path, project_copy):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [os.path.join(VENV_BIN, "mlflow"), "run", str(project_copy), "--env-manager", "local",
         "-P", "dataset=digits"],
        env=subprocess_env(MLFLOW_TRACKING_URI="sqlite:///mlflow.db"), cwd=elsewhere,
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: MLFLOW_TRACKING_URI=sqlite:///mlflow.db is relative" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project_copy / "mlflow.db").exists()  # no stray empty store
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{elsewhere / 'mlflow.db'}")
    try:
        runs = mlflow.MlflowClient().search_runs(["0"])
        assert [r.info.status for r in runs] == ["FAILED"]  # the main run, closed
    finally:
        mlflow.set_tracking_uri(previous)
