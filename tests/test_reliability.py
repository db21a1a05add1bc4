"""Faults with real processes and a real store: orphaned runs of killed processes, two
pipelines on a fresh store, a damaged sqlite store, a full disk, a tracking server
restarted or lost mid-pipeline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from helpers.processes import (
    PROJECT_DIR,
    VENV_BIN,
    assert_clean_failure,
    assert_group_gone,
    copy_project,
    run_step,
    start,
    subprocess_env,
)
from helpers.store import TrackingServer, temporary_store, wait_for_training
from steps.download_data import cli as download_data
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import run_cli
from steps.tracking.runtime.runs import close_orphans, process_tags

PIPELINE = ["-P", "dataset=digits", "-P", "epochs=500", "-P", "batch_size=4"]


def running_run(client, **run_tags: str):
    return client.create_run("0", tags=run_tags)


def test_only_runs_of_gone_processes_on_this_host_are_closed(tracking_uri):
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = running_run(client, **process_tags())
    reused_pid = running_run(client, **{tags.HOST: host, tags.PID: str(os.getpid()),
                                        tags.PID_STARTED: "1.00"})  # same pid, older process
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
def test_two_pipelines_started_at_once_on_a_fresh_relative_store_both_finish_in_it(tmp_path):
    """Two ``make run`` at once from the project folder with no store yet, at the relative
    URI a user types (``sqlite:///mlflow.db``): both finish, and every run of both lands in
    that one file, none in a store of its own beside a child step."""
    project = copy_project(tmp_path / "project")
    (project / ".venv").symlink_to(VENV_BIN.removesuffix("/bin"))
    env = subprocess_env(MLFLOW_TRACKING_URI="sqlite:///mlflow.db")
    runs = [subprocess.Popen(["make", "-s", "-C", str(project), "run",
                              f"ARGS=-P dataset=digits -P epochs=1 -P seed={seed}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
            for seed in (1, 2)]
    for proc in runs:
        _, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr[-3000:]
        assert "main: done." in stderr
    stores = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("mlflow.db"))
    assert stores == [Path("project/mlflow.db")]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("mnist-pipeline").experiment_id
        mains = client.search_runs([experiment], "tags.`pipeline.step` = 'main'")
        assert len(mains) == 2
        for main in mains:
            children = client.search_runs(
                [experiment], f"tags.`mlflow.parentRunId` = '{main.info.run_id}'")
            assert len(children) == 4
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_store_is_one_line_naming_it_before_any_step(tmp_path, damage):
    """``make run`` on a store cut to half its size, or overwritten with random bytes: one
    line naming the store and what to do, before MLflow's launcher or any step opens it."""
    store = tmp_path / "mlflow.db"
    with temporary_store(tmp_path):
        run_cli(download_data, ["--dataset", "digits"])  # a store with a run in it
    whole = store.read_bytes()
    store.write_bytes(whole[:len(whole) // 2] if damage == "truncated" else os.urandom(len(whole)))
    damaged = store.read_bytes()
    uri = f"sqlite:///{store}"
    project = copy_project(tmp_path / "project")
    (project / ".venv").symlink_to(VENV_BIN.removesuffix("/bin"))
    result = subprocess.run(["make", "-s", "-C", str(project), "run", "ARGS=-P dataset=digits"],
                            env=subprocess_env(MLFLOW_TRACKING_URI=uri), capture_output=True,
                            text=True, timeout=120)
    line = assert_clean_failure(result, uri, "is damaged", "backup", f"mv {store} ")
    assert "mlflow.projects" not in result.stderr  # the launcher never started
    # A step started without make says the same, and nothing touched the file.
    assert assert_clean_failure(run_step("main", "--dataset", "digits",
                                         MLFLOW_TRACKING_URI=uri), uri) == line
    assert store.read_bytes() == damaged


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs at tmp_path/disk (root mounts one); ``grow()`` frees space by resizing
    it. Skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)

    try:
        yield disk, grow
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_it_and_the_next_run_after_freeing_space_works(
        small_disk):
    """Store and artifacts on a 4 MB disk: the pipeline stops on the first write that does
    not fit, saying where, with no traceback and no half-registered version; once there is
    room, the same command finishes and no run is left RUNNING."""
    disk, grow = small_disk
    uri = f"sqlite:///{disk / 'mlflow.db'}"
    # The mlp: its 3.6 MiB checkpoint is the write that does not fit, inside a step. Where
    # the store's own file is what fills the disk, MLflow's launcher (`mlflow run`, not
    # this project's code) prints its traceback when it marks the main run FAILED.
    command = [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "--env-manager",
               "local", "-P", "dataset=digits", "-P", "epochs=1", "-P", "arch=mlp"]
    full = subprocess.run(command, cwd=disk, env=subprocess_env(MLFLOW_TRACKING_URI=uri),
                          capture_output=True, text=True, timeout=400)
    assert full.returncode != 0
    said = full.stdout + full.stderr
    assert f"error: no space left on device: {disk}" in said, said[-3000:]
    assert "Traceback" not in said, said[-5000:]
    grow()
    again = subprocess.run(command, cwd=disk, env=subprocess_env(MLFLOW_TRACKING_URI=uri),
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient()
        statuses = [r.info.status for r in client.search_runs(["0"], max_results=1000)]
        assert "RUNNING" not in statuses
        versions = client.search_model_versions("name = 'mnist-classifier'")
        assert len(versions) == 1 and versions[0].tags["validation_status"] == "passed"
        assert len(versions[0].tags["model_digest"]) == 64
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def on_server(tmp_path, monkeypatch):
    """A real ``mlflow server`` (sqlite backend) that this process and its subprocesses use;
    the factory starts it, again on the same port after a stop."""
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    servers: list[TrackingServer] = []
    previous = mlflow.get_tracking_uri()

    def start_server() -> TrackingServer:
        servers.append(TrackingServer(backend, tmp_path,
                                      port=servers[-1].port if servers else None))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", servers[-1].url)
        mlflow.set_tracking_uri(servers[-1].url)
        return servers[-1]

    monkeypatch.chdir(tmp_path)
    yield start_server
    for server in servers:
        server.stop()
    mlflow.set_tracking_uri(previous)


def pipeline_on(server: TrackingServer, tmp_path, *params: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([os.path.join(VENV_BIN, "mlflow"), "run", ".", "--env-manager",
                             "local", *params], cwd=copy_project(tmp_path / "project"),
                            env=subprocess_env(MLFLOW_TRACKING_URI=server.url, **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_a_server_restarted_mid_training_is_ridden_out(tmp_path, on_server):
    """The server stopped during train and started again (same store, same port), down for
    as long as its start takes: every request in flight waits it out (the steps' retry
    budget) and the pipeline finishes as if nothing happened."""
    server = on_server()
    proc = pipeline_on(server, tmp_path, "-P", "dataset=digits", "-P", "epochs=3",
                       "-P", "batch_size=4")
    wait_for_training(proc=proc)
    server.stop()
    down = time.monotonic()
    on_server()  # about 10 s to start here, 20 s on a busy machine
    outage = time.monotonic() - down
    # The budget's last retry comes about 60 s after the first failure.
    assert outage < 55, f"the server took {outage:.0f}s to come back: past the budget"
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    assert "main: done." in stderr
    client = mlflow.MlflowClient()
    runs = client.search_runs(["0"])
    assert {r.data.tags.get(tags.STEP) for r in runs} == {
        "main", "download_data", "train", "evaluate", "register"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    train = next(r for r in runs if r.data.tags.get(tags.STEP) == "train")
    assert sorted(m.step for m in client.get_metric_history(train.info.run_id,
                                                            "val_accuracy")) == [1, 2, 3]


@pytest.mark.slow
def test_a_server_lost_mid_pipeline_ends_main_within_its_retry_budget(tmp_path, on_server):
    """Gone for good: main ends non-zero with no process left. With the default budget each
    request gives up after about a minute; a user's own (here two retries) wins."""
    server = on_server()
    proc = pipeline_on(server, tmp_path, *PIPELINE, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2")
    wait_for_training(proc=proc)
    server.stop()
    lost = time.monotonic()
    _, stderr = proc.communicate(timeout=180)
    assert time.monotonic() - lost < 60, stderr[-3000:]
    assert proc.returncode != 0
    assert_group_gone(proc.pid)


def test_an_experiment_another_launcher_created_meanwhile_is_taken_as_created(tracking_uri,
                                                                              monkeypatch):
    """``mlflow run`` checks for the experiment, then creates it: a launcher started at the
    same moment can create it in between (a window of milliseconds; seen with eight
    pipelines). The preflight's creation takes the other's as success."""
    from steps.tracking.runtime.store import ensure_experiment

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mnist-pipeline")
    mlflow.MlflowClient().create_experiment("mnist-pipeline")  # the other launcher's
    real, calls = mlflow.MlflowClient.get_experiment_by_name, []

    def not_yet_on_the_first_look(self, name):
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name",
                        not_yet_on_the_first_look)
    ensure_experiment(tracking_uri)
    assert len(calls) == 2  # looked, lost the race to create it, looked again
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    calls.clear()
    ensure_experiment(tracking_uri)  # no name: nothing to do, nothing looked up
    assert calls == []
    assert {e.name for e in mlflow.MlflowClient().search_experiments()} == {
        "mnist-pipeline", "Default"}


def test_a_folder_store_is_refused_in_one_line_by_make_run(tmp_path):
    """MLflow 3.17 refuses a file: store (maintenance mode); make run says so before any
    step, in one line naming MLflow's opt-out."""
    result = subprocess.run(["make", "-s", "-C", str(PROJECT_DIR), "run"],
                            env=subprocess_env(MLFLOW_TRACKING_URI=f"file://{tmp_path}/mlruns"),
                            capture_output=True, text=True, timeout=120)
    assert_clean_failure(result, "maintenance mode", "MLFLOW_ALLOW_FILE_STORE=true")
    assert not (tmp_path / "mlruns").exists()


def test_a_store_whose_writer_was_killed_mid_transaction_is_not_called_damaged(tmp_path):
    """SIGKILL inside a write leaves a hot journal beside the file: whole, and the next
    connection rolls it back. The store check must not take it for damage."""
    import sqlite3
    import sys

    from steps.tracking.runtime.store import check_sqlite_store

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as setup:
        setup.execute("CREATE TABLE experiments (name TEXT)")
        setup.execute("INSERT INTO experiments VALUES ('Default')")
    # A page cache of one page: the transaction spills to the file before it commits.
    writer = ("import os, signal, sqlite3, sys\n"
              "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "db.execute('PRAGMA cache_size=1'); db.execute('BEGIN IMMEDIATE')\n"
              "db.executemany('INSERT INTO experiments VALUES (?)',"
              " [('x' * 500,)] * 2000)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", writer, str(db)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "mlflow.db-journal").stat().st_size > 0  # the hot journal
    check_sqlite_store(f"sqlite:///{db}")
    with sqlite3.connect(db) as after:
        assert after.execute("SELECT name FROM experiments").fetchall() == [("Default",)]
