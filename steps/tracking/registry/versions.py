"""The registry's versions as ``register`` sees them: which evaluation a model has, the
version it becomes (created with every tag in one call), and each version as a
:class:`Candidate` for the alias (its score on the rule's metric and the digest of the data
it was scored on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from steps.core.choices import LOWER_IS_BETTER
from steps.tracking.inference.models import verified_model_files
from steps.tracking.runtime import tags
from steps.tracking.runtime.artifacts import output_missing
from steps.tracking.runtime.cli import StepError
from steps.tracking.runtime.runs import latest_finished_run, quote, where_else

log = logging.getLogger("steps.register")

# Copied from the evaluation onto each version, at the precision the decisions read.
COPIED_METRICS = ("test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high",
                  "test_loss", "test_macro_f1")
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


def rank(candidate: Candidate, metric: str) -> tuple:
    """What orders versions for the alias; ties go to the older version: a champion is not
    displaced by an equal model."""
    sign = -1 if metric in LOWER_IS_BETTER else 1
    return sign * candidate.score, -candidate.version


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
            "registered)" + ("" if model_uri else where_else(client, "evaluate",
                                                              experiment_id))
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
