"""register: put an evaluated model in the registry and move the alias only if it is better.

Reads:  ``--model-uri`` (empty = the model of the newest finished evaluate run) and the
        newest finished evaluate run of that model (its ``--metric``, data digest, run ids).
Writes: a model version of ``--model-name`` (none if this model is already registered),
        tagged ``model_uri``, ``data_digest``, ``dataset``, ``train_run_id``,
        ``evaluate_run_id`` and its test metrics; the ``--alias`` (default ``champion``)
        when the version beats the current holder on the same data, or none holds it;
        params ``model_uri``, ``model_name``, ``alias``, ``metric``;
        tags ``pipeline.step``, ``pipeline.registered_version``, ``pipeline.alias_decision``.

MLflow's alias update is last-writer-wins, so two pipelines registering at once could
leave the alias on the worse model. After writing, this step re-reads the registry and
repairs the alias until a read shows the best version holding it.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import click

from steps.tracking import (
    TAG_DATA_DIGEST,
    TAG_DATASET,
    TAG_MODEL_URI,
    TAG_TRAIN_RUN,
    StepError,
    latest_finished_run,
    log_params_once,
    model_name_option,
    quote,
    run_cli,
    run_link,
    step_run,
)

log = logging.getLogger("steps.register")

# Metrics where lower is better; everything else (accuracy, f1, ...) is higher-is-better.
LOWER_IS_BETTER = ("test_loss",)
COPIED_METRICS = ("test_accuracy", "test_loss", "test_macro_f1")


@dataclass(frozen=True)
class Candidate:
    version: int
    score: float
    digest: str


def candidates(client, name: str, metric: str) -> dict[int, Candidate]:
    """Every version of ``name`` that carries ``metric`` and a data digest."""
    found = {}
    for v in client.search_model_versions(f"name = {quote(name)}"):
        if metric in v.tags and "data_digest" in v.tags:
            found[int(v.version)] = Candidate(int(v.version), float(v.tags[metric]),
                                              v.tags["data_digest"])
    return found


def best_of(pool: list[Candidate], metric: str) -> Candidate:
    sign = -1 if metric in LOWER_IS_BETTER else 1
    # Ties go to the older version: a champion is not displaced by an equal model.
    return max(pool, key=lambda c: (sign * c.score, -c.version))


def current_holder(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def settle_alias(client, name: str, alias: str, metric: str, new: Candidate) -> str:
    """Point ``alias`` at the best version on the holder's data; say what was decided.

    Loops until one read finds the alias already on the best version: whichever pipeline
    writes last, its own final read repairs any stale write that raced with it.
    """
    from mlflow.exceptions import MlflowException

    decision = ""
    for attempt in range(20):
        pool = candidates(client, name, metric)
        holder = pool.get(current_holder(client, name, alias) or -1)
        digest = holder.digest if holder else new.digest
        best = best_of([c for c in pool.values() if c.digest == digest], metric)
        if holder is not None and holder.version == best.version:
            if not decision:
                if holder.version == new.version:
                    decision = f"{alias} already on v{new.version}"
                elif holder.digest != new.digest:
                    decision = (f"{alias} stays on v{holder.version}: it was scored on other data "
                                f"(digest {holder.digest}, new {new.digest}); not comparable")
                else:
                    decision = (f"{alias} stays on v{holder.version} ({metric} {holder.score:.4f}); "
                                f"v{new.version} scored {new.score:.4f}")
            return decision
        try:
            client.set_registered_model_alias(name, alias, str(best.version))
        except MlflowException as exc:
            # Two writers inserting the same alias at once collide on the store's unique
            # key; the other write landed, so re-read and decide again.
            log.debug("alias write raced (%s); re-reading", exc)
        else:
            before = f"v{holder.version} ({holder.score:.4f})" if holder else "no holder"
            decision = f"{alias} -> v{best.version} ({metric} {best.score:.4f}), was {before}"
        # Let a racing writer land before re-reading; jitter keeps two racers apart.
        time.sleep(0.2 + random.random() * 0.3 if attempt else 0.05)
    raise StepError(f"could not settle alias {alias} of {name} after 20 attempts")


@click.command()
@click.option("--model-uri", default="", help="Model to register (empty = newest evaluated).")
@model_name_option
@click.option("--alias", default="champion", show_default=True,
              help="Alias that follows the best version.")
@click.option("--metric", type=click.Choice(["test_accuracy", "test_macro_f1", "test_loss"]),
              default="test_accuracy", show_default=True, help="What 'better' means.")
def cli(model_uri: str, model_name: str, alias: str, metric: str) -> None:
    """Register MODEL_URI as a version of MODEL_NAME; move ALIAS if it is the best."""
    import mlflow

    if not alias.replace("_", "").replace("-", "").isalnum() or alias.lower() == "latest":
        raise click.BadParameter(
            f"{alias!r}: use letters, digits, '_' or '-' (and not 'latest')",
            param_hint="alias",
        )
    with step_run("register") as run:
        client = mlflow.MlflowClient()
        log_params_once({"model_uri": model_uri, "model_name": model_name, "alias": alias,
                           "metric": metric})
        evaluation = find_evaluation(client, run.info.experiment_id, model_uri)
        model_uri = evaluation.data.tags[TAG_MODEL_URI]
        if metric not in evaluation.data.metrics:
            raise StepError(f"evaluate run {evaluation.info.run_id} has no metric {metric}")
        version = register_version(client, model_name, model_uri, evaluation)
        new = Candidate(int(version.version), evaluation.data.metrics[metric],
                        evaluation.data.tags[TAG_DATA_DIGEST])
        decision = settle_alias(client, model_name, alias, metric, new)
        mlflow.set_tags({"pipeline.registered_version": version.version,
                         "pipeline.alias_decision": decision})
        log.info("register: %s version %s (%s %.4f)\n  %s\n  %s", model_name, version.version,
                 metric, new.score, decision, run_link(run))


def find_evaluation(client, experiment_id: str, model_uri: str):
    if model_uri:
        extra = f"tags.`{TAG_MODEL_URI}` = {quote(model_uri)}"
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
                extra = f"tags.`{TAG_MODEL_URI}` = {quote('models:/' + info.model_id)}"
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


def register_version(client, name: str, model_uri: str, evaluation):
    """The version holding ``model_uri``: the existing one, or a new one fully tagged."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="MNIST-style digit classifier; "
                                       "the `champion` alias marks the best version.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for existing in client.search_model_versions(f"name = {quote(name)}"):
        if existing.tags.get("model_uri") == model_uri:
            log.info("register: %s is already %s version %s; not creating another",
                     model_uri, name, existing.version)
            return existing
    tags = {
        "model_uri": model_uri,
        "data_digest": evaluation.data.tags[TAG_DATA_DIGEST],
        "dataset": evaluation.data.tags.get(TAG_DATASET, ""),
        "train_run_id": evaluation.data.tags.get(TAG_TRAIN_RUN, ""),
        "evaluate_run_id": evaluation.info.run_id,
        **{m: f"{evaluation.data.metrics[m]:.6f}" for m in COPIED_METRICS
           if m in evaluation.data.metrics},
    }
    # Tags go in with the version in one call: no version ever exists without them.
    return mlflow.register_model(model_uri, name, tags=tags)


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
