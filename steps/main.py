"""main: run download_data -> train -> evaluate -> register, each as a nested MLflow run.

Reads:  nothing itself; each step reads what the previous one wrote (URIs passed on).
Writes: params (every option); a child run per step under this run (``mlflow.parentRunId``);
        tags ``pipeline.step``, ``pipeline.<step>_run_id`` (the run that did the work, fresh
        or reused), ``pipeline.reused_steps``, ``pipeline.data_uri``, ``pipeline.model_uri``,
        ``pipeline.registered_version``.

Step cache: a step's earlier run is reused when it FINISHED and has the same cache key:
entry point, parameters (as strings, as MLflow stores them), a hash of the source files the
step runs (uncommitted edits count), the ids of the upstream runs it consumed and, for
``data_dir``, the names, sizes and modification times of the files in it. The key is a tag,
found with one ``search_runs`` filter. A reused step still appears under this run as a small
child run named ``<step> (reused)`` whose ``pipeline.reused_run_id`` tag points to the run
that did the work.

This module does not import torch: it only orchestrates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import click

from steps.core.choices import ARCHS, DATASETS, OPTIMIZERS
from steps.tracking import (
    TAG_CACHE_KEY,
    TAG_DATA_URI,
    TAG_MODEL_URI,
    TAG_REUSED_RUN,
    TAG_STEP,
    TAG_TRAIN_RUN,
    StepError,
    log_params_once,
    model_name_option,
    quote,
    run_cli,
    run_link,
    step_run,
)

log = logging.getLogger("steps.main")

PROJECT_DIR = Path(__file__).resolve().parent.parent
TAG_REUSED_STEP = "pipeline.reused_step"


def code_hash(entry_point: str) -> str:
    """Hash of every source file the step's process runs: its script, the core, MLproject."""
    files = [PROJECT_DIR / "MLproject", PROJECT_DIR / "steps" / f"{entry_point}.py",
             PROJECT_DIR / "steps" / "tracking.py",
             *sorted((PROJECT_DIR / "steps" / "core").glob("*.py"))]
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(PROJECT_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def folder_fingerprint(folder: str) -> str:
    """Cheap identity of a folder's files (name, size, mtime), so edited data is not reused."""
    if not folder:
        return ""
    root = Path(folder)
    entries = sorted(
        f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in root.rglob("*") if p.is_file()
    ) if root.is_dir() else ["<missing>"]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def cache_key(entry_point: str, params: dict, upstream_run_ids: list[str],
              extra: str = "") -> str:
    payload = {
        "entry_point": entry_point,
        "params": {k: str(v) for k, v in sorted(params.items())},
        "code": code_hash(entry_point),
        "upstream": upstream_run_ids,
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def find_reusable(client, experiment_id: str, key: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_CACHE_KEY}` = {quote(key)} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0] if runs else None


class Pipeline:
    """Runs steps as children of ``parent``; each result is the run that did the work."""

    def __init__(self, client, parent, use_cache: bool) -> None:
        self.client, self.parent, self.use_cache = client, parent, use_cache
        self.experiment_id = parent.info.experiment_id
        self.reused: list[str] = []

    def step(self, entry_point: str, params: dict, upstream: list, extra: str = ""):
        import mlflow
        from mlflow.exceptions import ExecutionException
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        key = cache_key(entry_point, params, [r.info.run_id for r in upstream], extra)
        if self.use_cache:
            hit = find_reusable(self.client, self.experiment_id, key)
            if hit is not None:
                # A pointer run keeps the UI's tree complete without redoing the work.
                pointer = self.client.create_run(self.experiment_id, tags={
                    MLFLOW_PARENT_RUN_ID: self.parent.info.run_id,
                    MLFLOW_RUN_NAME: f"{entry_point} (reused)",
                    TAG_STEP: "reused", TAG_REUSED_STEP: entry_point,
                    TAG_REUSED_RUN: hit.info.run_id,
                })
                self.client.set_terminated(pointer.info.run_id, "FINISHED")
                self.reused.append(entry_point)
                log.info("main: %s reused from run %s (same params, code and inputs)",
                         entry_point, hit.info.run_id)
                return hit
        started = time.perf_counter()
        log.info("main: running %s %s", entry_point,
                 " ".join(f"{k}={v}" for k, v in params.items()))
        try:
            submitted = mlflow.run(
                str(PROJECT_DIR), entry_point, parameters={k: str(v) for k, v in params.items()},
                env_manager="local", experiment_id=self.experiment_id, run_name=entry_point,
                synchronous=True,
            )
        except ExecutionException as exc:
            after = ("its error is above" if entry_point == "register" else
                     "later steps were not run and nothing was registered")
            raise StepError(
                f"step {entry_point} failed ({str(exc).strip().splitlines()[0]}); {after}"
            ) from None
        self.client.set_tag(submitted.run_id, TAG_CACHE_KEY, key)
        log.info("main: %s finished in %.1fs", entry_point, time.perf_counter() - started)
        return self.client.get_run(submitted.run_id)


@click.command()
@click.option("--dataset", type=click.Choice(DATASETS), default="mnist", show_default=True)
@click.option("--data-dir", default="", help="Folder with IDX files instead of downloading.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=0.001,
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam",
              show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), default="mlp", show_default=True)
@click.option("--hidden", default="", help="Two hidden sizes, e.g. '256,128' (empty = default).")
@click.option("--seed", type=int, default=42, show_default=True)
@model_name_option
@click.option("--use-cache", type=click.BOOL, default=True, show_default=True,
              help="Reuse finished steps with identical inputs and code.")
def cli(dataset: str, data_dir: str, epochs: int, learning_rate: float, batch_size: int,
        optimizer: str, arch: str, hidden: str, seed: int, model_name: str,
        use_cache: bool) -> None:
    """Run the whole pipeline: download_data, train, evaluate, register."""
    import mlflow

    if data_dir:
        data_dir = str(Path(data_dir).expanduser().resolve())
    absolutize_tracking_uri()
    with step_run("main") as run:
        log_params_once({
            "dataset": dataset, "data_dir": data_dir, "epochs": epochs,
            "learning_rate": learning_rate, "batch_size": batch_size, "optimizer": optimizer,
            "arch": arch, "hidden": hidden, "seed": seed, "model_name": model_name,
            "use_cache": use_cache,
        })
        pipeline = Pipeline(mlflow.MlflowClient(), run, use_cache)
        data_run = pipeline.step("download_data", {"dataset": dataset, "data_dir": data_dir},
                                 [], extra=folder_fingerprint(data_dir))
        data_uri = data_run.data.tags[TAG_DATA_URI]
        train_run = pipeline.step("train", {
            "data": data_uri, "epochs": epochs, "learning_rate": learning_rate,
            "batch_size": batch_size, "optimizer": optimizer, "arch": arch, "hidden": hidden,
            "seed": seed,
        }, [data_run])
        model_uri = train_run.data.tags[TAG_MODEL_URI]
        eval_run = pipeline.step("evaluate", {"model_uri": model_uri, "data": data_uri,
                                              "model_name": model_name}, [train_run])
        register_run = pipeline.step("register", {"model_uri": model_uri,
                                                  "model_name": model_name}, [eval_run])
        version = register_run.data.tags.get("pipeline.registered_version", "")
        mlflow.set_tags({
            "pipeline.download_data_run_id": data_run.info.run_id,
            TAG_TRAIN_RUN: train_run.info.run_id,
            "pipeline.evaluate_run_id": eval_run.info.run_id,
            "pipeline.register_run_id": register_run.info.run_id,
            "pipeline.reused_steps": ",".join(pipeline.reused) or "none",
            TAG_DATA_URI: data_uri, TAG_MODEL_URI: model_uri,
            "pipeline.registered_version": version,
        })
        metrics = eval_run.data.metrics
        mlflow.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_loss")
                            if k in metrics})
        log.info(
            "main: done. test_accuracy %.4f; %s version %s (%s)\n  reused: %s\n  %s",
            metrics.get("test_accuracy", float("nan")), model_name, version,
            register_run.data.tags.get("pipeline.alias_decision", ""),
            ", ".join(pipeline.reused) or "none", run_link(run),
        )


def absolutize_tracking_uri() -> None:
    """Make a relative sqlite store absolute so every child writes to the same place.

    ``mlflow run`` resolves a relative URI in the caller's folder but starts this process in
    the project folder. From the project folder the two agree; from elsewhere this run's own
    record is in another file, which is said here instead of creating an empty store.
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = os.path.abspath(uri[len("sqlite:///"):])
        if os.environ.get("MLFLOW_RUN_ID") and not os.path.exists(path):
            raise StepError(
                f"MLFLOW_TRACKING_URI={uri} is relative and `mlflow run` was started outside "
                f"the project folder ({os.getcwd()}); use an absolute URI such as "
                "sqlite:////full/path/mlflow.db, or run from the project folder"
            )
        uri = "sqlite:///" + path
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)


if __name__ == "__main__":
    run_cli(cli, fast_exit=True)
