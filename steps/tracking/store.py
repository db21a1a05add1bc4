"""A quick look at the tracking store before any work: a server reachable and taking our
login; a new sqlite store created by one process at a time.

MLflow's client retries an unreachable server for minutes and reports a refused login as a
traceback; this asks once, with a short timeout, and says what is wrong in one line (the
URI without its secrets). ``main`` and ``tune`` call it when they start; ``make run`` and
``make tune`` call it before ``mlflow run`` (whose launcher talks to the server before any
project code runs) through the preflight plugin's command:

    mnist-pipeline-preflight   # exit 0, or one error line and exit 1
"""

from __future__ import annotations

import os

from steps.tracking.cli import StepError
from steps.tracking.redact import redact

TIMEOUT_S = 5


def check_tracking_server(uri: str | None = None) -> None:
    """Raise StepError (one line, no secrets) unless an HTTP tracking server at ``uri``
    answers an authenticated request. Other stores (sqlite, PostgreSQL) are not checked."""
    import requests

    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    user, password = (os.environ.get("MLFLOW_TRACKING_USERNAME"),
                      os.environ.get("MLFLOW_TRACKING_PASSWORD"))
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    try:
        response = requests.get(url, params={"max_results": 1}, headers=headers,
                                auth=(user, password) if user and password else None,
                                timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise StepError(f"the tracking server {redact(uri)} cannot be reached "
                        f"({type(exc).__name__}); start it or fix MLFLOW_TRACKING_URI") from None
    if response.status_code in (401, 403):
        raise StepError(
            f"the tracking server {redact(uri)} refused the login (HTTP "
            f"{response.status_code}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
    if response.status_code >= 400:
        raise StepError(f"the tracking server {redact(uri)} answered HTTP "
                        f"{response.status_code} to a plain request; is it an MLflow server?")


def prepare_store(uri: str) -> None:
    """Create a sqlite store's tables under a file lock, if the file is new.

    Two pipelines started at once on a store that does not exist yet would both run
    MLflow's schema migrations, and one dies with ``duplicate column name``. The first to
    take the lock creates the tables; the other then finds them.
    """
    import fcntl
    from pathlib import Path

    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(f"{path}.lock")
    if not os.access(path.parent, os.W_OK) and not lock_path.exists():
        return  # a read-only folder: nobody creates a store there
    with open(lock_path, "a") as lock:
        # Taken even when the file is there: a file that is not empty may still be half
        # created by the process holding the lock.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file() and path.stat().st_size:
            return
        import mlflow

        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def prepare(uri: str | None = None) -> None:
    """Both checks for the store ``uri`` names (default: MLFLOW_TRACKING_URI): a server is
    reachable and takes the login, a new sqlite store gets its tables."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if uri is None else uri
    check_tracking_server(uri)
    prepare_store(uri)
