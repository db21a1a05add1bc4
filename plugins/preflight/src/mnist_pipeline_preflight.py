"""The `mlflow run` launcher's preflight, through MLflow's request-header plugin point.

MLflow's launcher talks to the tracking server (creating the run) before any project code
runs: an unreachable server costs minutes of retries, a refused login a traceback. MLflow
asks every registered request-header provider before each request, so this provider, in
the launcher process only, checks the server once with the project's own check
(``steps.tracking.runtime.store.check_tracking_server``) and ends the process with its one-line
error. It adds no header; when the tracking URI carries a password it also stops MLflow from
printing run links that show it.

It also creates the experiment ``MLFLOW_EXPERIMENT_NAME`` names before the launcher looks it
up: launchers started together would otherwise race to create it.

The same package gives ``make run`` and ``make tune`` their check before they start the
launcher: the command ``mnist-pipeline-preflight`` (``main`` below) also checks that a
sqlite store is a whole database and creates a new one's tables under a lock, which no
request-header hook can do (sqlite sends no request).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlflow.tracking.request_header.abstract_request_header_provider import (
    RequestHeaderProvider,
)


def _project_dir() -> Path | None:
    """The mnist-pipeline project: three folders up when installed editable (``make
    setup``), else the current folder (the image's ``pip install ./plugins/preflight``, run
    from the project); None when neither is it (some other project's ``mlflow run``)."""
    here = Path(__file__).resolve()
    for folder in (*here.parents[3:4], Path.cwd()):
        if (folder / "MLproject").is_file() and (folder / "steps" / "tracking").is_dir():
            return folder
    return None


def _import_project() -> bool:
    folder = _project_dir()
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder is not None


def main() -> None:
    """``mnist-pipeline-preflight [--model URI]``: check the store MLFLOW_TRACKING_URI names
    (a server that answers, a sqlite file that is whole) or create it (sqlite); with
    ``--model``, check that the model can be served (``make serve``). Exit 0, or one error
    line and exit 1."""
    if not _import_project():
        raise SystemExit("error: mnist-pipeline-preflight runs from the mnist-pipeline "
                         "project folder")
    import click

    from steps.tracking.runtime.cli import run_cli
    from steps.tracking.runtime.store import prepare

    @click.command()
    @click.option("--model", default="", help="A model URI that must be loadable.")
    @click.option("--port", type=int, default=None,
                  help="A port on 127.0.0.1 the server will listen on: it must be free.")
    def cli(model: str, port: int | None) -> None:
        prepare()
        if port is not None:
            port_is_free(port)
        if model:
            from steps.tracking.inference.models import check_servable

            check_servable(model)

    run_cli(cli)


def port_is_free(port: int) -> None:
    """Refuse, in one line naming PORT, a port on 127.0.0.1 that something listens on
    (uvicorn would end in a traceback)."""
    import socket

    from steps.tracking.runtime.cli import StepError

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise StepError(f"PORT={port} on 127.0.0.1 is taken ({exc.strerror}): stop what "
                            f"listens there, or pick another, e.g. PORT={port + 1}") from None


def _is_mlflow_run_launcher() -> bool:
    return Path(sys.argv[0]).name == "mlflow" and sys.argv[1:2] == ["run"]


class Preflight(RequestHeaderProvider):
    checked = False

    def in_context(self) -> bool:
        if Preflight.checked or not _is_mlflow_run_launcher():
            return False
        Preflight.checked = True
        if not _import_project():
            return False  # another project's `mlflow run`: not ours to check
        import os

        import mlflow

        from steps.tracking.runtime.cli import StepError, fail
        from steps.tracking.runtime.redact import redact
        from steps.tracking.runtime.store import check_tracking_server, ensure_experiment

        uri = mlflow.get_tracking_uri()
        if redact(uri) != uri:
            # MLflow's launcher would print its run link with the URI's password in it.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        try:
            check_tracking_server(uri)
            # Before the launcher's own lookup: launchers started together would race to
            # create it (this request's header is asked for again: `checked` answers).
            ensure_experiment(uri)
        except StepError as exc:
            # SystemExit, not an Exception: MLflow's registry logs and skips the latter.
            raise SystemExit(fail(str(exc), 1)) from None
        return False

    def request_headers(self) -> dict:
        return {}
