"""score: batch scoring on Spark (local mode, a real JVM) through mlflow.pyfunc.spark_udf,
label for label against the in-process pyfunc model, and its refusals."""

from __future__ import annotations

import os
import shutil
import time
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


@spark_job
def test_a_png_folder_is_decoded_by_the_executors_as_predict_decodes_it(champion, images,
                                                                        tmp_path):
    """Listed by Spark, decoded on its workers: the labels are pyfunc's for the images as
    ``predict`` reads the files (a light background inverted). A file that is no image
    fails the job in one line naming it."""
    from PIL import Image

    from steps.tracking.inference.images import load_images

    pixels = images[0][:30].astype(np.uint8)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(255 - image if i % 7 == 0 else image).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image, and not a .png: skipped")
    names, decoded = load_images(str(folder))
    expected = mlflow.pyfunc.load_model(champion["model_uri"]).predict(decoded)
    output = tmp_path / "predictions.parquet"
    result = run_step("score", "--images", str(folder), "--output", str(output),
                      "--spark-master", "local[2]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"score: {len(pixels)} images with" in result.stderr
    assert_same_as_pyfunc(scored(output, names), expected)

    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_step("score", "--images", str(folder), "--output", str(tmp_path / "never"),
                      "--spark-master", "local[2]")
    assert_clean_failure(result, "Spark job failed", "broken.png", "not a readable image")
    assert not (tmp_path / "never").exists()


def test_an_npy_is_staged_in_chunks_from_a_memory_map(tmp_path):
    """What reaches Spark from an .npy: Parquet files of ``chunk`` images each, ids by
    position, uint8 kept uint8; a bad chunk is named by its images."""
    from steps.tracking.inference.spark import stage_npy
    from steps.tracking.runtime.cli import StepError

    pixels = np.random.default_rng(0).integers(0, 256, (25, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "a.npy", pixels)
    staging = tmp_path / "staged"
    staging.mkdir()
    assert stage_npy(tmp_path / "a.npy", staging, chunk=10) == 25
    files = sorted(staging.iterdir())
    assert [pq.read_metadata(f).num_rows for f in files] == [10, 10, 5]
    table = pq.read_table(staging)
    assert table.schema.field("pixels").type == pa.list_(pa.uint8())
    assert table["id"].to_pylist() == [f"a.npy[{i}]" for i in range(25)]
    assert np.array_equal(np.stack(table["pixels"].to_numpy(zero_copy_only=False)),
                          pixels.reshape(25, -1))

    floats = pixels.reshape(25, 784).astype(np.float32)
    floats[13, 5] = 300.0
    np.save(tmp_path / "b.npy", floats)
    (tmp_path / "b").mkdir()
    with pytest.raises(StepError, match=r"b\.npy' \(images 10 to 19\): pixels must be from "
                                        r"0 to 255"):
        stage_npy(tmp_path / "b.npy", tmp_path / "b", chunk=10)


def test_a_driver_out_of_memory_is_said_with_what_to_change():
    from steps.tracking.inference.spark import spark_cause

    for text in ("An error occurred while calling o42.collect.\n: java.lang.OutOfMemoryError:"
                 " Java heap space\n\tat java.base/...", "Answer from Java side is empty"):
        said = spark_cause(RuntimeError(text))
        assert "ran out of memory" in said and "--driver-memory" in said and "Parquet" in said


def test_progress_reports_each_running_stage_until_the_job_ends(caplog):
    """Against the status tracker's interface (a running job's stages and their tasks)."""
    from types import SimpleNamespace

    from helpers.waiting import wait_until
    from steps.tracking.inference.spark import progress

    tracker = SimpleNamespace(getActiveStageIds=lambda: [4], getStageInfo=lambda i: (
        SimpleNamespace(stageId=i, numTasks=8, numCompletedTasks=3)))
    spark = SimpleNamespace(sparkContext=SimpleNamespace(statusTracker=lambda: tracker))
    caplog.set_level("INFO", logger="steps.score")
    with progress(spark, every=0.05):
        wait_until(lambda: caplog.records, 5, "a progress line")
    assert caplog.records[0].getMessage() == "score: 3 of 8 tasks done (Spark stage 4)"
    after = len(caplog.records)
    time.sleep(0.2)
    assert len(caplog.records) == after  # none once the block has ended
