"""train: fit a classifier on a download_data artifact and log the best epoch's model.

Reads:  ``--data`` (a download_data artifact URI; empty = the newest finished download_data
        run of the experiment). The artifact's digest is verified before training.
Writes: params (every option, plus the resolved data URI and device);
        metrics per epoch ``train_loss``, ``val_loss``, ``val_accuracy``, ``epoch_seconds``;
        ``best_val_accuracy``, ``best_epoch``; figure ``training_curves.png``;
        model ``model`` (``mlflow.pytorch.log_model``, pt2 format, TensorSpec signature:
        raw pixels float32 (-1, 28, 28) -> class probabilities float32 (-1, 10));
        model ``classifier`` (pyfunc from ``steps/serving.py`` with the same weights and
        ``steps/core/model.py``: raw images in any common layout -> ``label`` and
        ``probabilities``; this is what evaluate, register and serving use);
        input ``<dataset>-train`` (context ``training``);
        tags ``pipeline.step``, ``pipeline.data_uri``, ``pipeline.data_digest``,
        ``pipeline.dataset``, ``pipeline.model_uri`` (the classifier),
        ``pipeline.network_uri`` (the pt2 network).
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import version
from pathlib import Path

import click

from steps.core.choices import ARCHS, DEVICES, OPTIMIZERS
from steps.tracking import (
    TAG_DATA_DIGEST,
    TAG_DATA_URI,
    TAG_DATASET,
    TAG_MODEL_URI,
    TAG_NETWORK_URI,
    StepError,
    latest_finished_run,
    load_data_artifact,
    log_params_once,
    run_cli,
    run_link,
    step_run,
)

log = logging.getLogger("steps.train")


def parse_hidden(_ctx, _param, value: str) -> str:
    if value:
        parts = value.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise click.BadParameter(
                f"{value!r}: give two positive sizes like '256,128' (empty = the arch's default)"
            )
    return value


@click.command()
@click.option("--data", default="", help="Data artifact URI (empty = newest download_data run).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=0.001,
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), default="mlp", show_default=True)
@click.option("--hidden", default="", callback=parse_hidden,
              help="Two hidden sizes (mlp) or channel counts (cnn), e.g. '256,128'.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.1, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def cli(data: str, epochs: int, learning_rate: float, batch_size: int, optimizer: str,
        arch: str, hidden: str, val_fraction: float, seed: int, device: str) -> None:
    """Train ARCH on the data artifact and log the best epoch's model."""
    import mlflow

    from steps.core.training import TrainConfig, resolve_device

    with step_run("train") as run:
        # The cheap check first: no data is fetched for a device that is not there.
        try:
            resolved_device = str(resolve_device(device))
        except ValueError as exc:
            raise StepError(str(exc)) from None
        client = mlflow.MlflowClient()
        if not data:
            upstream = latest_finished_run(client, run.info.experiment_id, "download_data")
            if upstream is None:
                raise StepError(
                    "data is empty and this experiment has no finished download_data run; "
                    "run `mlflow run . -e download_data` first or pass data=runs:/<id>/data"
                )
            data = f"runs:/{upstream.info.run_id}/data"
        dataset = load_data_artifact(data)
        hidden_sizes = tuple(int(p) for p in hidden.split(",")) if hidden else None
        config = TrainConfig(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                             optimizer=optimizer, arch=arch, hidden=hidden_sizes, seed=seed,
                             device=device)
        params = {
            "data": data, "epochs": epochs, "learning_rate": learning_rate,
            "batch_size": batch_size, "optimizer": optimizer, "arch": arch, "hidden": hidden,
            "val_fraction": val_fraction, "seed": seed, "device": device,
        }
        log_params_once(params)
        mlflow.set_tags({
            TAG_DATA_URI: data, TAG_DATA_DIGEST: dataset.digest, TAG_DATASET: dataset.name,
            "resolved_device": resolved_device,
        })
        model_uri, result, _ = fit_and_log(config, dataset, val_fraction)
        log.info(
            "train: %s on %s (%d epochs, %s): best val_accuracy %.4f at epoch %d\n"
            "  model: %s\n  %s",
            arch, dataset.name, epochs, resolved_device, result.best_val_accuracy,
            result.best_epoch, model_uri, run_link(run),
        )


def fit_and_log(config, dataset, val_fraction: float, on_epoch_end=None,
                with_models: bool = True):
    """Train on ``dataset``, logging per-epoch metrics and curves to the active run.

    Shared with ``tune``, whose trials are runs of their own: a trial passes
    ``on_epoch_end`` (to report and prune) and ``with_models=False`` (only the best trial's
    model is logged, by :func:`log_models`). Returns (model_uri or None, result, x_val).
    """
    import mlflow
    import mlflow.data

    from steps.core.data import dataset_digest, split_train_val
    from steps.core.plots import training_curves_figure
    from steps.core.training import train

    train_idx, val_idx = split_train_val(len(dataset.y_train), val_fraction, config.seed)
    x_train, y_train = dataset.x_train[train_idx], dataset.y_train[train_idx]
    x_val, y_val = dataset.x_train[val_idx], dataset.y_train[val_idx]
    mlflow.log_input(
        mlflow.data.from_numpy(
            dataset.x_train, targets=dataset.y_train, name=f"{dataset.name}-train",
            digest=dataset_digest(dataset.x_train, dataset.y_train),
        ),
        context="training",
    )

    def log_epoch(epoch):
        mlflow.log_metrics(
            {"train_loss": epoch.train_loss, "val_loss": epoch.val_loss,
             "val_accuracy": epoch.val_accuracy, "epoch_seconds": epoch.seconds},
            step=epoch.epoch,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    try:
        result = train(config, x_train, y_train, x_val, y_val, on_epoch_end=log_epoch,
                       progress=sys.stderr.isatty())
    except FloatingPointError as exc:
        raise StepError(str(exc)) from None
    mlflow.log_metrics({"best_val_accuracy": result.best_val_accuracy,
                        "best_epoch": result.best_epoch})
    mlflow.log_figure(
        training_curves_figure([vars(h) for h in result.history]), "training_curves.png"
    )
    model_uri = (log_models(result.model, config.arch, config.hidden, x_val[:2])
                 if with_models else None)
    return model_uri, result, x_val


def log_models(network, arch: str, hidden, example_images) -> str:
    """Log the pt2 ``model`` and the ``classifier``; return the classifier's URI."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from steps.core.model import Probabilities

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    # Two examples, not one: torch.export treats a batch of 1 as a fixed size.
    example = np.ascontiguousarray(example_images, dtype=np.float32)
    with torch.no_grad():
        logged = mlflow.pytorch.log_model(
            Probabilities(network), name="model", signature=signature,
            input_example=example, pip_requirements=model_requirements(),
        )
    classifier = log_classifier(network, arch, hidden)
    mlflow.set_tags({TAG_NETWORK_URI: logged.model_uri, TAG_MODEL_URI: classifier.model_uri})
    return classifier.model_uri


def log_classifier(network, arch: str, hidden):
    """Log the served model: ``steps/serving.py`` (model from code) rebuilding ``network``
    from its weights and ``steps/core/model.py``.

    Weights, not the pt2 program: loading a pt2 archive imports torch._dynamo (about 2 s),
    which every evaluation and every server start would pay.
    """
    import json
    import tempfile

    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    from steps.core import model

    signature = ModelSignature(
        inputs=None,  # see steps/serving.py: several layouts and dtypes are accepted
        outputs=Schema([ColSpec(DataType.long, "label"),
                        ColSpec(Array(DataType.float), "probabilities")]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights, architecture = Path(tmp, "weights.pt"), Path(tmp, "architecture.json")
        torch.save(network.state_dict(), weights)
        architecture.write_text(json.dumps({"arch": arch, "hidden": list(hidden or [])}))
        return mlflow.pyfunc.log_model(
            name="classifier", python_model=str(Path(__file__).with_name("serving.py")),
            artifacts={"weights": str(weights), "architecture": str(architecture)},
            code_paths=[model.__file__], signature=signature,
            pip_requirements=model_requirements() + [f"pandas=={version('pandas')}"],
        )


def model_requirements() -> list[str]:
    """The logged model's pip requirements, pinned to what trained it.

    Given explicitly: MLflow's inference runs the model in a subprocess (about 10 s here)
    and only rediscovers these.
    """
    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "numpy")]


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
