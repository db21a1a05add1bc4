"""Batch scoring on Spark, for ``score``: images in, one row of predictions per image out,
through ``mlflow.pyfunc.spark_udf`` (the engine MLflow scales a pyfunc model with).

Every check that can be made before a Spark job starts is made first, each failing in one
line naming its parameter: Java, the images, their pixel column, the output.

The images reach Spark without passing whole through the driver, so its memory does not
grow with them: Parquet is read by Spark itself; in local mode an ``.npy`` is read from its
file and staged as Parquet a chunk at a time (:data:`NPY_CHUNK` images; a Fortran-order
array whole), and a PNG folder's files are handed to Spark by name (its ``binaryFile``
source reads them) and decoded on the executors. On a
cluster, whose executors cannot see the driver's disk, an ``.npy`` or PNGs go through the
driver instead (``createDataFrame``), bounded by its memory: give a cluster Parquet on
shared storage (docs/scoring.md). A job that
fails leaves nothing under the output's name: Spark writes to a hidden sibling, renamed
into place (Hadoop's FileSystem rename, so the same on a local disk and on HDFS) only once
the job has succeeded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from steps.core.text import first_line
from steps.tracking.runtime.cli import StepError

log = logging.getLogger("steps.score")

# What the classifier returns (steps/tracking/inference/classifier.py), as a Spark type.
PREDICTION_TYPE = "label long, probabilities array<float>"
PIXELS = 28 * 28
TOP_PROBABILITY_BINS = 20
# Images per chunk staged from an .npy: 10,000 are 7.8 MB of uint8 (31 MB as the float32
# the pixel check makes), the most of the file the driver holds at once.
NPY_CHUNK = 10_000
PROGRESS_EVERY_S = 10.0
NUMERIC_SPARK_TYPES = ("ByteType", "ShortType", "IntegerType", "LongType", "FloatType",
                       "DoubleType", "DecimalType")


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def check_java(master: str) -> None:
    """Spark's driver is a JVM in this process, in local mode and as a cluster's client
    alike: without Java it dies with a page of py4j output."""
    home = os.environ.get("JAVA_HOME")
    if home and not Path(home, "bin", "java").exists():
        raise StepError(f"spark_master={master!r} needs Java (17 or newer): JAVA_HOME={home} "
                        "holds no bin/java; fix JAVA_HOME or unset it")
    if not home and not shutil.which("java"):
        raise StepError(f"spark_master={master!r} needs Java (17 or newer), and there is no "
                        "`java` on PATH and no JAVA_HOME (Debian: apt-get install "
                        "default-jre-headless)")


@contextlib.contextmanager
def spark_session(master: str, batch_size: int) -> Iterator:
    """A SparkSession on ``master``, stopped on the way out.

    ``batch_size`` is the UDF's batch (Arrow's records per batch): how many images one
    ``predict`` call gets. In local mode Spark's Python workers run this interpreter (the
    project's environment, where the model's requirements are) and the driver listens on
    127.0.0.1 only; on a cluster both are the cluster's business (docs/scoring.md).
    """
    import warnings

    check_java(master)
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise StepError("score needs pyspark (pip install -r requirements.txt)") from None
    # pyspark 4.3 warns at every pandas UDF that pandas 3 is "not yet fully supported"; the
    # UDF here passes arrays and numbers only, and its results are checked against pyfunc's
    # in the tests.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas",
                            category=FutureWarning)
    logging.getLogger("py4j").setLevel(logging.WARNING)  # "Closing down clientserver ..."
    builder = (SparkSession.builder.master(master).appName("mnist-score")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.ui.showConsoleProgress", "false")
               # 16 MB of input per task, not 128: 20,000 uint8 images, so that a long job
               # has tasks enough for its progress lines to move (and cores to share).
               .config("spark.sql.files.maxPartitionBytes", str(16 * 2**20)))
    if is_local(master):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = (builder.config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.ui.enabled", "false"))
    # The JVM (and the Python workers it starts) write their own log to stderr: start-up
    # chatter on every run, a Java stack for every failed task. It goes to a file instead;
    # what failed is said in one line from the exception, with the file's name.
    spark_log = spark_log_path()
    with open(spark_log, "ab") as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)  # the JVM, started now, inherits it
        try:
            spark = builder.getOrCreate()
        except Exception as exc:  # py4j, a refused master URL, a JVM that would not start
            raise StepError(f"spark_master={master!r}: Spark did not start "
                            f"({spark_cause(exc)}); Spark's log: {spark_log}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    try:
        yield spark
    finally:
        spark.stop()
    spark_log.unlink(missing_ok=True)  # kept when the job failed: its message names it


def spark_log_path() -> Path:
    import tempfile

    return Path(tempfile.gettempdir(), f"mnist-score-spark-{os.getpid()}.log")


# How a driver JVM that ran out of heap shows in Python: its error, or py4j losing it.
OUT_OF_MEMORY = ("java.lang.OutOfMemoryError", "Java heap space",
                 "Answer from Java side is empty")


def spark_cause(exc: BaseException) -> str:
    """The line of a Spark error that says what went wrong: for a failed Python worker the
    last ``SomeError: message`` line of its traceback (the model's own refusal, ``images:
    ...``), for the JVM the first line of its message."""
    text = str(exc)
    if any(sign in text for sign in OUT_OF_MEMORY):
        if "Lost task" in text or "executor" in text.lower():
            return ("an executor ran out of memory (Java heap space); give executors more "
                    "(spark.executor.memory) or lower batch_size")
        return ("the driver's JVM ran out of memory (Java heap space); give it more with "
                "PYSPARK_SUBMIT_ARGS='--driver-memory 4g pyspark-shell', or score Parquet, "
                "which Spark reads without the driver")
    raised = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Images)): (.+)$", text, re.M)
    if raised:
        kind, message = raised[-1]
        return message.strip() if message.startswith("images:") else f"{kind}: {message.strip()}"
    return first_line(text)


# --------------------------------------------------------------------------- input


def check_images(images: str) -> None:
    """A local ``images`` path that is missing is refused before anything starts."""
    if "://" not in images and not Path(images).exists():
        raise StepError(f"images={images!r} does not exist; give a Parquet file or folder, "
                        "an .npy array, a PNG or a folder of PNGs")


def read_images(spark, images: str, column: str, staging: Path, local: bool = True):
    """(Spark DataFrame of ``id`` string and ``pixels`` array<float> of 784, image count).

    ``images``: a Parquet file or folder whose ``column`` holds one array of pixels per
    image (784 numbers, or 28 arrays of 28), an ``.npy`` array, or PNGs (read as
    ``predict`` reads them). A Parquet ``id`` column is kept; otherwise ids are Spark's.
    ``staging``: an empty folder that lasts as long as the job, for an ``.npy`` staged as
    Parquet; ``local``: whether the executors share this machine's disk (local mode).
    """
    from pyspark.sql import functions as F

    check_images(images)
    if not is_parquet(images):
        if not local:
            return images_from_files(spark, images)
        if Path(images).suffix == ".npy":
            count = stage_npy(Path(images), staging)
            frame = spark.read.parquet(str(staging))
            return frame.select("id", F.col("pixels").cast("array<float>").alias("pixels")), count
        return png_folder(spark, images)
    try:
        frame = spark.read.parquet(images)
    except Exception as exc:
        raise StepError(f"images={images!r} is not readable as Parquet ({spark_cause(exc)})"
                        ) from None
    pixels = pixel_column(frame, images, column)
    ids = (F.col("id").cast("string") if "id" in frame.columns
           else F.monotonically_increasing_id().cast("string"))
    frame = frame.select(ids.alias("id"), pixels.cast("array<float>").alias("pixels"))
    shortest, longest, count = frame.agg(
        F.min(F.size("pixels")), F.max(F.size("pixels")), F.count(F.lit(1))).first()
    if count == 0:
        raise StepError(f"images={images!r} holds no rows (no images)")
    if shortest != PIXELS or longest != PIXELS:
        raise StepError(
            f"column={column!r}: each image must have {PIXELS} pixels (28x28); these have "
            f"{'no array or ' if shortest is None or shortest < 0 else ''}"
            f"{max(shortest or 0, 0)} to {longest}")
    return frame, count


def is_parquet(images: str) -> bool:
    path = Path(images)
    if "://" in images or path.suffix == ".parquet":
        return True
    return path.is_dir() and any(path.glob("*.parquet")) and not any(path.glob("*.png"))


def pixel_column(frame, images: str, column: str):
    """``column`` as one flat array per image, or StepError naming ``column``."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType

    if column not in frame.columns:
        raise StepError(f"column={column!r} is not a column of {images!r} (it has "
                        f"{', '.join(frame.columns) or 'none'})")
    kind = frame.schema[column].dataType
    nested = isinstance(kind, ArrayType) and isinstance(kind.elementType, ArrayType)
    inner = kind.elementType.elementType if nested else getattr(kind, "elementType", None)
    if not isinstance(kind, ArrayType) or type(inner).__name__ not in NUMERIC_SPARK_TYPES:
        raise StepError(f"column={column!r} of {images!r} is {kind.simpleString()}; it must "
                        "hold one array of pixel numbers per image (array<float>, 784 long, "
                        "or 28 arrays of 28)")
    return F.flatten(F.col(column)) if nested else F.col(column)


def stage_npy(path: Path, staging: Path, chunk: int = NPY_CHUNK) -> int:
    """Copy an .npy's images into Parquet files under ``staging``, ``chunk`` images at a
    time read from the file; return how many. Each chunk is checked as ``predict`` checks
    images; uint8 pixels stay uint8 (a quarter of float32's bytes), others are float32."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steps.core.pixels import to_images
    from steps.tracking.inference.images import npy_chunks

    count = 0
    for part_number, (first, part) in enumerate(npy_chunks(path, chunk)):
        try:
            checked = to_images(part)
        except ValueError as exc:
            at = f" (images {first} to {first + len(part) - 1})" if first or len(part) == \
                chunk else ""
            raise StepError(f"images={str(path)!r}{at}: {exc}") from None
        pixels = (np.ascontiguousarray(part, np.uint8).reshape(-1) if part.dtype == np.uint8
                  else checked.reshape(-1))
        offsets = pa.array(np.arange(0, len(checked) * PIXELS + 1, PIXELS, dtype=np.int32))
        pq.write_table(pa.table({
            "id": pa.array([f"{path.name}[{i}]" for i in range(first, first + len(checked))]),
            "pixels": pa.ListArray.from_arrays(offsets, pa.array(pixels))}),
            staging / f"part-{part_number:06d}.parquet")
        count += len(checked)
    if not count:
        raise StepError(f"images={str(path)!r}: there are no images (an empty array)")
    return count


def png_folder(spark, images: str):
    """A PNG (or a folder of them) as a Spark DataFrame: the files ``predict`` would read
    (the folder's ``*.png``, not its subfolders), listed here by name only, read by Spark
    and decoded by each executor as ``predict`` decodes them (grayscale, 28x28, a light
    background inverted)."""
    import numpy as np
    import pandas as pd

    source = Path(images).resolve()
    files = sorted(source.glob("*.png")) if source.is_dir() else [source]
    if not files:
        raise StepError(f"images={images!r}: the folder holds no .png files")

    def decode(batches):
        from steps.tracking.inference.images import read_png

        for batch in batches:
            names = [Path(p).name for p in batch["path"]]
            pixels = [read_png(Path(name), bytes(content)).astype(np.float32).reshape(-1)
                      for name, content in zip(names, batch["content"], strict=True)]
            yield pd.DataFrame({"id": names, "pixels": pixels})

    frame = spark.read.format("binaryFile").load([str(f) for f in files])
    frame = frame.select("path", "content").mapInPandas(decode, "id string, pixels array<float>")
    return frame, len(files)


def images_from_files(spark, images: str):
    """An .npy or PNGs as a Spark DataFrame, through Arrow from the driver: for a cluster,
    whose executors cannot read this machine's files. Bounded by the driver's memory."""
    import numpy as np
    import pyarrow as pa

    from steps.tracking.inference.images import load_images

    names, pixels = load_images(images)
    flat = pa.array(np.ascontiguousarray(pixels, np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, len(pixels) * PIXELS + 1, PIXELS, dtype=np.int32))
    table = pa.table({"id": pa.array(names, pa.string()),
                      "pixels": pa.ListArray.from_arrays(offsets, flat)})
    return spark.createDataFrame(table), len(names)


# --------------------------------------------------------------------------- scoring


@contextlib.contextmanager
def progress(spark, every: float = PROGRESS_EVERY_S) -> Iterator[None]:
    """Every ``every`` seconds while the block runs, one line per running Spark stage (its
    tasks done of all): a long job is seen to move (Spark's own console bar is off, being
    written over the step's lines)."""
    import threading

    tracker, stop = spark.sparkContext.statusTracker(), threading.Event()

    def report() -> None:
        while not stop.wait(every):
            try:
                stages = list(filter(None, map(tracker.getStageInfo,
                                               tracker.getActiveStageIds())))
            except Exception:  # a JVM that died: the job's own failure says why
                return
            for stage in stages:
                log.info("score: %d of %d tasks done (Spark stage %d)",
                         stage.numCompletedTasks, stage.numTasks, stage.stageId)

    thread = threading.Thread(target=report, name="score-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()



def score(spark, frame, model_dir: str, model_version: str):
    """The predictions, lazily: ``id``, ``label``, ``probabilities``, ``model_version``."""
    import mlflow
    from pyspark.sql import functions as F

    # env_manager="local": the workers run this environment, whose pins were checked
    # against the model's (MLflow warns about that choice each time; said once in
    # docs/scoring.md instead).
    chatty = [logging.getLogger(name) for name in
              ("mlflow.pyfunc", "mlflow.models.flavor_backend_registry")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(logging.ERROR)
    try:
        predict = mlflow.pyfunc.spark_udf(spark, model_dir, result_type=PREDICTION_TYPE,
                                          env_manager="local")
    finally:
        for logger, level in zip(chatty, levels, strict=True):
            logger.setLevel(level)
    return (frame.select("id", predict("pixels").alias("prediction"))
            .select("id", "prediction.label", "prediction.probabilities",
                    F.lit(model_version).alias("model_version")))


def filesystem_of(output: str):
    """(pyarrow's filesystem for ``output``, the path in it): a local path, or a URI of any
    filesystem Arrow reads (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``; Hadoop's
    ``s3a://`` is S3's)."""
    from pyarrow import fs

    if "://" not in output:
        return fs.LocalFileSystem(), os.path.abspath(output)
    return fs.FileSystem.from_uri(re.sub(r"^s3a://", "s3://", output))


def write_atomically(frame, output: str) -> None:
    """Write ``frame`` as Parquet at ``output``, or nothing there at all: Spark writes to a
    hidden sibling, moved into place only once the job has succeeded."""
    from pyarrow import fs

    filesystem, path = filesystem_of(output)
    parent, name = path.rstrip("/").rsplit("/", 1)
    partial = f"{parent}/.{name}.partial"
    partial_uri = output[:len(output) - len(name)].rstrip("/") + f"/.{name}.partial" \
        if "://" in output else partial

    def remove_partial() -> None:
        if filesystem.get_file_info(partial).type != fs.FileType.NotFound:
            filesystem.delete_dir(partial)

    remove_partial()
    try:
        frame.write.parquet(partial_uri)
        filesystem.move(partial, path)
    except Exception as exc:
        remove_partial()
        if isinstance(exc, OSError):
            raise StepError(f"output={output!r}: the finished predictions could not be moved "
                            f"into place from {partial_uri} ({first_line(exc)})") from None
        raise StepError(f"the Spark job failed ({spark_cause(exc)}); nothing was written to "
                        f"{output} (Spark's log: {spark_log_path()})") from None


def check_output(output: str) -> None:
    """Refuse an ``output`` that exists."""
    from pyarrow import fs

    filesystem, path = filesystem_of(output)
    if filesystem.get_file_info(path).type != fs.FileType.NotFound:
        raise StepError(f"output={output!r} already exists; give a new path or move it aside "
                        "(score never overwrites predictions)")


def summarize(spark, output: str) -> dict:
    """From the written predictions: how many, per predicted label, and the top
    probability's histogram (``TOP_PROBABILITY_BINS`` equal bins over 0-1)."""
    from pyspark.sql import functions as F

    scored = spark.read.parquet(output)
    top = F.array_max("probabilities")
    bins = F.least(F.floor(top * TOP_PROBABILITY_BINS), F.lit(TOP_PROBABILITY_BINS - 1))
    per_label, histogram, top_sum = {}, [0] * TOP_PROBABILITY_BINS, 0.0
    for row in scored.groupBy("label", bins.alias("bin")).agg(
            F.count(F.lit(1)).alias("n"), F.sum(top).alias("top")).collect():
        per_label[row["label"]] = per_label.get(row["label"], 0) + row["n"]
        histogram[int(row["bin"])] += row["n"]
        top_sum += row["top"]
    count = sum(per_label.values())
    return {"count": count, "per_label": per_label, "histogram": histogram,
            "mean_top_probability": top_sum / count if count else float("nan")}
