"""The step cache: what goes into a step's key, when an earlier run is reused, and the one
line saying why a step runs again. Decisions are taken by the real ``Pipeline`` against a
real sqlite store; the slow tests wipe real artifacts under real ``mlflow run`` pipelines."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from helpers.processes import copy_project, mlflow_run
from steps.tracking import cache, tags
from steps.tracking.cache import Pipeline, StepInputs, code_files

TRAIN_PARAMS = {"data": "runs:/aaaa/data", "epochs": 1, "learning_rate": 0.001,
                "batch_size": 64, "optimizer": "adam", "arch": "mlp", "hidden": "",
                "seed": 42}
UPSTREAM = {"download_data": "aaaa"}


@pytest.fixture
def project(tmp_path) -> Path:
    return copy_project(tmp_path / "project")


@pytest.fixture
def pipeline(tracking_uri, project):
    client = mlflow.MlflowClient()
    parent = client.create_run("0", tags={tags.STEP: "main"})
    return Pipeline(client, parent, use_cache=True, root=project)


def record(pipeline, inputs: StepInputs, **extra_tags: str):
    """A FINISHED run of the step as ``main`` leaves it: key and inputs as tags."""
    run = pipeline.client.create_run("0", tags={
        tags.STEP: inputs.entry_point, tags.CACHE_KEY: inputs.key(),
        tags.CACHE_INPUTS: inputs.to_json(), **extra_tags})
    pipeline.client.set_terminated(run.info.run_id, "FINISHED")
    return run


def test_train_key_covers_what_train_runs_and_ships_and_nothing_else():
    files = code_files("train")
    for path in ("steps/train.py", "steps/tracking/fitting.py", "steps/tracking/artifacts.py",
                 "steps/core/training.py", "steps/core/model.py", "steps/core/data.py",
                 "steps/tracking/serving.py",  # shipped inside every classifier, never imported
                 "steps/__init__.py", "steps/core/__init__.py",
                 "MLproject", "conda.yaml", "requirements.txt"):
        assert path in files, path
    for path in ("steps/evaluate.py", "steps/main.py", "steps/tracking/cache.py", "steps/tracking/registry.py",
                 "steps/core/metrics.py"):
        assert path not in files, path
    assert "steps/tracking/registry.py" in code_files("register")
    assert "steps/core/metrics.py" in code_files("evaluate")


@pytest.mark.parametrize("path", [
    "steps/train.py", "steps/tracking/fitting.py", "steps/core/training.py", "steps/tracking/serving.py",
    "steps/core/model.py", "MLproject", "requirements.txt", "conda.yaml",
])
def test_editing_an_input_file_reruns_the_step_and_names_the_file(pipeline, project, path):
    before = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    earlier = record(pipeline, before)
    hit, _ = pipeline.lookup(before)
    assert hit.info.run_id == earlier.info.run_id  # unchanged: reused
    (project / path).write_text((project / path).read_text() + "\n# edited\n")
    after = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    hit, why = pipeline.lookup(after)
    assert hit is None
    assert why == f"since run {earlier.info.run_id}, changed files: {path}"


def test_editing_a_file_the_step_does_not_run_keeps_the_cache(pipeline, project):
    before = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    earlier = record(pipeline, before)
    (project / "steps" / "evaluate.py").write_text("# edited\n")
    after = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    assert pipeline.lookup(after)[0].info.run_id == earlier.info.run_id


def test_an_upgraded_package_reruns_the_step(pipeline, project, monkeypatch):
    before = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    earlier = record(pipeline, before)
    upgraded = {**before.packages, "torch": "9.9.9"}
    monkeypatch.setattr(cache, "pinned_package_versions", lambda root: upgraded)
    hit, why = pipeline.lookup(StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM,
                                                  root=project))
    assert hit is None
    assert why == (f"since run {earlier.info.run_id}, packages: torch "
                   f"{before.packages['torch']} -> 9.9.9")


def test_params_and_upstream_changes_are_said_once_each(pipeline, project):
    earlier = record(pipeline, StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM,
                                                  root=project))
    params = {**TRAIN_PARAMS, "epochs": 3, "data": "runs:/bbbb/data"}
    hit, why = pipeline.lookup(StepInputs.collect("train", params, {"download_data": "bbbb"},
                                                  root=project))
    assert hit is None
    assert why == (f"since run {earlier.info.run_id}, params: epochs 1 -> 3; "
                   "upstream: download_data run aaaa -> bbbb")


def test_changed_files_in_data_dir_rerun_download(pipeline, project, tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(b"one")
    params = {"dataset": "mnist", "data_dir": str(folder)}
    earlier = record(pipeline, StepInputs.collect("download_data", params, data_dir=str(folder),
                                                  root=project))
    (folder / "train-images-idx3-ubyte").write_bytes(b"other")
    hit, why = pipeline.lookup(StepInputs.collect("download_data", params,
                                                  data_dir=str(folder), root=project))
    assert hit is None
    assert why == f"since run {earlier.info.run_id}, the files in data_dir changed"


def test_a_run_whose_outputs_are_gone_is_not_reused(pipeline, project, tmp_path):
    inputs = StepInputs.collect("download_data", {"dataset": "digits", "data_dir": ""},
                                root=project)
    earlier = record(pipeline, inputs)
    run_id = earlier.info.run_id
    artifact = tmp_path / "dataset.npz"
    np.savez(artifact, x=np.zeros(3))
    pipeline.client.log_artifact(run_id, str(artifact), "data")
    pipeline.client.set_tag(run_id, tags.DATA_URI, f"runs:/{run_id}/data")
    assert pipeline.lookup(inputs)[0].info.run_id == run_id
    local = mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")
    shutil.rmtree(Path(local) / "data")
    hit, why = pipeline.lookup(inputs)
    assert hit is None
    assert why == (f"run {run_id} had the same inputs but its outputs are missing: "
                   f"runs:/{run_id}/data has no files")


def test_first_run_of_a_step_says_so(pipeline, project):
    hit, why = pipeline.lookup(StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM,
                                                  root=project))
    assert hit is None and why == "no earlier finished train run in this experiment"


# --------------------------------------------------------------------------- end to end

DIGITS = ("-P", "dataset=digits", "-P", "epochs=1")


def _why(stderr: str, step: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith(f"main: {step} "))


def _champion_loads() -> None:
    model = mlflow.pyfunc.load_model("models:/mnist-classifier@champion")
    assert model.predict(np.zeros((2, 28, 28), np.uint8))["label"].shape == (2,)


@pytest.mark.slow
def test_a_wiped_artifact_store_reruns_every_step(tracking_uri, tmp_path):
    first = mlflow_run(*DIGITS)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(tmp_path / "mlruns")  # `rm -rf mlruns` to free space; mlflow.db stays
    second = mlflow_run(*DIGITS)
    assert second.returncode == 0, second.stderr[-3000:]
    for step in ("download_data",):
        assert "had the same inputs but its outputs are missing" in _why(second.stderr, step)
    assert "reused: none" in second.stderr
    assert "champion holder v1 cannot be loaded" in second.stderr
    champion = mlflow.MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    assert str(champion.version) == "2"
    _champion_loads()


@pytest.mark.slow
def test_one_runs_deleted_models_rerun_train_and_what_follows(tracking_uri):
    first = mlflow_run(*DIGITS)
    assert first.returncode == 0, first.stderr[-3000:]
    client = mlflow.MlflowClient()
    train = client.search_runs(["0"], f"tags.`{tags.STEP}` = 'train'")[0]
    model_id = train.data.tags[tags.MODEL_URI].removeprefix("models:/")
    shutil.rmtree(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    second = mlflow_run(*DIGITS)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "main: download_data reused from run" in second.stderr
    why = _why(second.stderr, "train")
    assert why == (f"main: train runs: run {train.info.run_id} had the same inputs but its "
                   f"outputs are missing: models:/{model_id} has no MLmodel file")
    assert "reused: download_data\n" in second.stderr
    _champion_loads()
