"""predict: the quick check — classify local images with a logged or registered model.

Reads:  ``--model-uri`` (default ``models:/mnist-classifier@champion``) and ``--images``: a
        PNG file, a folder of PNGs, or an ``.npy`` array of shape (N, 28, 28),
        (N, 1, 28, 28) or (N, 784) with pixels 0-255 (anything else, NaN and infinity
        included, is refused in one line naming ``images``).
Writes: prints one line per image (label, confidence). Run alone, nothing to the tracking
        store. Under ``mlflow run . -e predict``, whose launcher makes a run for every entry
        point, that run records the call: tags ``pipeline.step`` (``predict``) and
        ``pipeline.model_uri``, metric ``predicted_images``, beside the launcher's params.

Images are read as ``steps/tracking/inference/images.py`` says (PNGs resized to 28x28, light
backgrounds inverted).
"""

from __future__ import annotations

import logging

import click

from steps.tracking.inference.images import load_images
from steps.tracking.inference.models import load_pyfunc, unloadable
from steps.tracking.runtime import options, tags
from steps.tracking.runtime.cli import StepError, run_cli

log = logging.getLogger("steps.predict")


@click.command()
@options.MODEL_URI(default=f"models:/mnist-classifier@{tags.DEFAULT_ALIAS}")
@click.option("--images", required=True, help="A PNG, a folder of PNGs, or an .npy array.")
def cli(model_uri: str, images: str) -> None:
    """Print the predicted label and confidence for each image."""
    import numpy as np
    from mlflow.exceptions import MlflowException

    names, pixels = load_images(images)
    try:
        model = load_pyfunc(model_uri)
    except (MlflowException, OSError) as exc:
        raise unloadable(model_uri, exc) from None
    try:
        output = model.predict(pixels)
    except ValueError as exc:  # a model's own check (one logged before pixels.py)
        raise StepError(f"images={images!r}: {exc}") from None
    labels = output["label"].to_numpy()
    confidence = np.stack(output["probabilities"].to_numpy()).max(axis=1)
    for name, label, conf in zip(names, labels, confidence, strict=True):
        click.echo(f"{name}\t{label}\t{conf:.3f}")
    record_in_launcher_run(model_uri, len(names))
    log.info("predict: %d images with %s", len(names), model_uri)


def record_in_launcher_run(model_uri: str, count: int) -> None:
    """Under ``mlflow run`` the launcher made a run before this process began: say in it
    what it was (otherwise an anonymous empty run per call)."""
    import os
    import time

    launcher_run = os.environ.get("MLFLOW_RUN_ID")
    if not launcher_run:
        return
    import mlflow
    from mlflow.entities import Metric, RunTag

    mlflow.MlflowClient().log_batch(
        launcher_run, metrics=[Metric("predicted_images", count, int(time.time() * 1000), 0)],
        tags=[RunTag(tags.STEP, "predict"), RunTag(tags.MODEL_URI, model_uri)])


if __name__ == "__main__":
    run_cli(cli, fast_exit=True, spark=False)
