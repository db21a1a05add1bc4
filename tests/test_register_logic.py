"""The alias decision against a real sqlite registry, without training anything: versions are
created directly with the tags ``register`` writes, and races are simulated."""

from __future__ import annotations

import threading

import mlflow
import pytest

from steps.registry import Candidate, best_of, candidates, settle_alias

NAME = "mnist-classifier"


@pytest.fixture
def registry(tracking_uri, tmp_path):
    client = mlflow.MlflowClient()
    client.create_registered_model(NAME)
    source = tmp_path / "model"
    source.mkdir()

    def add(accuracy: float, digest: str = "d1") -> Candidate:
        version = client.create_model_version(
            NAME, source=str(source),
            tags={"test_accuracy": str(accuracy), "test_loss": str(1 - accuracy),
                  "data_digest": digest})
        return Candidate(int(version.version), accuracy, digest)

    return client, add


def holder(client) -> int:
    return int(client.get_model_version_by_alias(NAME, "champion").version)


def test_best_of_prefers_higher_accuracy_lower_loss_and_older_ties():
    pool = [Candidate(1, 0.9, "d"), Candidate(2, 0.95, "d"), Candidate(3, 0.95, "d")]
    assert best_of(pool, "test_accuracy").version == 2
    assert best_of([Candidate(1, 0.3, "d"), Candidate(2, 0.2, "d")], "test_loss").version == 2


def test_first_version_takes_the_alias(registry):
    client, add = registry
    v1 = add(0.90)
    assert "champion -> v1" in settle_alias(client, NAME, "champion", "test_accuracy", v1)
    assert holder(client) == 1


def test_better_moves_worse_stays_other_data_is_not_compared(registry):
    client, add = registry
    settle_alias(client, NAME, "champion", "test_accuracy", add(0.90))
    worse = add(0.80)
    assert "stays on v1" in settle_alias(client, NAME, "champion", "test_accuracy", worse)
    better = add(0.95)
    assert "champion -> v3" in settle_alias(client, NAME, "champion", "test_accuracy", better)
    other_data = add(0.99, digest="d2")
    decision = settle_alias(client, NAME, "champion", "test_accuracy", other_data)
    assert "other data" in decision and holder(client) == 3


def test_a_lost_race_is_repaired(registry):
    client, add = registry
    good, bad = add(0.95), add(0.80)
    # The worse pipeline's write landed last, as MLflow's last-writer-wins allows.
    client.set_registered_model_alias(NAME, "champion", str(bad.version))
    settle_alias(client, NAME, "champion", "test_accuracy", good)
    assert holder(client) == good.version


def test_concurrent_registrations_end_on_the_best(registry):
    client, add = registry
    versions = [add(acc) for acc in (0.91, 0.97, 0.93, 0.95)]
    errors = []

    def register(candidate):
        try:
            settle_alias(mlflow.MlflowClient(), NAME, "champion", "test_accuracy", candidate)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert holder(client) == 2
    assert set(candidates(client, NAME, "test_accuracy")) == {1, 2, 3, 4}
