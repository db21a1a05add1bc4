"""download_data: fetch a dataset and log it as one pickle-free run artifact.

Reads:  the internet (official torchvision mirrors, md5-checked), ``--data-dir`` (a folder
        with the four IDX files), or scikit-learn's bundled 8x8 digits (``--dataset digits``).
Writes: artifact ``data/`` = ``dataset.npz`` (uint8 images, int64 labels; loads with
        ``allow_pickle=False``) + ``manifest.json`` (name, digest, sizes, class names);
        inputs ``<dataset>-train`` / ``<dataset>-test`` via ``mlflow.log_input``;
        params ``dataset``, ``data_dir``; metrics ``train_size``, ``test_size``;
        tags ``pipeline.step``, ``pipeline.dataset``, ``pipeline.data_uri``,
        ``pipeline.data_digest``; run alone, the cache key main would give it (main then
        reuses the run).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import click

from steps.core.data import DataError
from steps.tracking.pipeline.inputs import findable_by_main
from steps.tracking.runtime import options, tags
from steps.tracking.runtime.cli import StepError, run_cli
from steps.tracking.runtime.runs import log_cli_params, log_dataset, run_link, step_run

log = logging.getLogger("steps.download_data")


@click.command()
@options.DATASET()
@options.DATA_DIR()
def cli(dataset: str, data_dir: str) -> None:
    """Fetch DATASET (or read DATA_DIR) and log it as the run artifact ``data/``."""
    import mlflow

    from steps.core.data import load_dataset, save_dataset

    with step_run("download_data", **{tags.DATASET: dataset}) as run:
        log_cli_params()
        # main resolves data_dir before it keys the step; so does a run of it alone.
        full_dir = str(Path(data_dir).expanduser().resolve()) if data_dir else ""
        findable_by_main("download_data", {"data_dir": full_dir}, data_dir=full_dir)
        try:
            ds = load_dataset(dataset, data_dir)
        except DataError as exc:
            message = str(exc)
            if data_dir and "data_dir" not in message:
                message = f"data_dir={data_dir!r}: {message}"
            raise StepError(message) from None
        with tempfile.TemporaryDirectory() as tmp:
            save_dataset(ds, tmp)
            mlflow.log_artifacts(tmp, artifact_path="data")
        data_uri = f"runs:/{run.info.run_id}/data"
        for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
            # No `source`: MLflow cannot resolve artifact URIs of a tracking server as dataset
            # sources; the data URI is the run's pipeline.data_uri tag.
            log_dataset(x, y, f"{dataset}-{split}", context=split)
        mlflow.log_metrics({"train_size": len(ds.y_train), "test_size": len(ds.y_test)})
        mlflow.set_tags({tags.DATA_URI: data_uri, tags.DATA_DIGEST: ds.digest})
        log.info(
            "download_data: %s, %d train / %d test images, digest %s\n  data: %s\n  %s",
            dataset, len(ds.y_train), len(ds.y_test), ds.digest, data_uri, run_link(run),
        )


if __name__ == "__main__":
    run_cli(cli, fast_exit=True, spark=False)
