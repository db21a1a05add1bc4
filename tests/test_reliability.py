"""Faults with real processes and a real store: orphaned runs of killed processes, two
pipelines on a fresh store, a tracking server lost mid-pipeline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import mlflow
import pytest

from helpers.processes import VENV_BIN, assert_group_gone, copy_project, start, subprocess_env
from helpers.store import TrackingServer, temporary_store, wait_for_training
from steps.download_data import cli as download_data
from steps.tracking import tags
from steps.tracking.cli import run_cli
from steps.tracking.runs import _process_start, close_orphans

PIPELINE = ["-P", "dataset=digits", "-P", "epochs=500", "-P", "batch_size=4"]


def running_run(client, **run_tags: str):
    return client.create_run("0", tags=run_tags)


def test_only_runs_of_gone_processes_on_this_host_are_closed(tracking_uri):
    client = mlflow.MlflowClient()
    host, me = socket.gethostname(), os.getpid()
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = running_run(client, **{tags.HOST: host, tags.PID: str(me),
                                   tags.PID_STARTED: _process_start(me)})
    reused_pid = running_run(client, **{tags.HOST: host, tags.PID: str(me),
                                        tags.PID_STARTED: "1"})  # same pid, older process
    gone = running_run(client, **{tags.HOST: host, tags.PID: str(dead.pid)})
    elsewhere = running_run(client, **{tags.HOST: "another-host", tags.PID: str(dead.pid)})
    untagged = running_run(client)
    closed = close_orphans(client, "0")
    assert sorted(closed) == sorted([gone.info.run_id, reused_pid.info.run_id])
    status = {r.info.run_id: r.info.status for r in client.search_runs(["0"])}
    assert status[alive.info.run_id] == status[elsewhere.info.run_id] == "RUNNING"
    assert status[untagged.info.run_id] == "RUNNING"
    assert status[gone.info.run_id] == "KILLED"
    why = client.get_run(gone.info.run_id).data.tags[tags.ENDED_BECAUSE]
    assert f"process {dead.pid} on {host} was gone" in why


@pytest.mark.slow
def test_a_killed_pipeline_leaves_no_run_running_after_the_next_step(tmp_path):
    with temporary_store(tmp_path):
        proc = start([os.path.join(VENV_BIN, "mlflow"), "run", str(copy_project(
            tmp_path / "project")), "--env-manager", "local", *PIPELINE])
        wait_for_training(proc=proc)
        os.killpg(proc.pid, signal.SIGKILL)  # a crashed machine, an OOM kill
        proc.communicate(timeout=30)
        assert_group_gone(proc.pid)
        client = mlflow.MlflowClient()
        orphans = {r.data.tags.get(tags.STEP): r.info.run_id
                   for r in client.search_runs(["0"], "attributes.status = 'RUNNING'")}
        assert {"main", "train"} <= set(orphans)
        run_cli(download_data, ["--dataset", "digits"])  # any step, when it starts
        for step in ("main", "train"):
            run = client.get_run(orphans[step])
            assert run.info.status == "KILLED", step
            assert "was gone" in run.data.tags[tags.ENDED_BECAUSE]
        assert not client.search_runs(["0"], "attributes.status = 'RUNNING'")


@pytest.mark.slow
def test_two_pipelines_started_at_once_on_a_fresh_store_both_finish(tmp_path):
    project = copy_project(tmp_path / "project")
    (project / ".venv").symlink_to(VENV_BIN.removesuffix("/bin"))
    env = subprocess_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # MLflow's default: sqlite:///mlflow.db, here new
    runs = [subprocess.Popen(["make", "-s", "-C", str(project), "run",
                              f"ARGS=-P dataset=digits -P epochs=1 -P seed={seed}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
            for seed in (1, 2)]
    for proc in runs:
        _, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr[-3000:]
        assert "main: done." in stderr


@pytest.mark.slow
def test_a_server_lost_mid_pipeline_ends_main_within_a_minute(tmp_path, monkeypatch):
    server = TrackingServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        proc = subprocess.Popen([os.path.join(VENV_BIN, "mlflow"), "run", ".",
                                 "--env-manager", "local", *PIPELINE],
                                cwd=copy_project(tmp_path / "project"),
                                env=subprocess_env(MLFLOW_TRACKING_URI=server.url),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        wait_for_training(proc=proc)
        server.stop()
        lost = time.monotonic()
        _, stderr = proc.communicate(timeout=180)
        assert time.monotonic() - lost < 60, stderr[-3000:]
        assert proc.returncode != 0
        assert_group_gone(proc.pid)
    finally:
        server.stop()
        mlflow.set_tracking_uri(previous)
