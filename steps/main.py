"""main: run download_data -> train -> evaluate -> register, each as a nested MLflow run.

Reads:  nothing itself; each step reads what the previous one wrote (URIs passed on).
Writes: params (every option); a child run per step under this run (``mlflow.parentRunId``),
        or a ``<step> (reused)`` pointer run when the step cache serves it;
        metrics ``test_accuracy``, ``test_loss`` (from evaluate); input ``<dataset>-train``;
        tags ``pipeline.step``, ``pipeline.<step>_run_id`` (the run that did the work, fresh
        or reused), ``pipeline.reused_steps``, ``pipeline.data_uri``, ``pipeline.model_uri``,
        ``pipeline.registered_version``. The run is named for what it ran, e.g.
        ``digits mlp e5 lr=0.001``.

The step cache (``steps/tracking/pipeline/``) decides per step whether an earlier run serves
and, when a step runs, prints one line saying why: what changed since that step's newest
finished run (each step's run keeps it as ``pipeline.cache_decision``). A train run with the
same inputs that ended KILLED or FAILED holding a checkpoint is continued in place (``main:
train resumes run ... at epoch 4 of 30``); ``use_cache=false`` starts afresh. ``main``
creates each step's run itself and hands it to MLflow's launcher
(``steps/tracking/pipeline/launch.py``).

This module does not import torch: it only orchestrates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from steps.tracking.pipeline.launch import Pipeline
from steps.tracking.runtime import options, tags
from steps.tracking.runtime.cli import StepError, run_cli
from steps.tracking.runtime.runs import (
    absolutize_tracking_uri,
    describe_experiment,
    launcher_run_name,
    log_cli_params,
    run_link,
    step_run,
)
from steps.tracking.runtime.store import check_store
from steps.tracking.training.elastic import ScaleOut

log = logging.getLogger("steps.main")


def run_name(dataset: str, arch: str, epochs: int, learning_rate: float) -> str:
    return f"{dataset} {arch} e{epochs} lr={learning_rate:g}"


@click.command()
@options.DATASET()
@options.DATA_DIR()
@options.training_options
@options.WORKERS()
@options.MAX_RESTARTS()
@options.CHECKPOINT_EVERY()
@options.MODEL_NAME()
@options.MIN_DELTA()
@options.MIN_SCORE()
@click.option("--use-cache", type=click.BOOL, default=True, show_default=True,
              help="Reuse finished steps with identical inputs and code.")
def cli(dataset: str, data_dir: str, epochs: int, learning_rate: float, batch_size: int,
        optimizer: str, arch: str, hidden: str, lr_schedule: str, augment: str, seed: int,
        patience: int, workers: int,
        max_restarts: int, checkpoint_every: int, model_name: str, min_delta: float,
        min_score: float | None, use_cache: bool) -> None:
    """Run the whole pipeline: download_data, train, evaluate, register."""
    import mlflow

    options.check_model_fits(arch, hidden, batch_size)
    try:  # before any download: train would refuse it only after
        ScaleOut(workers=workers).check(batch_size)
    except ValueError as exc:
        raise StepError(str(exc)) from None
    if data_dir:
        data_dir = str(Path(data_dir).expanduser().resolve())
    absolutize_tracking_uri()
    check_store()
    # A name given to MLflow's launcher (`mlflow run --run-name`) is the user's: kept.
    name = None if launcher_run_name() else run_name(dataset, arch, epochs, learning_rate)
    with step_run("main", run_name=name) as run:
        describe_experiment(run.info.experiment_id)
        params = log_cli_params(data_dir=data_dir)
        pipeline = Pipeline(mlflow.MlflowClient(), run, use_cache)
        given = pipeline.given(params)  # each step's share of main's parameters
        data_run = pipeline.step("download_data", given("download_data"), data_dir=data_dir)
        data_uri = data_run.data.tags[tags.DATA_URI]
        train_run = pipeline.step("train", {**given("train"), "data": data_uri},
                                  {"download_data": data_run})
        model_uri = train_run.data.tags[tags.MODEL_URI]
        eval_run = pipeline.step("evaluate", {**given("evaluate"), "model_uri": model_uri,
                                              "data": data_uri}, {"train": train_run})
        register_run = pipeline.step("register", {**given("register"),
                                                  "model_uri": model_uri},
                                     {"evaluate": eval_run})
        done = {"download_data": data_run, "train": train_run, "evaluate": eval_run,
                "register": register_run}
        version = register_run.data.tags.get(tags.REGISTERED_VERSION, "")
        mlflow.set_tags({
            **{tags.step_run_id(step): r.info.run_id for step, r in done.items()},
            tags.REUSED_STEPS: ",".join(pipeline.reused) or "none",
            tags.DATA_URI: data_uri, tags.MODEL_URI: model_uri, tags.DATASET: dataset,
            tags.REGISTERED_VERSION: version,
        })
        # The main row shows what it trained on and how well it did.
        train_inputs = train_run.inputs.dataset_inputs if train_run.inputs else []
        if train_inputs:
            mlflow.MlflowClient().log_inputs(run.info.run_id, datasets=train_inputs)
        metrics = eval_run.data.metrics
        mlflow.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_loss")
                            if k in metrics})
        log.info(
            "main: done. test_accuracy %.4f; %s version %s (%s)\n  reused: %s\n  %s",
            metrics.get("test_accuracy", float("nan")), model_name, version,
            register_run.data.tags.get(tags.ALIAS_DECISION, ""),
            ", ".join(pipeline.reused) or "none", run_link(run),
        )


if __name__ == "__main__":
    run_cli(cli, fast_exit=True, spark=False)
