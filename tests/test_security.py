"""Credentials never leave the process, and an authenticated tracking server works.

The redaction helper is fed every URI form MLflow accepts; the pipeline then runs against
a real ``mlflow server --app-name basic-auth`` on 127.0.0.1 with credentials in the
environment and in the URI, and the store, the artifacts and the output are searched for
the secret. A wrong login and a user without permission on the model fail in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from helpers.processes import (
    PROJECT_DIR,
    VENV_BIN,
    free_port,
    mlflow_run,
    start_listening,
    subprocess_env,
)
from helpers.store import basic_auth_server
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import StepError, run_cli, setup_logging
from steps.tracking.runtime.redact import redact

ADMIN_PASSWORD = "Adm1n-pw-n0t-default-7Q"
USER_PASSWORD = "B0b-pw-s3cret-9Z"
MODEL = "mnist-classifier"


@pytest.mark.parametrize("uri, shown", [
    ("http://alice:s3cret@mlflow.example.com:5000", "http://alice:***@mlflow.example.com:5000"),
    ("https://alice:s3cret@mlflow.example.com/#/experiments/1",
     "https://alice:***@mlflow.example.com/#/experiments/1"),
    ("https://s3cret@mlflow.example.com", "https://***@mlflow.example.com"),
    ("postgresql://mlflow:s3cret@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("postgresql+psycopg2://mlflow:s3cret@db/mlflow",
     "postgresql+psycopg2://mlflow:***@db/mlflow"),
    ("mysql+pymysql://root:s3cret@db/mlflow?charset=utf8mb4",
     "mysql+pymysql://root:***@db/mlflow?charset=utf8mb4"),
    ("mssql+pyodbc://sa:s3cret@db/mlflow?driver=ODBC", "mssql+pyodbc://sa:***@db/mlflow?driver=ODBC"),
    ("https://mlflow.example.com/?token=s3cret&x=1", "https://mlflow.example.com/?token=***&x=1"),
    ("https://acct.blob.core.windows.net/c?sv=2024&sig=s3cret&se=1",
     "https://acct.blob.core.windows.net/c?sv=2024&sig=***&se=1"),
    ("https://h/api?access_token=s3cret", "https://h/api?access_token=***"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("databricks", "databricks"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
])
def test_redact_every_uri_form(uri, shown):
    assert redact(uri) == shown
    assert redact(f"error: the server {uri} refused") == f"error: the server {shown} refused"


def test_log_lines_and_error_lines_are_redacted(capsys, caplog):
    caplog.set_level(logging.INFO)
    setup_logging()  # puts the filter on the handlers present, pytest's capture too
    logging.getLogger("steps.test").info("store: %s", "postgresql://u:s3cret@db/mlflow")
    assert caplog.records[-1].getMessage() == "store: postgresql://u:***@db/mlflow"
    import click

    @click.command()
    def fails() -> None:
        raise StepError("cannot reach http://u:s3cret@host:5000")

    with pytest.raises(SystemExit):
        run_cli(fails, [])
    err = capsys.readouterr().err
    assert "s3cret" not in err + caplog.text
    assert "error: cannot reach http://u:***@host:5000" in err


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` with proxied artifacts, on 127.0.0.1."""
    root = tmp_path_factory.mktemp("auth")
    with basic_auth_server(root, ADMIN_PASSWORD) as url:
        yield {"url": url, "root": root}


@pytest.fixture
def as_user(auth_server, tmp_path, monkeypatch):
    """Point this process (and its subprocesses) at the server as ``user``."""
    previous = mlflow.get_tracking_uri()

    def login(user: str, password: str) -> mlflow.MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server["url"])
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        mlflow.set_tracking_uri(auth_server["url"])
        return mlflow.MlflowClient()

    monkeypatch.chdir(tmp_path)
    yield login
    mlflow.set_tracking_uri(previous)


def text_files(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix not in (".npz", ".pt", ".pt2", ".png", ".pkl"):
            yield path


def assert_secret_absent(client, secret: str, *outputs: str) -> None:
    for output in outputs:
        assert secret not in output
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        assert secret not in repr(run.data.params) + repr(run.data.tags)
    for version in client.search_model_versions():
        assert secret not in repr(version.tags) + str(version.source)


@pytest.mark.slow
def test_the_pipeline_runs_against_an_authenticated_server(auth_server, as_user):
    client = as_user("admin", ADMIN_PASSWORD)
    result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["model_uri"]
    # The same pipeline with the login in the URI, through `make run`: every step inherits
    # it and nothing prints it (a bare `mlflow run .` launcher prints its own run link).
    with_login = auth_server["url"].replace("://", f"://admin:{ADMIN_PASSWORD}@")
    again = subprocess.run(
        ["make", "-s", "-C", str(PROJECT_DIR), "run", "ARGS=-P dataset=digits -P epochs=1"],
        env=subprocess_env(MLFLOW_TRACKING_URI=with_login, MLFLOW_TRACKING_PASSWORD="",
                           MLFLOW_TRACKING_USERNAME="", MLFLOW_EXPERIMENT_NAME="Default"),
        capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused: download_data, train, evaluate, register" in again.stderr
    assert "admin:***@127.0.0.1" in again.stderr
    assert_secret_absent(client, ADMIN_PASSWORD, result.stdout, result.stderr,
                         again.stdout, again.stderr)
    for path in text_files(auth_server["root"] / "artifacts"):
        assert ADMIN_PASSWORD.encode() not in path.read_bytes(), path
    # `make serve` of the champion against the same server, with the same environment.
    serve, port = start_listening(  # returns once /ping answers: the champion loads
        lambda port: ["make", "-s", "-C", str(PROJECT_DIR), "serve", f"PORT={port}"],
        auth_server["root"] / "serve.log", "/ping")
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": [[[0] * 28] * 28]}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            labels = [p["label"] for p in json.loads(response.read())["predictions"]]
        assert len(labels) == 1 and 0 <= labels[0] <= 9
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
    assert ADMIN_PASSWORD not in (auth_server["root"] / "serve.log").read_text()


LAUNCHERS = {
    "make run": lambda: ["make", "-s", "-C", str(PROJECT_DIR), "run",
                         "ARGS=-P dataset=digits -P epochs=1"],
    "mlflow run .": lambda: [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR),
                             "--env-manager", "local", "-P", "dataset=digits"],
}


def launch_and_expect_one_error(launcher: str, env: dict) -> str:
    """Start the pipeline as a user does; it must fail within 20 s with one error line and
    no traceback. Returns that line."""
    started = time.monotonic()
    result = subprocess.run(LAUNCHERS[launcher](), env=env, capture_output=True, text=True,
                            timeout=120)
    assert time.monotonic() - started < 20, result.stderr[-2000:]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("user, password", [("admin", "wrong-password"), ("", "")],
                         ids=["wrong", "missing"])
def test_a_refused_login_fails_fast_in_one_line(auth_server, as_user, launcher, user,
                                                password):
    admin = as_user("admin", ADMIN_PASSWORD)
    before = len(admin.search_runs([e.experiment_id for e in admin.search_experiments()]))
    env = subprocess_env(MLFLOW_TRACKING_URI=auth_server["url"],
                         MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    error = launch_and_expect_one_error(launcher, env)
    assert error == (f"error: the tracking server {auth_server['url']} refused the login "
                     "(HTTP 401); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                     "(or MLFLOW_TRACKING_TOKEN) in the environment")
    after = len(admin.search_runs([e.experiment_id for e in admin.search_experiments()]))
    assert after == before  # nothing was started, nothing half-registered


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_an_unreachable_server_fails_fast_in_one_line_without_its_password(launcher,
                                                                          tmp_path):
    port = free_port()  # nothing listens there
    env = subprocess_env(MLFLOW_TRACKING_URI=f"http://bob:{USER_PASSWORD}@127.0.0.1:{port}")
    error = launch_and_expect_one_error(launcher, env)
    assert error.startswith(f"error: the tracking server http://bob:***@127.0.0.1:{port} "
                            "cannot be reached")
    assert USER_PASSWORD not in error


@pytest.mark.slow
def test_a_user_who_may_not_write_the_model_gets_one_line_from_register(auth_server, as_user):
    admin = as_user("admin", ADMIN_PASSWORD)
    try:
        admin.create_registered_model(MODEL)  # owned by admin; others may only read it
    except mlflow.exceptions.MlflowException as exc:
        assert exc.error_code == "RESOURCE_ALREADY_EXISTS"
    from mlflow.server import get_app_client

    users = get_app_client("basic-auth", tracking_uri=auth_server["url"])
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # exists from a rerun
        users.create_user("bob", USER_PASSWORD)
    bob = as_user("bob", USER_PASSWORD)
    # Bob's own experiment (its creator may write it); the model stays admin's.
    result = mlflow_run("-P", "dataset=digits", "-P", "epochs=1",
                        MLFLOW_EXPERIMENT_NAME="bobs-experiment")
    assert result.returncode != 0
    assert (f"error: the tracking server refused to let this user write registered model "
            f"{MODEL} (permission denied)") in result.stderr
    assert "error: step register failed" in result.stderr
    assert "Traceback" not in result.stderr
    experiment = bob.get_experiment_by_name("bobs-experiment")
    runs = {r.data.tags[tags.STEP]: r for r in bob.search_runs([experiment.experiment_id])}
    for step in ("download_data", "train", "evaluate"):
        assert runs[step].info.status == "FINISHED", step
    assert runs["evaluate"].data.metrics["test_accuracy"] > 0.5
    assert runs["register"].info.status == "FAILED"
    assert not [v for v in admin.search_model_versions(f"name = '{MODEL}'")
                if v.run_id == runs["train"].info.run_id]
    assert USER_PASSWORD not in result.stdout + result.stderr


def test_the_debug_traceback_is_redacted_too(capsys, monkeypatch):
    import click

    monkeypatch.setenv("PIPELINE_DEBUG", "1")

    @click.command()
    def breaks() -> None:
        raise ValueError("no store at postgresql://u:s3cret@db/mlflow")

    with pytest.raises(SystemExit):
        run_cli(breaks, [])
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError" in err
    assert "s3cret" not in err and "postgresql://u:***@db/mlflow" in err


def test_a_slow_server_is_waited_for_and_a_refusing_one_is_not(monkeypatch):
    """The start-up check tells a server that is down (the connection refused: one line at
    once) from one that is up and busy (it answers after the connect timeout: waited for)."""
    import http.server
    import threading

    from steps.tracking.runtime import store

    class SlowAnswer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(1.5)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    monkeypatch.setattr(store, "CONNECT_TIMEOUT_S", 0.5)  # shorter than the answer takes
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        waited = time.monotonic()
        store.check_tracking_server(f"http://127.0.0.1:{server.server_address[1]}")
        assert time.monotonic() - waited >= 1.4  # it waited for the answer
    finally:
        server.shutdown()
        server.server_close()
    started = time.monotonic()
    with pytest.raises(StepError, match="cannot be reached"):
        store.check_tracking_server(f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 2
