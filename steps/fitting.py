"""Training inside a run: the core loop with its per-epoch metrics, curves and inputs
logged to the active run. Shared by ``train`` and by every ``tune`` trial."""

from __future__ import annotations

import sys
from collections.abc import Callable

from steps.cli import StepError
from steps.runs import log_dataset


def fit_and_log(config, dataset, val_fraction: float,
                on_epoch_end: Callable | None = None):
    """Train on ``dataset`` (validation split held out with ``config.seed``), logging the
    training input, per-epoch metrics, ``best_*`` and ``training_curves.png`` to the active
    run. Returns the core's ``TrainResult``; logging the model is the caller's choice
    (``steps.artifacts.log_models``). ``on_epoch_end`` may raise to stop early (pruning).
    """
    import mlflow

    from steps.core.data import split_train_val
    from steps.core.plots import training_curves_figure
    from steps.core.training import train

    train_idx, val_idx = split_train_val(len(dataset.y_train), val_fraction, config.seed)
    log_dataset(dataset.x_train, dataset.y_train, f"{dataset.name}-train", context="training")

    def log_epoch(epoch):
        mlflow.log_metrics(
            {"train_loss": epoch.train_loss, "val_loss": epoch.val_loss,
             "val_accuracy": epoch.val_accuracy, "epoch_seconds": epoch.seconds},
            step=epoch.epoch,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    try:
        result = train(config, dataset.x_train, dataset.y_train, train_idx, val_idx,
                       on_epoch_end=log_epoch, progress=sys.stderr.isatty())
    except FloatingPointError as exc:
        raise StepError(str(exc)) from None
    mlflow.log_metrics({"best_val_accuracy": result.best_val_accuracy,
                        "best_epoch": result.best_epoch})
    mlflow.log_figure(
        training_curves_figure([vars(h) for h in result.history]), "training_curves.png"
    )
    return result
