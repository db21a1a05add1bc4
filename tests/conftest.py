"""Fixtures only: a throw-away sqlite tracking store, a tiny IDX dataset, a PostgreSQL
cluster. What tests share besides fixtures lives in ``tests/helpers/``."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.data import write_idx_folder
from helpers.store import postgres_bin, postgres_cluster


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


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1 (run as user postgres when we are root)."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's package)")
    with postgres_cluster() as uri:
        yield uri
