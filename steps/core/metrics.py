"""Classification metrics from labels and predicted probabilities, through scikit-learn's
``metrics`` and ``calibration`` (a pinned dependency already): what a reviewer knows how to
read, computed the way everyone computes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CALIBRATION_BINS = 15
CONFIDENCE = 0.95
_Z = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95% interval


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float  # cross-entropy (log-loss) of the true class
    confusion: np.ndarray  # (classes, classes): rows are true labels, columns predictions
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    predictions: np.ndarray
    top2_accuracy: float
    roc_auc: np.ndarray  # per class, one-vs-rest; NaN for a class absent from the labels
    pr_auc: np.ndarray  # per class average precision; NaN likewise
    ece: float  # expected calibration error of the top label, CALIBRATION_BINS bins
    brier: float  # multiclass Brier score: mean squared distance to the one-hot label
    accuracy_ci: tuple[float, float]  # Wilson interval for the accuracy, CONFIDENCE level

    @property
    def macro_roc_auc(self) -> float | None:
        return _mean_of_defined(self.roc_auc)

    def scalar_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """Flat metric dict for a tracker: overall numbers plus one entry per class (a
        per-class AUC that is undefined is left out rather than logged as NaN)."""
        metrics = {f"{prefix}accuracy": self.accuracy, f"{prefix}loss": self.loss,
                   f"{prefix}accuracy_ci_low": self.accuracy_ci[0],
                   f"{prefix}accuracy_ci_high": self.accuracy_ci[1],
                   f"{prefix}top2_accuracy": self.top2_accuracy,
                   f"{prefix}ece": self.ece, f"{prefix}brier": self.brier}
        for name, values in (("precision", self.precision), ("recall", self.recall),
                             ("f1", self.f1), ("roc_auc", self.roc_auc),
                             ("pr_auc", self.pr_auc)):
            macro = _mean_of_defined(values)
            if macro is not None:
                metrics[f"{prefix}macro_{name}"] = macro
            metrics.update({f"{prefix}{name}_class_{i}": float(v) for i, v in enumerate(values)
                            if not np.isnan(v)})
        return metrics

    def per_class_rows(self, class_names: list[str]) -> list[dict]:
        def rounded(value: float):
            return "" if np.isnan(value) else round(float(value), 4)

        return [
            {"class": i, "name": class_names[i], "precision": round(float(self.precision[i]), 4),
             "recall": round(float(self.recall[i]), 4), "f1": round(float(self.f1[i]), 4),
             "roc_auc": rounded(self.roc_auc[i]), "pr_auc": rounded(self.pr_auc[i]),
             "support": int(self.support[i])}
            for i in range(len(self.support))
        ]


def _mean_of_defined(values: np.ndarray) -> float | None:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else None


def wilson_interval(correct: int, total: int, z: float = _Z) -> tuple[float, float]:
    """The Wilson score interval for a proportion: unlike the normal approximation it stays
    inside [0, 1] and behaves near 0 and 1, where good classifiers live."""
    if total <= 0:
        raise ValueError("an interval needs at least one trial")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # At 0 and at 1 the interval touches the bound exactly; rounding would leave it short.
    return (0.0 if correct == 0 else float(centre - half),
            1.0 if correct == total else float(centre + half))


def _one_vs_rest(y_true: np.ndarray, probabilities: np.ndarray, score) -> np.ndarray:
    """``score(is_class_k, p_k)`` per class; NaN for a class the labels lack (or hold only),
    where a ranking metric is undefined."""
    values = np.full(probabilities.shape[1], np.nan)
    for k in range(probabilities.shape[1]):
        positive = y_true == k
        if 0 < positive.sum() < len(y_true):
            values[k] = score(positive, probabilities[:, k])
    return values


def reliability(y_true: np.ndarray, probabilities: np.ndarray,
                bins: int = CALIBRATION_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label reliability: per non-empty confidence bin (equal widths over [0, 1]), the
    mean confidence, the accuracy and the number of images (scikit-learn's
    ``calibration_curve`` on "the top label is right")."""
    from sklearn.calibration import calibration_curve

    confidence = probabilities.max(axis=1)
    right = (probabilities.argmax(axis=1) == y_true).astype(int)
    accuracy, mean_confidence = calibration_curve(right, confidence, n_bins=bins,
                                                  strategy="uniform")
    # calibration_curve's own binning, to count what it averaged over (it drops empty bins).
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)
    return mean_confidence, accuracy, counts[counts > 0]


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """How far the top label's confidence is from its accuracy, averaged over the bins
    weighted by their share of the images (0 = perfectly calibrated)."""
    confidence, accuracy, counts = reliability(y_true, probabilities, bins)
    return float(np.sum(counts * np.abs(accuracy - confidence)) / counts.sum())


def evaluate_predictions(
    y_true: np.ndarray, probabilities: np.ndarray, num_classes: int = 10
) -> Evaluation:
    """Every metric ``evaluate`` logs, from the labels and the class probabilities."""
    from sklearn import metrics

    if len(y_true) == 0:
        raise ValueError("cannot evaluate on an empty split")
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.arange(num_classes)
    predictions = probabilities.argmax(axis=1)
    # A class never predicted (or absent) has undefined precision (recall): 0, not NaN.
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y_true, predictions, labels=labels, zero_division=0)
    correct = int((predictions == y_true).sum())
    # Softmax outputs in float32 sum to 1 only up to rounding; log_loss wants exactly 1.
    normalised = probabilities / probabilities.sum(axis=1, keepdims=True)
    return Evaluation(
        accuracy=correct / len(y_true),
        loss=float(metrics.log_loss(y_true, normalised, labels=labels)),
        confusion=metrics.confusion_matrix(y_true, predictions, labels=labels),
        precision=precision, recall=recall, f1=f1, support=support, predictions=predictions,
        top2_accuracy=float(metrics.top_k_accuracy_score(y_true, probabilities, k=2,
                                                         labels=labels)),
        roc_auc=_one_vs_rest(y_true, probabilities, metrics.roc_auc_score),
        pr_auc=_one_vs_rest(y_true, probabilities, metrics.average_precision_score),
        ece=expected_calibration_error(y_true, probabilities),
        brier=float(metrics.brier_score_loss(y_true, normalised, labels=labels,
                                             scale_by_half=False)),
        accuracy_ci=wilson_interval(correct, len(y_true)),
    )


def curves(y_true: np.ndarray, probabilities: np.ndarray, kind: str) -> list[tuple]:
    """Per class, one-vs-rest: (class, x, y, area) of its ROC curve (``kind="roc"``: false
    and true positive rates) or precision-recall curve (``"pr"``: recall, precision); a
    class the labels lack (or hold only) is left out."""
    from sklearn import metrics

    y_true = np.asarray(y_true, dtype=np.int64)
    found = []
    for k in range(probabilities.shape[1]):
        positive = y_true == k
        if not 0 < positive.sum() < len(y_true):
            continue
        if kind == "roc":
            x, y, _ = metrics.roc_curve(positive, probabilities[:, k])
            area = metrics.roc_auc_score(positive, probabilities[:, k])
        else:
            y, x, _ = metrics.precision_recall_curve(positive, probabilities[:, k])
            area = metrics.average_precision_score(positive, probabilities[:, k])
        found.append((k, x, y, float(area)))
    return found


def micro_roc(y_true: np.ndarray, probabilities: np.ndarray) -> tuple:
    """(false positive rates, true positive rates, area) of every class's one-vs-rest
    decision pooled: one curve that sums a classifier up, for comparing two."""
    from sklearn import metrics

    onehot = np.eye(probabilities.shape[1], dtype=int)[np.asarray(y_true, dtype=np.int64)]
    fpr, tpr, _ = metrics.roc_curve(onehot.ravel(), probabilities.ravel())
    return fpr, tpr, float(metrics.auc(fpr, tpr))


@dataclass(frozen=True)
class Comparison:
    """Two models' predictions on the same labelled images."""

    rows: list[dict]  # per class: support and each model's accuracy
    only_holder_right: np.ndarray  # indices of images the holder gets right, the challenger not
    only_challenger_right: np.ndarray


def compare_predictions(y_true: np.ndarray, holder: np.ndarray, challenger: np.ndarray,
                        class_names: list[str]) -> Comparison:
    """Per-class accuracy of two models on the same images, and where exactly one is right."""
    y_true, holder, challenger = (np.asarray(a, dtype=np.int64)
                                  for a in (y_true, holder, challenger))
    if not len(y_true) == len(holder) == len(challenger):
        raise ValueError(f"predictions of different lengths: {len(y_true)} labels, "
                         f"{len(holder)} holder, {len(challenger)} challenger")
    holder_right, challenger_right = holder == y_true, challenger == y_true
    rows = []
    for k, name in enumerate(class_names):
        mask = y_true == k
        n = int(mask.sum())
        a = float(holder_right[mask].mean()) if n else 0.0
        b = float(challenger_right[mask].mean()) if n else 0.0
        rows.append({"class": k, "name": name, "support": n, "holder_accuracy": round(a, 4),
                     "challenger_accuracy": round(b, 4), "difference": round(b - a, 4)})
    return Comparison(rows, np.flatnonzero(holder_right & ~challenger_right),
                      np.flatnonzero(challenger_right & ~holder_right))
