"""Classification metrics from labels and predicted probabilities. NumPy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    confusion: np.ndarray  # (classes, classes): rows are true labels, columns predictions
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    predictions: np.ndarray

    def scalar_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """Flat metric dict for a tracker: overall numbers plus one entry per class."""
        metrics = {f"{prefix}accuracy": self.accuracy, f"{prefix}loss": self.loss}
        for name, values in (("precision", self.precision), ("recall", self.recall),
                             ("f1", self.f1)):
            metrics[f"{prefix}macro_{name}"] = float(values.mean())
            metrics.update({f"{prefix}{name}_class_{i}": float(v) for i, v in enumerate(values)})
        return metrics

    def per_class_rows(self, class_names: list[str]) -> list[dict]:
        return [
            {"class": i, "name": class_names[i], "precision": round(float(self.precision[i]), 4),
             "recall": round(float(self.recall[i]), 4), "f1": round(float(self.f1[i]), 4),
             "support": int(self.support[i])}
            for i in range(len(self.support))
        ]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(
        y_true * num_classes + y_pred, minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)


def evaluate_predictions(
    y_true: np.ndarray, probabilities: np.ndarray, num_classes: int = 10
) -> Evaluation:
    """Accuracy, cross-entropy and per-class precision/recall/F1 from class probabilities."""
    if len(y_true) == 0:
        raise ValueError("cannot evaluate on an empty split")
    y_true = np.asarray(y_true, dtype=np.int64)
    predictions = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(y_true)), y_true]
    loss = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    cm = confusion_matrix(y_true, predictions, num_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted_count, support = cm.sum(axis=0), cm.sum(axis=1)
    # A class never predicted (or absent) has undefined precision (recall); report 0, as
    # scikit-learn does with zero_division=0, rather than NaN that breaks charts.
    precision = np.divide(tp, predicted_count, out=np.zeros_like(tp), where=predicted_count > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return Evaluation(
        accuracy=float((predictions == y_true).mean()), loss=loss, confusion=cm,
        precision=precision, recall=recall, f1=f1, support=support, predictions=predictions,
    )


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
