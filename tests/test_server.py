"""A team's set-up: the pipeline against a real ``mlflow server`` on 127.0.0.1 with proxied
artifacts, first on sqlite, then on PostgreSQL with two pipelines racing for the alias.
Also: a relative sqlite URI keeps every child run in the same store as ``main``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from helpers.processes import PROJECT_DIR, VENV_BIN, copy_project, mlflow_run, subprocess_env
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


def pipeline_children(client, main_run_id: str) -> list:
    return client.search_runs(["0"], f"tags.`mlflow.parentRunId` = '{main_run_id}'")


def test_pipeline_against_a_sqlite_server_with_proxied_artifacts(tmp_path, use_server):
    server = TrackingServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    try:
        client = use_server(server)
        result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1")
        assert result.returncode == 0, result.stderr[-3000:]
        main = client.search_runs(["0"], "tags.`pipeline.step` = 'main'")[0]
        children = pipeline_children(client, main.info.run_id)
        assert {c.data.tags["pipeline.step"] for c in children} == {
            "download_data", "train", "evaluate", "register"}
        assert all(c.info.artifact_uri.startswith("mlflow-artifacts:") for c in children)
        assert client.get_model_version_by_alias("mnist-classifier", "champion")
        # Nothing went to a local store: every byte went through the server.
        work = tmp_path / "work"
        assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()
        assert list((tmp_path / "artifacts").rglob("dataset.npz"))
        assert f"{server.url}/#/experiments/0/runs/" in result.stderr
    finally:
        server.stop()


def test_two_pipelines_at_once_on_postgres_leave_the_alias_on_the_better(
        tmp_path, postgres, use_server):
    server = TrackingServer(postgres, tmp_path)
    try:
        client = use_server(server)
        env = subprocess_env()
        cmd = [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "--env-manager",
               "local", "-P", "dataset=digits", "-P", "epochs=1"]
        # Same data, very different learning rates: one model is clearly better.
        runs = [subprocess.Popen([*cmd, "-P", f"learning_rate={lr}"], env=env,
                                 cwd=tmp_path / "work", stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
                for lr in ("0.001", "0.00001")]
        for proc in runs:
            _, stderr = proc.communicate(timeout=400)
            assert proc.returncode == 0, stderr[-3000:]
        versions = client.search_model_versions("name = 'mnist-classifier'")
        assert sorted(int(v.version) for v in versions) == [1, 2]
        assert versions[0].tags["model_uri"] != versions[1].tags["model_uri"]
        best = max(versions, key=lambda v: float(v.tags["test_accuracy"]))
        champion = client.get_model_version_by_alias("mnist-classifier", "champion")
        assert champion.version == best.version
        assert len(client.search_runs(["0"], "tags.`pipeline.step` = 'main'")) == 2
    finally:
        server.stop()


@pytest.fixture
def project_copy(tmp_path) -> Path:
    return copy_project(tmp_path / "project")


def test_a_relative_sqlite_uri_keeps_every_run_in_one_store(tmp_path, project_copy,
                                                            monkeypatch):
    """``MLFLOW_TRACKING_URI=sqlite:///mlflow.db`` from the project folder, as a user types it
    (in a copy of the project, so the repository stays clean)."""
    copy = project_copy
    monkeypatch.chdir(copy)
    env = subprocess_env(MLFLOW_TRACKING_URI="sqlite:///mlflow.db")
    result = subprocess.run(
        [os.path.join(VENV_BIN, "mlflow"), "run", ".", "--env-manager", "local",
         "-P", "dataset=digits", "-P", "epochs=1"],
        env=env, cwd=copy, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    stores = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("mlflow.db"))
    assert stores == [Path("project/mlflow.db")]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        main = client.search_runs(["0"], "tags.`pipeline.step` = 'main'")[0]
        assert len(pipeline_children(client, main.info.run_id)) == 4
    finally:
        mlflow.set_tracking_uri(previous)


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
