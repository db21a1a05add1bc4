"""Starting the project's processes as a user would, and watching them: subprocess
environments, `mlflow run`, entry scripts, sessions a test can signal, ports and HTTP waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from helpers.waiting import wait_until
from steps.tracking.runtime.project import PROJECT_DIR

VENV_BIN = str(Path(sys.executable).parent)


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(PROJECT_DIR)
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    # Every `mlflow server`/`ui` the tests start runs without MLflow's GenAI job runner
    # (seven huey consumers, about 50 s of CPU per start); nothing here uses it (`make ui`
    # runs without it too).
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
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


def start_listening(command, log: Path, health: str, *, port: int | None = None,
                    cwd: str | Path | None = None, env: dict | None = None,
                    attempts: int = 3) -> tuple[subprocess.Popen, int]:
    """Start ``command(port)`` (a server, in a session of its own, its output to ``log``) and
    wait until ``http://127.0.0.1:<port><health>`` answers; return the process and port.

    ``free_port`` lets go of its port before the server binds it, and in between any
    process (a parallel test, a client's ephemeral port) may take it. The server then
    dies saying 'address already in use', and ``mlflow server`` even exits 0: so that
    death, and only that one, is retried on another free port. A given ``port`` (a
    server started again where it was) is not moved.
    """
    attempt = 1
    while True:
        chosen = port or free_port()
        with open(log, "w") as err:
            proc = subprocess.Popen(command(chosen), env=env or subprocess_env(), cwd=cwd,
                                    stdout=err, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_for_http(f"http://127.0.0.1:{chosen}{health}", proc,
                          lambda: Path(log).read_text()[-3000:])
            return proc, chosen
        except AssertionError:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            lost_race = "address already in use" in Path(log).read_text().lower()
            if port is not None or attempt == attempts or not lost_race:
                raise
        attempt += 1


def wait_for_http(url: str, proc: subprocess.Popen, describe, timeout: float = 120) -> None:
    """Poll ``url`` until it answers; fail with ``describe()`` if ``proc`` dies or time runs out."""
    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until(answers, timeout, f"{url} to answer", poll=0.5,
                   give_up=lambda: proc.poll() is not None and f"exit {proc.returncode}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{describe()}") from None


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
    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_until(gone, timeout, "the processes of the interrupted run to end")
    except AssertionError:
        os.killpg(pgid, signal.SIGKILL)
        raise
