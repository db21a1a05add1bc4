"""tune: an Optuna search over the training hyperparameters, every trial a nested run.

Reads:  one download_data run's artifact, fetched (or reused from the step cache) once as a
        child run and shared by every trial; with ``--storage``, the Optuna study
        ``--study-name`` in that storage, shared with every other ``tune`` pointed at it.
Writes: a nested run per trial (params ``learning_rate``, ``batch_size``, ``optimizer``,
        ``arch``, ``hidden``, ``lr_schedule``, ``augment``; per-epoch ``train_loss``, ``val_loss``, ``val_accuracy``;
        ``best_val_accuracy``; ``stopped_epoch`` with ``--patience`` (early stopping); tag
        ``optuna.state`` COMPLETE or PRUNED; a diverging trial's run is FAILED and the sweep
        goes on); on this run: params (every option), metrics ``best_val_accuracy``,
        ``completed_trials``, ``pruned_trials``, params ``best_<name>`` for the winner,
        figures ``optimization_history.png`` and ``param_importances.png``;
        the best trial's models (``model`` and ``classifier``) in the best trial's run
        (a worker of a shared study none of whose own trials completed logs none);
        tags ``pipeline.model_uri`` (best classifier), ``pipeline.best_trial_run_id``,
        ``pipeline.data_uri``; with a shared study, ``pipeline.study_name`` and the study's
        best over all workers as ``study_best_val_accuracy`` and ``pipeline.study_best_run_id``.

Scaling out: several ``tune`` processes, on one machine or many, given the same
``--storage`` (an Optuna RDB URL: ``postgresql+psycopg2://...``, ``sqlite:///...``) and
``--study-name`` share one study through Optuna's own storage; each runs ``--trials``
trials as nested runs of its own ``tune`` run, and every trial number is distinct.

Why Optuna and not the tutorials' hyperopt: Optuna is actively maintained, prunes hopeless
trials from their per-epoch reports (hyperopt cannot), and its define-by-run API expresses
conditional spaces (hidden sizes that mean different things for mlp and cnn) directly.
The search space and the trial runs are in ``steps/tracking/training/trials.py``.
"""

from __future__ import annotations

import logging

import click

from steps.core.text import first_line
from steps.tracking.inference.models import log_models
from steps.tracking.pipeline.launch import Pipeline
from steps.tracking.runtime import options, tags
from steps.tracking.runtime.artifacts import load_data_artifact
from steps.tracking.runtime.cli import StepError, run_cli
from steps.tracking.runtime.redact import redact
from steps.tracking.runtime.runs import (
    absolutize_tracking_uri,
    describe_experiment,
    log_cli_params,
    run_link,
    step_run,
    take_back,
)
from steps.tracking.runtime.store import check_store
from steps.tracking.training.trials import (
    MISSED_BEATS,
    TRIAL_RUN_ATTR,
    Objective,
    StaleTrials,
    log_sweep_summary,
)

log = logging.getLogger("steps.tune")


@click.command()
@options.DATASET()
@options.DATA_DIR()
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True)
@options.EPOCHS(default=3, help="Epochs per trial.")
@click.option("--timeout", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop starting trials after this many seconds (0 = no limit).")
@options.SEED()
@options.PATIENCE()
@options.MODEL_NAME()
@click.option("--storage", default="",
              help="Optuna storage URL shared by several tune processes (empty = in memory).")
@click.option("--study-name", default="",
              help="Study to create or join in the storage (empty = tune-<dataset>).")
@click.option("--heartbeat-interval", type=click.IntRange(min=0), default=30,
              show_default=True,
              help="With storage: seconds between a trial's heartbeats; a trial silent for "
                   f"{MISSED_BEATS} of them is failed and retried by another worker (0 = off).")
def cli(dataset: str, data_dir: str, trials: int, epochs: int, timeout: int, seed: int,
        patience: int, model_name: str, storage: str, study_name: str,
        heartbeat_interval: int) -> None:
    """Search hyperparameters with Optuna; log the best trial's model."""
    import mlflow
    import optuna

    absolutize_tracking_uri()
    check_store()
    # Optuna's own lines (a failed trial's traceback among them) stay off the console; the
    # sweep says what happened in its own.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if study_name and not storage:
        raise StepError("study_name is only used with storage (a study in memory is not "
                        "shared); pass storage too, or leave study_name empty")
    shared = open_storage(storage, heartbeat_interval)
    study_name = study_name or (f"tune-{dataset}" if storage else "")
    with step_run("tune", run_name=f"tune {dataset} {trials} trials e{epochs}") as parent:
        describe_experiment(parent.info.experiment_id)
        log_cli_params()
        data_run = Pipeline(mlflow.MlflowClient(), parent, use_cache=True).step(
            "download_data", {"dataset": dataset, "data_dir": data_dir}, data_dir=data_dir)
        data_uri = data_run.data.tags[tags.DATA_URI]
        mlflow.set_tag(tags.DATA_URI, data_uri)
        study = optuna.create_study(
            direction="maximize", study_name=study_name or f"tune-{parent.info.run_id}",
            storage=shared, load_if_exists=True,
            # Workers of one study must not all draw the same first trials.
            sampler=optuna.samplers.TPESampler(
                seed=seed if shared is None else worker_seed(seed, parent.info.run_id)),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        )
        if shared is not None:
            mlflow.set_tag(tags.STUDY_NAME, study.study_name)
        objective = Objective(study, load_data_artifact(data_uri), data_uri, epochs, seed,
                              patience, heartbeat_interval * MISSED_BEATS)
        run_trials(study, objective, trials, timeout)
        if objective.all_given_up:  # in case the survivor closed our run after we looked
            take_back(parent.info.run_id)
        best = objective.best
        completed = any(t.state.name == "COMPLETE" for t in study.trials)
        # In a shared study another worker's completed trial is this sweep's result too.
        if best is None and not (shared is not None and completed):
            raise StepError("no trial completed (all were pruned or failed); "
                            "widen the search with more epochs or trials")
        best_params = log_sweep_summary(study)
        if shared is not None:
            study_best = study.best_trial
            mlflow.log_metric("study_best_val_accuracy", study_best.value)
            mlflow.set_tag(tags.STUDY_BEST_RUN, study_best.user_attrs.get(TRIAL_RUN_ATTR, ""))
            log.info("tune: study %s (shared): %d trials over all workers, best val_accuracy "
                     "%.4f in trial %d (run %s); this worker ran %d", study.study_name,
                     len(study.trials), study_best.value, study_best.number,
                     study_best.user_attrs.get(TRIAL_RUN_ATTR, "?"), objective.trials_run)
        as_params = " ".join(f"-P {k}={v}" for k, v in best_params.items())
        if best is None:
            log.info("tune: none of this worker's %d trials completed (pruned, failed or "
                     "given up), so it logs no model; retrain the study's best through the "
                     "pipeline:  mlflow run . --env-manager local %s -P model_name=%s\n  %s",
                     objective.trials_run, as_params, model_name, run_link(parent))
            return
        with mlflow.start_run(run_id=best.run_id, nested=True):
            model_uri = log_models(best.network, best.config.arch, best.config.hidden,
                                   best.example, step=best.epoch)
        mlflow.set_tags({tags.MODEL_URI: model_uri, tags.BEST_TRIAL_RUN: best.run_id})
        pruned = sum(t.state.name == "PRUNED" for t in study.trials)
        log.info(
            "tune: %d trials (%d pruned), best val_accuracy %.4f: %s\n"
            "  best model (this process's best trial, run %s): %s\n"
            "  register it:  mlflow run . -e evaluate --env-manager local -P model_uri=%s "
            "&& mlflow run . -e register --env-manager local -P model_uri=%s -P model_name=%s\n"
            "  or retrain it through the pipeline:  mlflow run . --env-manager local %s "
            "-P model_name=%s\n  %s",
            len(study.trials), pruned, study.best_value, best_params, best.run_id,
            model_uri, model_uri, model_uri, model_name, as_params, model_name,
            run_link(parent),
        )


def run_trials(study, objective, trials: int, timeout: int) -> None:
    """Run ``trials`` trials of ``study``, starting none after ``timeout`` seconds (0: no
    limit), one ``optimize`` call each.

    A diverging trial (StepError) is a FAILED run and a failed trial, not a failed sweep. A
    trial given up under a paused worker (:class:`Objective`) is one of the trials run:
    Optuna refuses to record it again (``Cannot tell a FAIL trial``), and the sweep goes on
    with the next one (optuna/optuna#5470 asks for a worker to learn this sooner).
    """
    import time

    started = time.monotonic()
    for _ in range(trials):
        left = timeout - (time.monotonic() - started) if timeout else None
        if left is not None and left <= 0:
            break
        try:
            study.optimize(objective, n_trials=1, timeout=left, catch=(StepError,),
                           gc_after_trial=False)
        except ValueError:
            if objective.given_up is None:
                raise


def open_storage(storage: str, heartbeat_interval: int = 0):
    """Optuna's RDB storage for ``storage``, or None for an in-memory study; a URL that
    cannot be opened is refused naming the parameter.

    With ``heartbeat_interval``, every running trial beats that often; one silent for
    :data:`MISSED_BEATS` beats (its worker killed or lost) is failed by the next worker to
    start a trial, and retried (``steps.tracking.training.trials.StaleTrials``).
    """
    if not storage:
        return None
    import random
    import time
    import warnings

    import optuna
    from sqlalchemy.exc import DBAPIError

    beats = {}
    if heartbeat_interval:
        grace = heartbeat_interval * MISSED_BEATS
        beats = {"heartbeat_interval": heartbeat_interval, "grace_period": grace,
                 "heartbeat_stale_trial_callback": StaleTrials(grace)}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # Optuna calls its heartbeat "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(storage, **beats)
        except DBAPIError as exc:
            # Workers started together on a new database race to create Optuna's tables
            # (a unique violation in PostgreSQL's catalog); the loser finds them next time.
            error = exc
            time.sleep(0.5 + random.random() * (attempt + 1))
        except Exception as exc:  # a malformed URL, an unknown dialect or driver
            error = exc
            break
    raise StepError(f"storage={redact(storage)!r} cannot be opened as an Optuna storage "
                    f"({first_line(error)}); pass e.g. sqlite:///optuna.db or "
                    "postgresql+psycopg2://user@host/db") from None


def worker_seed(seed: int, run_id: str) -> int:
    """A sampler seed per worker: reproducible from the run, different across workers."""
    import zlib

    return zlib.crc32(f"{seed}:{run_id}".encode())


if __name__ == "__main__":
    run_cli(cli, fast_exit=True, spark=False)
