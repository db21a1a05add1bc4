"""Process control for every entry script: logging set-up, signals, and the rule that every
failure ends as one ``error:`` line and a non-zero exit.

Free of torch and of MLflow at import time, so that ``main`` and ``register`` start fast.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading

import click

from steps.core.text import described
from steps.tracking.runtime.redact import RedactingFilter, redact

log = logging.getLogger("steps")

DEBUG_ENV = "PIPELINE_DEBUG"
# Five retries, 4, 8, 16 and 32 s apart: a tracking server that restarts within 30 s is
# ridden out; one that is gone fails each request in about a minute, not MLflow's many.
RETRY_BUDGET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class StepError(Exception):
    """A failure the user can act on. Its message is printed as one line, without traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so that it unwinds exactly like Ctrl-C: runs are
    closed KILLED, and MLflow's project runner (inside ``main``) cancels the child step."""


def setup_logging() -> None:
    # Progress bars are for people at a terminal; in CI logs they are carriage-return noise.
    # TQDM_DISABLE also quiets torchvision's download bar.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: <tracking URI>" itself, password included when the
    # URI carries one; every step prints its own, redacted link instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # A bounded retry budget (RETRY_BUDGET): MLflow's defaults (7 retries, backoff factor 2,
    # 120 s timeouts) keep a step waiting many minutes on a lost server. Children inherit
    # them. A user's own settings win.
    for name, value in RETRY_BUDGET.items():
        os.environ.setdefault(name, value)
    # MLflow 3.17's telemetry client sets and unsets an environment variable from a
    # background thread while the HTTP client reads the environment for proxies: under load
    # a request fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'. Off in our processes
    # (set it to false to send MLflow its usage data).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # train's system metrics: MLflow samples every 10 s and drops the sample in progress at
    # the end, so a smoke run of a few seconds would record none.
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
    level = logging.DEBUG if os.environ.get(DEBUG_ENV) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # MLflow and its dependencies are chatty at INFO; keep the console for our summary.
    for noisy in ("mlflow", "mlflow.system_metrics", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # No credential in any log line: ours (root handler) or MLflow's own handler.
    for handler in (*logging.getLogger().handlers, *logging.getLogger("mlflow").handlers):
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


_interrupted = False  # a flag, not a threading.Event: a signal handler must take no lock


def _interrupt_once(signum, _frame):
    """The first SIGINT or SIGTERM unwinds the process like Ctrl-C; any later one is dropped.

    One Ctrl-C brings ``main`` two: the terminal's SIGINT, then SIGTERM from its launcher.
    On a busy machine the second landed anywhere in the unwinding the first began, even on
    the first line of the handler that closes the run KILLED, and the launcher's FAILED
    stayed. Dropped here, in the signal handler itself, it has no line left to land on.
    """
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt("SIGINT")  # the run's ended_because says which
    raise _raised_on.get(signum, Interrupted)(signal.Signals(signum).name)


_raised_on: dict[int, type[Interrupted]] = {}  # signals besides SIGINT/SIGTERM that unwind


def handle_interrupts() -> None:
    """Install :func:`_interrupt_once` for SIGINT and SIGTERM (main thread only)."""
    global _interrupted
    if threading.current_thread() is threading.main_thread():
        _interrupted = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _interrupt_once)


def interrupt_on(signum: int, raised: type[Interrupted]) -> None:
    """Have ``signum`` unwind the process too, as ``raised`` (an Interrupted of its own
    kind, so that the handlers can tell why), under the same first-signal-only rule."""
    _raised_on[signum] = raised
    signal.signal(signum, _interrupt_once)


def ignore_interrupts() -> None:
    """The process is closing its run or ending: no further SIGINT/SIGTERM may cut that
    short, also where a library replaced :func:`_interrupt_once` with a handler of its own
    (torch's elastic agent does, while it runs the ranks)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT, *_raised_on):
            signal.signal(signum, signal.SIG_IGN)


def run_cli(command: click.Command, args: list[str] | None = None,
            fast_exit: bool = False, spark: bool = True) -> None:
    """Run a click command; every failure ends as one ``error:`` line and a non-zero exit.

    For the ``python -m steps.X`` entry of a fresh process:

    - ``fast_exit`` skips tearing down the interpreter, which takes about 2 s with torch
      loaded on 2 cores and every pipeline step would pay (:func:`exit_after_handlers`).
    - ``spark=False``, for a step that runs no Spark job, runs it as if pyspark were not
      installed. ``import mlflow`` imports pyspark whenever it is (``mlflow.types.schema``
      asks whether Spark types exist): 0.6 s of CPU at the start of every step, a fifth of
      MLflow's import. MLflow runs without pyspark as a supported install.
    """
    if not spark:
        sys.modules.setdefault("pyspark", None)  # import pyspark: ModuleNotFoundError
    if fast_exit:
        exit_after_handlers()
    setup_logging()
    handle_interrupts()
    code = 0
    try:
        command.main(args=args, standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        code = 2
    except click.ClickException as exc:
        code = fail(_click_message(exc), exc.exit_code or 2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        ignore_interrupts()
        _close_active_run("KILLED")
        code = fail("interrupted (Ctrl-C or SIGTERM); the run is marked KILLED", 130)
    except StepError as exc:
        _close_active_run("FAILED")
        code = fail(str(exc), 1)
    except Exception as exc:  # anything else is still reported in one line
        full = disk_full(exc)
        _close_active_run("FAILED")
        if os.environ.get(DEBUG_ENV):  # the traceback, asked for, still without secrets
            import traceback

            click.echo(redact(traceback.format_exc()), err=True, nl=False)
        if full is not None:
            code = fail(no_space(full), 1)
        else:
            code = fail(f"{described(exc)} (set {DEBUG_ENV}=1 for the traceback)", 1)
    # Exiting already, with the run closed: a late signal (a launcher stopping the rest of
    # a job) must not turn the exit handlers into a traceback.
    ignore_interrupts()
    global _exit_code
    _exit_code = code
    if code:
        sys.exit(code)


def exit_after_handlers() -> None:
    """End the process, at its normal exit, right after the exit handlers registered from
    now on (MLflow's: its temporary folders, its async logging) have run, without the
    interpreter's teardown.

    ``atexit`` runs handlers last-in, first-out, so the one registered here, first, runs
    last; what it skips is the freeing of every module's objects, and the handlers of
    modules imported before this call (logging's, which it does itself).
    """
    def exit_now() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code)

    atexit.register(exit_now)


_exit_code = 0  # what run_cli ended with, for exit_now


def disk_full(error: BaseException, artifacts: str = "") -> str | None:
    """Where the disk ran full, when ``error`` (or an error it was raised from: MLflow wraps
    SQLAlchemy, which wraps sqlite3) is a full disk; None for any other error. The place is
    the file the OS named, else the sqlite store when the database said so, else the run's
    ``artifacts`` folder, else the store."""
    import errno

    seen, full, database = set(), False, False
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC and error.filename:
            return str(error.filename)
        text = str(error)
        database = database or "database or disk is full" in text
        full = full or database or "No space left on device" in text or (
            isinstance(error, OSError) and error.errno == errno.ENOSPC)
        error = error.__cause__ or error.__context__ or getattr(error, "orig", None)
    if not full:
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    store = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else redact(uri)
    if database:
        return store
    return artifacts.removeprefix("file://") or store or "the tracking store's disk"


def no_space(where: str) -> str:
    return (f"no space left on device: {where}; free some space there and run again (a run "
            "that could not be closed is marked KILLED by the next start)")


def _click_message(exc: click.ClickException) -> str:
    if isinstance(exc, click.MissingParameter) and exc.param is not None:
        what = f" ({exc.param.help})" if getattr(exc.param, "help", None) else ""
        return f"{exc.param.name} is required{what}"
    if isinstance(exc, click.BadParameter) and exc.param is not None:
        return f"invalid value for {exc.param.name}: {exc.message}"
    if isinstance(exc, click.NoSuchOption):
        return f"unknown option {exc.option_name}"
    return exc.format_message()


def fail(message: str, code: int) -> int:
    """Print ``error: <message>`` (without secrets) and return ``code``: the one way a
    process of this project says it failed."""
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        # A rank of a data-parallel job: its launcher prints the line of the rank that
        # failed first (steps.tracking.training.elastic), not one per rank.
        return code
    click.echo(f"error: {redact(message)}", err=True)
    return code


def _close_active_run(status: str) -> None:
    with contextlib.suppress(Exception):
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run(status)
