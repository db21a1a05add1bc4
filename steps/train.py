"""train: fit a classifier on a download_data artifact and log the best epoch's model.

Reads:  ``--data`` (a download_data artifact URI; empty = the newest finished download_data
        run of the experiment). The artifact's digest is verified before training.
        The run's own checkpoint, when it has one (``steps/tracking/training/checkpoints.py``):
        a train run that ended KILLED or FAILED and is started again (``main`` does it; ``--resume
        RUN_ID`` alone) continues at the epoch after its checkpoint, in the same run.
Writes: params (every option, plus the resolved data URI);
        metrics per epoch ``train_loss``, ``val_loss``, ``val_accuracy``, ``epoch_seconds``;
        ``best_val_accuracy``, ``best_epoch``, ``stopped_epoch`` (with ``--patience``),
        ``checkpoint_seconds`` (this attempt's time spent writing checkpoints);
        MLflow's ``system/*`` metrics (CPU, memory, GPU where there is one);
        figure ``training_curves.png``;
        every ``--checkpoint-every`` epochs, ``checkpoint/state-{0,1}.pt`` in turn and the
        tag ``pipeline.checkpoint`` naming the newest whole one; ``pipeline.resumes``;
        model ``model`` (``mlflow.pytorch.log_model`` at ``step`` = the best epoch, linked
        to that epoch's metrics; pt2 format, TensorSpec signature:
        raw pixels float32 (-1, 28, 28) -> class probabilities float32 (-1, 10));
        model ``classifier`` (pyfunc from ``steps/tracking/inference/classifier.py`` with the
        same weights and ``steps/core/model.py``: raw images in any common layout -> ``label`` and
        ``probabilities``; this is what evaluate, register and serving use);
        input ``<dataset>-train`` (context ``training``);
        tags ``pipeline.step``, ``pipeline.data_uri``, ``pipeline.data_digest``,
        ``pipeline.dataset``, ``pipeline.resolved_device``, ``pipeline.model_uri`` (the
        classifier), ``pipeline.network_uri`` (the pt2 network).

Scale-out (``steps/tracking/training/elastic.py``): ``--workers N`` trains with N data-parallel
processes started by torch's elastic agent, ``batch_size`` staying the global batch; with
``--nodes M --node-rank R --rdzv-endpoint host:port`` the job spans M machines, meeting at
node 0's c10d rendezvous. One run either way, owned by this process on node 0; local rank
0 of node 0 logs into it. ``--max-restarts K`` lets the agent restart every rank up to K
times after a failure; they continue from the run's latest checkpoint, in the same run,
and each restart is recorded in ``pipeline.restarts`` (cause, time, epoch continued at).
Other nodes run ``python -m steps.train --workers N --nodes M --node-rank R
--rdzv-endpoint host:port [--max-restarts K]``, which creates no run and needs no tracking
server: data, settings and checkpoint come from node 0; one that is started again after
its processes died joins the job's next round.

``--resume RUN_ID`` continues that KILLED or FAILED train run (same parameters required;
``--data`` may stay empty). A train run started alone with parameters main could have
passed (the others at their defaults) carries main's cache key: ``mlflow run .`` continues
it if it stopped, and reuses it if it finished. Under ``mlflow run`` the launcher's own new run then only
points at it (``pipeline.step`` = ``resume``, ``pipeline.resumed_run_id``).
"""

from __future__ import annotations

import logging
import os
import sys

import click

from steps.core.choices import parse_hidden
from steps.tracking.pipeline.inputs import findable_by_main
from steps.tracking.runtime import options, tags
from steps.tracking.runtime.cli import StepError, run_cli
from steps.tracking.runtime.runs import (
    latest_finished_run,
    log_cli_params,
    param_differences,
    step_run,
    where_else,
)
from steps.tracking.training import elastic
from steps.tracking.training.checkpoints import check_resumable_run
from steps.tracking.training.fit import train_in_run, train_replica

log = logging.getLogger("steps.train")


@click.command()
@options.DATA()
@options.training_options
@options.VAL_FRACTION()
@options.DEVICE()
@options.WORKERS()
@options.NODES()
@options.NODE_RANK()
@options.RDZV_ENDPOINT()
@options.CHECKPOINT_EVERY()
@options.MAX_RESTARTS()
@click.option("--resume", default="", show_default=True,
              help="Continue this KILLED or FAILED train run from its checkpoint.")
def cli(data: str, epochs: int, learning_rate: float, batch_size: int, optimizer: str,
        arch: str, hidden: str, lr_schedule: str, augment: str, seed: int, patience: int,
        val_fraction: float, device: str, workers: int, nodes: int, node_rank: int,
        rdzv_endpoint: str, checkpoint_every: int, max_restarts: int, resume: str) -> None:
    """Train ARCH on the data artifact and log the best epoch's model."""
    from steps.core.training import TrainConfig, resolve_device

    scale = elastic.ScaleOut(workers, nodes, node_rank, rdzv_endpoint, max_restarts)
    try:
        scale.check(batch_size)
    except ValueError as exc:
        raise StepError(str(exc)) from None
    options.check_model_fits(arch, hidden, batch_size)
    config = TrainConfig(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         optimizer=optimizer, arch=arch, hidden=parse_hidden(hidden),
                         seed=seed, device=device, patience=patience,
                         lr_schedule=lr_schedule, augment=augment)
    if elastic.started_by_our_agent():  # one rank of a job: the tracking rank logs
        elastic.run_rank(lambda run, replica: train_in_run(
            run, data, config, val_fraction, str(resolve_device(device)), replica,
            checkpoint_every, restart=elastic.restart_count()), train_replica)
        return
    if node_rank > 0:  # a worker node: its ranks train, node 0 holds the run
        log.info("train: node %d of %d joining %s with %d worker(s); data and settings "
                 "come from node 0", node_rank, nodes, rdzv_endpoint, workers)
        elastic.launch(scale, sys.argv[1:])
        return
    import mlflow

    continued = None
    if resume:
        continued = check_resumable_run(
            mlflow.MlflowClient(), resume,
            lambda run: param_differences(run, ignore=("resume", "data") if not data else
                                          ("resume",)))
        data = data or continued.data.params.get("data", "")
        point_launcher_run_at(continued)
    # One process per job measures the machine: here, or the tracking rank when ranks train.
    with step_run("train", run_id=continued and continued.info.run_id,
                  log_system_metrics=not scale.supervised) as run:
        # The cheap checks first: no data is fetched for a device that is not there.
        try:
            resolved_device = str(resolve_device(device))
            scale.check_devices(resolved_device)
        except ValueError as exc:
            raise StepError(str(exc)) from None
        if not data:
            upstream = latest_finished_run(mlflow.MlflowClient(), run.info.experiment_id,
                                           "download_data")
            if upstream is None:
                raise StepError(
                    "data is empty and this experiment has no finished download_data run; "
                    "run `mlflow run . -e download_data` first or pass data=runs:/<id>/data"
                    + where_else(mlflow.MlflowClient(), "download_data",
                                 run.info.experiment_id))
            data = f"runs:/{upstream.info.run_id}/data"
        log_cli_params(data=data)
        if continued is None:  # so that main continues it if it stops, or reuses it
            findable_by_main("train", {"data": data}, {"download_data": data})
        if scale.supervised:
            # The ranks train and log; this process waits, and ends the run for them.
            elastic.launch(scale, [*sys.argv[1:], "--data", data], run.info.run_id)
        else:
            train_in_run(run, data, config, val_fraction, resolved_device,
                          checkpoint_every=checkpoint_every)


def point_launcher_run_at(continued) -> None:
    """Under ``mlflow run -P resume=ID`` the launcher made a new run before this process
    began; the work goes on in ``continued``, and the new run says so."""
    import mlflow
    from mlflow.entities import RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    launcher_run = os.environ.pop("MLFLOW_RUN_ID", None)
    if launcher_run and launcher_run != continued.info.run_id:
        mlflow.MlflowClient().log_batch(launcher_run, tags=[
            RunTag(tags.STEP, "resume"), RunTag(tags.RESUMED_RUN, continued.info.run_id),
            RunTag(MLFLOW_RUN_NAME, f"train (resumes {continued.info.run_id[:8]})")])


if __name__ == "__main__":
    run_cli(cli, fast_exit=True, spark=False)
