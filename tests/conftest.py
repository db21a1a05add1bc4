"""Fixtures: a throw-away sqlite tracking store, a tiny IDX dataset, a registered
champion, a PostgreSQL cluster, and each xdist worker's share of the cores; plus pytest's
hooks that order the test files longest first for the xdist workers. What tests share
besides fixtures lives in ``tests/helpers/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.data import write_idx_folder
from helpers.scheduling import DurationLog, longest_files_first, read_durations
from helpers.store import postgres_bin, postgres_cluster, temporary_store


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A real sqlite store in a temp dir, used by this process and every subprocess."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    return write_idx_folder(tmp_path / "idx")


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A store with one trained, evaluated and registered digits model (in-process, fast)."""
    import importlib

    from steps.tracking.runtime.cli import run_cli

    root = tmp_path_factory.mktemp("champion")
    with temporary_store(root) as uri:
        for step, args in (("download_data", ["--dataset", "digits"]),
                           ("train", ["--epochs", "2"]), ("evaluate", []), ("register", [])):
            run_cli(importlib.import_module(f"steps.{step}").cli, args)
        yield {"root": root, "uri": uri, "model_uri": "models:/mnist-classifier@champion"}


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1 (run as user postgres when we are root)."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's package)")
    with postgres_cluster() as uri:
        yield uri


@pytest.fixture(scope="session", autouse=True)
def a_share_of_the_cores():
    """Under pytest-xdist, each worker, and every process it starts, uses its share of the
    cores. torch runs a thread per core in every process: with two workers training at once
    on two cores, a digits epoch took 20 s instead of 2, and the tests' waits ran out."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    import torch

    threads, before = max(1, (os.cpu_count() or 1) // workers), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    yield
    del os.environ["OMP_NUM_THREADS"]
    torch.set_num_threads(before)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help="after the run, write each test file's seconds to "
                          "tests/durations.json (the order xdist hands files out)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("store_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(DurationLog(), "duration-log")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest test files first: xdist hands whole files to its workers in this order
    (``--no-loadscope-reorder``), so that they end together (``helpers/scheduling.py``)."""
    order = longest_files_first([item.nodeid for item in items], read_durations())
    items[:] = [items[i] for i in order]
