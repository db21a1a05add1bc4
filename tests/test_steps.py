"""Each entry point through the real ``mlflow.run`` against a real sqlite store.

The chain itself is under test: module-scoped fixtures run download -> train -> evaluate ->
register once each, and every test asks for the stage it needs, so each passes alone and
in any order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers.data import write_idx_folder
from helpers.processes import run_entry, run_step
from helpers.store import temporary_store
from steps.tracking.runtime import tags

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    with temporary_store(root) as uri:
        yield {"root": root, "uri": uri}


@pytest.fixture(scope="module")
def data_run(store):
    return run_entry("download_data", dataset="digits")


@pytest.fixture(scope="module")
def train_run(data_run):
    return run_entry("train", data=data_run.data.tags[tags.DATA_URI], epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def eval_run(train_run):
    """evaluate with no params, while no champion exists: the newest model and its data."""
    return run_entry("evaluate")


@pytest.fixture(scope="module")
def registered(eval_run, train_run):
    run = run_entry("register", model_uri=train_run.data.tags[tags.MODEL_URI])
    version = mlflow.MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    return run, version


def test_evaluate_before_any_run_fails_clearly(tracking_uri):
    result = run_step("evaluate")
    assert result.returncode == 1
    assert "error: model_uri is empty" in result.stderr and "Traceback" not in result.stderr


def test_download_data_digits(data_run):
    run = data_run
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["pipeline.step"] == "download_data"
    assert tags["pipeline.data_uri"] == f"runs:/{run.info.run_id}/data"
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "data")}
    assert files == {"data/dataset.npz", "data/manifest.json"}
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"train", "test"}
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"digits-train", "digits-test"}
    assert run.data.metrics["train_size"] + run.data.metrics["test_size"] == 1797


def test_download_data_from_a_folder(store, tmp_path):
    folder = write_idx_folder(tmp_path / "idx", n_train=60, n_test=20, layout="torchvision")
    run = run_entry("download_data", dataset="mnist", data_dir=str(folder))
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_size"] == 60 and run.data.metrics["test_size"] == 20


def test_train_logs_metrics_and_a_pt2_model(train_run):
    run = train_run
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    for metric in ("train_loss", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1, 2], metric
    assert run.data.metrics["best_val_accuracy"] > 0.8
    for param in ("epochs", "learning_rate", "batch_size", "optimizer", "arch", "seed",
                  "val_fraction", "device", "data"):
        assert param in run.data.params
    assert "training_curves.png" in {f.path for f in client.list_artifacts(run.info.run_id)}
    # The network: mlflow.pytorch.log_model, pt2, TensorSpec signature.
    network = mlflow.models.get_model_info(run.data.tags["pipeline.network_uri"])
    assert network.name == "model"
    assert network.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 28, 28)
    assert network.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)
    assert network.flavors["pytorch"]["model_data"] == "data"
    # The classifier around it is what the pipeline passes on.
    model_uri = run.data.tags["pipeline.model_uri"]
    classifier = mlflow.models.get_model_info(model_uri)
    assert classifier.name == "classifier" and "python_function" in classifier.flavors


def test_logged_model_loads_without_pickle(train_run, monkeypatch):
    network_uri = train_run.data.tags[tags.NETWORK_URI]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    local = Path(mlflow.artifacts.download_artifacts(network_uri))
    assert list(local.rglob("model.pt2")), "not saved in the pt2 format"
    network = mlflow.pytorch.load_model(network_uri)
    probs = network(torch.zeros(3, 28, 28)).detach().numpy()
    assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    classifier = mlflow.pyfunc.load_model(train_run.data.tags[tags.MODEL_URI])
    assert classifier.predict(np.zeros((3, 28, 28), np.uint8))["label"].shape == (3,)


def test_classifier_is_the_same_network_rebuilt_from_its_weights(train_run):
    """The served model carries weights and model.py, not the pt2 program, and answers
    exactly like the pt2 network."""
    model_uri = train_run.data.tags[tags.MODEL_URI]
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    assert (local / "code" / "model.py").is_file()
    assert not list(local.rglob("*.pt2"))
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.float32)
    served = mlflow.pyfunc.load_model(model_uri).predict(images)
    network = mlflow.pytorch.load_model(train_run.data.tags[tags.NETWORK_URI])
    expected = network(torch.from_numpy(images)).detach().numpy()
    np.testing.assert_allclose(np.stack(served["probabilities"]), expected, atol=1e-6)


def test_classifier_loads_without_torch_dynamo(store, train_run):
    """Loading a pt2 archive imports torch._dynamo (~2 s); evaluate and serving must not."""
    code = ("import sys, mlflow, numpy as np; "
            f"m = mlflow.pyfunc.load_model({train_run.data.tags[tags.MODEL_URI]!r}); "
            "m.predict(np.zeros((2, 28, 28))); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"]})
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


def test_a_step_starts_without_pyspark_and_mlflow_works_without_it(tracking_uri):
    """``import mlflow`` imports pyspark whenever it is installed; the steps that run no
    Spark job start without it (0.6 s of CPU each). ``score``, which runs Spark, keeps it:
    its tests go through Spark."""
    done = run_step("download_data", "--dataset", "digits", PYTHONPROFILEIMPORTTIME="1")
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "mlflow" in imported and "sklearn.datasets" in imported
    # MLflow's attempts (`import pyspark`) are listed too, failed; what pyspark itself
    # imports is not.
    assert not {name for name in imported if name.split(".")[0] == "py4j"
                or name in ("pyspark.context", "pyspark.sql.types")}
    run = mlflow.MlflowClient().search_runs(["0"])[0]
    assert run.info.status == "FINISHED" and run.data.tags[tags.STEP] == "download_data"


def test_evaluate_with_no_params_uses_the_newest_model_and_its_data(eval_run, train_run,
                                                                    data_run):
    run = eval_run
    assert run.info.status == "FINISHED"
    assert run.data.tags[tags.MODEL_URI] == train_run.data.tags[tags.MODEL_URI]
    assert run.data.tags[tags.DATA_URI] == data_run.data.tags[tags.DATA_URI]
    metrics = run.data.metrics
    assert 0.8 < metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    for k in range(10):
        for name in ("precision", "recall", "f1", "roc_auc", "pr_auc"):
            assert f"test_{name}_class_{k}" in metrics
    assert metrics["test_accuracy_ci_low"] < metrics["test_accuracy"] < metrics[
        "test_accuracy_ci_high"]
    assert metrics["test_accuracy"] <= metrics["test_top2_accuracy"] <= 1
    assert 0 <= metrics["test_ece"] < 1 and 0 <= metrics["test_brier"] < 2
    assert 0.5 < metrics["test_macro_roc_auc"] <= 1 and 0 < metrics["test_macro_pr_auc"] <= 1
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix_normalized.png", "misclassified.png",
            "roc_curves.png", "pr_curves.png", "reliability_diagram.png",
            "per_class_metrics.csv", "probabilities.npy"} <= artifacts
    csv_text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/per_class_metrics.csv")
    assert csv_text.splitlines()[0] == "class,name,precision,recall,f1,roc_auc,pr_auc,support"
    probabilities = np.load(mlflow.artifacts.download_artifacts(
        f"runs:/{run.info.run_id}/probabilities.npy"))
    assert probabilities.shape == (359, 10)  # the digits test split, every class
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)


def test_register_creates_a_tagged_version_and_the_alias(registered, train_run, eval_run):
    run, version = registered
    assert run.info.status == "FINISHED"
    assert str(version.version) == "1"
    assert version.tags["model_uri"] == train_run.data.tags[tags.MODEL_URI]
    assert version.tags["evaluate_run_id"] == eval_run.info.run_id
    assert version.tags["train_run_id"] == train_run.info.run_id
    assert float(version.tags["test_accuracy"]) == pytest.approx(
        eval_run.data.metrics["test_accuracy"], abs=1e-6)
    assert version.tags["data_digest"] == eval_run.data.tags[tags.DATA_DIGEST]
    assert float(version.tags["test_accuracy_ci_low"]) < float(version.tags["test_accuracy"])
    assert version.tags["validation_status"] == "passed"
    assert version.tags["validation_reason"].endswith("no holder to beat")
    assert "champion -> v1" in run.data.tags[tags.ALIAS_DECISION]


def test_registering_the_same_model_twice_adds_no_version(registered, train_run):
    model_uri = train_run.data.tags[tags.MODEL_URI]
    run = run_entry("register", model_uri=model_uri)
    assert run.data.tags[tags.REGISTERED_VERSION] == str(registered[1].version)
    versions = mlflow.MlflowClient().search_model_versions("name = 'mnist-classifier'")
    assert [v.tags["model_uri"] for v in versions].count(model_uri) == 1


def test_a_worse_model_does_not_take_the_alias(registered, data_run):
    champion = registered[1].version
    weak = run_entry("train", data=data_run.data.tags[tags.DATA_URI], epochs=1,
                     learning_rate=1e-5)
    run_entry("evaluate", model_uri=weak.data.tags[tags.MODEL_URI])
    run = run_entry("register", model_uri=weak.data.tags[tags.MODEL_URI], min_delta=0.001,
                    min_score=0.5)
    new = run.data.tags[tags.REGISTERED_VERSION]
    assert new != str(champion)
    decision = run.data.tags[tags.ALIAS_DECISION]
    assert decision.startswith(f"champion stays on v{champion}")
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias("mnist-classifier", "champion").version == champion
    # Registered all the same, with the rule's verdict and its numbers.
    version = client.get_model_version("mnist-classifier", new)
    assert version.tags["validation_status"] == "rejected"
    assert version.tags["validation_reason"] in decision
    assert "< min_delta 0.001" in decision or "< min_score 0.5" in decision
    assert run.data.params["min_delta"] == "0.001" and run.data.params["min_score"] == "0.5"


def test_evaluate_alone_prefers_the_champion(registered):
    run = run_entry("evaluate")
    assert run.data.tags[tags.MODEL_URI] == registered[1].tags["model_uri"]


def test_no_run_is_left_running(registered):
    runs = mlflow.MlflowClient().search_runs(["0"], max_results=1000)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
