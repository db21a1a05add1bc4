"""evaluate: score a logged model on the test split and draw the figures people look at.

Reads:  ``--model-uri`` (empty = ``models:/<model_name>@champion`` if that alias exists,
        else the newest finished train run's model) and ``--data`` (empty = the data the
        model was trained on, found through the train run's tags).
Writes: params ``model_uri``, ``data``, ``model_name``;
        metrics ``test_accuracy``, ``test_loss``, ``test_macro_{precision,recall,f1}`` and
        ``test_{precision,recall,f1}_class_<k>``;
        artifacts ``confusion_matrix.png`` (counts), ``confusion_matrix_normalized.png``,
        ``misclassified.png``, ``per_class_metrics.csv``;
        input ``<dataset>-test`` (context ``test``);
        tags ``pipeline.step``, ``pipeline.model_uri`` (the concrete ``models:/m-...`` URI),
        ``pipeline.train_run_id``, ``pipeline.data_uri``, ``pipeline.data_digest``.
"""

from __future__ import annotations

import csv
import io
import logging

import click

from steps.tracking import (
    TAG_DATA_DIGEST,
    TAG_DATA_URI,
    TAG_DATASET,
    TAG_MODEL_URI,
    TAG_TRAIN_RUN,
    StepError,
    latest_finished_run,
    load_data_artifact,
    load_pyfunc,
    log_params_once,
    model_name_option,
    run_cli,
    run_link,
    step_run,
)

log = logging.getLogger("steps.evaluate")


def resolve_model(client, experiment_id: str, model_uri: str, model_name: str):
    """(concrete model URI, ModelInfo) for ``model_uri`` or, when empty, the default choice."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri:
        try:
            version = client.get_model_version_by_alias(model_name, "champion")
            model_uri = f"models:/{version.model_id}" if version.model_id else version.source
        except MlflowException:
            train_run = latest_finished_run(client, experiment_id, "train")
            if train_run is None or TAG_MODEL_URI not in train_run.data.tags:
                raise StepError(
                    f"model_uri is empty, no model is registered as {model_name}@champion and "
                    "this experiment has no finished train run; run the pipeline first "
                    "(`mlflow run . --env-manager local`) or pass model_uri"
                ) from None
            model_uri = train_run.data.tags[TAG_MODEL_URI]
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        raise StepError(
            f"model_uri={model_uri!r} does not name a logged model "
            f"({str(exc).splitlines()[0]}); pass models:/<model_id>, models:/<name>/<version>, "
            "models:/<name>@<alias> or runs:/<run_id>/model"
        ) from None
    if info.model_id:
        model_uri = f"models:/{info.model_id}"
    return model_uri, info


def data_for_model(client, info, data: str) -> str:
    """The data URI the model was trained on, read from its train run's tags."""
    if data:
        return data
    tags = client.get_run(info.run_id).data.tags if info.run_id else {}
    if TAG_DATA_URI not in tags:
        raise StepError(
            "data is empty and the model's training run records no data URI; pass data"
        )
    return tags[TAG_DATA_URI]


@click.command()
@click.option("--model-uri", default="", help="Model to evaluate (empty = champion or newest).")
@click.option("--data", default="", help="Data artifact URI (empty = the model's training data).")
@model_name_option
def cli(model_uri: str, data: str, model_name: str) -> None:
    """Evaluate a model on the test split; log metrics, confusion matrices and examples."""
    import mlflow

    with step_run("evaluate") as run:
        client = mlflow.MlflowClient()
        log_params_once({"model_uri": model_uri, "data": data, "model_name": model_name})
        model_uri, info = resolve_model(client, run.info.experiment_id, model_uri, model_name)
        data = data_for_model(client, info, data)
        dataset = load_data_artifact(data)
        mlflow.set_tags({
            TAG_MODEL_URI: model_uri, TAG_TRAIN_RUN: info.run_id or "",
            TAG_DATA_URI: data, TAG_DATA_DIGEST: dataset.digest, TAG_DATASET: dataset.name,
        })
        evaluation = evaluate_and_log(model_uri, dataset)
        log.info(
            "evaluate: %s on %s test split (%d images): accuracy %.4f, loss %.4f\n"
            "  figures: confusion_matrix.png, confusion_matrix_normalized.png, "
            "misclassified.png\n  %s",
            model_uri, dataset.name, len(dataset.y_test), evaluation.accuracy, evaluation.loss,
            run_link(run),
        )


def predict_probabilities(model_uri: str, images):
    """Class probabilities (N, classes) from a classifier (label + probabilities columns) or
    from a bare network whose pyfunc answers with the probability matrix itself."""
    import numpy as np

    model = load_pyfunc(model_uri)
    output = model.predict(np.ascontiguousarray(images, dtype=np.float32))
    if hasattr(output, "columns") and "probabilities" in output.columns:
        return np.stack(output["probabilities"].to_numpy()).astype(np.float64)
    output = np.asarray(output, dtype=np.float64)
    if output.ndim != 2:
        raise StepError(f"model_uri={model_uri!r} does not output class probabilities")
    return output


def evaluate_and_log(model_uri: str, dataset):
    import mlflow
    import mlflow.data

    from steps.core.data import dataset_digest
    from steps.core.metrics import evaluate_predictions
    from steps.core.plots import confusion_matrix_figure, misclassified_figure

    probabilities = predict_probabilities(model_uri, dataset.x_test)
    evaluation = evaluate_predictions(dataset.y_test, probabilities, len(dataset.classes))
    mlflow.log_metrics(evaluation.scalar_metrics("test_"))
    mlflow.log_input(
        mlflow.data.from_numpy(
            dataset.x_test, targets=dataset.y_test, name=f"{dataset.name}-test",
            digest=dataset_digest(dataset.x_test, dataset.y_test),
        ),
        context="test",
    )
    classes = list(dataset.classes)
    mlflow.log_figure(confusion_matrix_figure(evaluation.confusion, classes),
                      "confusion_matrix.png")
    mlflow.log_figure(confusion_matrix_figure(evaluation.confusion, classes, normalized=True),
                      "confusion_matrix_normalized.png")
    confidence = probabilities.max(axis=1)
    mlflow.log_figure(
        misclassified_figure(dataset.x_test, dataset.y_test, evaluation.predictions,
                             confidence, classes),
        "misclassified.png",
    )
    rows = evaluation.per_class_rows(classes)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    mlflow.log_text(buffer.getvalue(), "per_class_metrics.csv")
    return evaluation


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
