"""Trials of a hyperparameter sweep: the search space, one trial as one nested run, what a
surviving worker does with a lost worker's trial, and what the sweep logs at its end.
``steps/tune.py`` only parses, opens its run and calls these."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from steps.core.choices import ARCHS, AUGMENTS, LR_SCHEDULES, OPTIMIZERS
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import StepError
from steps.tracking.runtime.runs import (
    WORKER_LOST,
    ClosedElsewhere,
    Ending,
    end_run,
    step_run,
    take_back,
)
from steps.tracking.training.fit import fit_and_log

log = logging.getLogger("steps.tune")

VAL_FRACTION = 0.1
TRIAL_RUN_ATTR = "mlflow_run_id"  # Optuna user attribute: the trial's run, for every worker
# A shared study gives a worker up after this many missed heartbeats (Optuna's grace period).
MISSED_BEATS = 3
# How often the parameters of a trial whose worker was lost are tried again.
MAX_RETRIES = 2


def search_space(trial) -> dict:
    """The trial's training params, named as ``train`` takes them; hidden sizes depend on
    the architecture (units for mlp, channels for cnn)."""
    arch = trial.suggest_categorical("arch", list(ARCHS))
    if arch == "mlp":
        first = trial.suggest_categorical("mlp_hidden_1", [64, 128, 256, 512])
        second = trial.suggest_categorical("mlp_hidden_2", [32, 64, 128, 256])
    else:
        first = trial.suggest_categorical("cnn_channels_1", [8, 16, 32])
        second = trial.suggest_categorical("cnn_channels_2", [16, 32, 64])
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128, 256]),
        "optimizer": trial.suggest_categorical("optimizer", list(OPTIMIZERS)),
        "arch": arch,
        "hidden": f"{first},{second}",
        "lr_schedule": trial.suggest_categorical("lr_schedule", list(LR_SCHEDULES)),
        "augment": trial.suggest_categorical("augment", list(AUGMENTS)),
    }


def to_train_params(params: dict) -> dict:
    """Optuna's flat trial params -> the names ``train``/``main`` take."""
    arch = params["arch"]
    prefix = "mlp_hidden" if arch == "mlp" else "cnn_channels"
    return {"learning_rate": params["learning_rate"], "batch_size": params["batch_size"],
            "optimizer": params["optimizer"], "arch": arch,
            "hidden": f"{params[prefix + '_1']},{params[prefix + '_2']}",
            # A trial of a study begun before these knobs trained without them.
            "lr_schedule": params.get("lr_schedule", "constant"),
            "augment": params.get("augment", "none")}


@dataclass
class BestTrial:
    """The best completed trial so far: its network stays in memory, so only the winner's
    model is ever logged."""

    accuracy: float
    epoch: int  # the trial's best epoch: the logged model's step
    run_id: str
    config: object  # TrainConfig
    network: object  # nn.Module with the best epoch's weights
    example: object  # two validation-shaped images for the logged model's input example


class Objective:
    """Optuna's objective: each call trains one trial as a nested run of the active run.

    A trial can be given up under it: paused past the heartbeat's grace (a laptop lid
    closed, SIGSTOP), this worker wakes to find its trial FAILED by a surviving worker,
    which retries its parameters and closed its runs KILLED. The trial is then left as they
    left it, the worker's ``tune`` run is taken back, and the trial ends pruned, which
    Optuna then refuses to record over the FAIL (:attr:`given_up` says so; ``tune`` goes
    on with its next trial).
    """

    def __init__(self, study, dataset, data_uri: str, epochs: int, seed: int,
                 patience: int = 0, grace_period: int = 0) -> None:
        self.study, self.dataset, self.data_uri = study, dataset, data_uri
        self.epochs, self.seed, self.patience = epochs, seed, patience
        self.grace_period = grace_period
        self.best: BestTrial | None = None
        self.trials_run = 0
        self.given_up: int | None = None  # this call's trial, if it was given up under us
        self.all_given_up: list[int] = []

    def __call__(self, trial) -> float:
        import mlflow
        import optuna

        from steps.core.choices import parse_hidden
        from steps.core.training import TrainConfig

        self.given_up = None
        params = search_space(trial)
        config = TrainConfig(epochs=self.epochs, seed=self.seed, device="auto",
                             learning_rate=params["learning_rate"],
                             batch_size=params["batch_size"], optimizer=params["optimizer"],
                             arch=params["arch"], hidden=parse_hidden(params["hidden"]),
                             lr_schedule=params["lr_schedule"], augment=params["augment"],
                             patience=self.patience)
        # A retry (StaleTrials) starts with the user attributes of the trial it retries.
        lost_run = trial.user_attrs.get(TRIAL_RUN_ATTR)
        try:
            with step_run("tune_trial", run_name=f"trial-{trial.number}", nested=True, **{
                    tags.OPTUNA_TRIAL: str(trial.number), tags.DATA_URI: self.data_uri,
                    tags.DATA_DIGEST: self.dataset.digest, tags.DATASET: self.dataset.name,
                    **({tags.RETRY_OF_RUN: lost_run} if lost_run else {}),
            }) as run:
                self.trials_run += 1
                trial.set_user_attr(TRIAL_RUN_ATTR, run.info.run_id)
                mlflow.log_params({**params, "epochs": self.epochs, "seed": self.seed,
                                   "patience": self.patience, "data": self.data_uri})
                result = self._fit(trial, config)
                if self._taken(trial):
                    raise ClosedElsewhere(f"trial {trial.number} was given up")
                # A pruned trial did its job: its run ends FINISHED, tagged PRUNED.
                mlflow.set_tag(tags.OPTUNA_STATE, "PRUNED" if result is None else "COMPLETE")
        except ClosedElsewhere:
            self._carry_on(trial)
            raise optuna.TrialPruned(f"trial {trial.number} was given up") from None
        except StepError as exc:  # a diverging trial: Optuna records it FAIL, and we say why
            log.warning("tune: trial %d failed: %s", trial.number, exc)
            raise
        if result is None:
            raise optuna.TrialPruned()
        if self.best is None or result.best_val_accuracy > self.best.accuracy:
            self.best = BestTrial(result.best_val_accuracy, result.best_epoch, run.info.run_id,
                                  config, result.model, self.dataset.x_test[:2])
        return result.best_val_accuracy

    def _fit(self, trial, config):
        """The trial's TrainResult, or None when the pruner stopped it."""
        import optuna

        def report(epoch):
            try:
                trial.report(epoch.val_accuracy, epoch.epoch)
            except optuna.exceptions.UpdateFinishedTrialError:
                raise ClosedElsewhere(f"trial {trial.number} was given up") from None
            # After the last epoch the work is done: pruning it would only throw it away
            # (and with epochs=1 a worker could end with every trial pruned).
            if epoch.epoch < config.epochs and trial.should_prune():
                raise optuna.TrialPruned()

        try:
            return fit_and_log(config, self.dataset, VAL_FRACTION, on_epoch_end=report)
        except optuna.TrialPruned:
            return None

    def _taken(self, trial) -> bool:
        """Whether the trial was given up (FAILED by another worker) after its last report."""
        from optuna.trial import TrialState

        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return trial.number not in {t.number for t in running}

    def _carry_on(self, trial) -> None:
        import mlflow

        self.given_up = trial.number
        self.all_given_up.append(trial.number)
        parent = mlflow.active_run()
        if parent is not None:
            take_back(parent.info.run_id)
        log.warning("tune: trial %d was given up by another worker while this one was paused "
                    "(no heartbeat for %ds); it stays FAILED and its run KILLED, its "
                    "parameters are retried there; this worker goes on", trial.number,
                    self.grace_period)


class StaleTrials:
    """Optuna's ``heartbeat_stale_trial_callback`` for a shared study.

    A surviving worker has just marked FAILED a trial whose worker stopped beating (killed,
    its machine lost). Its parameters are queued to be tried again by whichever worker
    starts a trial next (Optuna's ``RetryHeartbeatStaleTrialCallback``, at most
    :data:`MAX_RETRIES` times), and the lost worker's MLflow runs, the trial's and its
    ``tune`` run, are closed KILLED saying why: no process is left to close them.
    """

    def __init__(self, grace_period: int) -> None:
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.grace_period = grace_period
        with warnings.catch_warnings():  # Optuna calls the callback "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)

    def __call__(self, study, trial) -> None:
        import mlflow
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self.retry(study, trial)
        because = (f"its tune worker stopped (Optuna trial {trial.number} had no heartbeat for "
                   f"{self.grace_period}s); marked KILLED by a surviving worker")
        log.warning("tune: trial %d lost its worker (no heartbeat for %ds); its parameters "
                    "are tried again", trial.number, self.grace_period)
        client = mlflow.MlflowClient()
        run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
        while run_id:
            run = client.get_run(run_id)
            if run.info.status == "RUNNING":
                end_run(client, run_id, Ending("KILLED", WORKER_LOST, because))
            # The trial's parent is the lost worker's tune run; it stops there.
            run_id = (run.data.tags.get(MLFLOW_PARENT_RUN_ID)
                      if run.data.tags.get(tags.STEP) == "tune_trial" else None)


def log_sweep_summary(study) -> dict:
    """Log the sweep's metrics, best params and figures to the active run; return the best
    params as ``train`` takes them."""
    import mlflow
    import optuna

    from steps.core.plots import importance_figure, search_history_figure

    states = [t.state.name for t in study.trials]
    mlflow.log_metrics({"best_val_accuracy": study.best_value,
                        "completed_trials": states.count("COMPLETE"),
                        "pruned_trials": states.count("PRUNED")})
    best_params = to_train_params(study.best_trial.params)
    mlflow.log_params({f"best_{k}": v for k, v in best_params.items()})
    # A pruned trial is drawn at its last report, a failed one not at all.
    values = [t.value if t.value is not None else
              (max(t.intermediate_values.values()) if t.intermediate_values else None)
              for t in study.trials]
    mlflow.log_figure(search_history_figure(values, states), "optimization_history.png")
    if states.count("COMPLETE") >= 2:
        with warnings.catch_warnings():  # "few trials per regime": expected in small sweeps
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
        mlflow.log_figure(importance_figure(importances), "param_importances.png")
    return best_params
