"""evaluate: score a logged model on the test split and draw the figures people look at.

Reads:  ``--model-uri`` (empty = ``models:/<model_name>@champion`` if that alias exists,
        else the newest finished train run's model) and ``--data`` (empty = the data the
        model was trained on, found through the train run's tags).
Writes: params ``model_uri``, ``data``, ``model_name``;
        metrics ``test_accuracy`` with its 95% Wilson interval ``test_accuracy_ci_low`` /
        ``_high``, ``test_loss`` (log-loss), ``test_top2_accuracy``, ``test_ece``
        (expected calibration error, 15 bins), ``test_brier``,
        ``test_macro_{precision,recall,f1,roc_auc,pr_auc}`` and
        ``test_{precision,recall,f1,roc_auc,pr_auc}_class_<k>`` (scikit-learn's);
        artifacts ``confusion_matrix.png`` (counts), ``confusion_matrix_normalized.png``,
        ``misclassified.png``, ``roc_curves.png`` and ``pr_curves.png`` (all ten classes
        each), ``reliability_diagram.png``, ``per_class_metrics.csv`` (with the AUC
        columns), ``predictions.csv`` (per test image: index, label, predicted, confidence)
        and ``probabilities.npy`` (per test image, every class), both read by ``register``;
        input ``<dataset>-test`` (context ``test``);
        tags ``pipeline.step``, ``pipeline.model_uri`` (the concrete ``models:/m-...`` URI),
        ``pipeline.train_run_id``, ``pipeline.data_uri``, ``pipeline.data_digest``.
"""

from __future__ import annotations

import logging

import click

from steps.tracking.inference.scorecard import data_for_model, evaluate_and_log, resolve_model
from steps.tracking.runtime import options, tags
from steps.tracking.runtime.artifacts import load_data_artifact
from steps.tracking.runtime.cli import run_cli
from steps.tracking.runtime.runs import log_cli_params, run_link, step_run

log = logging.getLogger("steps.evaluate")


@click.command()
@options.MODEL_URI(help="Model to evaluate (empty = champion or newest).")
@options.DATA(help="Data artifact URI (empty = the model's training data).")
@options.MODEL_NAME()
def cli(model_uri: str, data: str, model_name: str) -> None:
    """Evaluate a model on the test split; log metrics, confusion matrices and examples."""
    import mlflow

    with step_run("evaluate") as run:
        client = mlflow.MlflowClient()
        log_cli_params()
        model_uri, info = resolve_model(client, run.info.experiment_id, model_uri, model_name)
        data = data_for_model(client, info, data)
        dataset = load_data_artifact(data)
        mlflow.set_tags({
            tags.MODEL_URI: model_uri, tags.TRAIN_RUN: info.run_id or "",
            tags.DATA_URI: data, tags.DATA_DIGEST: dataset.digest, tags.DATASET: dataset.name,
        })
        evaluation = evaluate_and_log(model_uri, dataset)
        low, high = evaluation.accuracy_ci
        auc = evaluation.macro_roc_auc
        log.info(
            "evaluate: %s on %s test split (%d images): accuracy %.4f (95%% CI %.4f-%.4f), "
            "loss %.4f, top-2 %.4f, macro ROC AUC %s, ECE %.4f, Brier %.4f\n"
            "  figures: confusion_matrix.png, confusion_matrix_normalized.png, "
            "misclassified.png, roc_curves.png, pr_curves.png, reliability_diagram.png\n  %s",
            model_uri, dataset.name, len(dataset.y_test), evaluation.accuracy, low, high,
            evaluation.loss, evaluation.top2_accuracy,
            "n/a" if auc is None else f"{auc:.4f}", evaluation.ece,
            evaluation.brier, run_link(run),
        )


if __name__ == "__main__":
    run_cli(cli, fast_exit=True, spark=False)
