"""Run bookkeeping: opening and closing a step's run, finding earlier runs, logging the
parsed parameters, and the tracking URI every child step must share."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from steps.tracking import tags
from steps.tracking.cli import StepError, disk_full, first_line, ignore_interrupts, no_space
from steps.tracking.redact import redact

log = logging.getLogger("steps")


# main hands each step it launches the step cache's key and inputs through these, so that
# the step's run carries them from its start: a run killed midway is still found by them.
CACHE_ENV = {tags.CACHE_KEY: "PIPELINE_CACHE_KEY", tags.CACHE_INPUTS: "PIPELINE_CACHE_INPUTS"}
MAX_RECORDS_KEPT = 20


@contextlib.contextmanager
def step_run(step: str, run_name: str | None = None, nested: bool = False,
             run_id: str | None = None, log_system_metrics: bool = False,
             **extra_tags: str) -> Iterator:
    """Start (or, under ``mlflow run``, resume) this step's run and tag it with its name.

    The run ends FINISHED, FAILED on an error, or KILLED on Ctrl-C/SIGTERM; never RUNNING.
    ``nested`` starts a child of the active run (a tuning trial); ``run_id`` continues that
    run. A run that had ended KILLED or FAILED and is continued (by ``run_id``, or by a
    launcher handed its id) records why it had ended in ``pipeline.resumes``.
    ``log_system_metrics`` starts MLflow's system-metrics monitor on the run.
    """
    import mlflow

    # Set by a launcher (`mlflow run`) that made the run; start_run removes it from os.environ.
    launched_by = None if nested else os.environ.get("MLFLOW_RUN_ID")
    cache_tags = {} if nested else {tag: os.environ.pop(env) for tag, env in CACHE_ENV.items()
                                    if env in os.environ}
    ended_before = None
    if not nested:  # steps started at once on a new sqlite store: one creates its tables
        from steps.tracking.store import prepare_store

        prepare_store(mlflow.get_tracking_uri())
        if run_id or launched_by:
            earlier = mlflow.MlflowClient().get_run(run_id or launched_by)
            if earlier.info.status in ("KILLED", "FAILED"):
                ended_before = earlier
    run = mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested,
                           log_system_metrics=log_system_metrics or None)
    try:
        mlflow.set_tags({tags.STEP: step, **process_tags(), **cache_tags, **extra_tags})
        if ended_before is not None:
            _record_continuation(ended_before)
        if not nested:
            close_orphans(mlflow.MlflowClient(), run.info.experiment_id)
        yield run
    except KeyboardInterrupt as exc:
        ignore_interrupts()
        _note_ending(f"interrupted ({first_line(exc) or 'Ctrl-C'})")
        mlflow.end_run("KILLED")
        if launched_by == run.info.run_id:
            keep_killed_after_launcher(run.info.run_id)
        raise
    except BaseException as exc:
        if isinstance(exc, StepError):  # not an unreachable store: that costs a retry budget
            _note_ending(first_line(exc))
        full = disk_full(exc, run.info.artifact_uri) if isinstance(exc, Exception) else None
        # A store that cannot take this (a full disk, a lost server) must not hide the error
        # that ended the step: the run is then closed KILLED by the next start.
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        if full is not None and not isinstance(exc, StepError):
            raise StepError(no_space(full)) from exc
        raise
    mlflow.end_run("FINISHED")


def _note_ending(reason: str) -> None:
    """The one line a failed or killed run ended with, on the run itself (best effort: the
    store may be what failed)."""
    import mlflow

    with contextlib.suppress(Exception):
        mlflow.set_tag(tags.ENDED_BECAUSE, redact(reason)[:500])


def _record_continuation(earlier) -> None:
    """Add how ``earlier`` (this run, as it was before it was continued) had ended to its
    ``pipeline.resumes``, and clear its ending: it is running again."""
    import mlflow

    because = earlier.data.tags.get(tags.ENDED_BECAUSE, "")
    add_record(earlier.info.run_id, tags.RESUMES, {
        "after": earlier.info.status, "because": because,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if because:
        mlflow.MlflowClient().delete_tag(earlier.info.run_id, tags.ENDED_BECAUSE)


def records(run_tags: dict, tag: str) -> list[dict]:
    """A run's JSON list tag (``pipeline.resumes``, ``pipeline.restarts``), oldest first."""
    try:
        found = json.loads(run_tags.get(tag, "[]"))
    except ValueError:
        return []
    return found if isinstance(found, list) else []


def add_record(run_id: str, tag: str, record: dict, amend: bool = False) -> None:
    """Append ``record`` to the run's JSON list tag ``tag`` (``amend``: merge it into the
    newest record instead), keeping the newest :data:`MAX_RECORDS_KEPT`."""
    import mlflow

    client = mlflow.MlflowClient()
    found = records(client.get_run(run_id).data.tags, tag)
    if amend and found:
        found[-1].update(record)
    else:
        found.append(record)
    client.set_tag(run_id, tag, json.dumps(found[-MAX_RECORDS_KEPT:]))


PROJECT_DIR = Path(__file__).resolve().parents[2]
LAUNCHER_GRACE_S = 30


def keep_killed_after_launcher(run_id: str) -> None:
    """Keep a run its launcher started KILLED once the launcher has had its say.

    MLflow 3.17's launcher (``mlflow run``, and ``mlflow.run`` inside ``main``) marks its run
    FAILED after any non-zero exit, even one the step already ended KILLED:
    ``mlflow.projects._maybe_set_run_terminated`` tests the status *string* with
    ``RunStatus.is_terminated``, which expects an int, so it always overwrites. No project
    code runs in a bare launcher, so a small detached process waits for that write and
    puts KILLED back (public client calls only). It is told the run's continuations
    (``pipeline.resumes``) as this step ended it: that process may start late on a busy
    machine, after a launcher killed by the same signal wrote nothing and the next step
    already continued the run and ended it FAILED, a FAILED that is not the launcher's.
    """
    import mlflow

    try:
        resumes = mlflow.MlflowClient().get_run(run_id).data.tags.get(tags.RESUMES, "")
    except Exception:  # the store the run was just closed in: it is not worth a traceback
        return
    # It inherits this ending process's ignored signals: it gets Python's defaults back.
    code = (f"import signal; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
            f"signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"from steps.tracking.runs import restore_status; "
            f"restore_status({run_id!r}, 'KILLED', {os.getppid()}, {resumes!r})")
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_DIR, env=os.environ.copy(),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)


def restore_status(run_id: str, status: str, launcher_pid: int, resumes: str) -> None:
    """Put ``status`` back on ``run_id`` when the launcher overwrites it with FAILED, until
    the launcher process is gone (and a second longer) or :data:`LAUNCHER_GRACE_S` passed.
    Any other change is left alone: RUNNING again, or a ``pipeline.resumes`` other than
    ``resumes``, the tag as the step ended the run (it was continued since, and how that
    continuation ended is its own). A store that is busy (sqlite's lock, held by the
    launcher's write) is asked again."""
    import mlflow

    client = mlflow.MlflowClient()
    deadline, gone_at, end_time = time.monotonic() + LAUNCHER_GRACE_S, None, None
    while time.monotonic() < deadline:
        try:
            run = client.get_run(run_id)
            if run.data.tags.get(tags.RESUMES, "") != resumes:
                return
            end_time = end_time or run.info.end_time  # the step's own, not the launcher's
            if run.info.status == "FAILED" != status:
                client.set_terminated(run_id, status, end_time=end_time)
                return
        except Exception:  # a detached process: nobody would see its error
            time.sleep(0.2)
            continue
        if run.info.status != status:  # continued, or changed by someone else
            return
        if gone_at is None and _process_gone(launcher_pid, ""):
            gone_at = time.monotonic()
        if gone_at is not None and time.monotonic() - gone_at > 1:
            return
        time.sleep(0.2)


EXPERIMENT_DESCRIPTION = """\
MNIST-style digit classifiers trained with PyTorch by the mnist-pipeline MLflow Project.

- Each `main` run is one pipeline, named for what it ran (dataset, arch, epochs, learning
  rate); expand it for its four steps: `download_data`, `train` (per-epoch curves, the
  logged models), `evaluate` (test metrics, confusion matrices, misclassified images) and
  `register`. A `<step> (reused)` child points at the earlier run the step cache reused.
- Each `tune` run is a hyperparameter sweep; its trials are nested under it.
- The best model is `models:/mnist-classifier@champion` (Models tab).
"""


def describe_experiment(experiment_id: str) -> None:
    """Mark the experiment as model training (so the UI opens on its training runs, not the
    GenAI overview) and describe it; tags a user already set are left as they are."""
    import mlflow

    client = mlflow.MlflowClient()
    existing = client.get_experiment(experiment_id).tags
    for key, value in ((tags.EXPERIMENT_KIND, tags.TRAINING_EXPERIMENT),
                       (tags.EXPERIMENT_NOTE, EXPERIMENT_DESCRIPTION)):
        if key in existing:
            continue
        try:
            client.set_experiment_tag(experiment_id, key, value)
        except mlflow.exceptions.MlflowException:
            # Two pipelines starting at once both insert the tag and the store's unique key
            # refuses the second; the tag being there is all that was wanted.
            if key not in client.get_experiment(experiment_id).tags:
                raise


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot), '' if unknown; with the pid it
    names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    return {tags.HOST: socket.gethostname(), tags.PID: str(os.getpid()),
            tags.PID_STARTED: _process_start(os.getpid())}


def _process_gone(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return bool(started) and _process_start(pid) not in ("", started)


def close_orphans(client, experiment_id: str) -> list[str]:
    """Mark KILLED this experiment's RUNNING runs whose process, on this host, is gone;
    return their ids. Runs of live processes and of other hosts are never touched."""
    host = socket.gethostname()
    closed = []
    for run in client.search_runs(
            [experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                           f"tags.`{tags.HOST}` = {quote(host)}",
            max_results=1000):
        pid = run.data.tags.get(tags.PID, "")
        if not pid.isdigit() or not _process_gone(int(pid), run.data.tags.get(tags.PID_STARTED,
                                                                               "")):
            continue
        mark_killed(client, run.info.run_id, f"its process {pid} on {host} was gone (killed "
                    "or crashed); marked KILLED by a later run")
        closed.append(run.info.run_id)
    if closed:
        log.warning("marked KILLED %d run(s) whose process is gone: %s", len(closed),
                    ", ".join(closed))
    return closed


def mark_killed(client, run_id: str, because: str) -> None:
    """End a run whose process is gone KILLED, saying why in ``pipeline.ended_because``."""
    client.set_tag(run_id, tags.ENDED_BECAUSE, redact(because)[:500])
    client.set_terminated(run_id, "KILLED")


def log_dataset(x, y, name: str, context: str) -> None:
    """Record a numpy split as an input of the active run (the UI's Dataset column).

    Two runs logging the same new dataset at once collide on the store's unique key
    (experiment, name, digest): the other insert landed, so one retry finds the row.
    """
    import mlflow
    import mlflow.data
    from mlflow.exceptions import MlflowException

    from steps.core.data import dataset_digest

    dataset = mlflow.data.from_numpy(x, targets=y, name=name, digest=dataset_digest(x, y))
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as exc:
        if "UNIQUE" not in str(exc).upper() and "DUPLICATE" not in str(exc).upper():
            raise
        time.sleep(0.2)
        mlflow.log_input(dataset, context=context)


def log_cli_params(**overrides) -> dict:
    """Log the current click command's parsed parameters (``overrides`` replace resolved
    values) to the active run; return what was logged.

    Under ``mlflow run`` the project backend has already logged the entry point's
    parameters as it stores them; those are kept, and only the missing ones are added.
    """
    import mlflow

    params = {**click.get_current_context().params, **overrides}
    run = mlflow.active_run()
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    # An option left unset (None) is logged as MLflow's launcher logs it: empty.
    missing = {k: "" if v is None else v for k, v in params.items() if k not in existing}
    if missing:
        mlflow.log_params(missing)
    return params


def param_differences(run, ignore: tuple[str, ...] = ()) -> list[str]:
    """``name=stored there, given here`` for each parameter of the current click command
    that ``run`` logged with another value (read through the option's own type, so ``1e-3``
    and ``0.001`` agree); names in ``ignore`` and parameters the run lacks are skipped."""
    import shlex

    ctx = click.get_current_context()
    differ = []
    for param in ctx.command.params:
        stored = run.data.params.get(param.name)
        if param.name in ignore or stored is None:
            continue
        with contextlib.suppress(ValueError):  # `mlflow run` logs values shell-quoted ('')
            words = shlex.split(stored)
            stored = words[0] if len(words) == 1 else "" if not words else stored
        try:
            value = param.type_cast_value(ctx, stored)
        except click.BadParameter:
            value = stored
        if value != ctx.params[param.name]:
            differ.append(f"{param.name}={stored!r} there, {ctx.params[param.name]!r} here")
    return differ


def latest_finished_run(client, experiment_id: str, step: str, extra_filter: str = ""):
    """The newest FINISHED run of ``step`` in the experiment, or None."""
    runs = newest_runs(client, experiment_id, step, extra_filter, max_results=1)
    return runs[0] if runs else None


def newest_runs(client, experiment_id: str, step: str, extra_filter: str = "",
                max_results: int = 1) -> list:
    """The newest FINISHED runs of ``step``, newest first."""
    query = f"tags.`{tags.STEP}` = '{step}' and attributes.status = 'FINISHED'"
    if extra_filter:
        query += f" and {extra_filter}"
    return client.search_runs([experiment_id], filter_string=query,
                              order_by=["attributes.start_time DESC"], max_results=max_results)


def quote(value: str) -> str:
    """Quote a value for an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_link(run) -> str:
    """Where to look for ``run``: its UI address when the store is a server, else its id."""
    import mlflow

    uri = redact(mlflow.get_tracking_uri())
    path = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"run {run.info.run_id} (mlflow ui --backend-store-uri {uri}, then {path})"


def absolutize_tracking_uri() -> None:
    """Make a relative sqlite store absolute so every child writes to the same place.

    ``mlflow run`` resolves a relative URI in the caller's folder but starts this process in
    the project folder. From the project folder the two agree; from elsewhere this run's own
    record is in another file, which is said here instead of creating an empty store.
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = os.path.abspath(uri[len("sqlite:///"):])
        if os.environ.get("MLFLOW_RUN_ID") and not os.path.exists(path):
            raise StepError(
                f"MLFLOW_TRACKING_URI={uri} is relative and `mlflow run` was started outside "
                f"the project folder ({os.getcwd()}); use an absolute URI such as "
                "sqlite:////full/path/mlflow.db, or run from the project folder"
            )
        uri = "sqlite:///" + path
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
