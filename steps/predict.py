"""predict: the quick check — classify local images with a logged or registered model.

Reads:  ``--model-uri`` (default ``models:/mnist-classifier@champion``) and ``--images``: a
        PNG file, a folder of PNGs, or an ``.npy`` array of shape (N, 28, 28),
        (N, 1, 28, 28) or (N, 784) with pixels 0-255.
Writes: nothing to the tracking store; prints one line per image (label, confidence).

PNGs are read as grayscale and resized to 28x28. MNIST digits are light on dark; an image
whose background is light (mean above mid-grey) is inverted, as a drawing usually is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from steps.tracking import options, tags
from steps.tracking.artifacts import load_pyfunc
from steps.tracking.cli import StepError, first_line, run_cli

log = logging.getLogger("steps.predict")


def load_images(path: str):
    """(names, uint8 array (N, 28, 28)) from a PNG, a folder of PNGs or an .npy file."""
    import numpy as np

    source = Path(path)
    if not source.exists():
        raise StepError(f"images={path!r} does not exist; give a PNG, a folder of PNGs or a .npy")
    if source.suffix == ".npy":
        try:
            array = np.load(source, allow_pickle=False)
        except ValueError as exc:
            raise StepError(f"images={path!r} is not a plain .npy array ({exc})") from None
        return [f"{source.name}[{i}]" for i in range(len(array))], array
    files = sorted(source.glob("*.png")) if source.is_dir() else [source]
    if not files:
        raise StepError(f"images={path!r}: the folder holds no .png files")
    return [f.name for f in files], np.stack([read_png(f) for f in files])


def read_png(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError) as exc:
        raise StepError(f"images: {path} is not a readable image ({exc})") from None
    pixels = np.asarray(gray, dtype=np.uint8)
    return 255 - pixels if pixels.mean() > 127 else pixels


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
        raise StepError(
            f"model_uri={model_uri!r} cannot be loaded ({first_line(exc)}); run the "
            "pipeline first or pass a models:/ or runs:/ URI"
        ) from None
    try:
        output = model.predict(pixels)
    except ValueError as exc:
        raise StepError(f"images={images!r}: {exc}") from None
    labels = output["label"].to_numpy()
    confidence = np.stack(output["probabilities"].to_numpy()).max(axis=1)
    for name, label, conf in zip(names, labels, confidence, strict=True):
        click.echo(f"{name}\t{label}\t{conf:.3f}")
    log.info("predict: %d images with %s", len(names), model_uri)


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
