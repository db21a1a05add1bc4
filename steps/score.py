"""score: batch scoring on Spark — a registered model over a set of images, one row each.

Reads:  ``--model-uri`` (default ``models:/mnist-classifier@champion``; an alias is resolved
        once, to the version every image is scored with, and its files are checked against
        their recorded digest) and ``--images``: a Parquet file or folder whose ``--column``
        holds one pixel array per image (784 numbers 0-255, or 28 arrays of 28; an ``id``
        column is kept), an ``.npy`` array, a PNG or a folder of PNGs (read as ``predict``
        reads them).
Writes: ``--output`` (empty = ``scores/<run id>.parquet``), a Parquet folder of ``id``,
        ``label``, ``probabilities`` (ten floats) and ``model_version``; written only
        whole (a failed job leaves nothing there) and never over an existing path.
        Run: params ``model_uri``, ``images``, ``column``, ``output``, ``spark_master``,
        ``batch_size``; metrics ``scored_images``, ``images_per_second`` (the job's),
        ``mean_top_probability``, ``label_count_<k>``; figure ``top_probability.png``; tags ``pipeline.step``,
        ``pipeline.model_uri`` (the version scored with), ``pipeline.model_version`` and
        ``pipeline.output``.

Scoring is ``mlflow.pyfunc.spark_udf`` on ``--spark-master``: ``local[*]`` (Spark inside
this process, all cores; needs only Java) or any cluster's master URL. ``--batch-size`` is
how many images each ``predict`` call of the UDF gets. The driver's memory does not grow
with the images in local mode (``steps/tracking/inference/spark.py`` says how), and a long
job prints a line of progress every 10 s.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import click

from steps.tracking.runtime import options, tags
from steps.tracking.runtime.cli import run_cli
from steps.tracking.runtime.runs import log_cli_params, run_link, step_run

log = logging.getLogger("steps.score")


@click.command()
@options.MODEL_URI(default=f"models:/mnist-classifier@{tags.DEFAULT_ALIAS}")
@click.option("--images", required=True,
              help="Parquet file or folder, .npy array, PNG or folder of PNGs.")
@click.option("--column", default="pixels", show_default=True,
              help="The Parquet column holding each image's pixels.")
@click.option("--output", default="",
              help="Where the predictions go, a new path (empty = scores/<run id>.parquet).")
@click.option("--spark-master", default="local[*]", show_default=True,
              help="Spark's master: local[*], spark://host:7077, yarn, k8s://...")
@options.BATCH_SIZE(default=10000, help="Images per predict call of the Spark UDF.")
def cli(model_uri: str, images: str, column: str, output: str, spark_master: str,
        batch_size: int) -> None:
    """Score images with a registered model on Spark; write the predictions as Parquet."""
    import mlflow

    from steps.core.plots import top_probability_figure
    from steps.tracking.inference.models import (
        resolve_version,
        verified_model_files,
        warn_of_other_requirements,
    )
    from steps.tracking.inference.spark import (
        check_images,
        check_output,
        is_local,
        progress,
        read_images,
        score,
        spark_session,
        summarize,
        write_atomically,
    )

    check_images(images)
    if output:
        check_output(output)
    with step_run("score") as run:
        output = output or f"scores/{run.info.run_id}.parquet"
        if "://" not in output:  # recorded where it is, wherever the next reader stands
            output = os.path.abspath(output)
        log_cli_params(output=output)
        scored_uri, version = resolve_version(mlflow.MlflowClient(), model_uri)
        model_dir, _ = verified_model_files(scored_uri)
        warn_of_other_requirements(model_dir, scored_uri)
        mlflow.set_tags({tags.MODEL_URI: scored_uri, tags.MODEL_VERSION: version,
                         tags.OUTPUT: output})
        with spark_session(spark_master, batch_size) as spark, \
                tempfile.TemporaryDirectory(prefix="mnist-score-") as staging:
            frame, count = read_images(spark, images, column, Path(staging),
                                       local=is_local(spark_master))
            log.info("score: %d images with %s on Spark %s", count, scored_uri, spark_master)
            started = time.perf_counter()
            with progress(spark):
                write_atomically(score(spark, frame, str(model_dir), version), output)
            seconds = time.perf_counter() - started
            summary = summarize(spark, output)
        mlflow.log_metrics({
            "scored_images": summary["count"],
            "images_per_second": summary["count"] / seconds,
            "mean_top_probability": summary["mean_top_probability"],
            **{f"label_count_{k}": n for k, n in sorted(summary["per_label"].items())},
        })
        mlflow.log_figure(top_probability_figure(summary["histogram"], summary["per_label"]),
                          "top_probability.png")
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(summary["per_label"].items()))
        log.info("score: %d images with %s -> %s\n  labels %s\n  mean top probability %.4f"
                 "\n  %s", summary["count"], scored_uri, output, counts,
                 summary["mean_top_probability"], run_link(run))


if __name__ == "__main__":
    run_cli(cli)
