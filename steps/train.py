"""train: fit a classifier on a download_data artifact and log the best epoch's model.

Reads:  ``--data`` (a download_data artifact URI; empty = the newest finished download_data
        run of the experiment). The artifact's digest is verified before training.
Writes: params (every option, plus the resolved data URI);
        metrics per epoch ``train_loss``, ``val_loss``, ``val_accuracy``, ``epoch_seconds``;
        ``best_val_accuracy``, ``best_epoch``; figure ``training_curves.png``;
        model ``model`` (``mlflow.pytorch.log_model``, pt2 format, TensorSpec signature:
        raw pixels float32 (-1, 28, 28) -> class probabilities float32 (-1, 10));
        model ``classifier`` (pyfunc from ``steps/serving.py`` with the same weights and
        ``steps/core/model.py``: raw images in any common layout -> ``label`` and
        ``probabilities``; this is what evaluate, register and serving use);
        input ``<dataset>-train`` (context ``training``);
        tags ``pipeline.step``, ``pipeline.data_uri``, ``pipeline.data_digest``,
        ``pipeline.dataset``, ``pipeline.resolved_device``, ``pipeline.model_uri`` (the
        classifier), ``pipeline.network_uri`` (the pt2 network).

Scale-out (``steps/distributed.py``): ``--workers N`` trains with N data-parallel processes
started by torch's elastic launcher, ``batch_size`` staying the global batch; with
``--nodes M --node-rank R --rdzv-endpoint host:port`` the job spans M machines. One run
either way, owned by this process on node 0; global rank 0 logs into it. Other nodes run
``python -m steps.train --workers N --nodes M --node-rank R --rdzv-endpoint host:port``,
which creates no run and needs no tracking server: data and settings come from node 0.
"""

from __future__ import annotations

import logging
import sys

import click

from steps import distributed, options
from steps.cli import StepError, run_cli
from steps.core.choices import parse_hidden
from steps.fitting import train_replica, train_tracked
from steps.runs import latest_finished_run, log_cli_params, step_run

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
def cli(data: str, epochs: int, learning_rate: float, batch_size: int, optimizer: str,
        arch: str, hidden: str, val_fraction: float, seed: int, device: str, workers: int,
        nodes: int, node_rank: int, rdzv_endpoint: str) -> None:
    """Train ARCH on the data artifact and log the best epoch's model."""
    from steps.core.training import TrainConfig, resolve_device

    scale = distributed.ScaleOut(workers, nodes, node_rank, rdzv_endpoint)
    try:
        scale.check(batch_size)
    except ValueError as exc:
        raise StepError(str(exc)) from None
    options.check_model_fits(arch, hidden, batch_size)
    config = TrainConfig(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         optimizer=optimizer, arch=arch, hidden=parse_hidden(hidden),
                         seed=seed, device=device)
    replica = distributed.launched_rank()
    if replica is not None:  # one rank of a job our launcher started
        try:
            if replica.rank == 0:
                import mlflow

                with mlflow.start_run(run_id=distributed.rank_run_id()) as run:
                    train_tracked(run, data, config, val_fraction,
                                  str(resolve_device(device)), replica)
            else:
                train_replica(replica)
        except BaseException as exc:
            distributed.report_failure(exc)
            raise
        finally:
            distributed.leave()
        return
    if node_rank > 0:  # a worker node: its ranks train, node 0 holds the run
        log.info("train: node %d of %d joining %s with %d worker(s); data and settings "
                 "come from node 0", node_rank, nodes, rdzv_endpoint, workers)
        distributed.launch(scale, sys.argv[1:])
        return
    import mlflow

    with step_run("train") as run:
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
                )
            data = f"runs:/{upstream.info.run_id}/data"
        log_cli_params(data=data)
        if scale.distributed:
            # The ranks train and log; this process waits, and ends the run for them.
            distributed.launch(scale, [*sys.argv[1:], "--data", data], run.info.run_id)
        else:
            train_tracked(run, data, config, val_fraction, resolved_device)


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
