"""Tracking stores for tests: a throw-away sqlite store, a real `mlflow server`, a
throw-away PostgreSQL cluster, and queries on what the steps left in them."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from helpers.processes import VENV_BIN, free_port, start_listening, subprocess_env
from helpers.waiting import wait_until
from steps.tracking.runtime.store import prepare_store


@contextlib.contextmanager
def temporary_store(root: Path):
    """Point this process and its subprocesses at a fresh sqlite store under ``root``."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "PATH",
                                             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, PATH=VENV_BIN + os.pathsep + os.environ["PATH"],
                      MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    cwd = os.getcwd()
    os.chdir(root)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    # The tables first, as `make run` does: a test polling a store while the process it
    # started creates it would run MLflow's migrations twice at once ("table ... already
    # exists" in one of them).
    prepare_store(uri)
    try:
        yield uri
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # Restore, not clear: a module-scoped store may be around this one.
        mlflow.set_tracking_uri(previous)


def runs_of(experiment_ids=("0",), filter_string: str = ""):
    import mlflow

    return mlflow.MlflowClient().search_runs(list(experiment_ids), filter_string=filter_string,
                                             max_results=1000)


def _said(proc) -> str:
    """What an ended process wrote (its last lines of stdout, then stderr)."""
    out, err = proc.communicate()
    return f"{(out or '')[-2000:]}\n{(err or '')[-4000:]}"


def wait_for_training(timeout: float = 120, step: str = "train", epoch: int = 1,
                      poll: float = 0.3, proc=None):
    """Block until some run of ``step`` has logged ``epoch`` (so is mid-training, in the
    epoch after it); return that run. With ``proc``, fail at once with its output if it
    ends first."""
    import mlflow

    client = mlflow.MlflowClient()

    def reached():
        for run in client.search_runs(["0"], f"tags.`pipeline.step` = '{step}'"):
            if "val_accuracy" in run.data.metrics and (epoch == 1 or any(
                    m.step >= epoch for m in
                    client.get_metric_history(run.info.run_id, "val_accuracy"))):
                return run
        return None

    def ended() -> str | None:
        if proc is not None and proc.poll() is not None:
            return f"the process ended (exit {proc.returncode}):\n{_said(proc)}"
        return None

    try:
        return wait_until(reached, timeout, f"a {step} run to reach epoch {epoch}",
                          poll=poll, give_up=ended)
    except AssertionError as exc:
        if proc is None or proc.returncode is not None:
            raise
        with contextlib.suppress(ProcessLookupError):  # its session, as start() made it
            os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{exc}; the process said:\n{_said(proc)}") from None


class TrackingServer:
    """``mlflow server`` with artifacts proxied into ``root/artifacts`` (on ``port``: a free
    one, or a stopped server's, to start it again)."""

    def __init__(self, backend_uri: str, root: Path, port: int | None = None) -> None:
        self.log = root / "server.log"
        self.proc, self.port = start_listening(
            lambda port: [os.path.join(VENV_BIN, "mlflow"), "server",
                          "--backend-store-uri", backend_uri,
                          "--artifacts-destination", str(root / "artifacts"),
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            self.log, "/health", port=port, cwd=root)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def basic_auth_server(root: Path, admin_password: str):
    """``mlflow server --app-name basic-auth`` with proxied artifacts on 127.0.0.1, user
    ``admin`` with ``admin_password``; yields its URL. MLflow's credential cache is on
    (``auth_cache_ttl_seconds``): without it each request costs a password hash, about 1 s
    on two cores."""
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 600\n")
    env = subprocess_env(MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                         MLFLOW_AUTH_CONFIG_PATH=str(config),
                         MLFLOW_FLASK_SERVER_SECRET_KEY="test-only-csrf-key")
    server, port = start_listening(
        lambda port: [os.path.join(VENV_BIN, "mlflow"), "server", "--app-name", "basic-auth",
                      "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                      "--artifacts-destination", str(root / "artifacts"),
                      "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        root / "server.log", "/health", cwd=root, env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@contextlib.contextmanager
def postgres_cluster():
    """A throw-away PostgreSQL cluster on 127.0.0.1 (run as user postgres when we are root)."""
    bindir = postgres_bin()
    assert bindir is not None, "PostgreSQL is not installed"
    # Not under tmp_path: pytest's base temp dir is private to root, and the cluster runs
    # as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="mnist-pipeline-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
        "--auth=trust")
    run(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
            "mlflow")
        # +psycopg2: the pinned driver (SQLAlchemy 2.1 would otherwise look for psycopg 3).
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)
