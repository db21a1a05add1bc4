"""The alias decision against a real sqlite registry, without training anything: versions are
created directly with the tags ``register`` writes, and races are simulated. The promotion
rule (min_delta, min_score) judges each version as ``register`` does: against the holder
at registration, its verdict written with the version."""

from __future__ import annotations

import threading

import mlflow
import pytest

from helpers.docs import documented_python
from steps.tracking.registry import promotion
from steps.tracking.registry.promotion import (
    ALREADY,
    COMPARED,
    KEPT_BETTER,
    KEPT_DEMOTED,
    KEPT_OTHER_DATA,
    KEPT_REJECTED,
    MOVED,
    NOT_SET,
    AliasDecision,
    PromotionRule,
    Verdict,
    alias_history,
    force_alias,
    record_move,
    settle_alias,
)
from steps.tracking.registry.versions import (
    PASSED,
    REJECTED,
    Candidate,
    candidates,
    holder_to_beat,
    rank,
)
from steps.tracking.runtime.cli import StepError

NAME = "mnist-classifier"
RULE = PromotionRule("test_accuracy")  # today's default: beat the holder by anything


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

    def judged(score: float, rule: PromotionRule, digest: str = "d1") -> Candidate:
        """What ``register`` does: judge against the holder as it is now, and create the
        version with the verdict in its tags."""
        judged = rule.judge(Candidate(0, score, digest),
                            holder_to_beat(client, NAME, "champion", rule.metric))
        version = client.create_model_version(NAME, source=str(source), tags={
            rule.metric: str(score), "data_digest": digest,
            "validation_status": judged.status, "validation_reason": judged.reason()})
        return Candidate(int(version.version), score, digest, str(source))

    add.judged = judged
    return client, add


def holder(client) -> int:
    return int(client.get_model_version_by_alias(NAME, "champion").version)


def test_the_best_version_has_higher_accuracy_lower_loss_and_is_older_on_ties():
    def best(pool: list[Candidate], metric: str) -> int:
        return max(pool, key=lambda c: rank(c, metric)).version

    pool = [Candidate(1, 0.9, "d"), Candidate(2, 0.95, "d"), Candidate(3, 0.95, "d")]
    assert best(pool, "test_accuracy") == 2
    assert best([Candidate(1, 0.3, "d"), Candidate(2, 0.2, "d")], "test_loss") == 2


def moved(decision: AliasDecision, version: int) -> bool:
    return decision.kind == MOVED and decision.version == version


def test_first_version_takes_the_alias(registry):
    client, add = registry
    v1 = add(0.90)
    decision = settle_alias(client, NAME, "champion", RULE, v1)
    assert moved(decision, 1) and decision.before is None
    assert holder(client) == 1


def test_better_moves_worse_stays_other_data_is_not_compared(registry):
    client, add = registry
    settle_alias(client, NAME, "champion", RULE, add(0.90))
    worse = add(0.80)
    kept = settle_alias(client, NAME, "champion", RULE, worse)
    assert (kept.kind, kept.version, kept.new.version) == (KEPT_BETTER, 1, 2)
    better = add(0.95)
    decision = settle_alias(client, NAME, "champion", RULE, better)
    assert moved(decision, 3) and decision.before.version == 1
    other_data = add(0.99, digest="d2")
    decision = settle_alias(client, NAME, "champion", RULE, other_data)
    assert (decision.kind, decision.version) == (KEPT_OTHER_DATA, 3) and holder(client) == 3


def test_a_lost_race_is_repaired(registry):
    client, add = registry
    good, bad = add(0.95), add(0.80)
    # The worse pipeline's write landed last, as MLflow's last-writer-wins allows.
    client.set_registered_model_alias(NAME, "champion", str(bad.version))
    decision = settle_alias(client, NAME, "champion", RULE, good)
    assert moved(decision, good.version) and decision.before.version == bad.version
    assert holder(client) == good.version


def test_concurrent_registrations_end_on_the_best(registry):
    client, add = registry
    versions = [add(acc) for acc in (0.91, 0.97, 0.93, 0.95)]
    errors = []

    def register(candidate):
        try:
            settle_alias(mlflow.MlflowClient(), NAME, "champion", RULE, candidate)
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
    # The first move set the alias; every move names versions that exist. (Racing writers
    # may each record a move from the same holder: the history says what each one did.)
    assert history[0]["from_version"] is None
    assert {m["to_version"] for m in history} <= {1, 2, 3, 4}
    assert len([k for k in client.get_registered_model(NAME).tags
                if k.startswith("alias_history/")]) == len(history)


def test_a_forced_rollback_sticks_until_a_better_new_version(registry):
    client, add = registry
    v1, v2 = add(0.90), add(0.95)
    settle_alias(client, NAME, "champion", RULE, v2, run_id="r-first")
    decision = force_alias(client, NAME, "champion", RULE, v1, run_id="r-rollback")
    assert holder(client) == 1
    assert moved(decision, 1) and decision.forced and decision.demoted == (2,)
    assert (decision.before.version, decision.before.score) == (2, 0.95)
    assert "demoted" in client.get_model_version(NAME, "2").tags
    # The next ordinary registration does not hand the alias back to the demoted v2 ...
    v3 = add(0.92)
    assert moved(settle_alias(client, NAME, "champion", RULE, v3), 3)
    # ... and re-registering v2 itself says why it cannot take the alias.
    decision = settle_alias(client, NAME, "champion", RULE, v2)
    assert holder(client) == 3 and decision.kind == KEPT_DEMOTED
    # A forced promotion brings it back and clears its tag.
    force_alias(client, NAME, "champion", RULE, v2, run_id="r-promote")
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
        force_alias(client, NAME, "champion", RULE, gone)
    assert client.get_registered_model(NAME).aliases == {}


def test_the_history_keeps_the_newest_moves_one_tag_each(registry, monkeypatch):
    client, add = registry
    monkeypatch.setattr(promotion, "HISTORY_LIMIT", 5)
    v1 = add(0.9)
    made = [record_move(client, NAME, "champion", RULE, None, v1, False, f"r{k}",
                        when=f"2020-01-01T00:00:{k:02d}.000000+00:00") for k in range(7)]
    assert alias_history(client, NAME) == made[2:]
    history_tags = [k for k in client.get_registered_model(NAME).tags
                    if k.startswith("alias_history/")]
    assert len(history_tags) == 5
    # Each value is one move: far under PostgreSQL's 5,000 characters for a model's tag.
    assert max(len(client.get_registered_model(NAME).tags[k]) for k in history_tags) < 1000


def test_concurrent_history_writers_lose_no_move(registry):
    client, add = registry
    target = add(0.9)
    errors = []

    def write(k: int) -> None:
        try:
            record_move(mlflow.MlflowClient(), NAME, "champion", RULE, None, target,
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


def verdict(client, version: int) -> str:
    return client.get_model_version(NAME, str(version)).tags["validation_status"]


def test_a_gain_under_min_delta_keeps_the_holder_and_says_why(registry):
    client, add = registry
    rule = PromotionRule("test_accuracy", min_delta=0.002)
    v1 = add.judged(0.9545, rule)
    assert moved(settle_alias(client, NAME, "champion", rule, v1), 1)
    v2 = add.judged(0.9551, rule)
    decision = settle_alias(client, NAME, "champion", rule, v2)
    assert (decision.kind, decision.version, decision.new.version) == (KEPT_REJECTED, 1, 2)
    assert decision.judgement == "v2 rejected: " + rule.judge(
        Candidate(2, 0.9551, "d1"), Candidate(1, 0.9545, "d1")).reason()
    assert holder(client) == 1 and verdict(client, 2) == REJECTED
    v3 = add.judged(0.9570, rule)
    decision = settle_alias(client, NAME, "champion", rule, v3, run_id="r3")
    assert moved(decision, 3) and decision.judgement.startswith("v3 passed: ")
    assert alias_history(client, NAME)[-1]["rule"] == {
        "metric": "test_accuracy", "min_delta": 0.002, "min_score": None}
    assert verdict(client, 3) == PASSED and holder(client) == 3
    # The rejected v2 never holds the alias: with v3's model gone it falls back to v1.
    client.set_model_version_tag(NAME, "3", "model_uri", "runs:/0123456789abcdef/model")
    decision = settle_alias(client, NAME, "champion", rule, v2)
    assert moved(decision, 1) and decision.before_gone


def test_a_score_under_min_score_keeps_the_holder_or_sets_none(registry):
    client, add = registry
    rule = PromotionRule("test_accuracy", min_score=0.95)
    v1 = add.judged(0.90, rule)
    decision = settle_alias(client, NAME, "champion", rule, v1)
    assert decision.kind == NOT_SET and decision.judgement.startswith("v1 rejected: ")
    assert client.get_registered_model(NAME).aliases == {}
    v2 = add.judged(0.96, rule)
    assert moved(settle_alias(client, NAME, "champion", rule, v2), 2)
    v3 = add.judged(0.94, rule)
    decision = settle_alias(client, NAME, "champion", rule, v3)
    assert (decision.kind, decision.version) == (KEPT_REJECTED, 2)
    assert holder(client) == 2


def test_the_rule_judges_by_kind_and_gain():
    rule = PromotionRule("test_accuracy", min_delta=0.002, min_score=0.9)
    holder_ = Candidate(1, 0.95, "d1")
    judged = rule.judge(Candidate(0, 0.9515, "d1"), holder_)
    assert (judged.status, judged.kind) == (REJECTED, COMPARED)
    assert judged.gain == pytest.approx(0.0015)
    assert rule.judge(Candidate(0, 0.96, "d1"), holder_).status == PASSED
    assert rule.judge(Candidate(0, 0.89, "d1"), None).kind == promotion.BELOW_MIN_SCORE
    assert rule.judge(Candidate(0, 0.99, "d2"), holder_).kind == promotion.OTHER_DATA
    assert rule.judge(Candidate(0, 0.91, "d1"), None).kind == promotion.NO_HOLDER


def test_lower_is_better_with_test_loss(registry):
    client, add = registry
    rule = PromotionRule("test_loss", min_delta=0.01, min_score=0.25)
    v1 = add.judged(0.24, rule)
    settle_alias(client, NAME, "champion", rule, v1)
    v2 = add.judged(0.235, rule)  # lower, but by less than min_delta
    assert settle_alias(client, NAME, "champion", rule, v2).kind == KEPT_REJECTED
    v3 = add.judged(0.20, rule)
    assert moved(settle_alias(client, NAME, "champion", rule, v3), 3)
    assert holder(client) == 3
    # A higher loss is worse however small min_delta is; above the ceiling is refused too.
    worse = PromotionRule("test_loss")
    judged = worse.judge(Candidate(0, 0.21, "d1"), Candidate(3, 0.20, "d1"))
    assert judged.status == REJECTED and judged.gain == pytest.approx(-0.01)
    assert worse.judge(Candidate(0, 0.19, "d1"), Candidate(3, 0.20, "d1")).status == PASSED
    judged = rule.judge(Candidate(0, 0.26, "d1"), None)
    assert (judged.status, judged.kind) == (REJECTED, promotion.BELOW_MIN_SCORE)


def test_each_verdict_and_alias_decision_reads_as_one_line():
    """The wording, checked once; every other test asserts on kinds and numbers."""
    accuracy = PromotionRule("test_accuracy", min_delta=0.002)
    loss = PromotionRule("test_loss", min_score=0.25)
    v1, v2 = Candidate(1, 0.9545, "d1"), Candidate(2, 0.9551, "d1")
    assert accuracy.judge(v2, v1).reason() == (
        "test_accuracy 0.9551 vs v1's 0.9545: +0.0006 < min_delta 0.002")
    assert accuracy.judge(Candidate(3, 0.957, "d1"), v1).reason() == (
        "test_accuracy 0.9570 vs v1's 0.9545: +0.0025 >= min_delta 0.002")
    assert loss.judge(Candidate(0, 0.26, "d1"), None).reason() == (
        "test_loss 0.2600 > min_score 0.25")
    assert loss.judge(Candidate(0, 0.24, "d1"), None).reason() == (
        "test_loss 0.2400, no holder to beat, <= min_score 0.25")
    assert PromotionRule("test_accuracy").judge(Candidate(3, 0.96, "d1"), v1).reason() == (
        "test_accuracy 0.9600 vs v1's 0.9545: +0.0055 better")
    assert PromotionRule("test_loss").judge(Candidate(0, 0.21, "d1"),
                                            Candidate(3, 0.20, "d1")).reason() == (
        "test_loss 0.2100 vs v3's 0.2000: -0.0100 not better")
    assert accuracy.judge(Candidate(0, 0.99, "d2"), v1).reason() == (
        "test_accuracy 0.9900 was scored on other data than the holder v1's (digest d2, "
        "not d1): not comparable")
    assert isinstance(accuracy.judge(v2, v1), Verdict)
    judged = "v2 rejected: why"
    lines = {
        NOT_SET: AliasDecision(NOT_SET, "champion", "test_accuracy", None, judgement=judged),
        ALREADY: AliasDecision(ALREADY, "champion", "test_accuracy", 1, 0.9545, v1, new=v1),
        MOVED: AliasDecision(MOVED, "champion", "test_accuracy", 2, 0.9551, v1, new=v2,
                             judgement="v2 passed: why"),
        "forced": AliasDecision(MOVED, "champion", "test_accuracy", 1, 0.9545, v2, new=v1,
                                forced=True, demoted=(2,)),
        KEPT_REJECTED: AliasDecision(KEPT_REJECTED, "champion", "test_accuracy", 1, 0.9545,
                                     v1, new=v2, judgement=judged),
        KEPT_DEMOTED: AliasDecision(KEPT_DEMOTED, "champion", "test_accuracy", 1, 0.9545,
                                    v1, new=v2),
        KEPT_OTHER_DATA: AliasDecision(KEPT_OTHER_DATA, "champion", "test_accuracy", 1,
                                       0.9545, v1, new=Candidate(2, 0.99, "d2")),
        KEPT_BETTER: AliasDecision(KEPT_BETTER, "champion", "test_accuracy", 2, 0.9551, v2,
                                   new=v1),
    }
    assert {kind: decision.line() for kind, decision in lines.items()} == {
        NOT_SET: "champion not set; v2 rejected: why",
        ALREADY: "champion already on v1",
        MOVED: "champion -> v2 (test_accuracy 0.9551), was v1 (0.9545); v2 passed: why",
        "forced": "champion -> v1 (test_accuracy 0.9545), was v2 (0.9551); forced "
                  "(force=true), whatever the scores and the rule; demoted v2, which scored "
                  "better on the same data",
        KEPT_REJECTED: "champion stays on v1 (0.9545); v2 rejected: why",
        KEPT_DEMOTED: "champion stays on v1: v2 was demoted by a forced move; register it "
                      "with force=true to promote it",
        KEPT_OTHER_DATA: "champion stays on v1: it was scored on other data (digest d1, new "
                         "d2); not comparable",
        KEPT_BETTER: "champion stays on v2 (0.9551); v1 scored 0.9545",
    }


def test_concurrent_registrations_end_on_the_best_passing_version(registry):
    client, add = registry
    rule = PromotionRule("test_accuracy", min_score=0.92)
    errors, made = [], []

    def register(score):
        try:
            candidate = add.judged(score, rule)
            made.append(candidate)
            settle_alias(mlflow.MlflowClient(), NAME, "champion", rule, candidate)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(s,)) for s in (0.91, 0.97, 0.93, 0.95)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    by_score = {c.score: c.version for c in made}
    assert holder(client) == by_score[0.97]
    assert verdict(client, by_score[0.97]) == PASSED
    assert verdict(client, by_score[0.91]) == REJECTED  # under min_score whatever the race
    assert all(m["to_version"] != by_score[0.91] for m in alias_history(client, NAME))


def test_forcing_the_holder_itself_demotes_nobody(registry):
    """The target's own score, read at full precision, once seemed below its 6-decimal tag:
    force=true on the champion said it had demoted the champion."""
    client, add = registry
    v1 = add(0.9)
    settle_alias(client, NAME, "champion", RULE, v1)
    unrounded = Candidate(v1.version, 0.9 - 4e-7, v1.digest, v1.model_uri)
    decision = force_alias(client, NAME, "champion", RULE, unrounded)
    assert moved(decision, 1) and decision.before.version == 1 and decision.demoted == ()
    assert "demoted" not in client.get_model_version(NAME, "1").tags
    assert holder(client) == 1


def test_the_documented_history_reader_prints_every_move_oldest_first(registry, capsys):
    client, add = registry
    v1 = add(0.90)
    settle_alias(client, NAME, "champion", RULE, v1, run_id="r1")
    v2 = add(0.95)
    settle_alias(client, NAME, "champion", RULE, v2, run_id="r2")
    force_alias(client, NAME, "champion", RULE, v1, run_id="r3")
    exec(documented_python("parameters.md", "Every move of an alias"), {})
    printed = [line.split()[1:] for line in capsys.readouterr().out.splitlines()]
    assert printed == [["vNone", "->", "v1", "r1"], ["v1", "->", "v2", "r2"],
                       ["v2", "->", "v1", "forced", "r3"]]
