"""The alias decision against a real sqlite registry, without training anything: versions are
created directly with the tags ``register`` writes, and races are simulated."""

from __future__ import annotations

import json
import threading

import mlflow
import pytest

from steps.tracking import registry as registry_module
from steps.tracking.cli import StepError
from steps.tracking.registry import (
    Candidate,
    alias_history,
    best_of,
    candidates,
    force_alias,
    record_move,
    settle_alias,
)

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
    # Every write is in the history, and the newest entry is where the alias is.
    history = alias_history(client, NAME)
    assert history and history[-1]["to_version"] == 2
    assert [m["time"] for m in history] == sorted(m["time"] for m in history)


def test_a_forced_rollback_sticks_until_a_better_new_version(registry):
    client, add = registry
    v1, v2 = add(0.90), add(0.95)
    settle_alias(client, NAME, "champion", "test_accuracy", v2, run_id="r-first")
    decision = force_alias(client, NAME, "champion", "test_accuracy", v1, run_id="r-rollback")
    assert holder(client) == 1
    assert "forced" in decision and "was v2 (0.9500)" in decision and "demoted v2" in decision
    assert "demoted" in client.get_model_version(NAME, "2").tags
    # The next ordinary registration does not hand the alias back to the demoted v2 ...
    v3 = add(0.92)
    assert "champion -> v3" in settle_alias(client, NAME, "champion", "test_accuracy", v3)
    # ... and re-registering v2 itself says why it cannot take the alias.
    decision = settle_alias(client, NAME, "champion", "test_accuracy", v2)
    assert holder(client) == 3 and "demoted by a forced move" in decision
    # A forced promotion brings it back and clears its tag.
    force_alias(client, NAME, "champion", "test_accuracy", v2, run_id="r-promote")
    assert holder(client) == 2 and "demoted" not in client.get_model_version(NAME, "2").tags
    moves = [(m["from_version"], m["to_version"], m["forced"], m["register_run_id"])
             for m in alias_history(client, NAME)]
    assert moves == [(None, 2, False, "r-first"), (2, 1, True, "r-rollback"),
                     (1, 3, False, ""), (3, 2, True, "r-promote")]
    rollback = alias_history(client, NAME)[1]
    assert rollback["from_score"] == 0.95 and rollback["to_score"] == 0.90
    assert rollback["metric"] == "test_accuracy" and rollback["alias"] == "champion"


def test_force_refuses_a_version_whose_model_is_gone(registry, tmp_path):
    client, add = registry
    v1 = add(0.90)
    gone = Candidate(v1.version, v1.score, v1.digest, "runs:/0123456789abcdef/model")
    with pytest.raises(StepError, match="cannot force champion onto"):
        force_alias(client, NAME, "champion", "test_accuracy", gone)
    assert client.get_registered_model(NAME).aliases == {}


def test_the_history_keeps_the_newest_hundred(registry, monkeypatch):
    client, add = registry
    old = [{"to_version": 1, "time": f"2020-01-01T00:00:{k // 10:02d}.{k % 10:03d}+00:00"}
           for k in range(registry_module.HISTORY_LIMIT)]
    client.set_registered_model_tag(NAME, "alias_history", json.dumps(old))
    v1 = add(0.9)
    move = record_move(client, NAME, "champion", "test_accuracy", None, v1, False, "r")
    history = alias_history(client, NAME)
    assert len(history) == registry_module.HISTORY_LIMIT
    assert history[-1] == move and history[0] == old[1]


def test_concurrent_history_writers_lose_no_move(registry):
    client, add = registry
    target = add(0.9)
    errors = []

    def write(k: int) -> None:
        try:
            record_move(mlflow.MlflowClient(), NAME, "champion", "test_accuracy", None, target,
                        False, f"run-{k}")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(m["register_run_id"] for m in alias_history(client, NAME)) == [
        f"run-{k}" for k in range(8)]
