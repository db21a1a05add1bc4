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
"""

from __future__ import annotations

import logging

import click

from steps import options, tags
from steps.artifacts import load_data_artifact, log_models
from steps.cli import StepError, run_cli
from steps.core.choices import parse_hidden
from steps.fitting import fit_and_log
from steps.runs import latest_finished_run, log_cli_params, run_link, step_run

log = logging.getLogger("steps.train")


@click.command()
@options.DATA()
@options.training_options
@options.VAL_FRACTION()
@options.DEVICE()
def cli(data: str, epochs: int, learning_rate: float, batch_size: int, optimizer: str,
        arch: str, hidden: str, val_fraction: float, seed: int, device: str) -> None:
    """Train ARCH on the data artifact and log the best epoch's model."""
    import mlflow

    from steps.core.training import TrainConfig, resolve_device

    options.check_model_fits(arch, hidden, batch_size)
    with step_run("train") as run:
        # The cheap check first: no data is fetched for a device that is not there.
        try:
            resolved_device = str(resolve_device(device))
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
        dataset = load_data_artifact(data)
        config = TrainConfig(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                             optimizer=optimizer, arch=arch, hidden=parse_hidden(hidden),
                             seed=seed, device=device)
        log_cli_params(data=data)
        mlflow.set_tags({tags.DATA_URI: data, tags.DATA_DIGEST: dataset.digest,
                         tags.DATASET: dataset.name, tags.RESOLVED_DEVICE: resolved_device})
        result = fit_and_log(config, dataset, val_fraction)
        model_uri = log_models(result.model, arch, config.hidden, dataset.x_test[:2])
        log.info(
            "train: %s on %s (%d epochs, %s): best val_accuracy %.4f at epoch %d\n"
            "  model: %s\n  %s",
            arch, dataset.name, epochs, resolved_device, result.best_val_accuracy,
            result.best_epoch, model_uri, run_link(run),
        )


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
