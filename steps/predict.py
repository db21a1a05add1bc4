"""predict: the quick check — classify local images with a logged or registered model.

Reads:  ``--model-uri`` (default ``models:/mnist-classifier@champion``) and ``--images``: a
        PNG file, a folder of PNGs, or an ``.npy`` array of shape (N, 28, 28),
        (N, 1, 28, 28) or (N, 784) with pixels 0-255 (anything else, NaN and infinity
        included, is refused in one line naming ``images``).
Writes: prints one line per image (label, confidence). Run alone, nothing to the tracking
        store. Under ``mlflow run . -e predict``, whose launcher makes a run for every entry
        point, that run records the call: tags ``pipeline.step`` (``predict``) and
        ``pipeline.model_uri``, metric ``predicted_images``, beside the launcher's params.

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


# A digit drawn at any sensible resolution fits; a bigger file is refused before decoding.
MAX_PNG_PIXELS = 4096 * 4096


def load_images(path: str):
    """(names, float32 array (N, 28, 28)) from a PNG, a folder of PNGs or an .npy file;
    anything that is not digit images is refused in one line naming ``images``."""
    from steps.core.pixels import to_images

    source = Path(path)
    if not source.exists():
        raise StepError(f"images={path!r} does not exist; give a PNG, a folder of PNGs or a .npy")
    if source.suffix == ".npy":
        names_of, array = lambda n: [f"{source.name}[{i}]" for i in range(n)], read_npy(source)
    else:
        files = sorted(source.glob("*.png")) if source.is_dir() else [source]
        if not files:
            raise StepError(f"images={path!r}: the folder holds no .png files")
        names_of, array = lambda n: [f.name for f in files], [read_png(f) for f in files]
    try:
        pixels = to_images(array)
    except ValueError as exc:
        raise StepError(f"images={path!r}: {exc}") from None
    return names_of(len(pixels)), pixels


def read_npy(path: Path):
    """The array in an .npy file, refused unless its header is one of a plain array the
    file really holds (a forged header could ask for any amount of memory)."""
    import numpy as np

    headers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in headers:
                raise ValueError(f"format version {version[0]}.{version[1]}")
            shape, _, dtype = headers[version](f)
            body = path.stat().st_size - f.tell()
    except (ValueError, OSError) as exc:
        raise StepError(f"images={str(path)!r} is not a plain .npy array ({exc})") from None
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if not dtype.hasobject else -1
    if needed != body:
        claims = f"{needed / 2**30:.1f} GiB" if needed >= 2**30 else f"{needed} bytes"
        raise StepError(f"images={str(path)!r}: its header claims {shape} {dtype} ({claims}) "
                        f"but the file holds {body} bytes of data; not a whole .npy array"
                        if needed >= 0 else f"images={str(path)!r} holds Python objects, not "
                        "pixels (only plain numeric .npy arrays are read)")
    return np.load(path, allow_pickle=False)


def read_png(path: Path):
    import warnings

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL's warning of a big image: refused below anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PNG_PIXELS:
                    raise StepError(f"images: {path} is {image.width}x{image.height} pixels, "
                                    "too large for a digit image (over "
                                    f"{MAX_PNG_PIXELS // 2**20} megapixels); scale it down")
                gray = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError as exc:  # so large that PIL will not even open it
        raise StepError(f"images: {path} is too large for a digit image ({exc})") from None
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
    run_cli(cli, fast_exit=True)
