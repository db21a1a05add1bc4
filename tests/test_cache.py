"""The step cache: what goes into a step's key, when an earlier run is reused, and why a step
runs again. Decisions are taken by the real ``StepCache`` against a real sqlite store and
checked field by field; their wording is checked once, in
``test_every_decision_reads_as_one_line``. The slow tests wipe real artifacts under real
``mlflow run`` pipelines and read each step's decision from its run."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from helpers.processes import copy_project, mlflow_run
from steps.tracking.pipeline import cache, inputs
from steps.tracking.pipeline.cache import Decision, StepCache, decision_of
from steps.tracking.pipeline.inputs import Change, StepInputs, code_files
from steps.tracking.runtime import tags

TRAIN_PARAMS = {"data": "runs:/aaaa/data", "epochs": 1, "learning_rate": 0.001,
                "batch_size": 64, "optimizer": "adam", "arch": "mlp", "hidden": "",
                "seed": 42}
UPSTREAM = {"download_data": "aaaa"}


@pytest.fixture
def project(tmp_path) -> Path:
    return copy_project(tmp_path / "project")


@pytest.fixture
def step_cache(tracking_uri):
    return StepCache(mlflow.MlflowClient(), "0")


def record(step_cache, step_inputs: StepInputs, **extra_tags: str):
    """A FINISHED run of the step as ``main`` leaves it: key and inputs as tags."""
    run = step_cache.client.create_run("0", tags={
        tags.STEP: step_inputs.entry_point, tags.CACHE_KEY: step_inputs.key(),
        tags.CACHE_INPUTS: step_inputs.to_json(), **extra_tags})
    step_cache.client.set_terminated(run.info.run_id, "FINISHED")
    return run


def decide(step_cache, step_inputs: StepInputs) -> Decision:
    return step_cache.decide(step_inputs)[0]


def test_train_key_covers_what_train_runs_and_ships_and_nothing_else():
    files = code_files("train")
    for path in ("steps/train.py", "steps/tracking/training/fit.py",
                 "steps/tracking/inference/models.py", "steps/core/training.py",
                 "steps/core/model.py", "steps/core/data.py",
                 # shipped inside every classifier, never imported
                 "steps/tracking/inference/classifier.py",
                 "steps/__init__.py", "steps/core/__init__.py",
                 "steps/tracking/__init__.py", "steps/tracking/training/__init__.py",
                 "MLproject", "conda.yaml", "requirements.txt"):
        assert path in files, path
    for path in ("steps/evaluate.py", "steps/main.py", "steps/tracking/pipeline/cache.py",
                 "steps/tracking/registry/promotion.py", "steps/core/metrics.py"):
        assert path not in files, path
    assert "steps/tracking/registry/promotion.py" in code_files("register")
    assert "steps/core/metrics.py" in code_files("evaluate")


@pytest.mark.parametrize("path", [
    "steps/train.py", "steps/tracking/training/fit.py", "steps/core/training.py",
    "steps/tracking/inference/classifier.py", "steps/core/model.py", "MLproject",
    "requirements.txt", "conda.yaml",
])
def test_editing_an_input_file_reruns_the_step_and_names_the_file(step_cache, project, path):
    before = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    earlier = record(step_cache, before)
    assert decide(step_cache, before) == Decision("train", cache.REUSE, earlier.info.run_id)
    (project / path).write_text((project / path).read_text() + "\n# edited\n")
    after = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    original = before.files[path]
    assert decide(step_cache, after) == Decision(
        "train", cache.RUN, earlier.info.run_id, cache.INPUTS_CHANGED,
        (Change(inputs.FILES, ((path, original, after.files[path]),)),))


def test_editing_a_file_the_step_does_not_run_keeps_the_cache(step_cache, project):
    before = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    earlier = record(step_cache, before)
    (project / "steps" / "evaluate.py").write_text("# edited\n")
    after = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    assert decide(step_cache, after) == Decision("train", cache.REUSE, earlier.info.run_id)


def test_an_upgraded_package_reruns_the_step(step_cache, project, monkeypatch):
    before = StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM, root=project)
    earlier = record(step_cache, before)
    upgraded = {**before.packages, "torch": "9.9.9"}
    monkeypatch.setattr(inputs, "pinned_package_versions", lambda root: upgraded)
    decision = decide(step_cache, StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM,
                                                     root=project))
    assert (decision.action, decision.run_id, decision.reason) == (
        cache.RUN, earlier.info.run_id, cache.INPUTS_CHANGED)
    assert decision.changes == (
        Change(inputs.PACKAGES, (("torch", before.packages["torch"], "9.9.9"),)),)


def test_params_and_upstream_changes_are_said_once_each(step_cache, project):
    earlier = record(step_cache, StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM,
                                                    root=project))
    params = {**TRAIN_PARAMS, "epochs": 3, "data": "runs:/bbbb/data"}
    decision = decide(step_cache, StepInputs.collect("train", params,
                                                     {"download_data": "bbbb"}, root=project))
    assert (decision.action, decision.run_id) == (cache.RUN, earlier.info.run_id)
    # The data URI moved with its upstream run: said once, as the upstream.
    assert decision.changes == (Change(inputs.PARAMS, (("epochs", "1", "3"),)),
                                Change(inputs.UPSTREAM, (("download_data", "aaaa", "bbbb"),)))


def test_changed_files_in_data_dir_rerun_download(step_cache, project, tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(b"one")
    params = {"dataset": "mnist", "data_dir": str(folder)}
    earlier = record(step_cache, StepInputs.collect("download_data", params,
                                                    data_dir=str(folder), root=project))
    (folder / "train-images-idx3-ubyte").write_bytes(b"other")
    decision = decide(step_cache, StepInputs.collect("download_data", params,
                                                     data_dir=str(folder), root=project))
    assert (decision.action, decision.run_id) == (cache.RUN, earlier.info.run_id)
    assert [c.kind for c in decision.changes] == [inputs.DATA_FILES]


def test_a_run_whose_outputs_are_gone_is_not_reused(step_cache, project, tmp_path):
    step_inputs = StepInputs.collect("download_data", {"dataset": "digits", "data_dir": ""},
                                     root=project)
    run_id = record(step_cache, step_inputs).info.run_id
    artifact = tmp_path / "dataset.npz"
    np.savez(artifact, x=np.zeros(3))
    step_cache.client.log_artifact(run_id, str(artifact), "data")
    step_cache.client.set_tag(run_id, tags.DATA_URI, f"runs:/{run_id}/data")
    assert decide(step_cache, step_inputs).action == cache.REUSE
    local = mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")
    shutil.rmtree(Path(local) / "data")
    assert decide(step_cache, step_inputs) == Decision(
        "download_data", cache.RUN, run_id, cache.OUTPUTS_MISSING,
        missing=(f"runs:/{run_id}/data has no files",))


def test_first_run_of_a_step_says_so(step_cache, project):
    assert decide(step_cache, StepInputs.collect("train", TRAIN_PARAMS, UPSTREAM,
                                                 root=project)) == Decision(
        "train", cache.RUN, reason=cache.NO_EARLIER_RUN)


def test_every_decision_reads_as_one_line():
    """The wording, once for each kind of decision and change; every other test checks
    the fields."""
    files = Change(inputs.FILES, (("steps/train.py", "a", "b"), ("MLproject", "c", "")))
    params = Change(inputs.PARAMS, (("epochs", "1", "3"), ("seed", "", "7")))
    upstream = Change(inputs.UPSTREAM, (("download_data", "aaaa", "bbbb"),))
    packages = Change(inputs.PACKAGES, (("torch", "2.14.1", "9.9.9"),))
    data = Change(inputs.DATA_FILES, (("data_dir", "x", "y"),))
    lines = {
        Decision("train", cache.REUSE, "r1"):
            "main: train reused from run r1 (same params, code, packages and inputs)",
        Decision("train", cache.RESUME, "r1", epoch=4, epochs=30, was="KILLED",
                 because="interrupted (SIGINT)"):
            "main: train resumes run r1 at epoch 4 of 30 (it was KILLED: interrupted (SIGINT))",
        Decision("train", cache.RESUME, "r1", epoch=2, epochs=3, was="FAILED"):
            "main: train resumes run r1 at epoch 2 of 3 (it was FAILED)",
        Decision("train", cache.RUN, reason=cache.NO_CACHE): "main: train runs: use_cache=false",
        Decision("train", cache.RUN, reason=cache.NO_EARLIER_RUN):
            "main: train runs: no earlier finished train run in this experiment",
        Decision("evaluate", cache.RUN, "r1", cache.OUTPUTS_MISSING,
                 missing=("models:/m-1 has no MLmodel file", "x has no files")):
            "main: evaluate runs: run r1 had the same inputs but its outputs are missing: "
            "models:/m-1 has no MLmodel file; x has no files",
        Decision("train", cache.RUN, "r1", cache.INPUTS_CHANGED,
                 (files, params, upstream, packages, data)):
            "main: train runs: since run r1, changed files: steps/train.py, MLproject; "
            "params: epochs 1 -> 3, seed (unset) -> 7; upstream: download_data run aaaa -> "
            "bbbb; packages: torch 2.14.1 -> 9.9.9; the files in data_dir changed",
        Decision("train", cache.RUN, "r1", cache.INPUTS_CHANGED):
            "main: train runs: since run r1, nothing recorded differs",
    }
    for decision, line in lines.items():
        assert decision.line() == line
        assert Decision.from_json(decision.to_json()) == decision  # as runs keep it


# --------------------------------------------------------------------------- end to end

DIGITS = ("-P", "dataset=digits", "-P", "epochs=1")


def decisions() -> dict[str, Decision]:
    """Each step's decision in the newest pipeline, as its run (or reused pointer) keeps it."""
    client = mlflow.MlflowClient()
    main = client.search_runs(["0"], f"tags.`{tags.STEP}` = 'main'",
                              order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs(
        ["0"], f"tags.`mlflow.parentRunId` = '{main.info.run_id}'")
    found = {d.step: d for d in map(decision_of, children) if d is not None}
    assert set(found) == {"download_data", "train", "evaluate", "register"}, found
    return found


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
    made = decisions()
    assert all(d.action == cache.RUN for d in made.values()), made
    # The data's files are gone; every later step runs because the step before it ran anew.
    assert made["download_data"].reason == cache.OUTPUTS_MISSING
    for step in ("train", "evaluate", "register"):
        assert made[step].reason == cache.INPUTS_CHANGED
        assert inputs.UPSTREAM in [c.kind for c in made[step].changes], made[step]
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
    made = decisions()
    assert made["download_data"].action == cache.REUSE
    assert made["train"] == Decision("train", cache.RUN, train.info.run_id,
                                     cache.OUTPUTS_MISSING,
                                     missing=(f"models:/{model_id} has no MLmodel file",))
    assert [made[s].action for s in ("evaluate", "register")] == [cache.RUN, cache.RUN]
    assert made["train"].line() in second.stderr  # what main said is what its run keeps
    assert "reused: download_data\n" in second.stderr
    _champion_loads()


@pytest.mark.slow
def test_steps_run_alone_are_reused_by_main_unless_main_could_not_have_run_them(tracking_uri):
    client = mlflow.MlflowClient()
    for step, extra in (("download_data", ()), ("train", ("-P", "val_fraction=0.3")),
                        ("train", ())):
        alone = mlflow_run("-e", step, *DIGITS[:2] if step == "download_data" else DIGITS[2:],
                           *extra)
        assert alone.returncode == 0, alone.stderr[-3000:]
    data_run, *trains = (run for step in ("download_data", "train") for run in client.search_runs(
        ["0"], f"tags.`pipeline.step` = '{step}'", order_by=["attributes.start_time ASC"]))
    assert [tags.CACHE_KEY in r.data.tags for r in (data_run, *trains)] == [True, False, True]
    pipeline = mlflow_run(*DIGITS)
    assert pipeline.returncode == 0, pipeline.stderr[-3000:]
    made = decisions()
    assert made["download_data"] == Decision("download_data", cache.REUSE, data_run.info.run_id)
    # The train run with its own val_fraction trained another model: not main's to reuse.
    assert made["train"] == Decision("train", cache.REUSE, trains[1].info.run_id)
    assert [made[s].action for s in ("evaluate", "register")] == [cache.RUN, cache.RUN]
