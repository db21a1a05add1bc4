"""tune: an Optuna search over the training hyperparameters, every trial a nested run.

Reads:  one download_data run's artifact, fetched (or reused from the step cache) once as a
        child run and shared by every trial.
Writes: a nested run per trial (params ``learning_rate``, ``batch_size``, ``optimizer``,
        ``arch``, ``hidden``; per-epoch ``train_loss``, ``val_loss``, ``val_accuracy``;
        ``best_val_accuracy``; tag ``optuna.state`` COMPLETE or PRUNED; a diverging
        trial's run is FAILED and the sweep goes on);
        on this run: params (every option), metrics ``best_val_accuracy``,
        ``completed_trials``, ``pruned_trials``, params ``best_<name>`` for the winner,
        figures ``optimization_history.png`` and ``param_importances.png``;
        the best trial's models (``model`` and ``classifier``) in the best trial's run;
        tags ``pipeline.model_uri`` (best classifier), ``pipeline.best_trial_run_id``,
        ``pipeline.data_uri``.

Why Optuna and not the tutorials' hyperopt: Optuna is actively maintained, prunes hopeless
trials from their per-epoch reports (hyperopt cannot), and its define-by-run API expresses
conditional spaces (hidden sizes that mean different things for mlp and cnn) directly.
"""

from __future__ import annotations

import logging
import warnings

import click

from steps.core.choices import ARCHS, DATASETS, OPTIMIZERS
from steps.tracking import (
    TAG_DATA_DIGEST,
    TAG_DATA_URI,
    TAG_DATASET,
    TAG_MODEL_URI,
    StepError,
    load_data_artifact,
    log_params_once,
    model_name_option,
    run_cli,
    run_link,
    step_run,
)

log = logging.getLogger("steps.tune")

def suggest(trial) -> dict:
    """The search space; hidden sizes depend on the architecture."""
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
    }


@click.command()
@click.option("--dataset", type=click.Choice(DATASETS), default="mnist", show_default=True)
@click.option("--data-dir", default="", help="Folder with IDX files instead of downloading.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Epochs per trial.")
@click.option("--timeout", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop starting trials after this many seconds (0 = no limit).")
@click.option("--seed", type=int, default=42, show_default=True)
@model_name_option
def cli(dataset: str, data_dir: str, trials: int, epochs: int, timeout: int, seed: int,
        model_name: str) -> None:
    """Search hyperparameters with Optuna; log the best trial's model."""
    import mlflow
    import optuna

    from steps.core.plots import importance_figure, search_history_figure
    from steps.core.training import TrainConfig
    from steps.main import Pipeline, absolutize_tracking_uri, folder_fingerprint
    from steps.train import fit_and_log, log_models

    absolutize_tracking_uri()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with step_run("tune") as parent:
        log_params_once({"dataset": dataset, "data_dir": data_dir, "trials": trials,
                         "epochs": epochs, "timeout": timeout, "seed": seed,
                         "model_name": model_name})
        pipeline = Pipeline(mlflow.MlflowClient(), parent, use_cache=True)
        data_run = pipeline.step("download_data", {"dataset": dataset, "data_dir": data_dir},
                                 [], extra=folder_fingerprint(data_dir))
        data_uri = data_run.data.tags[TAG_DATA_URI]
        data = load_data_artifact(data_uri)
        mlflow.set_tag(TAG_DATA_URI, data_uri)
        best = {"accuracy": -1.0, "model": None, "config": None, "x_val": None, "run_id": None}

        def objective(trial) -> float:
            params = suggest(trial)
            config = TrainConfig(epochs=epochs, seed=seed, device="auto",
                                 learning_rate=params["learning_rate"],
                                 batch_size=params["batch_size"],
                                 optimizer=params["optimizer"], arch=params["arch"],
                                 hidden=tuple(int(h) for h in params["hidden"].split(",")))

            def report(epoch):
                trial.report(epoch.val_accuracy, epoch.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            with step_run("tune_trial", run_name=f"trial-{trial.number}", nested=True,
                          **{"optuna.trial": str(trial.number), TAG_DATA_URI: data_uri,
                             TAG_DATA_DIGEST: data.digest, TAG_DATASET: data.name}) as run:
                mlflow.log_params({**params, "epochs": epochs, "seed": seed,
                                   "data": data_uri})
                try:
                    _, result, x_val = fit_and_log(config, data, 0.1, on_epoch_end=report,
                                                   with_models=False)
                except optuna.TrialPruned as exc:
                    # A pruned trial did its job: its run ends FINISHED, tagged PRUNED.
                    mlflow.set_tag("optuna.state", "PRUNED")
                    pruned = exc
                else:
                    pruned = None
                    mlflow.set_tag("optuna.state", "COMPLETE")
                    if result.best_val_accuracy > best["accuracy"]:
                        best.update(accuracy=result.best_val_accuracy, model=result.model,
                                    config=config, x_val=x_val[:2], run_id=run.info.run_id)
            if pruned is not None:
                raise pruned
            return result.best_val_accuracy

        study = optuna.create_study(
            direction="maximize", study_name=f"tune-{parent.info.run_id}",
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        )
        # A diverging trial (StepError) is a FAILED run and a failed trial, not a failed sweep.
        study.optimize(objective, n_trials=trials, timeout=timeout or None,
                       catch=(StepError,), gc_after_trial=False)
        if best["run_id"] is None:
            raise StepError("no trial completed (all were pruned or failed); "
                            "widen the search with more epochs or trials")
        with mlflow.start_run(run_id=best["run_id"], nested=True):
            model_uri = log_models(best["model"], best["config"].arch, best["config"].hidden,
                                   best["x_val"])
        states = [t.state.name for t in study.trials]
        mlflow.log_metrics({"best_val_accuracy": study.best_value,
                            "completed_trials": states.count("COMPLETE"),
                            "pruned_trials": states.count("PRUNED")})
        best_params = suggest_to_train_params(study.best_trial.params)
        mlflow.log_params({f"best_{k}": v for k, v in best_params.items()})
        mlflow.set_tags({TAG_MODEL_URI: model_uri,
                         "pipeline.best_trial_run_id": best["run_id"]})
        values = [t.value if t.value is not None else
                  (max(t.intermediate_values.values()) if t.intermediate_values else None)
                  for t in study.trials]
        mlflow.log_figure(search_history_figure(values, states), "optimization_history.png")
        if states.count("COMPLETE") >= 2:
            with warnings.catch_warnings():  # "few trials per regime": expected in small sweeps
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
            mlflow.log_figure(importance_figure(importances), "param_importances.png")
        as_params = " ".join(f"-P {k}={v}" for k, v in best_params.items())
        log.info(
            "tune: %d trials (%d pruned), best val_accuracy %.4f: %s\n"
            "  best model: %s\n"
            "  register it:  mlflow run . -e evaluate --env-manager local -P model_uri=%s "
            "&& mlflow run . -e register --env-manager local -P model_uri=%s\n"
            "  or retrain it through the pipeline:  mlflow run . --env-manager local %s\n  %s",
            len(states), states.count("PRUNED"), study.best_value, best_params, model_uri,
            model_uri, model_uri, as_params, run_link(parent),
        )


def suggest_to_train_params(params: dict) -> dict:
    """Optuna's flat trial params -> the names ``train``/``main`` take."""
    arch = params["arch"]
    prefix = "mlp_hidden" if arch == "mlp" else "cnn_channels"
    return {"learning_rate": params["learning_rate"], "batch_size": params["batch_size"],
            "optimizer": params["optimizer"], "arch": arch,
            "hidden": f"{params[prefix + '_1']},{params[prefix + '_2']}"}


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
