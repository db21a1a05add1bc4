"""The challenger report ``register`` logs when it compares a new version with the alias
holder on the same test data: per-class accuracy of both (figure and CSV), the images
exactly one of them gets right, and the two side by side for calibration (reliability
diagrams, ECE) and ROC (pooled over the classes, AUC).

Built from the ``predictions.csv`` and ``probabilities.npy`` each evaluate run logs, so no
model is loaded again; the images come from the evaluate run's data artifact. A report
that cannot be made (an evaluate run from before predictions were logged) is skipped with
a warning, and the calibration figure alone when probabilities are missing: it informs the
decision, it does not make it.
"""

from __future__ import annotations

import io
import logging

from steps.core.text import first_line
from steps.tracking.inference.scorecard import PREDICTIONS_FILE, PROBABILITIES_FILE, csv_text
from steps.tracking.registry.versions import Candidate
from steps.tracking.runtime import tags
from steps.tracking.runtime.artifacts import load_data_artifact
from steps.tracking.runtime.cli import StepError

log = logging.getLogger("steps.register")

REPORT_DIR = "challenger"


def _predictions(client, evaluate_run_id: str):
    """(labels, predicted) arrays from an evaluate run's ``predictions.csv``."""
    import mlflow
    import numpy as np

    text = mlflow.artifacts.load_text(f"runs:/{evaluate_run_id}/{PREDICTIONS_FILE}")
    table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, ndmin=2)
    return table[:, 1].astype(np.int64), table[:, 2].astype(np.int64)


def _probabilities(evaluate_run_id: str):
    """An evaluate run's ``probabilities.npy`` (test images, classes)."""
    import tempfile

    import mlflow
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=evaluate_run_id, artifact_path=PROBABILITIES_FILE, dst_path=tmp)
        return np.load(path, allow_pickle=False)


def _log_calibration_and_roc(labels, runs: dict, versions: list[tuple[str, int]]) -> bool:
    """The two versions' reliability diagrams and pooled ROC curves side by side; False
    (with a warning) when an evaluation has no probabilities to draw them from."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from steps.core import metrics
    from steps.core.plots import calibration_and_roc_comparison_figure

    drawn = []
    for label, version in versions:
        try:
            probabilities = _probabilities(runs[version])
            if probabilities.shape[0] != len(labels):
                raise ValueError(f"{probabilities.shape[0]} rows for {len(labels)} images")
        except (MlflowException, OSError, ValueError) as exc:
            log.warning("register: no calibration and ROC comparison: %s's evaluation has no "
                        "usable %s (%s)", label, PROBABILITIES_FILE, first_line(exc))
            return False
        drawn.append((label, metrics.reliability(labels, probabilities),
                      metrics.expected_calibration_error(labels, probabilities),
                      metrics.micro_roc(labels, probabilities)))
    mlflow.log_figure(calibration_and_roc_comparison_figure(drawn),
                      f"{REPORT_DIR}/calibration_and_roc.png")
    return True


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
    _log_calibration_and_roc(labels, runs, [(a, holder.version), (b, challenger.version)])
    return (f"challenger report ({REPORT_DIR}/): {b} alone right on "
            f"{len(comparison.only_challenger_right)} images, {a} alone right on "
            f"{len(comparison.only_holder_right)}")
