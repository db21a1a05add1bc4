"""Figures for people: confusion matrices, misclassified examples, training curves, ROC and
precision-recall curves, reliability diagrams.

Built on ``matplotlib.figure.Figure`` directly (no pyplot): no global state, no GUI backend,
and nothing to close when a figure goes out of scope.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def confusion_matrix_figure(
    cm: np.ndarray, class_names: list[str], normalized: bool = False
) -> Figure:
    values = cm.astype(np.float64)
    if normalized:
        row_sums = values.sum(axis=1, keepdims=True)
        values = np.divide(values, row_sums, out=np.zeros_like(values), where=row_sums > 0)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(image, ax=ax, label="fraction of true class" if normalized else "images")
    n = len(class_names)
    ax.set_xticks(range(n), class_names, rotation=45 if max(map(len, class_names)) > 2 else 0,
                  ha="right" if max(map(len, class_names)) > 2 else "center")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    total_acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(
        f"Confusion matrix{' (normalized by row)' if normalized else ''} "
        f"- accuracy {total_acc:.2%}"
    )
    threshold = values.max() / 2 if values.size else 0
    for i in range(n):
        for j in range(n):
            text = f"{values[i, j]:.2f}" if normalized else f"{int(values[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if values[i, j] > threshold else "black")
    return fig


CELL, LABEL_H = 28 + 4, 18  # mosaic pixels per digit (with a margin) and per label line


def _digit_mosaic(ax, images: np.ndarray, indices: np.ndarray, labels: list[str],
                  cols: int) -> None:
    """Draw ``images[indices]`` on ``ax`` as one image with a text label over each digit.

    One mosaic with text rather than one axes per digit: a figure with dozens of axes
    takes seconds to render, and these are drawn on every pipeline.
    """
    rows = max(1, int(np.ceil(len(indices) / cols)))
    mosaic = np.full((rows * (CELL + LABEL_H), cols * CELL), 255, dtype=np.uint8)
    for k, i in enumerate(indices):
        r, c = divmod(k, cols)
        top = r * (CELL + LABEL_H) + LABEL_H
        mosaic[top + 2 : top + 30, c * CELL + 2 : c * CELL + 30] = 255 - images[i].reshape(28, 28)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    for k, label in enumerate(labels):
        r, c = divmod(k, cols)
        ax.text(c * CELL + CELL / 2, r * (CELL + LABEL_H) + LABEL_H - 1, label,
                ha="center", va="bottom", fontsize=7, color="firebrick")


def misclassified_figure(
    images: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    confidence: np.ndarray,
    class_names: list[str],
    max_images: int = 36,
    cols: int = 6,
) -> Figure:
    """A grid of the most confidently wrong predictions, labelled true -> predicted."""
    wrong = np.flatnonzero(y_true != y_pred)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:max_images]
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig = Figure(figsize=(cols * 1.5, rows * 1.5 + 0.6), layout="constrained")
    ax = fig.add_subplot()
    _digit_mosaic(ax, images, wrong, [
        f"{class_names[y_true[i]]} / {class_names[y_pred[i]]} {confidence[i]:.0%}"
        for i in wrong], cols)
    ax.set_title(
        f"Misclassified: {int((y_true != y_pred).sum())} of {len(y_true)} test images "
        "(most confident mistakes first; true / predicted, confidence)"
        if len(wrong) else "no misclassified images",
        fontsize=10,
    )
    return fig


def class_curves_figure(curves: list[tuple], class_names: list[str], kind: str) -> Figure:
    """Every class's one-vs-rest ROC curve (``kind="roc"``) or precision-recall curve
    (``"pr"``) in one axes, its area in the legend (``steps.core.metrics.curves``)."""
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    for k, x, y, area in curves:
        ax.plot(x, y, lw=1.2, label=f"{class_names[k]}  ({area:.3f})",
                drawstyle="steps-post" if kind == "pr" else "default")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
        ax.set(xlabel="false positive rate (log scale below 0.001)",
               ylabel="true positive rate", title="ROC curves, one class against the rest (AUC)")
        ax.legend(loc="lower right", fontsize=8, title="class (AUC)")
        # A good classifier's curves differ only in the top-left corner: stretch it.
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlim(0, 1)
    else:
        ax.set(xlabel="recall", ylabel="precision",
               title="Precision-recall curves, one class against the rest (AP)")
        ax.legend(loc="lower left", fontsize=8, title="class (average precision)")
        ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    return fig


def _reliability_axes(ax, diagrams: list[tuple]) -> None:
    """Draw reliability curves (label, mean confidence, accuracy, counts, ECE) and the
    diagonal of perfect calibration."""
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1, label="perfectly calibrated")
    for label, confidence, accuracy, _counts, ece in diagrams:
        ax.plot(confidence, accuracy, "o-", ms=4, label=f"{label} (ECE {ece:.3f})")
    ax.set(xlabel="confidence of the predicted class", ylabel="accuracy",
           xlim=(0, 1.01), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def reliability_figure(confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray,
                       ece: float) -> Figure:
    """Reliability diagram of the top label, with how many images each bin holds."""
    fig = Figure(figsize=(7, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    _reliability_axes(top, [("model", confidence, accuracy, counts, ece)])
    top.set_title("Reliability diagram: is a confidence of 90% right 90% of the time?")
    bottom.bar(confidence, counts, width=0.04, color="tab:blue")
    bottom.set_yscale("log")
    bottom.set(xlabel="confidence of the predicted class", ylabel="images per bin (log)")
    top.set_xlabel("")
    return fig


def calibration_and_roc_comparison_figure(models: list[tuple]) -> Figure:
    """Two models side by side: their reliability diagrams in one panel and their pooled
    (micro-averaged) ROC curves in the other. ``models``: (label, reliability triple, ECE,
    (fpr, tpr, auc))."""
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    calibration, roc = fig.subplots(1, 2)
    _reliability_axes(calibration, [(label, *diagram, ece)
                                    for label, diagram, ece, _ in models])
    calibration.set_title("Calibration of the predicted class")
    roc.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    for label, _, _, (fpr, tpr, area) in models:
        roc.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC {area:.4f})")
    roc.set(xlabel="false positive rate (log scale below 0.001)", ylabel="true positive rate",
            title="ROC, every class against the rest, pooled")
    # The interesting part of a good classifier's ROC is its top-left corner.
    roc.set_xscale("symlog", linthresh=1e-3)
    roc.set_xlim(0, 1)
    roc.grid(alpha=0.3)
    roc.legend(loc="lower right", fontsize=8)
    return fig


def class_accuracy_comparison_figure(rows: list[dict], holder: str, challenger: str) -> Figure:
    """Grouped bars: each class's accuracy under the holder and under the challenger."""
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    a = [r["holder_accuracy"] for r in rows]
    b = [r["challenger_accuracy"] for r in rows]
    ax.bar(x - 0.2, a, 0.4, label=f"holder {holder}", color="tab:gray")
    ax.bar(x + 0.2, b, 0.4, label=f"challenger {challenger}", color="tab:blue")
    ax.set_xticks(x, [str(r["name"]) for r in rows])
    low = min([*a, *b, 1.0])
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("true class")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Per-class accuracy on the same test images: {holder} vs {challenger}")
    ax.legend(loc="lower right")
    return fig


def disagreements_figure(images: np.ndarray, y_true: np.ndarray, holder_pred: np.ndarray,
                         challenger_pred: np.ndarray, only_holder_right: np.ndarray,
                         only_challenger_right: np.ndarray, class_names: list[str],
                         holder: str, challenger: str, max_images: int = 18,
                         cols: int = 6) -> Figure:
    """Two grids: images only the holder gets right, and images only the challenger does;
    each labelled true / the other model's (wrong) answer."""
    fig = Figure(figsize=(cols * 1.5, 2 * (max_images // cols) * 1.5 + 1.2),
                 layout="constrained")
    panels = ((only_holder_right, challenger_pred, f"{holder} right, {challenger} wrong"),
              (only_challenger_right, holder_pred, f"{challenger} right, {holder} wrong"))
    for k, (indices, wrong_pred, title) in enumerate(panels):
        ax = fig.add_subplot(2, 1, k + 1)
        shown = indices[:max_images]
        _digit_mosaic(ax, images, shown, [
            f"{class_names[y_true[i]]} / {class_names[wrong_pred[i]]}" for i in shown], cols)
        ax.set_title(f"{title}: {len(indices)} images (true / wrong answer)"
                     if len(indices) else f"{title}: none", fontsize=10)
    return fig


def training_curves_figure(history: list[dict]) -> Figure:
    """Loss (train and validation) and validation accuracy per epoch."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    loss_ax.legend()
    acc = [h["val_accuracy"] for h in history]
    acc_ax.plot(epochs, acc, "o-", color="tab:green")
    best = int(np.argmax(acc))
    acc_ax.annotate(f"best {acc[best]:.2%}", (epochs[best], acc[best]),
                    textcoords="offset points", xytext=(0, -15), ha="center")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    return fig


def search_history_figure(values: list[float | None], states: list[str]) -> Figure:
    """Each trial's validation accuracy and the best so far; pruned trials marked."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    numbers = list(range(len(values)))
    done = [(n, v) for n, v, s in zip(numbers, values, states, strict=True)
            if v is not None and s == "COMPLETE"]
    pruned = [(n, v) for n, v, s in zip(numbers, values, states, strict=True)
              if v is not None and s == "PRUNED"]
    if done:
        ax.plot(*zip(*done, strict=True), "o", label="complete")
        best, running = [], -np.inf
        for _, v in done:
            running = max(running, v)
            best.append(running)
        ax.step([n for n, _ in done], best, where="post", color="tab:red", label="best so far")
    if pruned:
        ax.plot(*zip(*pruned, strict=True), "x", color="gray", label="pruned (last report)")
    ax.set(xlabel="trial", ylabel="validation accuracy", title="Optimization history")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def importance_figure(importances: dict[str, float]) -> Figure:
    """Horizontal bars: each hyperparameter's share of importance, as Optuna rates it."""
    fig = Figure(figsize=(7, 0.5 * max(len(importances), 2) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (Optuna's default evaluator; the bars sum to 1)",
           title="Hyperparameter importance")
    ax.grid(axis="x", alpha=0.3)
    return fig


def top_probability_figure(histogram: list[int], labels: dict[int, int]) -> Figure:
    """Scored images: how sure the model was (its top probability, in equal bins over 0-1)
    and how many it gave each label."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    sure_ax, label_ax = fig.subplots(1, 2, width_ratios=(3, 2))
    width = 1 / len(histogram)
    sure_ax.bar(np.arange(len(histogram)) * width, histogram, width=width, align="edge",
                color="tab:blue", edgecolor="white")
    sure_ax.set(xlim=(0, 1), xlabel="top probability", ylabel="images",
                title=f"How sure: top probability of {sum(histogram)} scored images")
    if max(histogram, default=0) > 0:
        sure_ax.set_yscale("symlog", linthresh=1)
    classes = sorted(labels)
    label_ax.bar([str(c) for c in classes], [labels[c] for c in classes], color="tab:green")
    label_ax.set(xlabel="predicted label", ylabel="images", title="Predicted labels")
    for ax in (sure_ax, label_ax):
        ax.grid(axis="y", alpha=0.3)
    return fig
