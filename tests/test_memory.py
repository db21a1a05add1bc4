"""The train step's memory grows with its data by about one byte per pixel (the uint8
images themselves), not by the float32 copies it used to make.

Two real ``python -m steps.train`` processes on generated data of two sizes; the slope of
their peak RSS over the pixel count must stay <= 1.5 bytes per pixel. Before the loop
stopped copying, this slope was about 5.9 (measured on MNIST, 8k vs 60k images).
"""

from __future__ import annotations

import sys

import mlflow
import numpy as np
import pytest

from helpers.data import write_idx_folder
from helpers.processes import run_step, subprocess_env
from steps.tracking.runtime import tags
from tools.peak_rss import run_with_peak_rss

SIZES = (4_000, 44_000)
PIXELS_PER_IMAGE = 28 * 28
SLOPE_LIMIT = 1.5  # bytes of peak RSS per pixel of training data


def peak_rss_bytes(args: list[str]) -> int:
    # Through tools.peak_rss: a plain os.wait4 here would count this test runner's own
    # peak (hundreds of MiB once the suite has imported torch), not only train's.
    result, peak = run_with_peak_rss([sys.executable, "-m", "steps.train", *args],
                                     env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return peak


def test_peak_rss_counts_the_command_not_the_process_that_starts_it():
    ballast = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB resident in this process
    _, idle = run_with_peak_rss([sys.executable, "-c", "pass"])
    grow = "import numpy; a = numpy.ones(300 * 2**20, dtype=numpy.uint8)"
    _, grown = run_with_peak_rss([sys.executable, "-c", grow])
    del ballast
    assert idle < 100 * 2**20
    assert grown - idle >= 290 * 2**20


@pytest.mark.slow
def test_train_peak_memory_grows_by_at_most_1_5_bytes_per_pixel(tracking_uri, tmp_path):
    peaks = {}
    for n in SIZES:
        folder = write_idx_folder(tmp_path / str(n), n_train=n, n_test=100, gz=False)
        result = run_step("download_data", "--data-dir", str(folder))
        assert result.returncode == 0, result.stderr
        data = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  max_results=1)[0].data.tags[tags.DATA_URI]
        peaks[n] = peak_rss_bytes(["--data", data, "--epochs", "1", "--device", "cpu"])
    slope = (peaks[SIZES[1]] - peaks[SIZES[0]]) / ((SIZES[1] - SIZES[0]) * PIXELS_PER_IMAGE)
    print(f"peak RSS {peaks[SIZES[0]] / 2**20:.0f} MiB ({SIZES[0]} images), "
          f"{peaks[SIZES[1]] / 2**20:.0f} MiB ({SIZES[1]}): {slope:.2f} bytes per pixel")
    assert slope <= SLOPE_LIMIT
