"""Registry operations through real ``mlflow.run`` steps on a real sqlite store: the
challenger report, a forced rollback, the alias history, and the refusals around force."""

from __future__ import annotations

import csv
import io

import mlflow
import pytest

from helpers.processes import assert_clean_failure, run_entry, run_step
from helpers.store import temporary_store
from steps.tracking.registry.promotion import alias_history
from steps.tracking.runtime import tags

pytestmark = pytest.mark.slow

NAME = "mnist-classifier"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """v1 (2 epochs) holds champion; v2 (a weaker model on the same data) was compared with
    it and lost."""
    with temporary_store(tmp_path_factory.mktemp("store")) as uri:
        data = run_entry("download_data", dataset="digits").data.tags[tags.DATA_URI]
        runs = []
        for params in ({"epochs": 2, "batch_size": 32}, {"epochs": 1, "learning_rate": 1e-4}):
            model_uri = run_entry("train", data=data, **params).data.tags[tags.MODEL_URI]
            evaluation = run_entry("evaluate", model_uri=model_uri)
            runs.append((evaluation, run_entry("register", model_uri=model_uri)))
        yield uri, runs


def test_evaluate_logs_one_prediction_per_test_image(two_versions):
    evaluation = two_versions[1][0][0]
    text = mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/predictions.csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["index", "label", "predicted", "confidence"]
    correct = sum(r["label"] == r["predicted"] for r in rows)
    assert correct / len(rows) == pytest.approx(evaluation.data.metrics["test_accuracy"])


def test_a_compared_challenger_gets_a_report(two_versions):
    _, runs = two_versions
    (holder_eval, _), (challenger_eval, register) = runs
    assert "champion stays on v1" in register.data.tags[tags.ALIAS_DECISION]
    # The default rule: a version that does not beat the holder is registered, rejected.
    v2 = mlflow.MlflowClient().get_model_version(NAME, "2").tags
    assert v2["validation_status"] == "rejected" and "not better" in v2["validation_reason"]
    client = mlflow.MlflowClient()
    files = {f.path for f in client.list_artifacts(register.info.run_id, "challenger")}
    assert files == {"challenger/per_class_accuracy.csv", "challenger/per_class_accuracy.png",
                     "challenger/disagreements.png", "challenger/calibration_and_roc.png"}
    text = mlflow.artifacts.load_text(
        f"runs:/{register.info.run_id}/challenger/per_class_accuracy.csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 10
    support = sum(int(r["support"]) for r in rows)
    for column, evaluation in (("holder_accuracy", holder_eval),
                               ("challenger_accuracy", challenger_eval)):
        overall = sum(float(r[column]) * int(r["support"]) for r in rows) / support
        assert overall == pytest.approx(evaluation.data.metrics["test_accuracy"], abs=1e-3)
    # The first registration had no holder to compare with: no report.
    assert client.list_artifacts(runs[0][1].info.run_id, "challenger") == []


def test_a_forced_rollback_moves_the_alias_and_is_in_the_history(two_versions):
    uri, runs = two_versions
    run = run_entry("register", model_uri=f"models:/{NAME}/2", force="true")
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    decision = run.data.tags[tags.ALIAS_DECISION]
    assert "champion -> v2" in decision and "forced" in decision and "demoted v1" in decision
    assert "demoted" in client.get_model_version(NAME, "1").tags
    history = alias_history(client, NAME)
    assert [(m["from_version"], m["to_version"], m["forced"]) for m in history][-2:] == [
        (None, 1, False), (1, 2, True)]
    assert history[-1]["register_run_id"] == run.info.run_id
    # An ordinary register of the demoted v1 leaves the alias where the rollback put it.
    again = run_entry("register", model_uri=runs[0][0].data.tags[tags.MODEL_URI])
    assert "demoted by a forced move" in again.data.tags[tags.ALIAS_DECISION]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    # Promoting v1 back, by alias-free name/version, undoes it.
    run_entry("register", model_uri=f"models:/{NAME}/1", force="true")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert "demoted" not in client.get_model_version(NAME, "1").tags


@pytest.mark.parametrize(("args", "words"), [
    (["--force", "true"], ["force=true needs model_uri"]),
    (["--force", "true", "--model-uri", f"models:/{NAME}/9"], ["has no such version"]),
    (["--force", "maybe"], ["force"]),
    (["--min-delta", "-0.1"], ["invalid value for min_delta"]),
    (["--min-score", "high"], ["invalid value for min_score", "not a number"]),
    (["--min-score", "nan"], ["invalid value for min_score", "not a finite number"]),
])
def test_register_refusals_are_one_line(two_versions, args, words):
    uri, _ = two_versions
    before = alias_history(mlflow.MlflowClient(), NAME)
    assert_clean_failure(run_step("register", *args), *words)
    assert alias_history(mlflow.MlflowClient(), NAME) == before
