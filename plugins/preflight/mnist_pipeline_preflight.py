"""The `mlflow run` launcher's preflight, through MLflow's request-header plugin point.

MLflow's launcher talks to the tracking server (creating the run) before any project code
runs: an unreachable server costs minutes of retries, a refused login a traceback. MLflow
asks every registered request-header provider before each request, so this provider, in
the launcher process only, checks the server once with the project's own check
(``steps.server.check_tracking_server``) and ends the process with its one-line error.
It adds no header; when the tracking URI carries a password it also stops MLflow from
printing run links that show it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlflow.tracking.request_header.abstract_request_header_provider import (
    RequestHeaderProvider,
)

# Installed editable from <project>/plugins/preflight: the project is two folders up.
PROJECT_DIR = Path(__file__).resolve().parents[2]


def _is_mlflow_run_launcher() -> bool:
    return Path(sys.argv[0]).name == "mlflow" and sys.argv[1:2] == ["run"]


class Preflight(RequestHeaderProvider):
    checked = False

    def in_context(self) -> bool:
        if Preflight.checked or not _is_mlflow_run_launcher():
            return False
        Preflight.checked = True
        if str(PROJECT_DIR) not in sys.path:
            sys.path.insert(0, str(PROJECT_DIR))
        import os

        import mlflow

        from steps.cli import StepError, _fail
        from steps.redact import redact
        from steps.server import check_tracking_server

        uri = mlflow.get_tracking_uri()
        if redact(uri) != uri:
            # MLflow's launcher would print its run link with the URI's password in it.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        try:
            check_tracking_server(uri)
        except StepError as exc:
            # SystemExit, not an Exception: MLflow's registry logs and skips the latter.
            raise SystemExit(_fail(str(exc), 1)) from None
        return False

    def request_headers(self) -> dict:
        return {}
