"""Bad input, table-driven: every case exits non-zero with one ``error:`` line naming the
parameter, prints no traceback, leaves no run RUNNING and registers nothing.

The table runs the click scripts in-process through the same ``run_cli`` wrapper the
``python -m steps.X`` entry uses (a subprocess per case would spend minutes importing torch);
a few cases also go through a real ``mlflow run`` subprocess.
"""

from __future__ import annotations

import gzip
import importlib
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers.data import write_idx_folder
from helpers.processes import assert_clean_failure, mlflow_run, run_step
from helpers.store import temporary_store
from steps.tracking.runtime.cli import run_cli


@pytest.fixture(scope="module")
def store_with_data(tmp_path_factory):
    """A store holding one digits download_data run, and IDX folders with defects."""
    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    with temporary_store(tmp_path):
        yield _populate(tmp_path)


def _populate(tmp_path):
    run_cli(importlib.import_module("steps.download_data").cli, ["--dataset", "digits"])
    run = mlflow.MlflowClient().search_runs(["0"])[0]
    # A second artifact whose images were edited after logging: its digest no longer matches.
    run_cli(importlib.import_module("steps.download_data").cli, ["--dataset", "digits"])
    tampered = mlflow.MlflowClient().search_runs(
        ["0"], order_by=["attributes.start_time DESC"])[0]
    npz = Path(mlflow.get_run(tampered.info.run_id).info.artifact_uri.removeprefix("file://"))
    npz = npz / "data" / "dataset.npz"
    with np.load(npz) as arrays:
        edited = {k: arrays[k].copy() for k in arrays.files}
    edited["x_train"][0, 14, 14] ^= 0xFF
    np.savez(npz, **edited)
    missing = write_idx_folder(tmp_path / "missing", n_train=10, n_test=5)
    (missing / "train-labels-idx1-ubyte.gz").unlink()
    truncated = write_idx_folder(tmp_path / "truncated", n_train=10, n_test=5, gz=False)
    path = truncated / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    corrupt_gz = write_idx_folder(tmp_path / "corrupt_gz", n_train=10, n_test=5)
    gz = corrupt_gz / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage")[:-6])
    return {
        "data_run": run.info.run_id, "tampered_run": tampered.info.run_id,
        "missing": str(missing), "truncated": str(truncated),
        "corrupt_gz": str(corrupt_gz), "not_a_dir": str(tmp_path / "nope"),
    }


CASES = [
    # (entry point, args, words the error line must contain)
    ("download_data", ["--dataset", "imagenet"], ["dataset", "mnist", "digits"]),
    ("download_data", ["--data-dir", "{not_a_dir}"], ["data_dir", "not a folder"]),
    ("download_data", ["--data-dir", "{missing}"], ["data_dir", "train-labels-idx1-ubyte"]),
    ("download_data", ["--data-dir", "{truncated}"], ["data_dir", "truncated"]),
    ("download_data", ["--data-dir", "{corrupt_gz}"], ["data_dir", "corrupt"]),
    ("download_data", ["--dataset", "digits", "--data-dir", "{missing}"], ["data_dir", "digits"]),
    ("train", ["--epochs", "0"], ["epochs", ">=1"]),
    ("train", ["--epochs", "five"], ["epochs", "integer"]),
    ("train", ["--batch-size", "0"], ["batch_size", ">=1"]),
    ("train", ["--learning-rate", "0"], ["learning_rate", ">0"]),
    ("train", ["--learning-rate", "-0.1"], ["learning_rate", ">0"]),
    ("train", ["--learning-rate", "fast"], ["learning_rate", "float"]),
    ("train", ["--val-fraction", "0"], ["val_fraction", "0<x<1"]),
    ("train", ["--val-fraction", "1.5"], ["val_fraction", "0<x<1"]),
    ("train", ["--optimizer", "rmsprop"], ["optimizer", "adam", "sgd"]),
    ("train", ["--arch", "resnet"], ["arch", "mlp", "cnn"]),
    ("train", ["--device", "tpu"], ["device", "auto"]),
    ("train", ["--hidden", "256"], ["hidden", "two positive sizes"]),
    ("train", ["--seed", "x"], ["seed", "integer"]),
    ("train", ["--data", "runs:/0123456789abcdef0123456789abcdef/data"], ["data=", "cannot be read"]),
    ("train", ["--data", "runs:/{data_run}/data/manifest.json"], ["data=", "not a dataset artifact"]),
    ("train", ["--data", "runs:/{tampered_run}/data"], ["data=", "digest", "corrupt"]),
    ("train", ["--bogus", "1"], ["unknown option --bogus"]),
    ("evaluate", ["--model-uri", "models:/m-0123456789abcdef"], ["model_uri", "does not name a logged model"]),
    ("evaluate", ["--model-uri", "runs:/0123456789abcdef0123456789abcdef/model"], ["model_uri"]),
    ("evaluate", ["--model-name", "bad/name"], ["model_name", "letters, digits"]),
    ("register", ["--model-name", "has space"], ["model_name", "letters, digits"]),
    ("register", ["--metric", "speed"], ["metric", "test_accuracy"]),
    ("register", ["--alias", "bad alias"], ["alias", "letters, digits"]),
    ("register", ["--model-uri", "models:/m-0123456789abcdef"], ["model_uri", "evaluate"]),
    ("predict", [], ["images is required", "png"]),
    ("predict", ["--images", "{not_a_dir}"], ["images=", "does not exist"]),
    ("main", ["--dataset", "cifar"], ["dataset", "digits"]),
    ("main", ["--epochs", "-1"], ["epochs", ">=1"]),
    ("main", ["--use-cache", "maybe"], ["use_cache", "boolean"]),
    ("main", ["--arch", "vit"], ["arch", "mlp"]),
    # main checks hidden itself, before any data is fetched (it once failed only in train).
    ("main", ["--hidden", "256"], ["hidden", "two positive sizes"]),
    ("train", ["--seed", "-1"], ["seed", "0<=x<=4294967295"]),
    ("main", ["--seed", "-1"], ["seed", "0<=x<=4294967295"]),
    # Hundreds of millions of units: refused with the estimate, before any allocation.
    ("train", ["--hidden", "400000000,10"], ["hidden", "GiB", "this machine has"]),
    ("main", ["--hidden", "400000000,10", "--dataset", "digits"], ["hidden", "GiB"]),
    ("train", ["--arch", "cnn", "--hidden", "100000,100000"], ["hidden", "GiB"]),
    # Scale-out: refused before any process starts.
    ("train", ["--workers", "0"], ["workers", ">=1"]),
    ("train", ["--workers", "3"], ["batch_size=64", "not divisible", "workers=3"]),
    ("train", ["--workers", "2", "--nodes", "3", "--rdzv-endpoint", "127.0.0.1:29500"],
     ["batch_size=64", "workers*nodes=6"]),
    ("main", ["--workers", "3", "--dataset", "digits"], ["batch_size=64", "workers=3"]),
    ("train", ["--nodes", "2"], ["nodes=2", "rdzv_endpoint"]),
    ("train", ["--rdzv-endpoint", "127.0.0.1:29500"], ["rdzv_endpoint", "nodes > 1"]),
    ("train", ["--nodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"],
     ["node_rank=2", "nodes-1=1"]),
    ("train", ["--nodes", "2", "--rdzv-endpoint", "nohost"], ["rdzv_endpoint", "host:port"]),
    ("train", ["--nodes", "2", "--rdzv-endpoint", "h:70000"], ["rdzv_endpoint", "host:port"]),
]
if not torch.cuda.is_available():
    CASES.append(("train", ["--device", "cuda", "--epochs", "1"], ["device=cuda", "no CUDA GPU"]))
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    CASES.append(("train", ["--device", "cuda", "--workers", "2"],
                  ["workers=2", "CUDA GPUs", "one per worker"]))


@pytest.mark.parametrize("entry_point, args, words", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_clear_line(store_with_data, capsys, entry_point, args, words):
    args = [a.format(**store_with_data) for a in args]
    command = importlib.import_module(f"steps.{entry_point}").cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(command, args)
    assert exit_info.value.code not in (None, 0)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in error_lines[0].lower(), error_lines[0]
    client = mlflow.MlflowClient()
    assert not [r for r in client.search_runs(["0"]) if r.info.status == "RUNNING"]
    assert client.search_registered_models() == [] or not client.search_model_versions()


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["-e", "train", "-P", "epochs=0"], ["epochs"]),
    (["-e", "download_data", "-P", "dataset=svhn"], ["dataset"]),
    (["-e", "register", "-P", "model_name=a/b"], ["model_name"]),
])
def test_bad_input_through_mlflow_run(tracking_uri, args, words):
    result = mlflow_run(*args, timeout=120)
    assert_clean_failure(result, *words)
    runs = mlflow.MlflowClient().search_runs(["0"])
    assert runs and all(r.info.status == "FAILED" for r in runs)


def test_offline_mnist_download_fails_fast_naming_the_alternatives(tracking_uri, tmp_path):
    started = time.monotonic()
    result = run_step("download_data", "--dataset", "mnist", timeout=60,
                      MNIST_PIPELINE_MIRRORS="http://127.0.0.1:9/",  # nothing listens there
                      MNIST_PIPELINE_CACHE=str(tmp_path / "cache"))
    assert time.monotonic() - started < 30
    assert_clean_failure(result, "dataset=digits", "data_dir")
    runs = mlflow.MlflowClient().search_runs(["0"])
    assert [r.info.status for r in runs] == ["FAILED"]
