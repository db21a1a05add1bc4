"""A quick look at the tracking store before any work: a server reachable and taking our
login; a sqlite file that is a whole database; a new sqlite store created by one process
at a time.

MLflow's client retries an unreachable server for minutes and reports a refused login as a
traceback; this asks once, with a short timeout, and says what is wrong in one line (the
URI without its secrets). ``main`` and ``tune`` call it when they start; ``make run`` and
``make tune`` call it before ``mlflow run`` (whose launcher talks to the server before any
project code runs) through the preflight plugin's command:

    mnist-pipeline-preflight   # exit 0, or one error line and exit 1
"""

from __future__ import annotations

import os

from steps.tracking.runtime.cli import StepError
from steps.tracking.runtime.redact import redact

# A server that refuses the connection, or does not accept it within CONNECT_TIMEOUT_S, is
# down: say so at once. One that accepted it is up, and may be slow to answer while a team
# loads it (four pipelines starting at once on two cores took it past 5 s): wait for it.
CONNECT_TIMEOUT_S = 5
ANSWER_TIMEOUT_S = 60


def check_tracking_server(uri: str | None = None) -> None:
    """Raise StepError (one line, no secrets) unless an HTTP tracking server at ``uri``
    answers an authenticated request. Other stores (sqlite, PostgreSQL) are not checked."""
    import requests

    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import read_mlflow_creds

    # The login MLflow's client sends: MLFLOW_TRACKING_USERNAME/PASSWORD, else MLflow's
    # credentials file ~/.mlflow/credentials (what the Kubernetes manifests mount).
    user, password = read_mlflow_creds()
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    try:
        response = requests.get(url, params={"max_results": 1}, headers=headers,
                                auth=(user, password) if user and password else None,
                                timeout=(CONNECT_TIMEOUT_S, ANSWER_TIMEOUT_S))
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


def check_sqlite_store(uri: str) -> None:
    """Raise StepError (one line naming the store and what to do) when a sqlite store's file
    is there but is no whole database: truncated, overwritten, not SQLite at all. MLflow
    would fail on it with a page of SQLAlchemy traceback, in whichever step came first.

    SQLite's own ``PRAGMA quick_check``: it reads every page once (a fraction of a second
    for a store of tens of MB). The connection may write (``mode=rw``, never creating the
    file) because a writer killed mid-transaction leaves a hot journal that the next
    connection must roll back; a read-only one cannot, and SQLite then answers "attempt to
    write a readonly database" about a store that is whole.
    """
    import sqlite3
    from pathlib import Path

    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if not path.is_file() or not path.stat().st_size:
        return  # none yet: prepare_store creates it
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True) as db:
            verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if verdict == "ok":
                db.execute("SELECT count(*) FROM experiments").fetchone()
                return
            problem = f"SQLite's check says: {verdict}"
    except sqlite3.DatabaseError as exc:  # "file is not a database", "... malformed", ...
        problem = f"SQLite says: {exc}"
    raise StepError(
        f"the tracking store {redact(uri)} is damaged ({problem}); restore {path} from a "
        f"backup, or move it aside (mv {path} {path}.damaged) to start a new, empty store")


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


def check_store(uri: str | None = None) -> None:
    """The store ``uri`` names (default: the active tracking URI) can be worked with: a
    server answers and takes the login; a sqlite file is a whole database."""
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    check_tracking_server(uri)
    check_sqlite_store(uri)


def ensure_experiment(uri: str | None = None) -> None:
    """Create the experiment ``MLFLOW_EXPERIMENT_NAME`` names, if it is not there yet.

    ``mlflow run`` looks the experiment up and creates it when missing; launchers started
    together race, and the loser dies with a page of traceback on RESOURCE_ALREADY_EXISTS.
    Created here first, before any launcher asks, a race between two of these is absorbed:
    the experiment being there is all that was wanted.
    """
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is not None:
        return
    try:
        client.create_experiment(name)
    except MlflowException:
        if client.get_experiment_by_name(name) is None:
            raise


def prepare(uri: str | None = None) -> None:
    """Every check for the store ``uri`` names (default: MLFLOW_TRACKING_URI), then a new
    sqlite store gets its tables and the experiment ``MLFLOW_EXPERIMENT_NAME`` names is
    created."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if uri is None else uri
    check_store(uri)
    prepare_store(uri)
    ensure_experiment(uri or None)
