"""The challenger report ``register`` logs when it compares a new version with the alias
holder on the same test data: per-class accuracy of both (figure and CSV) and the images
exactly one of them gets right.

Built from the ``predictions.csv`` each evaluate run logs, so no model is loaded again;
the images come from the evaluate run's data artifact. A report that cannot be made (an
evaluate run from before predictions were logged) is skipped with a warning: it informs
the decision, it does not make it.
"""

from __future__ import annotations

import io
import logging

from steps.tracking import tags
from steps.tracking.artifacts import load_data_artifact
from steps.tracking.cli import StepError, first_line
from steps.tracking.evaluation import PREDICTIONS_FILE, csv_text
from steps.tracking.registry import Candidate

log = logging.getLogger("steps.register")

REPORT_DIR = "challenger"


def _predictions(client, evaluate_run_id: str):
    """(labels, predicted) arrays from an evaluate run's ``predictions.csv``."""
    import mlflow
    import numpy as np

    text = mlflow.artifacts.load_text(f"runs:/{evaluate_run_id}/{PREDICTIONS_FILE}")
    table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, ndmin=2)
    return table[:, 1].astype(np.int64), table[:, 2].astype(np.int64)


def log_challenger_report(client, name: str, holder: Candidate, challenger: Candidate) -> str:
    """Log the comparison of ``challenger`` with ``holder`` to the active run; return a
    one-line summary ('' when it could not be made)."""
    import mlflow
    import numpy as np
    from mlflow.exceptions import MlflowException

    from steps.core.metrics import compare_predictions
    from steps.core.plots import class_accuracy_comparison_figure, disagreements_figure

    runs = {}
    for candidate in (holder, challenger):
        version_tags = client.get_model_version(name, str(candidate.version)).tags
        runs[candidate.version] = version_tags.get(tags.VERSION_EVALUATE_RUN, "")
    try:
        labels, holder_pred = _predictions(client, runs[holder.version])
        challenger_labels, challenger_pred = _predictions(client, runs[challenger.version])
        if not np.array_equal(labels, challenger_labels):
            raise ValueError("the two evaluations scored different test images")
        data_uri = client.get_run(runs[challenger.version]).data.tags[tags.DATA_URI]
        dataset = load_data_artifact(data_uri)
        if len(dataset.y_test) != len(labels):
            raise ValueError(f"{data_uri} holds {len(dataset.y_test)} test images, the "
                             f"predictions {len(labels)}")
    except (MlflowException, OSError, KeyError, ValueError, StepError) as exc:
        log.warning("register: no challenger report for v%d vs v%d: %s", challenger.version,
                    holder.version, first_line(exc))
        return ""
    classes = list(dataset.classes)
    comparison = compare_predictions(labels, holder_pred, challenger_pred, classes)
    a, b = f"v{holder.version}", f"v{challenger.version}"
    mlflow.log_text(csv_text(comparison.rows), f"{REPORT_DIR}/per_class_accuracy.csv")
    mlflow.log_figure(class_accuracy_comparison_figure(comparison.rows, a, b),
                      f"{REPORT_DIR}/per_class_accuracy.png")
    mlflow.log_figure(
        disagreements_figure(dataset.x_test, labels, holder_pred, challenger_pred,
                             comparison.only_holder_right, comparison.only_challenger_right,
                             classes, a, b),
        f"{REPORT_DIR}/disagreements.png")
    return (f"challenger report ({REPORT_DIR}/): {b} alone right on "
            f"{len(comparison.only_challenger_right)} images, {a} alone right on "
            f"{len(comparison.only_holder_right)}")
