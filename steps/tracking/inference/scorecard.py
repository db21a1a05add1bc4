"""A model's scorecard on the test split, for ``evaluate``: which model and data to score,
the metrics, the figures, and the per-image predictions ``register`` compares.

Kept out of the entry script so that ``evaluate`` stays a door (parse, track, call).
"""

from __future__ import annotations

import csv
import io

from steps.core.text import first_line
from steps.tracking.inference.models import load_pyfunc
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import StepError
from steps.tracking.runtime.runs import latest_finished_run, log_dataset, where_else


def resolve_model(client, experiment_id: str, model_uri: str, model_name: str):
    """(concrete model URI, ModelInfo) for ``model_uri`` or, when empty, the champion of
    ``model_name``, else the newest finished train run's model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri:
        try:
            version = client.get_model_version_by_alias(model_name, tags.DEFAULT_ALIAS)
            model_uri = f"models:/{version.model_id}" if version.model_id else version.source
        except MlflowException:
            train_run = latest_finished_run(client, experiment_id, "train")
            if train_run is None or tags.MODEL_URI not in train_run.data.tags:
                raise StepError(
                    f"model_uri is empty, no model is registered as "
                    f"{model_name}@{tags.DEFAULT_ALIAS} and this experiment has no finished "
                    "train run; run the pipeline first (`mlflow run . --env-manager local`) "
                    "or pass model_uri" + where_else(client, "train", experiment_id)
                ) from None
            model_uri = train_run.data.tags[tags.MODEL_URI]
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        raise StepError(
            f"model_uri={model_uri!r} does not name a logged model ({first_line(exc)}); pass "
            "models:/<model_id>, models:/<name>/<version>, models:/<name>@<alias> or "
            "runs:/<run_id>/model"
        ) from None
    if info.model_id:
        model_uri = f"models:/{info.model_id}"
    return model_uri, info


def data_for_model(client, info, data: str) -> str:
    """``data``, or when empty the data URI the model was trained on (its run's tags)."""
    if data:
        return data
    run_tags = client.get_run(info.run_id).data.tags if info.run_id else {}
    if tags.DATA_URI not in run_tags:
        raise StepError(
            "data is empty and the model's training run records no data URI; pass data"
        )
    return run_tags[tags.DATA_URI]


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
    """Score ``model_uri`` on the test split; log metrics, input, figures, the per-class
    table and the per-image predictions and probabilities to the active run; return the
    core's ``Evaluation``."""
    import mlflow

    from steps.core import metrics
    from steps.core.plots import (
        class_curves_figure,
        confusion_matrix_figure,
        misclassified_figure,
        reliability_figure,
    )

    probabilities = predict_probabilities(model_uri, dataset.x_test)
    evaluation = metrics.evaluate_predictions(dataset.y_test, probabilities,
                                              len(dataset.classes))
    mlflow.log_metrics(evaluation.scalar_metrics("test_"))
    log_dataset(dataset.x_test, dataset.y_test, f"{dataset.name}-test", context="test")
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
    for kind in ("roc", "pr"):
        mlflow.log_figure(class_curves_figure(metrics.curves(dataset.y_test, probabilities,
                                                             kind), classes, kind),
                          f"{kind}_curves.png")
    mlflow.log_figure(reliability_figure(*metrics.reliability(dataset.y_test, probabilities),
                                         evaluation.ece), "reliability_diagram.png")
    mlflow.log_text(csv_text(evaluation.per_class_rows(classes)), "per_class_metrics.csv")
    # Per image, so that register can compare a challenger with the holder without
    # loading either model again.
    mlflow.log_text(csv_text(
        {"index": i, "label": int(label), "predicted": int(predicted),
         "confidence": round(float(conf), 4)}
        for i, (label, predicted, conf) in enumerate(
            zip(dataset.y_test, evaluation.predictions, confidence, strict=True))),
        PREDICTIONS_FILE)
    log_array(probabilities.astype("float32"), PROBABILITIES_FILE)
    return evaluation


def log_array(array, artifact_file: str) -> None:
    """Log a NumPy array to the active run as an ``.npy`` file."""
    import tempfile
    from pathlib import Path

    import mlflow
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, Path(artifact_file).name)
        np.save(path, array, allow_pickle=False)
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent).strip(".") or None)


PREDICTIONS_FILE = "predictions.csv"
PROBABILITIES_FILE = "probabilities.npy"  # (test images, classes) float32, in test order


def csv_text(rows) -> str:
    """Rows (dicts with the same keys) as CSV text with a header."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(first))
    writer.writeheader()
    writer.writerow(first)
    writer.writerows(rows)
    return buffer.getvalue()
