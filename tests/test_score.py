"""score: batch scoring on Spark (local mode, a real JVM) through mlflow.pyfunc.spark_udf,
label for label against the in-process pyfunc model, and its refusals."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.processes import VENV_BIN, assert_clean_failure, mlflow_run, run_step
from helpers.store import runs_of
from steps.core.data import load_digits_dataset

java = pytest.mark.skipif(
    shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
    reason="Spark needs Java 17+ (.ci/run installs Debian's default-jre-headless)")


def spark_job(test):
    """A test that starts Spark: a JVM and its Python workers, half a minute each."""
    return pytest.mark.slow(java(test))


def write_parquet(path: Path, images: np.ndarray, ids=None) -> Path:
    """One row per image: ``id`` and ``pixels`` (a flat array<float>), as a data team's
    image table would hold them."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    columns = {"pixels": pa.array(list(flat), pa.list_(pa.float32()))}
    if ids is not None:
        columns = {"id": pa.array(ids, pa.int64()), **columns}
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="module")
def images(champion):
    """The digits test split (359 images) and the champion's pyfunc answers for them."""
    pixels = load_digits_dataset().x_test
    expected = mlflow.pyfunc.load_model(champion["model_uri"]).predict(pixels)
    return pixels, expected


def scored(output: Path, order) -> pd.DataFrame:
    frame = pd.read_parquet(output)
    return frame.set_index("id").loc[order].reset_index()


def assert_same_as_pyfunc(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert frame["label"].tolist() == expected["label"].tolist()
    assert np.allclose(np.stack(frame["probabilities"].to_numpy()),
                       np.stack(expected["probabilities"].to_numpy()), atol=1e-6)


@spark_job
def test_score_through_mlflow_run_equals_pyfunc_label_for_label(champion, images, tmp_path):
    pixels, expected = images
    source = write_parquet(tmp_path / "images.parquet", pixels, ids=range(1000, 1000 + len(pixels)))
    output = tmp_path / "predictions.parquet"
    result = mlflow_run("-e", "score", "-P", f"images={source}", "-P", f"output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    frame = scored(output, [str(i) for i in range(1000, 1000 + len(pixels))])
    assert_same_as_pyfunc(frame, expected)
    assert set(frame["model_version"]) == {"1"}
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []

    run = runs_of(filter_string="tags.`pipeline.step` = 'score'")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.model_uri"] == "models:/mnist-classifier/1"
    assert run.data.tags["pipeline.model_version"] == "1"
    assert run.data.tags["pipeline.output"] == str(output)
    assert run.data.params["batch_size"] == "10000"
    assert run.data.metrics["scored_images"] == len(pixels)
    counts = expected["label"].value_counts()
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("label_count_")} == \
        {f"label_count_{k}": float(v) for k, v in counts.items()}
    top = np.stack(expected["probabilities"].to_numpy()).max(axis=1).mean()
    assert run.data.metrics["mean_top_probability"] == pytest.approx(top, abs=1e-5)
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert "top_probability.png" in names
    # The one line it ends with, and no Spark or Python warning on the way.
    assert "score: 359 images with models:/mnist-classifier/1" in result.stderr
    assert "Warning" not in result.stderr and "WARN" not in result.stderr, result.stderr


@spark_job
def test_score_an_npy_in_many_udf_batches(champion, images, tmp_path):
    pixels, expected = images
    np.save(tmp_path / "digits.npy", pixels.astype(np.uint8))
    # 359 images, 50 per predict call: eight batches or more, over the local workers.
    result = run_step("score", "--images", str(tmp_path / "digits.npy"), "--batch-size", "50",
                      "--spark-master", "local[2]")
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs_of(filter_string="tags.`pipeline.step` = 'score'")[0]
    output = Path(run.data.tags["pipeline.output"])  # the default: scores/<run id>.parquet
    assert output == Path.cwd() / "scores" / f"{run.info.run_id}.parquet"
    frame = scored(output, [f"digits.npy[{i}]" for i in range(len(pixels))])
    assert_same_as_pyfunc(frame, expected)


@spark_job
def test_a_failing_spark_job_fails_the_run_and_writes_nothing(champion, images, tmp_path):
    pixels = images[0][:40].astype(np.float32)
    pixels[17, 3, 3] = np.nan  # one bad image among good ones: refused by the model itself
    source = write_parquet(tmp_path / "bad.parquet", pixels)
    output = tmp_path / "never.parquet"
    result = run_step("score", "--images", str(source), "--output", str(output))
    line = assert_clean_failure(result, "Spark job failed", "images:", "not finite",
                                str(output))
    assert "Spark's log:" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]
    run = runs_of(filter_string="tags.`pipeline.step` = 'score'")[0]
    assert run.info.status == "FAILED"


@spark_job
def test_a_column_of_the_wrong_shape_is_refused_naming_it(champion, tmp_path):
    source = tmp_path / "short.parquet"
    pq.write_table(pa.table({"pixels": pa.array([[1.0] * 100] * 3, pa.list_(pa.float32())),
                             "name": ["a", "b", "c"]}), source)
    result = run_step("score", "--images", str(source))
    assert_clean_failure(result, "column='pixels'", "784 pixels", "100 to 100")
    result = run_step("score", "--images", str(source), "--column", "name")
    assert_clean_failure(result, "column='name'", "string", "array<float>")


@pytest.mark.parametrize("case", ["missing images", "missing model", "no java",
                                  "existing output"])
def test_bad_input_is_one_line_naming_the_parameter(champion, tmp_path, case):
    np.save(tmp_path / "some.npy", np.zeros((2, 28, 28), np.uint8))
    args, env = ["--images", str(tmp_path / "some.npy")], {}
    if case == "missing images":
        args, words = ["--images", str(tmp_path / "nothing.parquet")], ("images=", "not exist")
    elif case == "missing model":
        args += ["--model-uri", "models:/no-such-model@champion"]
        words = ("model_uri='models:/no-such-model@champion'",)
    elif case == "no java":
        env = {"PATH": VENV_BIN, "JAVA_HOME": ""}
        # Said before Spark is started: Spark's own failure would only say that its "Java
        # gateway process exited".
        words = ("spark_master='local[*]'", "needs Java (17 or newer)", "no JAVA_HOME")
    else:
        (tmp_path / "taken").mkdir()
        args += ["--output", str(tmp_path / "taken")]
        words = ("output=", "already exists")
    assert_clean_failure(run_step("score", *args, **env), *words)
