"""What every entry script shares: CLI error handling, run bookkeeping, finding upstream runs.

Deliberately free of torch so that ``main`` and ``register`` start fast.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator

import click

log = logging.getLogger("steps")

# Tags the steps write and read to find each other's outputs.
TAG_STEP = "pipeline.step"
TAG_DATASET = "pipeline.dataset"
TAG_DATA_URI = "pipeline.data_uri"
TAG_DATA_DIGEST = "pipeline.data_digest"
TAG_MODEL_URI = "pipeline.model_uri"
TAG_NETWORK_URI = "pipeline.network_uri"
TAG_TRAIN_RUN = "pipeline.train_run_id"
TAG_CACHE_KEY = "pipeline.cache_key"
TAG_REUSED_RUN = "pipeline.reused_run_id"

DEBUG_ENV = "PIPELINE_DEBUG"


class StepError(Exception):
    """A failure the user can act on. Its message is printed as one line, without traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so that it unwinds exactly like Ctrl-C: runs are
    closed KILLED, and MLflow's project runner (inside ``main``) cancels the child step."""


def setup_logging() -> None:
    # Progress bars are for people at a terminal; in CI logs they are carriage-return noise.
    # TQDM_DISABLE also quiets torchvision's download bar.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
    level = logging.DEBUG if os.environ.get(DEBUG_ENV) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # MLflow and its dependencies are chatty at INFO; keep the console for our summary.
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def run_cli(command: click.Command, args: list[str] | None = None,
            fast_exit: bool = False) -> None:
    """Run a click command; every failure ends as one ``error:`` line and a non-zero exit.

    ``fast_exit`` (for the ``python -m steps.X`` entry) ends the process right after the
    atexit handlers: tearing down torch's interpreter state takes about 2 s on 2 cores, and
    every pipeline step would pay it.
    """
    setup_logging()
    signal.signal(signal.SIGTERM, _raise_interrupted)
    code = 0
    try:
        command.main(args=args, standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        code = 2
    except click.ClickException as exc:
        code = _fail(_click_message(exc), exc.exit_code or 2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        _close_active_run("KILLED")
        code = _fail("interrupted (Ctrl-C or SIGTERM); the run is marked KILLED", 130)
    except StepError as exc:
        _close_active_run("FAILED")
        code = _fail(str(exc), 1)
    except Exception as exc:  # anything else is still reported in one line
        _close_active_run("FAILED")
        if os.environ.get(DEBUG_ENV):
            raise
        first = str(exc).strip().splitlines()
        code = _fail(
            f"{type(exc).__name__}: {first[0] if first else ''} "
            f"(set {DEBUG_ENV}=1 for the traceback)",
            1,
        )
    if fast_exit:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def _click_message(exc: click.ClickException) -> str:
    if isinstance(exc, click.MissingParameter) and exc.param is not None:
        what = f" ({exc.param.help})" if getattr(exc.param, "help", None) else ""
        return f"{exc.param.name} is required{what}"
    if isinstance(exc, click.BadParameter) and exc.param is not None:
        name = exc.param.name
        return f"invalid value for {name}: {exc.message}"
    if isinstance(exc, click.NoSuchOption):
        return f"unknown option {exc.option_name}"
    return exc.format_message()


def _fail(message: str, code: int) -> int:
    click.echo(f"error: {message}", err=True)
    return code


def _close_active_run(status: str) -> None:
    with contextlib.suppress(Exception):
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run(status)


@contextlib.contextmanager
def step_run(step: str, run_name: str | None = None, nested: bool = False,
             **tags: str) -> Iterator:
    """Start (or, under ``mlflow run``, resume) this step's run and tag it with its name.

    The run ends FINISHED, FAILED on an error, or KILLED on Ctrl-C/SIGTERM; never RUNNING.
    ``nested`` starts a child of the active run (a tuning trial).
    """
    import mlflow

    run = mlflow.start_run(run_name=run_name, nested=nested)
    try:
        mlflow.set_tags({TAG_STEP: step, **tags})
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def latest_finished_run(client, experiment_id: str, step: str, extra_filter: str = ""):
    """The newest FINISHED run of ``step`` in the experiment, or None."""
    query = f"tags.`{TAG_STEP}` = '{step}' and attributes.status = 'FINISHED'"
    if extra_filter:
        query += f" and {extra_filter}"
    runs = client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def quote(value: str) -> str:
    """Quote a value for an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_link(run) -> str:
    """Where to look for ``run``: its UI address when the store is a server, else its id."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    path = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"run {run.info.run_id} (mlflow ui --backend-store-uri {uri}, then {path})"


MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def model_name_option(func):
    def check(_ctx, _param, value: str) -> str:
        if not MODEL_NAME_RE.match(value):
            raise click.BadParameter(
                f"{value!r} is not a valid model name: use letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (at most 128 characters)"
            )
        return value

    return click.option("--model-name", default="mnist-classifier", show_default=True,
                        callback=check, help="Registered model name.")(func)


def load_data_artifact(data_uri: str):
    """Download a download_data artifact and return the verified dataset.

    Raises StepError naming the ``data`` parameter when the URI is missing or holds
    something else.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from steps.core.data import DataError, load_saved_dataset

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=data_uri)
    except (MlflowException, OSError) as exc:
        raise StepError(
            f"data={data_uri!r} cannot be read ({str(exc).splitlines()[0]}); pass the data URI "
            "a download_data run logged (runs:/<run_id>/data) or leave data empty"
        ) from None
    try:
        return load_saved_dataset(local)
    except DataError as exc:
        raise StepError(f"data={data_uri!r}: {exc}") from None


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` with a cheaper check of the model's requirements.

    MLflow's own check, on by default, reads the file list of every installed distribution
    (about 1.2 s with torch's CUDA wheels); the model pins a handful of packages, and
    comparing those with what is installed tells the same.
    """
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    mismatches = requirement_mismatches(os.path.join(local, "requirements.txt"))
    if mismatches:
        log.warning("warning: %s was logged with other packages than installed here: %s",
                    model_uri, "; ".join(mismatches))
    return mlflow.pyfunc.load_model(local, suppress_warnings=True)


def requirement_mismatches(requirements_txt: str) -> list[str]:
    """Pinned requirements in the file that the installed packages do not satisfy."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    if not os.path.isfile(requirements_txt):
        return []
    found = []
    with open(requirements_txt) as lines:
        for line in (raw.strip() for raw in lines):
            if not line or line.startswith(("#", "-")):
                continue
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            try:
                installed = version(requirement.name)
            except PackageNotFoundError:
                installed = None
            if installed is None or not requirement.specifier.contains(installed,
                                                                       prereleases=True):
                found.append(f"{line} (installed: {installed or 'none'})")
    return found


def log_params_once(params: dict) -> None:
    """Log params the active run does not have yet.

    Under ``mlflow run`` the project backend has already logged the entry point's
    parameters (as it stores them); logging them again with another spelling is an error.
    """
    import mlflow

    run = mlflow.active_run()
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    missing = {k: v for k, v in params.items() if k not in existing}
    if missing:
        mlflow.log_params(missing)
