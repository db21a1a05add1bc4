"""Where the alias belongs: the promotion rule, its verdict on each new version, the alias
move, and the alias history.

A :class:`PromotionRule` says when a new version may take the alias: it must beat the
holder on the rule's metric by at least ``min_delta`` (by anything at all when that is 0)
and reach ``min_score``. Each version is judged once, when it is registered, and tagged
``validation_status`` = ``passed`` or ``rejected`` with ``validation_reason``; a rejected
version is still registered, but never holds the alias unless forced.

MLflow's alias write is last-writer-wins and has no compare-and-set, so two pipelines
registering at once could leave the alias on the worse model. :func:`settle_alias` is the
one place that writes it: it re-reads the registry after each write until a read shows the
best passing version holding it, so whichever writer is last repairs a stale write. A
version whose model can no longer be read is never chosen, and a holder that lost its
model gives the alias up to the best passing version that still loads.

:func:`force_alias` moves the alias whatever the scores (a rollback, a manual promotion):
versions that outrank its target on its data are tagged ``demoted`` and the target passes,
so that settling the alias lands on the target, and the next ``register`` does not hand it
straight back. Every move, with the rule it was made under, is one tag of its own on the
registered model (:func:`record_move`): no writer can lose another's.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from steps.tracking.registry.versions import (
    PASSED,
    REJECTED,
    Candidate,
    candidates,
    current_holder,
    rank,
)
from steps.tracking.runtime import tags
from steps.tracking.runtime.artifacts import output_missing
from steps.tracking.runtime.cli import StepError

log = logging.getLogger("steps.register")

HISTORY_LIMIT = 100  # moves kept in the alias history; older ones are deleted
SETTLE_ATTEMPTS = 20

# Kinds of Verdict.
BELOW_MIN_SCORE, NO_HOLDER, OTHER_DATA, COMPARED = (
    "below min_score", "no holder", "other data", "compared")


@dataclass(frozen=True)
class Verdict:
    """The rule's judgement of a new version against the holder: ``passed`` or not, and the
    numbers it was made on."""

    status: str  # PASSED or REJECTED
    kind: str
    scored: str  # the new version's score as shown, e.g. "test_accuracy 0.9551 (95% CI ...)"
    rule: PromotionRule
    holder: Candidate | None = None
    new: Candidate | None = None
    gain: float = 0.0

    def reason(self) -> str:
        rule = self.rule
        if self.kind == BELOW_MIN_SCORE:
            worse = ">" if rule.lower_is_better else "<"
            return f"{self.scored} {worse} min_score {rule.min_score:g}"
        if self.kind == NO_HOLDER:
            return f"{self.scored}, no holder to beat{rule.floor()}"
        if self.kind == OTHER_DATA:
            return (f"{self.scored} was scored on other data than the holder "
                    f"v{self.holder.version}'s (digest {self.new.digest}, not "
                    f"{self.holder.digest}): not comparable")
        if rule.min_delta:
            said = f"{'>=' if self.status == PASSED else '<'} min_delta {rule.min_delta:g}"
        else:
            said = "better" if self.status == PASSED else "not better"
        return (f"{self.scored} vs v{self.holder.version}'s {self.holder.score:.4f}: "
                f"{self.gain:+.4f} {said}{rule.floor() if self.status == PASSED else ''}")


@dataclass(frozen=True)
class PromotionRule:
    """When a version may take the alias from the holder (see the module's docstring)."""

    metric: str = "test_accuracy"
    min_delta: float = 0.0
    min_score: float | None = None  # a floor; for a lower-is-better metric, a ceiling

    @property
    def lower_is_better(self) -> bool:
        from steps.core.choices import LOWER_IS_BETTER

        return self.metric in LOWER_IS_BETTER

    def gain(self, new: Candidate, old: Candidate) -> float:
        """How much better ``new`` scores than ``old`` (negative: worse)."""
        return old.score - new.score if self.lower_is_better else new.score - old.score

    def judge(self, new: Candidate, holder: Candidate | None) -> Verdict:
        """The verdict on ``new`` against the version holding the alias (None: no holder,
        or one whose model is gone)."""
        scored = new.shown(self.metric)
        if self.min_score is not None and (new.score > self.min_score if self.lower_is_better
                                           else new.score < self.min_score):
            return Verdict(REJECTED, BELOW_MIN_SCORE, scored, self, holder, new)
        if holder is None or holder.version == new.version:
            return Verdict(PASSED, NO_HOLDER, scored, self, holder, new)
        if holder.digest != new.digest:
            return Verdict(REJECTED, OTHER_DATA, scored, self, holder, new)
        gain = self.gain(new, holder)
        passed = gain >= self.min_delta if self.min_delta else gain > 0
        return Verdict(PASSED if passed else REJECTED, COMPARED, scored, self, holder, new,
                       gain)

    def floor(self) -> str:
        if self.min_score is None:
            return ""
        return f", {'<=' if self.lower_is_better else '>='} min_score {self.min_score:g}"

    def as_record(self) -> dict:
        return {"metric": self.metric, "min_delta": self.min_delta,
                "min_score": self.min_score}


# --------------------------------------------------------------------------- decisions

# Kinds of AliasDecision.
MOVED, ALREADY, NOT_SET, KEPT_REJECTED, KEPT_DEMOTED, KEPT_OTHER_DATA, KEPT_BETTER = (
    "moved", "already", "not set", "kept: rejected", "kept: demoted", "kept: other data",
    "kept: better")


@dataclass(frozen=True)
class AliasDecision:
    """What happened to the alias for one ``register``: where it is (``version``), where it
    was (``before``), and why, with the numbers."""

    kind: str
    alias: str
    metric: str
    version: int | None  # the holder afterwards
    score: float | None = None
    before: Candidate | None = None
    before_gone: str = ""  # why the former holder's model cannot be read
    new: Candidate | None = None  # the version this register brought
    judgement: str = ""  # "v5 passed: <reason>", from the version's tags
    forced: bool = False
    demoted: tuple[int, ...] = field(default=())

    def line(self) -> str:
        alias, judged = self.alias, f"; {self.judgement}" if self.judgement else ""
        if self.kind == NOT_SET:
            return f"{alias} not set{judged}"
        if self.kind == ALREADY:
            return f"{alias} already on v{self.version}"
        if self.kind == MOVED:
            if self.before is None:
                was = "no holder"
            elif self.before.version == self.version:
                was = "already there"
            else:
                was = f"v{self.before.version} ({self.before.score:.4f})"
                if self.before_gone:
                    was += f", whose model is gone: {self.before_gone}"
            said = (f"{alias} -> v{self.version} ({self.metric} {self.score:.4f}), was {was}")
            if not self.forced:
                return said + judged
            said += "; forced (force=true), whatever the scores and the rule"
            if self.demoted:
                said += (f"; demoted {', '.join(f'v{v}' for v in self.demoted)}, which "
                         "scored better on the same data")
            return said
        held = f"{alias} stays on v{self.version}"
        if self.kind == KEPT_DEMOTED:
            return (f"{held}: v{self.new.version} was demoted by a forced move; register it "
                    "with force=true to promote it")
        if self.kind == KEPT_REJECTED:
            return f"{held} ({self.score:.4f}){judged}"
        if self.kind == KEPT_OTHER_DATA:
            return (f"{held}: it was scored on other data (digest {self.before.digest}, new "
                    f"{self.new.digest}); not comparable")
        return f"{held} ({self.score:.4f}); v{self.new.version} scored {self.new.score:.4f}"


def _judgement(client, name: str, version: int) -> str:
    """``v5 passed: <reason>`` from a version's validation tags ('' for a version
    registered before the rule existed)."""
    version_tags = client.get_model_version(name, str(version)).tags
    status = version_tags.get(tags.VERSION_VALIDATION, "")
    reason = version_tags.get(tags.VERSION_VALIDATION_REASON, "")
    return f"v{version} {status}: {reason}" if status else ""


def settle_alias(client, name: str, alias: str, rule: PromotionRule, new: Candidate,
                 run_id: str = "", digest: str = "", forced: bool = False) -> AliasDecision:
    """Point ``alias`` at the best passing, loadable version on the holder's data (on
    ``digest``'s, when given: a forced move's); return what was decided. Each write is
    recorded in the alias history with ``run_id`` and the rule.

    Loops until one read finds the alias already on the best version: whichever pipeline
    writes last, its own final read repairs any stale write that raced with it (MLflow's
    alias write is last-writer-wins, with no compare-and-set).
    """
    from mlflow.exceptions import MlflowException

    metric = rule.metric
    lost: dict[int, str] = {}  # version -> why its model cannot be read; checked once each

    def gone(candidate: Candidate) -> str:
        if candidate.version not in lost:
            lost[candidate.version] = output_missing(client, candidate.model_uri)
        return lost[candidate.version]

    def best_loadable(pool: list[Candidate]) -> Candidate | None:
        return next((c for c in sorted(pool, key=lambda c: rank(c, metric), reverse=True)
                     if not gone(c)), None)

    decision = None
    for attempt in range(SETTLE_ATTEMPTS):
        pool = candidates(client, name, metric)
        held = current_holder(client, name, alias) or -1
        holder = pool.get(held)
        # A barred holder (demoted, rejected) gives the alias up, but the move is from it.
        was = holder or candidates(client, name, metric, barred=True).get(held)
        if holder is not None and gone(holder) and decision is None:
            log.warning("register: %s holder v%d cannot be loaded (%s); moving %s to the best "
                        "version that still loads", alias, holder.version, gone(holder), alias)
        on = digest or (holder.digest if holder else new.digest)
        best = (best_loadable([c for c in pool.values() if c.digest == on]) or
                best_loadable([c for c in pool.values() if c.digest == new.digest]))
        if best is None:
            if new.version not in pool and holder is None:  # the only one, and rejected
                return decision or AliasDecision(NOT_SET, alias, metric, None, new=new,
                                                 judgement=_judgement(client, name,
                                                                      new.version))
            raise StepError(f"no version of {name} can be loaded any more; nothing to point "
                            f"{alias} at")
        if holder is not None and holder.version == best.version:
            return decision or _kept(client, name, alias, metric, holder, new, pool)
        # Stamped before the write: a writer that saw this write and repairs it stamps later.
        when = _now()
        try:
            client.set_registered_model_alias(name, alias, str(best.version))
        except MlflowException as exc:
            # Two writers inserting the same alias at once collide on the store's unique
            # key; the other write landed, so re-read and decide again.
            log.debug("alias write raced (%s); re-reading", exc)
        else:
            record_move(client, name, alias, rule, was, best, forced=forced,
                        run_id=run_id, when=when)
            decision = AliasDecision(
                MOVED, alias, metric, best.version, best.score, was,
                gone(was) if was is not None else "", new,
                _judgement(client, name, best.version), forced)
        # Let a racing writer land before re-reading; jitter keeps two racers apart.
        time.sleep(0.2 + random.random() * 0.3 if attempt else 0.05)
    raise StepError(f"could not settle alias {alias} of {name} after {SETTLE_ATTEMPTS} "
                    "attempts")


def _kept(client, name: str, alias: str, metric: str, holder: Candidate, new: Candidate,
          pool: dict[int, Candidate]) -> AliasDecision:
    kept = AliasDecision(KEPT_BETTER, alias, metric, holder.version, holder.score, holder,
                         new=new)
    if holder.version == new.version:
        return AliasDecision(ALREADY, alias, metric, holder.version, holder.score, holder,
                             new=new)
    if new.version not in pool:
        version_tags = client.get_model_version(name, str(new.version)).tags
        if tags.VERSION_DEMOTED in version_tags:
            return replace(kept, kind=KEPT_DEMOTED)
        if version_tags.get(tags.VERSION_VALIDATION) == REJECTED:
            return replace(kept, kind=KEPT_REJECTED,
                           judgement=_judgement(client, name, new.version))
    if holder.digest != new.digest:
        return replace(kept, kind=KEPT_OTHER_DATA)
    return kept


def force_alias(client, name: str, alias: str, rule: PromotionRule, target: Candidate,
                run_id: str = "") -> AliasDecision:
    """Move ``alias`` to ``target`` whatever the scores and the rule; say what was done.

    Versions on the target's data that outrank it are tagged demoted first, so that a
    later ``register`` (or one racing with this) does not move the alias straight back;
    the target itself is no longer demoted, and passes from now on (the force is its
    reason). Then the alias is settled on the target's data, where the target is now the
    best.
    """
    metric = rule.metric
    why_gone = output_missing(client, target.model_uri)
    if why_gone:
        raise StepError(f"cannot force {alias} onto {name} v{target.version}: its model cannot "
                        f"be loaded ({why_gone})")
    holder = candidates(client, name, metric, barred=True).get(
        current_holder(client, name, alias) or -1)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    demoted = []
    for other in candidates(client, name, metric).values():
        if other.version != target.version and other.digest == target.digest and \
                rank(other, metric) > rank(target, metric):
            client.set_model_version_tag(
                name, str(other.version), tags.VERSION_DEMOTED,
                f"outranked v{target.version}, which {alias} was forced onto at {stamp} by "
                f"register run {run_id}; register with force=true to promote it again")
            demoted.append(other.version)
    if tags.VERSION_DEMOTED in client.get_model_version(name, str(target.version)).tags:
        client.delete_model_version_tag(name, str(target.version), tags.VERSION_DEMOTED)
    for key, value in ((tags.VERSION_VALIDATION, PASSED), (tags.VERSION_VALIDATION_REASON,
                       f"forced onto {alias} at {stamp} by register run {run_id}")):
        client.set_model_version_tag(name, str(target.version), key, value)
    settled = settle_alias(client, name, alias, rule, target, run_id, digest=target.digest,
                           forced=True)
    if settled.version != target.version:
        raise StepError(f"could not hold {alias} of {name} on v{target.version}: another "
                        "writer keeps moving it")
    return AliasDecision(MOVED, alias, metric, target.version, target.score, holder,
                         new=target, forced=True, demoted=tuple(demoted))


# --------------------------------------------------------------------------- history


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def record_move(client, name: str, alias: str, rule: PromotionRule, holder: Candidate | None,
                target: Candidate, forced: bool, run_id: str, when: str = "") -> dict:
    """Add one alias move (made at ``when``, default now, under ``rule``) to the registered
    model's history and return it.

    Each move is a tag of its own, ``alias_history/<time>-<random>``: writers never read,
    merge and write back one shared value, so none can drop another's move, and no value
    grows past the store's limit (PostgreSQL keeps 5,000 characters of a registered model's
    tag). The oldest moves beyond :data:`HISTORY_LIMIT` are deleted.
    """
    from mlflow.exceptions import MlflowException

    move = {"alias": alias, "from_version": holder.version if holder else None,
            "to_version": target.version, "metric": rule.metric,
            "from_score": holder.score if holder else None, "to_score": target.score,
            "forced": forced, "rule": rule.as_record(), "register_run_id": run_id,
            "time": when or _now()}
    # A key may hold letters, digits and "_-./: " only; one that sorts as the time does.
    stamp = move["time"].replace("+00:00", "Z").replace(":", "")
    key = f"{tags.ALIAS_HISTORY}/{stamp}-{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(name, key, json.dumps(move))
    keys = sorted(k for k in client.get_registered_model(name).tags
                  if k.startswith(f"{tags.ALIAS_HISTORY}/"))
    for old in keys[:-HISTORY_LIMIT]:
        try:
            client.delete_registered_model_tag(name, old)
        except MlflowException:  # another writer deleted it first
            continue
    return move


def alias_history(client, name: str) -> list[dict]:
    """The registered model's alias moves, oldest first ([] when none)."""
    found = []
    for key, text in client.get_registered_model(name).tags.items():
        if not key.startswith(f"{tags.ALIAS_HISTORY}/"):
            continue
        try:
            found.append(json.loads(text))
        except json.JSONDecodeError:
            log.warning("register: %s's %s is not JSON; skipped", name, key)
    return sorted(found, key=lambda m: m.get("time", ""))
