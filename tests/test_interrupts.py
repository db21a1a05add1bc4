"""Interrupts: SIGTERM to a step mid-epoch, Ctrl-C (SIGINT to the process group) on
``mlflow run .`` and on a sweep. Afterwards no run is RUNNING, the exit status is non-zero,
nothing is registered and no process of the group is left.

The runs the project creates (each step ``main`` launches, the trials of a sweep) end
KILLED. The run of the ``mlflow run`` a user types is MLflow's: its launcher marks it FAILED
after any non-zero exit, and ``pipeline.ended_as`` keeps what the step said (KILLED)."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import time

import mlflow
import psutil
import pytest

from helpers.processes import PROJECT_DIR, VENV_BIN, assert_group_gone, start
from helpers.store import temporary_store, wait_for_training
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import run_cli
from steps.tracking.runtime.runs import ended

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path):
    with temporary_store(tmp_path) as uri:
        yield uri


def assert_nothing_left_behind() -> None:
    client = mlflow.MlflowClient()
    running = [r.info.run_id for r in client.search_runs(["0"]) if r.info.status == "RUNNING"]
    assert running == []
    assert client.search_model_versions() == []


def test_sigterm_to_train_mid_epoch_marks_the_run_killed(store):
    run_cli(importlib.import_module("steps.download_data").cli, ["--dataset", "digits"])
    proc = start([sys.executable, "-m", "steps.train", "--epochs", "500", "--batch-size", "4"])
    wait_for_training(proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "error: interrupted" in stderr and "Traceback" not in stderr
    run = mlflow.MlflowClient().search_runs(["0"], "tags.`pipeline.step` = 'train'")[0]
    assert run.info.status == "KILLED"
    assert "pipeline.model_uri" not in run.data.tags
    assert_nothing_left_behind()


def statuses() -> dict[str, tuple[str, str]]:
    """Each step's run: (its status in the store, how it ended by its own account)."""
    runs = mlflow.MlflowClient().search_runs(["0"])
    return {r.data.tags.get(tags.STEP): (r.info.status, ended(r).status) for r in runs}


def test_sigterm_to_train_under_mlflow_run_leaves_the_launchers_failed_and_says_killed(store):
    """MLflow's launcher writes FAILED over the step's KILLED after the step exits (its
    rule, accepted); the run's own account still says what the console said."""
    run_cli(importlib.import_module("steps.download_data").cli, ["--dataset", "digits"])
    data = mlflow.MlflowClient().search_runs(["0"])[0].info.run_id
    proc = start([os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "-e", "train",
                  "--env-manager", "local", "-P", f"data=runs:/{data}/data", "-P", "epochs=500",
                  "-P", "batch_size=4"])
    wait_for_training(proc=proc)
    trainer = next(p for p in psutil.Process(proc.pid).children()
                   if "steps.train" in " ".join(p.cmdline()))
    trainer.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "the run is marked KILLED" in stderr
    assert statuses() == {"download_data": ("FINISHED", "FINISHED"),
                          "train": ("FAILED", "KILLED")}
    run = mlflow.MlflowClient().search_runs(["0"], "tags.`pipeline.step` = 'train'")[0]
    assert run.data.tags[tags.ENDED_BECAUSE] == "interrupted (SIGTERM)"
    assert_nothing_left_behind()


def test_ctrl_c_on_mlflow_run_kills_the_whole_pipeline(store):
    proc = start([os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "--env-manager",
                  "local", "-P", "dataset=digits", "-P", "epochs=500", "-P", "batch_size=4"])
    wait_for_training(proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert_group_gone(proc.pid)
    assert_nothing_left_behind()
    found = statuses()
    assert found["download_data"] == ("FINISHED", "FINISHED")
    # main created the train run and put KILLED back over its launcher's FAILED; main's own
    # run is the launcher's.
    assert found["train"] == ("KILLED", "KILLED") and found["main"] == ("FAILED", "KILLED")
    assert "evaluate" not in found and "register" not in found


def test_ctrl_c_on_a_sweep_leaves_no_trial_running(store):
    proc = start([os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "--env-manager",
                  "local", "-e", "tune", "-P", "dataset=digits", "-P", "trials=50",
                  "-P", "epochs=50"])
    wait_for_training(step="tune_trial", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert_group_gone(proc.pid)
    assert_nothing_left_behind()
    trials = mlflow.MlflowClient().search_runs(["0"], "tags.`pipeline.step` = 'tune_trial'",
                                               order_by=["attributes.start_time DESC"])
    # The newest trial was the one training when Ctrl-C came; every older one had finished.
    assert trials and trials[0].info.status == "KILLED"
    assert {t.info.status for t in trials[1:]} <= {"FINISHED"}
    assert ended(trials[0]).because.startswith("interrupted")


def test_a_second_signal_while_the_run_closes_leaves_it_killed(store, monkeypatch):
    """One Ctrl-C brings ``main`` two signals: the terminal's SIGINT, then its launcher's
    SIGTERM. Under load the second arrived while the run was being closed, cut that short,
    and the run stayed RUNNING (seen with three test workers). Here it comes at that very
    moment, in-process."""
    from steps.tracking.runtime import runs

    end_active_run = runs.end_active_run

    def end_while_the_launcher_sends_sigterm(ending) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        end_active_run(ending)

    monkeypatch.setattr(runs, "end_active_run", end_while_the_launcher_sends_sigterm)
    with pytest.raises(KeyboardInterrupt), interrupts_as_in_a_step(), runs.step_run("main"):
        raise KeyboardInterrupt("SIGINT")
    run = mlflow.MlflowClient().search_runs(["0"])[0]
    assert run.info.status == "KILLED"
    assert ended(run).cause == runs.INTERRUPTED
    assert run.data.tags[tags.ENDED_BECAUSE] == "interrupted (SIGINT)"


def test_after_the_first_interrupt_a_signal_raises_nowhere():
    """The launcher's SIGTERM can land on any line of the unwinding that ``main``'s SIGINT
    began, the first line of the handler that closes the run included (where no call of
    ours can have ignored it yet): it must raise nowhere. A later SIGINT neither."""
    with interrupts_as_in_a_step():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal's handler raises before this ends
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # pending handlers run between these bytecodes
        except KeyboardInterrupt as late:
            pytest.fail(f"a signal after the first still raised {late!r}")


@contextlib.contextmanager
def interrupts_as_in_a_step():
    """SIGINT and SIGTERM handled in this process as ``run_cli`` handles them in a step's,
    then given back."""
    from steps.tracking.runtime.cli import handle_interrupts

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    handle_interrupts()
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
