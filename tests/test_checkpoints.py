"""Training that survives being stopped: per-epoch checkpoints with the run, resume in the
same run (through ``main`` and through ``train --resume``), refusals, early stopping.

The exactness tests kill a real ``mlflow run`` during epoch 3 of 4 (SIGKILL to the whole
process group, as a lost machine; SIGTERM, as a scheduler), start it again, and compare
with an uninterrupted run: the same per-epoch metrics and the same sha256 over the final
and the logged weights, on the CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers.data import tiny_images, write_idx_folder
from helpers.processes import (
    PROJECT_DIR,
    VENV_BIN,
    assert_clean_failure,
    assert_group_gone,
    mlflow_run,
    run_step,
    start,
    subprocess_env,
)
from helpers.store import temporary_store, wait_for_training
from steps.core import training
from steps.tracking.runtime import tags
from steps.tracking.runtime.runs import ended

EPOCHS = 4
# Small batches make an epoch of the digits last a second or two: long enough to be
# killed in the middle of.
TRAIN_PARAMS = {"epochs": str(EPOCHS), "batch_size": "2"}
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy")


def weights_sha256(state_dict: dict) -> str:
    """One digest over a state_dict's names and tensor bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the core


@pytest.fixture(scope="module")
def tiny_split():
    x, y = tiny_images(600, seed=3)
    order = np.random.default_rng(0).permutation(600)
    return x, y, order[:500], order[500:]


def _saved(state: dict) -> dict:
    """``state`` through torch.save and back with weights_only=True, as a resume reads it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_resuming_any_checkpoint_ends_exactly_where_the_uninterrupted_run_does(tiny_split,
                                                                             arch):
    config = training.TrainConfig(epochs=3, batch_size=32, seed=0, device="cpu", arch=arch)
    states = []
    whole = training.train(config, *tiny_split, checkpoint_every=1,
                           on_checkpoint=lambda s: states.append(_saved(s)))
    assert [s["epoch"] for s in states] == [1, 2, 3]
    for state in states[:2]:
        resumed = training.train(config, *tiny_split, resume_from=state)
        assert resumed.resumed_from == state["epoch"]
        assert [(e.train_loss, e.val_loss, e.val_accuracy) for e in resumed.history] == [
            (e.train_loss, e.val_loss, e.val_accuracy) for e in whole.history]
        assert weights_sha256(resumed.model.state_dict()) == weights_sha256(
            whole.model.state_dict())
        assert resumed.best_epoch == whole.best_epoch


def test_checkpoints_come_every_n_epochs_and_at_the_last(tiny_split):
    config = training.TrainConfig(epochs=5, batch_size=100, seed=0, device="cpu")
    seen = []
    training.train(config, *tiny_split, checkpoint_every=2,
                   on_checkpoint=lambda s: seen.append(s["epoch"]))
    assert seen == [2, 4, 5]


@pytest.mark.parametrize("change, message", [
    ({"epochs": 5}, "epochs=3 there, 5 here"),
    ({"learning_rate": 0.01}, "learning_rate=0.003 there, 0.01 here"),
    ({"arch": "mlp"}, "arch='cnn' there, 'mlp' here"),
    ({"lr_schedule": "constant"}, "lr_schedule='onecycle' there, 'constant' here"),
    ({"augment": "none"}, "augment='shift' there, 'none' here"),
])
def test_a_checkpoint_of_other_parameters_is_refused(tiny_split, change, message):
    config = training.TrainConfig(epochs=3, batch_size=100, seed=0, device="cpu")
    states = []
    training.train(config, *tiny_split, checkpoint_every=1, on_checkpoint=states.append)
    other = training.TrainConfig(**{**config.as_params(), **change})
    with pytest.raises(training.CheckpointError, match=message):
        training.train(other, *tiny_split, resume_from=states[0])


def test_a_truncated_or_foreign_state_is_refused(tiny_split):
    config = training.TrainConfig(epochs=3, batch_size=100, seed=0, device="cpu")
    states = []
    training.train(config, *tiny_split, checkpoint_every=1, on_checkpoint=states.append)
    with pytest.raises(training.CheckpointError, match="no optimizer"):
        training.check_resumable({k: v for k, v in states[0].items() if k != "optimizer"},
                                 config)
    with pytest.raises(training.CheckpointError, match="history of 0 epochs"):
        training.check_resumable({**states[1], "history": []}, config)
    broken = {**states[0], "model": {"net.0.weight": torch.zeros(3)}}
    with pytest.raises(training.CheckpointError, match="does not fit this network"):
        training.train(config, *tiny_split, resume_from=broken)


def test_patience_stops_where_the_metric_plateaus(tiny_split):
    """Every image of one class: validation is perfect from the first epoch on and cannot
    improve, so training stops ``patience`` epochs after the best."""
    x, _, train_idx, val_idx = tiny_split
    y = np.full(len(x), 7)
    config = training.TrainConfig(epochs=30, batch_size=100, seed=0, device="cpu",
                                  patience=3)
    states = []
    result = training.train(config, x, y, train_idx, val_idx, checkpoint_every=10,
                            on_checkpoint=states.append)
    assert result.best_val_accuracy == 1.0
    assert result.stopped_epoch == result.best_epoch + 3 == len(result.history) < 30
    assert states[-1]["epoch"] == result.stopped_epoch  # the stop epoch is checkpointed
    # Resumed at the stop, it stops at once with the same best epoch.
    again = training.train(config, x, y, train_idx, val_idx, resume_from=states[-1])
    assert (again.stopped_epoch, again.best_epoch) == (result.stopped_epoch,
                                                       result.best_epoch)
    unlimited = training.train(training.TrainConfig(epochs=6, batch_size=100, seed=0,
                                                    device="cpu"), x, y, train_idx, val_idx)
    assert unlimited.stopped_epoch == 0 and len(unlimited.history) == 6


def test_a_continued_run_logs_every_epoch_exactly_once(tracking_uri, tiny_split):
    """In a real store: the epochs a checkpoint holds but the run never logged (killed
    between the two) are logged first; epochs the run already has (logged after the last
    checkpoint, with checkpoint_every > 1) are not logged again."""
    from types import SimpleNamespace

    from steps.tracking.training.fit import fit_and_log

    x, y, _, _ = tiny_split
    dataset = SimpleNamespace(x_train=x, y_train=y, name="tiny")
    config = training.TrainConfig(epochs=4, batch_size=100, seed=0, device="cpu")
    states = []
    training.train(config, x, y, *training_split(len(y)), checkpoint_every=1,
                   on_checkpoint=lambda state: states.append(_saved(state)))
    client = mlflow.MlflowClient()
    for logged_before, state in ((1, states[1]), (3, states[1])):
        with mlflow.start_run() as run:
            for epoch in range(1, logged_before + 1):  # what the stopped attempt logged
                mlflow.log_metric("val_accuracy", -1.0, step=epoch)
            fit_and_log(config, dataset, 0.1, resume_from=state,
                        logged_epochs=logged_before)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert sorted(steps) == [1, 2, 3, 4], (logged_before, steps)
        for key in ("train_loss", "val_loss"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == (
                list(range(logged_before + 1, 5)))


def training_split(n: int):
    from steps.core.data import split_train_val

    return split_train_val(n, 0.1, 0)


# --------------------------------------------------------------------------- runs


def _train_params(data_run_id: str = "") -> list[str]:
    params = [f"-P {k}={v}" for k, v in TRAIN_PARAMS.items()]
    if data_run_id:
        params.append(f"-P data=runs:/{data_run_id}/data")
    return [part for p in params for part in p.split(" ", 1)]


def _train_run():
    runs = mlflow.MlflowClient().search_runs(["0"], f"tags.`{tags.STEP}` = 'train'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _download_digits() -> str:
    result = run_step("download_data", "--dataset", "digits")
    assert result.returncode == 0, result.stderr
    return mlflow.MlflowClient().search_runs(
        ["0"], f"tags.`{tags.STEP}` = 'download_data'")[0].info.run_id


def outcome(run) -> dict:
    """What an uninterrupted and a resumed run must share: the per-epoch metrics, the
    final weights (the last checkpoint's network) and the logged classifier's weights."""
    client = mlflow.MlflowClient()
    history = {key: [(m.step, m.value) for m in sorted(
        client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in EPOCH_METRICS}
    pointer = json.loads(run.data.tags[tags.CHECKPOINT])
    final = torch.load(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=pointer["path"]), weights_only=True)
    classifier = Path(mlflow.artifacts.download_artifacts(run.data.tags[tags.MODEL_URI]))
    logged = torch.load(classifier / "artifacts" / "weights.pt", weights_only=True)
    return {"history": history, "final_sha256": weights_sha256(final["model"]),
            "logged_sha256": weights_sha256(logged), "best_epoch":
            run.data.metrics["best_epoch"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``mlflow run -e train`` on the digits, never stopped: what every resume must give."""
    with temporary_store(tmp_path_factory.mktemp("uninterrupted")):
        data = _download_digits()
        result = mlflow_run("-e", "train", *_train_params(data))
        assert result.returncode == 0, result.stderr
        yield outcome(_train_run())


@pytest.fixture
def store(tmp_path):
    with temporary_store(tmp_path) as uri:
        yield uri


def _kill_during_epoch_3(cmd: list[str], sig: signal.Signals):
    """Start ``cmd`` in a process group of its own, send ``sig`` to the whole group as
    soon as epoch 2 is logged, wait for the group to go; return the train run then. (The
    same SIGTERM ends MLflow's launcher at once, before it can write FAILED: the run stays
    as the step ended it.)"""
    proc = start(cmd)
    wait_for_training(epoch=2, poll=0.05, proc=proc)
    os.killpg(proc.pid, sig)
    proc.communicate(timeout=90)
    assert_group_gone(proc.pid)
    run = _train_run()
    if sig == signal.SIGKILL:
        assert run.info.status == "RUNNING"  # nothing was left to close it
    else:
        assert (run.info.status, ended(run).status) == ("KILLED", "KILLED")
    # Killed during epoch 3: two epochs logged, the checkpoint is epoch 2's.
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(
        run.info.run_id, "val_accuracy")] == [1, 2]
    assert json.loads(run.data.tags[tags.CHECKPOINT])["epoch"] == 2
    return run


def _main(*extra: str) -> list[str]:
    return [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "--env-manager",
            "local", "-P", "dataset=digits", *_train_params(), *extra]


def _assert_resumed_exactly(run_id: str, uninterrupted: dict, after: str) -> None:
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    got = outcome(run)
    print(f"resumed {run_id}: final sha256 {got['final_sha256']}, logged sha256 "
          f"{got['logged_sha256']}; uninterrupted: {uninterrupted['final_sha256']}, "
          f"{uninterrupted['logged_sha256']}")
    assert got == uninterrupted
    assert [s for s, _ in got["history"]["val_accuracy"]] == list(range(1, EPOCHS + 1))
    resumes = json.loads(run.data.tags[tags.RESUMES])
    assert len(resumes) == 1
    assert resumes[0]["from_epoch"] == 3 and resumes[0]["epochs"] == EPOCHS
    assert resumes[0]["after"] == after
    assert tags.ENDED_BECAUSE not in run.data.tags
    # MLflow's system metrics, from one process, continued after the resume: no step twice.
    cpu = [m.step for m in mlflow.MlflowClient().get_metric_history(
        run_id, "system/cpu_utilization_percentage")]
    assert cpu and len(cpu) == len(set(cpu))


@pytest.mark.slow
@pytest.mark.parametrize("sig, ended", [(signal.SIGKILL, "KILLED"),
                                        (signal.SIGTERM, "KILLED")])
def test_main_resumes_a_train_run_stopped_in_epoch_3_exactly(store, uninterrupted, sig,
                                                             ended):
    killed = _kill_during_epoch_3(_main(), sig)
    again = subprocess.run(_main(), capture_output=True, text=True, timeout=600,
                           env=subprocess_env(), cwd=os.getcwd())
    assert again.returncode == 0, again.stderr
    said = [line for line in again.stderr.splitlines() if line.startswith("main: train")]
    assert said[0].startswith(f"main: train resumes run {killed.info.run_id} at epoch 3 of "
                              f"{EPOCHS} (it was {ended}"), said
    _assert_resumed_exactly(killed.info.run_id, uninterrupted, ended)
    client = mlflow.MlflowClient()
    mains = client.search_runs(["0"], f"tags.`{tags.STEP}` = 'main'",
                               order_by=["attributes.start_time DESC"])
    assert mains[0].info.status == "FINISHED"
    # The pipeline that finished the run adopted it, and registered its model.
    assert _train_run().data.tags["mlflow.parentRunId"] == mains[0].info.run_id
    assert mains[0].data.tags[tags.step_run_id("train")] == killed.info.run_id
    assert client.get_model_version("mnist-classifier", "1").tags["train_run_id"] == (
        killed.info.run_id)


@pytest.mark.slow
def test_train_resume_continues_the_given_run_and_the_new_run_points_at_it(store,
                                                                          uninterrupted):
    data = _download_digits()
    train = [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "-e", "train",
             "--env-manager", "local", *_train_params(data)]
    # An orphan (RUNNING, its process gone): the resume check closes it first.
    killed = _kill_during_epoch_3(train, signal.SIGKILL)
    result = mlflow_run("-e", "train", *_train_params(), "-P",
                        f"resume={killed.info.run_id}")
    assert result.returncode == 0, result.stderr
    _assert_resumed_exactly(killed.info.run_id, uninterrupted, "KILLED")
    pointer = mlflow.MlflowClient().search_runs(["0"], f"tags.`{tags.STEP}` = 'resume'")
    assert len(pointer) == 1
    assert pointer[0].data.tags[tags.RESUMED_RUN] == killed.info.run_id


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_refused_in_one_line_and_nothing_trains_on_it(store):
    data = _download_digits()
    train = [os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "-e", "train",
             "--env-manager", "local", *_train_params(data)]
    killed = _kill_during_epoch_3(train, signal.SIGTERM)
    pointer = json.loads(killed.data.tags[tags.CHECKPOINT])
    saved = Path(killed.info.artifact_uri.removeprefix("file://"), pointer["path"])
    saved.write_bytes(saved.read_bytes()[: pointer["bytes"] // 2])  # a torn file
    result = run_step("train", "--epochs", str(EPOCHS), "--batch-size", "2", "--resume",
                      killed.info.run_id)
    line = assert_clean_failure(result, killed.info.run_id, "is corrupt", pointer["path"],
                                "nothing was trained on it")
    assert "sha256" in line
    run = mlflow.MlflowClient().get_run(killed.info.run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(
        run.info.run_id, "val_accuracy")] == [1, 2]
    assert tags.CHECKPOINT not in run.data.tags
    assert "is corrupt" in run.data.tags[tags.CHECKPOINT_REFUSED]


# --------------------------------------------------------------------------- refusals


def _make_train_run(status: str, checkpoint: bool = True, **params: str) -> str:
    """A train run as a stopped one looks in the store (for the parameter checks)."""
    client = mlflow.MlflowClient()
    run = client.create_run("0", tags={tags.STEP: "train"})
    for key, value in {"epochs": "4", "batch_size": "2", **params}.items():
        client.log_param(run.info.run_id, key, value)
    if checkpoint:
        client.set_tag(run.info.run_id, tags.CHECKPOINT, json.dumps(
            {"path": "checkpoint/state-0.pt", "epoch": 2, "epochs": 4, "sha256": "0" * 64,
             "bytes": 1}))
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.mark.parametrize("make, expected", [
    (lambda: "0" * 32, "no such run"),
    (lambda: mlflow.MlflowClient().create_run("0", tags={tags.STEP: "evaluate"}).info.run_id,
     "is not a train run (pipeline.step=evaluate)"),
    (lambda: _make_train_run("FINISHED"), "FINISHED: there is nothing to continue"),
    (lambda: _make_train_run("KILLED", checkpoint=False), "has no checkpoint"),
    (lambda: _make_train_run("KILLED", epochs="30"),
     "other parameters (epochs='30' there, 4 here)"),
    (lambda: _make_train_run("FAILED", learning_rate="1e-2"),
     "learning_rate='1e-2' there, 0.003 here"),
])
def test_resume_refuses_what_it_cannot_continue_naming_the_parameter(tracking_uri, capsys,
                                                                     make, expected):
    from steps.tracking.runtime.cli import run_cli
    from steps.train import cli

    run_id = make()
    runs_before = len(mlflow.MlflowClient().search_runs(["0"]))
    with pytest.raises(SystemExit) as exited:  # in-process: the check comes before any run
        run_cli(cli, ["--epochs", "4", "--batch-size", "2", "--resume", run_id])
    assert exited.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [errors[0]] and errors[0].startswith(f"error: resume={run_id}: ")
    assert expected in errors[0]
    assert len(mlflow.MlflowClient().search_runs(["0"])) == runs_before  # no run was made


# --------------------------------------------------------------------------- patience


@pytest.mark.slow
def test_a_train_run_with_patience_stops_early_and_logs_the_best_epochs_model(tmp_path,
                                                                            tracking_uri):
    folder = write_idx_folder(tmp_path / "one-class", n_train=300, n_test=50)
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        _relabel_idx(folder / name, 7)
    assert run_step("download_data", "--data-dir", str(folder)).returncode == 0
    result = run_step("train", "--epochs", "30", "--batch-size", "100", "--patience", "2")
    assert result.returncode == 0, result.stderr
    assert "early stop at epoch" in result.stderr
    run = _train_run()
    stopped, best = run.data.metrics["stopped_epoch"], run.data.metrics["best_epoch"]
    assert stopped == best + 2 < 30
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id,
                                                                     "val_accuracy")]
    assert steps == list(range(1, int(stopped) + 1))
    models = mlflow.search_logged_models(experiment_ids=["0"], output_format="list")
    assert {m.name for m in models} == {"model", "classifier"}
    for model in models:  # logged at the best epoch, linked to what it scored there
        linked = {m.key: m for m in model.metrics}
        assert linked["val_accuracy"].step == best
        assert linked["val_accuracy"].value == run.data.metrics["best_val_accuracy"]


def _relabel_idx(path: Path, label: int) -> None:
    import gzip

    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8:] = bytes([label]) * (len(raw) - 8)  # an IDX1 file: 8 header bytes, then labels
    path.write_bytes(gzip.compress(bytes(raw)))
