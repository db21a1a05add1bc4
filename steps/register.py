"""register: put an evaluated model in the registry and move the alias only if it is better.

Reads:  ``--model-uri`` (empty = the model of the newest finished evaluate run) and the
        newest finished evaluate run of that model (its ``--metric``, data digest, run ids).
Writes: a model version of ``--model-name`` (none if this model is already registered),
        tagged ``model_uri``, ``data_digest``, ``dataset``, ``train_run_id``,
        ``evaluate_run_id`` and its test metrics; the ``--alias`` (default ``champion``)
        when the version beats the current holder on the same data, or none holds it, or
        the holder's model can no longer be read;
        params ``model_uri``, ``model_name``, ``alias``, ``metric``;
        tags ``pipeline.step``, ``pipeline.registered_version``, ``pipeline.alias_decision``.

The registry logic (race-safe alias moves, comparisons) is in ``steps/registry.py``.
"""

from __future__ import annotations

import logging

import click

from steps import options, tags
from steps.cli import StepError, run_cli
from steps.registry import Candidate, find_evaluation, register_version, settle_alias
from steps.runs import log_cli_params, run_link, step_run

log = logging.getLogger("steps.register")


@click.command()
@options.MODEL_URI(help="Model to register (empty = newest evaluated).")
@options.MODEL_NAME()
@options.ALIAS()
@options.METRIC()
def cli(model_uri: str, model_name: str, alias: str, metric: str) -> None:
    """Register MODEL_URI as a version of MODEL_NAME; move ALIAS if it is the best."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with step_run("register") as run:
        client = mlflow.MlflowClient()
        log_cli_params()
        evaluation = find_evaluation(client, run.info.experiment_id, model_uri)
        model_uri = evaluation.data.tags[tags.MODEL_URI]
        if metric not in evaluation.data.metrics:
            raise StepError(f"evaluate run {evaluation.info.run_id} has no metric {metric}")
        try:
            version = register_version(client, model_name, model_uri, evaluation)
            new = Candidate(int(version.version), evaluation.data.metrics[metric],
                            evaluation.data.tags[tags.DATA_DIGEST], model_uri)
            decision = settle_alias(client, model_name, alias, metric, new)
        except MlflowException as exc:
            if exc.error_code != "PERMISSION_DENIED":
                raise
            raise StepError(
                f"the tracking server refused to let this user write registered model "
                f"{model_name} (permission denied); ask its owner for EDIT permission or "
                "pass another model_name") from None
        mlflow.set_tags({tags.REGISTERED_VERSION: version.version,
                         tags.ALIAS_DECISION: decision})
        log.info("register: %s version %s (%s %.4f)\n  %s\n  %s", model_name, version.version,
                 metric, new.score, decision, run_link(run))


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
