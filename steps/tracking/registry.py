"""The registry side of ``register``: which evaluation a model has, its version, and where
the alias belongs.

A :class:`PromotionRule` says when a new version may take the alias: it must beat the
holder on the rule's metric by at least ``min_delta`` (by anything at all when that is 0)
and reach ``min_score``. Each version is judged once, when it is registered, and tagged
``validation_status`` = ``passed`` or ``rejected`` with ``validation_reason``; a rejected
version is still registered, but never holds the alias unless forced.

MLflow's alias update is last-writer-wins, so two pipelines registering at once could
leave the alias on the worse model. After writing, :func:`settle_alias` re-reads the
registry and repairs the alias until a read shows the best passing version holding it. A
version whose model can no longer be read is never chosen, and a holder that lost its
model gives the alias up to the best passing version that still loads.

:func:`force_alias` moves the alias whatever the scores (a rollback, a manual promotion);
versions that outrank its target are tagged ``demoted`` so that the next ``register`` does
not hand the alias straight back. Every move, with the rule it was made under, is appended
to the registered model's ``alias_history`` tag (:func:`record_move`).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from steps.core.choices import LOWER_IS_BETTER
from steps.tracking import tags
from steps.tracking.artifacts import output_missing, verified_model_files
from steps.tracking.cli import StepError
from steps.tracking.runs import latest_finished_run, quote

log = logging.getLogger("steps.register")

# Copied from the evaluation onto each version, at the precision the decisions read.
COPIED_METRICS = ("test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high",
                  "test_loss", "test_macro_f1")
HISTORY_LIMIT = 100
PASSED, REJECTED = "passed", "rejected"


def stored_score(value: float) -> float:
    """A metric as a version's tag keeps it (6 decimals): every comparison reads this, so a
    fresh score and a stored one of the same model compare equal."""
    return float(f"{value:.6f}")


@dataclass(frozen=True)
class Candidate:
    version: int
    score: float
    digest: str
    model_uri: str = ""
    ci: tuple[float, float] | None = None  # the score's 95% interval, for test_accuracy

    def shown(self, metric: str) -> str:
        interval = f" (95% CI {self.ci[0]:.4f}-{self.ci[1]:.4f})" if self.ci else ""
        return f"{metric} {self.score:.4f}{interval}"


@dataclass(frozen=True)
class PromotionRule:
    """When a version may take the alias from the holder (see the module's docstring)."""

    metric: str = "test_accuracy"
    min_delta: float = 0.0
    min_score: float | None = None  # a floor; for a lower-is-better metric, a ceiling

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def gain(self, new: Candidate, old: Candidate) -> float:
        """How much better ``new`` scores than ``old`` (negative: worse)."""
        return old.score - new.score if self.lower_is_better else new.score - old.score

    def judge(self, new: Candidate, holder: Candidate | None) -> tuple[str, str]:
        """(``passed`` or ``rejected``, the reason with the numbers) for ``new`` against
        the version holding the alias (None: no holder, or one whose model is gone)."""
        scored = new.shown(self.metric)
        if self.min_score is not None and (new.score > self.min_score if self.lower_is_better
                                           else new.score < self.min_score):
            worse = ">" if self.lower_is_better else "<"
            return REJECTED, f"{scored} {worse} min_score {self.min_score:g}"
        if holder is None or holder.version == new.version:
            return PASSED, f"{scored}, no holder to beat{self._floor()}"
        if holder.digest != new.digest:
            return REJECTED, (f"{scored} was scored on other data than the holder "
                              f"v{holder.version}'s (digest {new.digest}, not "
                              f"{holder.digest}): not comparable")
        gain = self.gain(new, holder)
        if self.min_delta:
            passed = gain >= self.min_delta
            rule = f"{'>=' if passed else '<'} min_delta {self.min_delta:g}"
        else:
            passed = gain > 0
            rule = "better" if passed else "not better"
        return (PASSED if passed else REJECTED), (
            f"{scored} vs v{holder.version}'s {holder.score:.4f}: {gain:+.4f} {rule}"
            f"{self._floor() if passed else ''}")

    def _floor(self) -> str:
        if self.min_score is None:
            return ""
        return f", {'<=' if self.lower_is_better else '>='} min_score {self.min_score:g}"

    def as_record(self) -> dict:
        return {"metric": self.metric, "min_delta": self.min_delta,
                "min_score": self.min_score}


def candidates(client, name: str, metric: str, barred: bool = False
               ) -> dict[int, Candidate]:
    """Every version of ``name`` that carries ``metric`` and a data digest; versions barred
    from the alias (demoted by a forced move, or rejected by the rule) only when
    ``barred``."""
    found = {}
    for v in client.search_model_versions(f"name = {quote(name)}"):
        if metric in v.tags and tags.VERSION_DATA_DIGEST in v.tags and (
                barred or (tags.VERSION_DEMOTED not in v.tags and
                           v.tags.get(tags.VERSION_VALIDATION) != REJECTED)):
            ci = None
            if metric == "test_accuracy" and "test_accuracy_ci_low" in v.tags:
                ci = (float(v.tags["test_accuracy_ci_low"]),
                      float(v.tags["test_accuracy_ci_high"]))
            found[int(v.version)] = Candidate(
                int(v.version), float(v.tags[metric]), v.tags[tags.VERSION_DATA_DIGEST],
                v.tags.get(tags.VERSION_MODEL_URI, v.source), ci)
    return found


def version_candidate(client, name: str, version: int, metric: str) -> Candidate:
    """One version as a :class:`Candidate`, barred or not."""
    found = candidates(client, name, metric, barred=True)
    if version not in found:
        raise StepError(f"{name} v{version} carries no {metric} and data digest (it was not "
                        "registered by this pipeline); register it through evaluate first")
    return found[version]


def _rank(candidate: Candidate, metric: str) -> tuple:
    # Ties go to the older version: a champion is not displaced by an equal model.
    sign = -1 if metric in LOWER_IS_BETTER else 1
    return sign * candidate.score, -candidate.version


def best_of(pool: list[Candidate], metric: str) -> Candidate:
    return max(pool, key=lambda c: _rank(c, metric))


def current_holder(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def holder_to_beat(client, name: str, alias: str, metric: str) -> Candidate | None:
    """The version holding ``alias``, as a new version is judged against it: None when
    there is none, or when its model can no longer be read (then nothing is to be beaten)."""
    holder = candidates(client, name, metric, barred=True).get(
        current_holder(client, name, alias) or -1)
    if holder is not None and output_missing(client, holder.model_uri):
        return None
    return holder


def settle_alias(client, name: str, alias: str, rule: PromotionRule, new: Candidate,
                 run_id: str = "") -> str:
    """Point ``alias`` at the best passing, loadable version on the holder's data; say what
    was decided, with the rule's numbers. Each write is recorded in the alias history with
    ``run_id`` and the rule.

    Loops until one read finds the alias already on the best version: whichever pipeline
    writes last, its own final read repairs any stale write that raced with it.
    """
    from mlflow.exceptions import MlflowException

    metric = rule.metric
    lost: dict[int, str] = {}  # version -> why its model cannot be read; checked once each

    def gone(candidate: Candidate) -> str:
        if candidate.version not in lost:
            lost[candidate.version] = output_missing(client, candidate.model_uri)
        return lost[candidate.version]

    def best_loadable(pool: list[Candidate]) -> Candidate | None:
        return next((c for c in sorted(pool, key=lambda c: _rank(c, metric), reverse=True)
                     if not gone(c)), None)

    decision = ""
    for attempt in range(20):
        pool = candidates(client, name, metric)
        holder = pool.get(current_holder(client, name, alias) or -1)
        if holder is not None and gone(holder) and not decision:
            log.warning("register: %s holder v%d cannot be loaded (%s); moving %s to the best "
                        "version that still loads", alias, holder.version, gone(holder), alias)
        digest = holder.digest if holder else new.digest
        best = (best_loadable([c for c in pool.values() if c.digest == digest]) or
                best_loadable([c for c in pool.values() if c.digest == new.digest]))
        if best is None:
            if new.version not in pool and holder is None:  # the only one, and rejected
                return decision or f"{alias} not set{_judgement(client, name, new)}"
            raise StepError(f"no version of {name} can be loaded any more; nothing to point "
                            f"{alias} at")
        if holder is not None and holder.version == best.version:
            return decision or _kept(client, name, alias, holder, new, pool)
        # Stamped before the write: a writer that saw this write and repairs it stamps later.
        when = _now()
        try:
            client.set_registered_model_alias(name, alias, str(best.version))
        except MlflowException as exc:
            # Two writers inserting the same alias at once collide on the store's unique
            # key; the other write landed, so re-read and decide again.
            log.debug("alias write raced (%s); re-reading", exc)
        else:
            record_move(client, name, alias, rule, holder, best, forced=False,
                        run_id=run_id, when=when)
            before = "no holder"
            if holder is not None:
                before = f"v{holder.version} ({holder.score:.4f})"
                if gone(holder):
                    before += f", whose model is gone: {gone(holder)}"
            decision = (f"{alias} -> v{best.version} ({metric} {best.score:.4f}), was {before}"
                        + _judgement(client, name, best))
        # Let a racing writer land before re-reading; jitter keeps two racers apart.
        time.sleep(0.2 + random.random() * 0.3 if attempt else 0.05)
    raise StepError(f"could not settle alias {alias} of {name} after 20 attempts")


def _judgement(client, name: str, candidate: Candidate) -> str:
    """``; v5 passed: <reason>`` from a version's validation tags ('' for a version
    registered before the rule existed)."""
    version_tags = client.get_model_version(name, str(candidate.version)).tags
    status = version_tags.get(tags.VERSION_VALIDATION, "")
    reason = version_tags.get(tags.VERSION_VALIDATION_REASON, "")
    return f"; v{candidate.version} {status}: {reason}" if status else ""


def force_alias(client, name: str, alias: str, rule: PromotionRule, target: Candidate,
                run_id: str = "") -> str:
    """Move ``alias`` to ``target`` whatever the scores and the rule; say what was done.

    Versions on the target's data that outrank it are tagged demoted first, so that a
    later ``register`` (or one racing with this) does not move the alias straight back;
    the target itself is no longer demoted, and passes from now on (the force is its
    reason).
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
                _rank(other, metric) > _rank(target, metric):
            client.set_model_version_tag(
                name, str(other.version), tags.VERSION_DEMOTED,
                f"outranked v{target.version}, which {alias} was forced onto at {stamp} by "
                f"register run {run_id}; register with force=true to promote it again")
            demoted.append(f"v{other.version}")
    if tags.VERSION_DEMOTED in client.get_model_version(name, str(target.version)).tags:
        client.delete_model_version_tag(name, str(target.version), tags.VERSION_DEMOTED)
    for key, value in ((tags.VERSION_VALIDATION, PASSED), (tags.VERSION_VALIDATION_REASON,
                       f"forced onto {alias} at {stamp} by register run {run_id}")):
        client.set_model_version_tag(name, str(target.version), key, value)
    when = _now()
    for _ in range(5):  # a racing register could rewrite it from a read made before ours
        client.set_registered_model_alias(name, alias, str(target.version))
        time.sleep(0.2 + random.random() * 0.3)
        if current_holder(client, name, alias) == target.version:
            break
    else:
        raise StepError(f"could not hold {alias} of {name} on v{target.version}: another "
                        "writer keeps moving it")
    if holder is None or holder.version != target.version:
        record_move(client, name, alias, rule, holder, target, forced=True, run_id=run_id,
                    when=when)
    if holder is None:
        before = "no holder"
    elif holder.version == target.version:
        before = "already there"
    else:
        before = f"v{holder.version} ({holder.score:.4f})"
    decision = (f"{alias} -> v{target.version} ({metric} {target.score:.4f}), was {before}; "
                "forced (force=true), whatever the scores and the rule")
    if demoted:
        decision += f"; demoted {', '.join(demoted)}, which scored better on the same data"
    return decision


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def record_move(client, name: str, alias: str, rule: PromotionRule, holder: Candidate | None,
                target: Candidate, forced: bool, run_id: str, when: str = "") -> dict:
    """Append one alias move (made at ``when``, default now, under ``rule``) to the
    registered model's ``alias_history`` tag and return it.

    The tag is last-writer-wins like the alias, so the write is checked the same way: the
    entry is merged into what is there, written, and re-read after a jittered pause until
    two reads in a row hold it; a racing writer that dropped it gets it merged back.
    """
    from mlflow.exceptions import MlflowException

    move = {"alias": alias, "from_version": holder.version if holder else None,
            "to_version": target.version, "metric": rule.metric,
            "from_score": holder.score if holder else None, "to_score": target.score,
            "forced": forced, "rule": rule.as_record(), "register_run_id": run_id,
            "time": when or _now()}
    confirmed = 0
    for _ in range(40):
        history = alias_history(client, name)
        if move in history:
            confirmed += 1
            if confirmed == 2:
                return move
        else:
            confirmed = 0
            merged = sorted([*history, move], key=lambda m: m.get("time", ""))[-HISTORY_LIMIT:]
            try:
                client.set_registered_model_tag(name, tags.ALIAS_HISTORY, json.dumps(merged))
            except MlflowException as exc:  # two first writes collide on the unique key
                log.debug("history write raced (%s); re-reading", exc)
        time.sleep(0.1 + random.random() * 0.3)
    raise StepError(f"could not record the move of {alias} in {name}'s {tags.ALIAS_HISTORY}")


def alias_history(client, name: str) -> list[dict]:
    """The registered model's alias moves, oldest first ([] when none or unreadable)."""
    text = client.get_registered_model(name).tags.get(tags.ALIAS_HISTORY, "")
    try:
        history = json.loads(text) if text else []
    except json.JSONDecodeError:
        log.warning("register: %s's %s tag is not JSON; starting it again", name,
                    tags.ALIAS_HISTORY)
        return []
    return history if isinstance(history, list) else []


def _kept(client, name: str, alias: str, holder: Candidate, new: Candidate,
          pool: dict[int, Candidate]) -> str:
    if holder.version == new.version:
        return f"{alias} already on v{new.version}"
    if new.version not in pool:
        version_tags = client.get_model_version(name, str(new.version)).tags
        if tags.VERSION_DEMOTED in version_tags:
            return (f"{alias} stays on v{holder.version}: v{new.version} was demoted by a "
                    "forced move; register it with force=true to promote it")
        if version_tags.get(tags.VERSION_VALIDATION) == REJECTED:
            return (f"{alias} stays on v{holder.version} ({holder.score:.4f})"
                    f"{_judgement(client, name, new)}")
    if holder.digest != new.digest:
        return (f"{alias} stays on v{holder.version}: it was scored on other data "
                f"(digest {holder.digest}, new {new.digest}); not comparable")
    return (f"{alias} stays on v{holder.version} ({holder.score:.4f}); "
            f"v{new.version} scored {new.score:.4f}")


def registered_version(client, name: str, model_uri: str) -> int | None:
    """The version number ``model_uri`` names when it is ``models:/<name>/<version>`` or
    ``models:/<name>@<alias>`` of ``name``; None for any other URI."""
    from mlflow.exceptions import MlflowException

    prefix = f"models:/{name}"
    rest = model_uri[len(prefix):] if model_uri.startswith(prefix) else ""
    if rest[:1] not in ("/", "@") or len(rest) < 2:
        return None
    try:
        if rest[0] == "@":
            return int(client.get_model_version_by_alias(name, rest[1:]).version)
        return int(client.get_model_version(name, rest[1:]).version)
    except (MlflowException, ValueError):
        raise StepError(f"model_uri={model_uri!r}: {name} has no such version") from None


def find_evaluation(client, experiment_id: str, model_uri: str):
    """The newest finished evaluate run of ``model_uri`` (any spelling of it), or of any
    model when empty."""
    if model_uri:
        extra = f"tags.`{tags.MODEL_URI}` = {quote(model_uri)}"
        evaluation = latest_finished_run(client, experiment_id, "evaluate", extra)
        if evaluation is None and not model_uri.startswith("models:/m-"):
            # Accept any spelling of the model (runs:/..., name/version): resolve its id.
            import mlflow
            from mlflow.exceptions import MlflowException

            try:
                info = mlflow.models.get_model_info(model_uri)
            except (MlflowException, OSError):
                raise StepError(f"model_uri={model_uri!r} does not name a logged model") from None
            if info.model_id:
                extra = f"tags.`{tags.MODEL_URI}` = {quote('models:/' + info.model_id)}"
                evaluation = latest_finished_run(client, experiment_id, "evaluate", extra)
    else:
        evaluation = latest_finished_run(client, experiment_id, "evaluate")
    if evaluation is None:
        what = f"model_uri={model_uri!r}: no" if model_uri else "model_uri is empty and no"
        raise StepError(
            f"{what} finished evaluate run for it in this experiment; run "
            "`mlflow run . -e evaluate -P model_uri=...` first (only evaluated models are "
            "registered)"
        )
    return evaluation


def register_version(client, name: str, model_uri: str, evaluation,
                     validation: tuple[str, str] = ("", "")):
    """The version holding ``model_uri``: the existing one, or a new one fully tagged,
    ``validation`` (status and reason, from :meth:`PromotionRule.judge`) and the digest of
    its files (checked against the one train recorded) included."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(
                name, description="MNIST-style digit classifier; the `champion` alias marks "
                "the best version.")
        except MlflowException as race:  # another pipeline created it in between
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    for existing in client.search_model_versions(f"name = {quote(name)}"):
        if existing.tags.get(tags.VERSION_MODEL_URI) == model_uri:
            log.info("register: %s is already %s version %s; not creating another",
                     model_uri, name, existing.version)
            return existing
    run_tags, metrics = evaluation.data.tags, evaluation.data.metrics
    _, digest = verified_model_files(model_uri)  # what train logged, unchanged since
    version_tags = {
        tags.VERSION_MODEL_URI: model_uri,
        tags.VERSION_MODEL_DIGEST: digest,
        tags.VERSION_DATA_DIGEST: run_tags[tags.DATA_DIGEST],
        tags.VERSION_DATASET: run_tags.get(tags.DATASET, ""),
        tags.VERSION_TRAIN_RUN: run_tags.get(tags.TRAIN_RUN, ""),
        tags.VERSION_EVALUATE_RUN: evaluation.info.run_id,
        **{m: f"{metrics[m]:.6f}" for m in COPIED_METRICS if m in metrics},
        **({tags.VERSION_VALIDATION: validation[0],
            tags.VERSION_VALIDATION_REASON: validation[1]} if validation[0] else {}),
    }
    # Tags go in with the version in one call: no version ever exists without them. The
    # client call, not mlflow.register_model: that one tries to create the registered model
    # again and prints that it exists, on every registration.
    model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
    return client.create_model_version(
        name, source=model_uri, run_id=run_tags.get(tags.TRAIN_RUN) or None, tags=version_tags,
        model_id=model_id)
