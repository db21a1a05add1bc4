"""Shared fixtures: a throw-away sqlite tracking store, tiny IDX datasets, subprocess helpers."""

from __future__ import annotations

import contextlib
import glob
import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from steps.core.data import encode_idx

PROJECT_DIR = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)


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


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A real sqlite store in a temp dir, used by this process and every subprocess."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(PROJECT_DIR)
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    env.pop("PIPELINE_DEBUG", None)
    env.update(extra)
    return env


def run_step(module: str, *args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """``python -m steps.<module> ARGS`` as a user would run it, output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"steps.{module}", *args], capture_output=True, text=True,
        timeout=timeout, env=subprocess_env(**env), cwd=os.getcwd(),
    )


def mlflow_run(*args: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """``mlflow run <project> --env-manager local ARGS`` in a subprocess."""
    return subprocess.run(
        [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "--env-manager", "local",
         *args],
        capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env),
        cwd=os.getcwd(),
    )


def run_entry(entry_point: str, **params):
    """Run one entry point through the real ``mlflow.run`` (in-process launcher, local env)
    on the current store; return its finished run."""
    import mlflow

    submitted = mlflow.run(str(PROJECT_DIR), entry_point, parameters=params,
                           env_manager="local", synchronous=True)
    return mlflow.MlflowClient().get_run(submitted.run_id)


def copy_project(dest: Path) -> Path:
    """The files git tracks in this project, copied to ``dest`` (edits there leave the
    repository clean)."""
    import shutil

    files = subprocess.run(["git", "ls-files"], cwd=PROJECT_DIR, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (PROJECT_DIR / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_DIR / name, dest / name)
    return dest


def tiny_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 digits: scikit-learn's 8x8 digits upscaled, labels 0-9."""
    from steps.core.data import load_digits_dataset

    ds = load_digits_dataset()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds.y_train), size=n, replace=n > len(ds.y_train))
    return ds.x_train[idx], ds.y_train[idx]


def write_idx_folder(folder: Path, n_train: int = 200, n_test: int = 50, gz: bool = True,
                     layout: str = "flat") -> Path:
    """The four MNIST IDX files, flat or in torchvision's ``MNIST/raw`` layout."""
    target = folder / "MNIST" / "raw" if layout == "torchvision" else folder
    target.mkdir(parents=True, exist_ok=True)
    x_train, y_train = tiny_images(n_train, seed=1)
    x_test, y_test = tiny_images(n_test, seed=2)
    files = {
        "train-images-idx3-ubyte": x_train, "train-labels-idx1-ubyte": y_train,
        "t10k-images-idx3-ubyte": x_test, "t10k-labels-idx1-ubyte": y_test,
    }
    for name, array in files.items():
        raw = encode_idx(array.astype(np.uint8))
        if gz:
            (target / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (target / name).write_bytes(raw)
    return folder


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    return write_idx_folder(tmp_path / "idx")


def runs_of(experiment_ids=("0",), filter_string: str = ""):
    import mlflow

    return mlflow.MlflowClient().search_runs(list(experiment_ids), filter_string=filter_string,
                                             max_results=1000)


def assert_clean_failure(result: subprocess.CompletedProcess, *must_mention: str) -> str:
    """Exit != 0, no traceback, and an ``error:`` line mentioning each of ``must_mention``."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    for word in must_mention:
        assert word in errors[0], errors[0]
    return errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, describe, timeout: float = 120) -> None:
    """Poll ``url`` until it answers; fail with ``describe()`` if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered:\n{describe()}") from None
            time.sleep(0.5)


# --------------------------------------------------------------------------- processes


def wait_for_training(timeout: float = 120, step: str = "train", epoch: int = 1,
                      poll: float = 0.3):
    """Block until some run of ``step`` has logged ``epoch`` (so is mid-training, in the
    epoch after it); return that run."""
    import mlflow

    client = mlflow.MlflowClient()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in client.search_runs(["0"], f"tags.`pipeline.step` = '{step}'"):
            if "val_accuracy" in run.data.metrics and (epoch == 1 or any(
                    m.step >= epoch for m in
                    client.get_metric_history(run.info.run_id, "val_accuracy"))):
                return run
        time.sleep(poll)
    raise AssertionError(f"no {step} run reached epoch {epoch} in {timeout}s")


def _default_interrupts() -> None:
    # A background job of a non-interactive shell starts with SIGINT ignored, and children
    # inherit that: without this a Ctrl-C test would prove nothing there.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cmd: list[str]) -> subprocess.Popen:
    # A session of its own, so the test can signal the whole group like a terminal does.
    return subprocess.Popen(cmd, env=subprocess_env(), cwd=os.getcwd(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_default_interrupts)


def assert_group_gone(pgid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError("processes of the interrupted run were still alive")


class TrackingServer:
    """``mlflow server`` with artifacts proxied into ``root/artifacts``."""

    def __init__(self, backend_uri: str, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [os.path.join(VENV_BIN, "mlflow"), "server", "--backend-store-uri", backend_uri,
                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "2"],
                env=subprocess_env(), cwd=root, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True)
        try:
            wait_for_http(f"{self.url}/health", self.proc,
                          lambda: self.log.read_text()[-3000:])
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1 (run as user postgres when we are root)."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's package)")
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
