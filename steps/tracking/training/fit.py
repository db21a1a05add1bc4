"""Fitting a network inside a run: the core loop with its per-epoch metrics, checkpoints,
curves and inputs logged to the active run. Shared by ``train`` (one process, or the
tracking rank of a data-parallel job: :func:`train_in_run`) and by every ``tune`` trial
(:func:`fit_and_log`); the other ranks of a job train through :func:`train_replica` and log
nothing."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import StepError
from steps.tracking.runtime.runs import add_record, log_dataset, run_link
from steps.tracking.training import checkpoints

log = logging.getLogger("steps.train")

EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "epoch_seconds")


def train_in_run(run, data: str, config, val_fraction: float, resolved_device: str,
                  replica=None, checkpoint_every: int = 0, restart: int = 0) -> str:
    """``train``'s work inside its run: load and verify the data artifact, tag the run with
    it, continue the run's checkpoint if it has one, train (as the tracking rank of the job
    when ``replica`` is given), log both models. Returns the classifier's model URI.

    ``restart`` > 0: the job's agent restarted the ranks after a failure; where they
    continue is added to the run's newest ``pipeline.restarts`` record."""
    import mlflow

    from steps.tracking.inference.models import log_models
    from steps.tracking.runtime.artifacts import load_data_artifact

    dataset = load_data_artifact(data)
    mlflow.set_tags({tags.DATA_URI: data, tags.DATA_DIGEST: dataset.digest,
                     tags.DATASET: dataset.name, tags.RESOLVED_DEVICE: resolved_device})
    run = mlflow.MlflowClient().get_run(run.info.run_id)  # with the tags set since it began
    resume_from = checkpoints.load(run, config)
    from_epoch = resume_from["epoch"] + 1 if resume_from is not None else 1
    if restart:
        add_record(run.info.run_id, tags.RESTARTS, {"from_epoch": from_epoch}, amend=True)
    elif resume_from is not None:
        add_record(run.info.run_id, tags.RESUMES, {"from_epoch": from_epoch,
                                                   "epochs": config.epochs}, amend=True)
    if resume_from is not None:
        log.info("train: continuing run %s at epoch %d of %d from its checkpoint",
                 run.info.run_id, from_epoch, config.epochs)
    writer = checkpoints.CheckpointWriter(run.info.run_id, checkpoints.Pointer.of(run),
                                          config.epochs) if checkpoint_every else None
    result = fit_and_log(config, dataset, val_fraction, replica=replica,
                         checkpoint_every=checkpoint_every, on_checkpoint=writer,
                         resume_from=resume_from, logged_epochs=logged_epochs(run))
    if writer is not None:  # what surviving a stop costs this run, in seconds
        mlflow.log_metric("checkpoint_seconds", writer.seconds)
    model_uri = log_models(result.model, config.arch, config.hidden, dataset.x_test[:2],
                           step=result.best_epoch)
    workers = f", {replica.world} workers" if replica else ""
    saved = (f"; checkpoints {writer.last.bytes / 2**20:.1f} MiB each, "
             f"{writer.seconds:.2f}s writing them" if writer and writer.last else "")
    log.info(
        "train: %s on %s (%d epochs, %s%s): best val_accuracy %.4f at epoch %d%s\n"
        "  model: %s\n  %s",
        config.arch, dataset.name, config.epochs, resolved_device, workers,
        result.best_val_accuracy, result.best_epoch, saved, model_uri, run_link(run),
    )
    return model_uri


def logged_epochs(run) -> int:
    """The last epoch the run already logged (0 for none): a continued run logs no epoch
    twice."""
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    return max((m.step for m in history), default=0)


def train_replica(replica) -> None:
    """A rank other than the tracking rank: its data, settings and checkpoint, the same
    loop, no MLflow."""
    from steps.core.data import split_train_val
    from steps.core.training import train
    from steps.tracking.training.elastic import share_from_tracking_rank

    logging.getLogger("steps.core.training").setLevel(logging.WARNING)  # one rank reports
    (config, val_fraction, resume_from), images, labels = share_from_tracking_rank(None)
    train_idx, val_idx = split_train_val(len(labels), val_fraction, config.seed)
    try:
        train(config, images, labels, train_idx, val_idx, replica=replica,
              resume_from=resume_from)
    except FloatingPointError as exc:
        raise StepError(str(exc)) from None


def fit_and_log(config, dataset, val_fraction: float,
                on_epoch_end: Callable | None = None, replica=None,
                checkpoint_every: int = 0, on_checkpoint: Callable | None = None,
                resume_from: dict | None = None, logged_epochs: int = 0):
    """Train on ``dataset`` (validation split held out with ``config.seed``), logging the
    training input, per-epoch metrics, ``best_*``, ``stopped_epoch`` (with patience) and
    ``training_curves.png`` to the active run. Returns the core's ``TrainResult``; logging
    the model is the caller's choice (``steps.tracking.inference.models.log_models``).
    ``on_epoch_end`` may raise to stop early (pruning).

    Continuing a checkpoint (``resume_from``), the epochs it holds that the run has not
    logged yet (``logged_epochs`` is the last one it has) are logged first, and no epoch
    at or before ``logged_epochs`` is logged again.
    """
    import mlflow

    from steps.core.data import split_train_val
    from steps.core.plots import training_curves_figure
    from steps.core.training import EpochResult, Replica, train

    if replica is not None:  # the tracking rank of a job (a steps.core Replica)
        from steps.tracking.training.elastic import share_from_tracking_rank

        share_from_tracking_rank((config, val_fraction, resume_from), dataset.x_train,
                                 dataset.y_train)
    train_idx, val_idx = split_train_val(len(dataset.y_train), val_fraction, config.seed)
    if resume_from is None:
        log_dataset(dataset.x_train, dataset.y_train, f"{dataset.name}-train",
                    context="training")

    def log_metrics_of(epoch):
        if epoch.epoch > logged_epochs:
            mlflow.log_metrics(dict(zip(EPOCH_METRICS, (
                epoch.train_loss, epoch.val_loss, epoch.val_accuracy, epoch.seconds),
                strict=True)), step=epoch.epoch)

    def log_epoch(epoch):
        log_metrics_of(epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    # Checkpointed, then stopped before it was logged: logged now, not reported again.
    for earlier in (resume_from or {}).get("history", []):
        log_metrics_of(EpochResult(**earlier))
    try:
        result = train(config, dataset.x_train, dataset.y_train, train_idx, val_idx,
                       on_epoch_end=log_epoch, progress=sys.stderr.isatty(),
                       replica=replica or Replica(), checkpoint_every=checkpoint_every,
                       on_checkpoint=on_checkpoint, resume_from=resume_from)
    except FloatingPointError as exc:
        raise StepError(str(exc)) from None
    ending = {"best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch}
    if config.patience:
        ending["stopped_epoch"] = result.stopped_epoch or result.history[-1].epoch
    mlflow.log_metrics(ending)
    mlflow.log_figure(
        training_curves_figure([vars(h) for h in result.history]), "training_curves.png"
    )
    return result
