"""register: put an evaluated model in the registry and move the alias only if it is better.

Reads:  ``--model-uri`` (empty = the model of the newest finished evaluate run) and the
        newest finished evaluate run of that model (its ``--metric``, data digest, run ids,
        ``predictions.csv``); with ``--force``, ``models:/<name>/<version>`` or
        ``models:/<name>@<alias>`` of ``--model-name`` names an existing version directly.
Writes: a model version of ``--model-name`` (none if this model is already registered),
        tagged ``model_uri``, ``data_digest``, ``dataset``, ``train_run_id``,
        ``evaluate_run_id``, its test metrics (accuracy with its 95% interval), and
        ``validation_status`` (``passed``/``rejected``) with ``validation_reason``: the
        promotion rule, judged against the holder when it is registered (beat it by at
        least ``--min-delta`` on ``--metric`` and reach ``--min-score``); the ``--alias``
        (default ``champion``) moves to the best passing version on the holder's data, or
        when none holds it, or the holder's model can no longer be read, or ``--force`` is
        true (the target then passes; versions that outrank it are tagged ``demoted``);
        each move, with its rule, appended to the registered model's ``alias_history``;
        artifacts ``challenger/per_class_accuracy.{png,csv}``,
        ``challenger/disagreements.png`` and ``challenger/calibration_and_roc.png`` when
        the version is compared with a holder on the same data;
        params ``model_uri``, ``model_name``, ``alias``, ``metric``, ``min_delta``,
        ``min_score``, ``force``;
        tags ``pipeline.step``, ``pipeline.registered_version``, ``pipeline.alias_decision``.

The registry logic is in ``steps/tracking/registry/``: the versions (``versions.py``), the
rule, the race-safe alias move and its history (``promotion.py``), the challenger report
(``challenger.py``).
"""

from __future__ import annotations

import logging

import click

from steps.tracking.registry.challenger import log_challenger_report
from steps.tracking.registry.promotion import PromotionRule, force_alias, settle_alias
from steps.tracking.registry.versions import (
    Candidate,
    candidates,
    current_holder,
    find_evaluation,
    holder_to_beat,
    register_version,
    registered_version,
    stored_score,
    version_candidate,
)
from steps.tracking.runtime import options, tags
from steps.tracking.runtime.cli import StepError, run_cli
from steps.tracking.runtime.runs import log_cli_params, run_link, step_run

log = logging.getLogger("steps.register")


@click.command()
@options.MODEL_URI(help="Model to register (empty = newest evaluated).")
@options.MODEL_NAME()
@options.ALIAS()
@options.METRIC()
@options.MIN_DELTA()
@options.MIN_SCORE()
@click.option("--force", type=click.BOOL, default=False, show_default=True,
              help="Move ALIAS to this version whatever the scores (rollback, promotion).")
def cli(model_uri: str, model_name: str, alias: str, metric: str, min_delta: float,
        min_score: float | None, force: bool) -> None:
    """Register MODEL_URI as a version of MODEL_NAME; move ALIAS if it is the best."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if force and not model_uri:
        raise StepError("force=true needs model_uri: the version to move the alias to, e.g. "
                        f"models:/{model_name}/<version>")
    rule = PromotionRule(metric, min_delta, min_score)
    with step_run("register") as run:
        client = mlflow.MlflowClient()
        log_cli_params()
        run_id = run.info.run_id
        try:
            existing = registered_version(client, model_name, model_uri) if force else None
            if existing is not None:  # a rollback to (or promotion of) a registered version
                new = version_candidate(client, model_name, existing, metric)
            else:
                evaluation = find_evaluation(client, run.info.experiment_id, model_uri)
                model_uri = evaluation.data.tags[tags.MODEL_URI]
                scores = evaluation.data.metrics
                if metric not in scores:
                    raise StepError(f"evaluate run {evaluation.info.run_id} has no metric "
                                    f"{metric}")
                ci = ((stored_score(scores["test_accuracy_ci_low"]),
                       stored_score(scores["test_accuracy_ci_high"]))
                      if metric == "test_accuracy" and "test_accuracy_ci_low" in scores
                      else None)
                # Judged as it will be stored, against the holder as it is now.
                judged = Candidate(0, stored_score(scores[metric]),
                                   evaluation.data.tags[tags.DATA_DIGEST], model_uri, ci)
                verdict = rule.judge(judged, holder_to_beat(client, model_name, alias, metric))
                version = register_version(client, model_name, model_uri, evaluation,
                                           ("", "") if force else
                                           (verdict.status, verdict.reason()))
                new = version_candidate(client, model_name, int(version.version), metric)
            holder = candidates(client, model_name, metric, barred=True).get(
                current_holder(client, model_name, alias) or -1)
            if force:
                decision = force_alias(client, model_name, alias, rule, new, run_id)
            else:
                decision = settle_alias(client, model_name, alias, rule, new, run_id)
        except MlflowException as exc:
            if exc.error_code != "PERMISSION_DENIED":
                raise
            raise StepError(
                f"the tracking server refused to let this user write registered model "
                f"{model_name} (permission denied); ask its owner for EDIT permission or "
                "pass another model_name") from None
        mlflow.set_tags({tags.REGISTERED_VERSION: str(new.version),
                         tags.ALIAS_DECISION: decision.line()})
        report = ""
        if holder is not None and holder.version != new.version and holder.digest == new.digest:
            report = log_challenger_report(client, model_name, holder, new)
        log.info("register: %s version %s (%s %.4f)\n  %s%s\n  %s", model_name, new.version,
                 metric, new.score, decision.line(), f"\n  {report}" if report else "",
                 run_link(run))


if __name__ == "__main__":
    run_cli(cli, fast_exit=True, spark=False)
