"""Training inside a run: the core loop with its per-epoch metrics, curves and inputs
logged to the active run. Shared by ``train`` (one process, or global rank 0 of a
data-parallel job) and by every ``tune`` trial; the other ranks of a job train through
``train_replica`` and log nothing."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from steps import tags
from steps.cli import StepError
from steps.runs import log_dataset, run_link

log = logging.getLogger("steps.train")


def train_tracked(run, data: str, config, val_fraction: float, resolved_device: str,
                  replica=None) -> str:
    """``train``'s work inside its run: load and verify the data artifact, tag the run with
    it, train (as rank 0 of the job when ``replica`` has company), log both models.
    Returns the classifier's model URI."""
    import mlflow

    from steps.artifacts import load_data_artifact, log_models

    dataset = load_data_artifact(data)
    mlflow.set_tags({tags.DATA_URI: data, tags.DATA_DIGEST: dataset.digest,
                     tags.DATASET: dataset.name, tags.RESOLVED_DEVICE: resolved_device})
    result = fit_and_log(config, dataset, val_fraction, replica=replica)
    model_uri = log_models(result.model, config.arch, config.hidden, dataset.x_test[:2])
    workers = f", {replica.world} workers" if replica else ""
    log.info(
        "train: %s on %s (%d epochs, %s%s): best val_accuracy %.4f at epoch %d\n"
        "  model: %s\n  %s",
        config.arch, dataset.name, config.epochs, resolved_device, workers,
        result.best_val_accuracy, result.best_epoch, model_uri, run_link(run),
    )
    return model_uri


def train_replica(replica) -> None:
    """A rank other than 0: rank 0's data and settings, the same loop, no MLflow."""
    from steps.core.data import split_train_val
    from steps.core.training import train
    from steps.distributed import share_from_rank0

    logging.getLogger("steps.core.training").setLevel(logging.WARNING)  # rank 0 reports
    (config, val_fraction), images, labels = share_from_rank0(None)
    train_idx, val_idx = split_train_val(len(labels), val_fraction, config.seed)
    try:
        train(config, images, labels, train_idx, val_idx, replica=replica)
    except FloatingPointError as exc:
        raise StepError(str(exc)) from None


def fit_and_log(config, dataset, val_fraction: float,
                on_epoch_end: Callable | None = None, replica=None):
    """Train on ``dataset`` (validation split held out with ``config.seed``), logging the
    training input, per-epoch metrics, ``best_*`` and ``training_curves.png`` to the active
    run. Returns the core's ``TrainResult``; logging the model is the caller's choice
    (``steps.artifacts.log_models``). ``on_epoch_end`` may raise to stop early (pruning).
    """
    import mlflow

    from steps.core.data import split_train_val
    from steps.core.plots import training_curves_figure
    from steps.core.training import Replica, train

    if replica is not None:  # rank 0 of a data-parallel job (a steps.core Replica)
        from steps.distributed import share_from_rank0

        share_from_rank0((config, val_fraction), dataset.x_train, dataset.y_train)
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
                       on_epoch_end=log_epoch, progress=sys.stderr.isatty(),
                       replica=replica or Replica())
    except FloatingPointError as exc:
        raise StepError(str(exc)) from None
    mlflow.log_metrics({"best_val_accuracy": result.best_val_accuracy,
                        "best_epoch": result.best_epoch})
    mlflow.log_figure(
        training_curves_figure([vars(h) for h in result.history]), "training_curves.png"
    )
    return result
