"""Run bookkeeping: opening and closing a step's run, finding earlier runs, logging the
parsed parameters, and the tracking URI every child step must share."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import click

from steps.core.text import first_line
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import StepError, disk_full, ignore_interrupts, no_space
from steps.tracking.runtime.redact import redact

log = logging.getLogger("steps")

# MLflow cuts a run tag's value at 8,000 characters (mlflow.utils.validation's
# MAX_TAG_VAL_LENGTH): a JSON list cut there is no JSON at all. The project's record tags
# keep the newest records that fit, each record's text shortened first.
TAG_VALUE_LIMIT = 8000
RECORD_TEXT_LIMIT = 300


@dataclass(frozen=True)
class Ending:
    """How a run ended, by the account of whoever ended it: its own process, or the one
    that found that process gone. Kept in the run's tags (``pipeline.ended_as``,
    ``pipeline.ended_cause``, ``pipeline.ended_because``), so that it survives a launcher
    that writes its own status over the run's (see :func:`ended`)."""

    status: str  # FINISHED, FAILED or KILLED
    cause: str = ""  # INTERRUPTED, ERROR, ...; "" for FINISHED
    because: str = ""  # what happened, one line

    def tags(self) -> dict[str, str]:
        """The tags that tell it; none where the status alone does (FINISHED, or FAILED
        without a line of ours: each write to a store that is failing costs a retry budget)."""
        if not self.cause or (self.cause == ERROR and not self.because):
            return {}
        found = {tags.ENDED_AS: self.status}
        if self.cause:
            found[tags.ENDED_CAUSE] = self.cause
        if self.because:
            found[tags.ENDED_BECAUSE] = redact(self.because)[:500]
        return found


INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM: the run can be continued
ERROR = "error"  # the step failed; the line says why
PROCESS_GONE = "process gone"  # killed outright or crashed, found by a later run
WORKER_LOST = "worker lost"  # a tune worker stopped beating; a surviving worker closed it
AGENT_LOST = "agent lost"  # torch's elastic agent died; the tracking rank closed it


def ended(run) -> Ending:
    """How ``run`` ended by its own account. MLflow's launcher marks its run FAILED after
    any non-zero exit, even one the step had already ended KILLED
    (``mlflow.projects._wait_for`` hands the status *string* to ``RunStatus.is_terminated``,
    which expects an int, so it always overwrites): the run's ``pipeline.ended_as`` says
    what the step said. A run that is still RUNNING, or ended without saying, is taken as
    its status says."""
    said = run.data.tags.get(tags.ENDED_AS)
    if run.info.status == "RUNNING" or said not in ("FINISHED", "FAILED", "KILLED"):
        return Ending(run.info.status, run.data.tags.get(tags.ENDED_CAUSE, ""),
                      run.data.tags.get(tags.ENDED_BECAUSE, ""))
    return Ending(said, run.data.tags.get(tags.ENDED_CAUSE, ""),
                  run.data.tags.get(tags.ENDED_BECAUSE, ""))


@contextlib.contextmanager
def step_run(step: str, run_name: str | None = None, nested: bool = False,
             run_id: str | None = None, log_system_metrics: bool = False,
             **extra_tags: str) -> Iterator:
    """Start (or, under ``mlflow run``, take up) this step's run and tag it with its name.

    The run ends FINISHED, FAILED on an error, or KILLED on Ctrl-C/SIGTERM; never RUNNING,
    and its :class:`Ending` says which and why. ``nested`` starts a child of the active run
    (a tuning trial); ``run_id`` continues that run. A run that had ended KILLED or FAILED
    and is continued (by ``run_id``, or by a launcher handed its id) records how it had
    ended in ``pipeline.resumes``. ``log_system_metrics`` starts MLflow's system-metrics
    monitor on the run.
    """
    import mlflow

    # Set by a launcher (`mlflow run`) that made the run; start_run removes it from os.environ.
    launched_by = None if nested else os.environ.get("MLFLOW_RUN_ID")
    ended_before = None
    if not nested:  # steps started at once on a new sqlite store: one creates its tables
        from steps.tracking.runtime.store import prepare_store

        prepare_store(mlflow.get_tracking_uri())
        if run_id or launched_by:
            earlier = mlflow.MlflowClient().get_run(run_id or launched_by)
            if earlier.info.status in ("KILLED", "FAILED"):
                ended_before = earlier
    run = mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested,
                           log_system_metrics=log_system_metrics or None)
    try:
        mlflow.set_tags({tags.STEP: step, **process_tags(), **extra_tags})
        if ended_before is not None:
            _record_continuation(ended_before)
        if not nested:
            close_orphans(mlflow.MlflowClient(), run.info.experiment_id)
        yield run
    except ClosedElsewhere:
        # Another process closed this run, taking this one for lost: it stays as that
        # process left it (its status written again, with MLflow's end_run).
        with contextlib.suppress(Exception):
            mlflow.end_run(mlflow.MlflowClient().get_run(run.info.run_id).info.status)
        raise
    except KeyboardInterrupt as exc:
        ignore_interrupts()
        end_active_run(Ending("KILLED", INTERRUPTED,
                              f"interrupted ({first_line(exc) or 'Ctrl-C'})"))
        raise
    except BaseException as exc:
        full = disk_full(exc, run.info.artifact_uri) if isinstance(exc, Exception) else None
        # A store that cannot take this (a full disk, a lost server) must not hide the error
        # that ended the step: the run is then closed KILLED by the next start. Only a
        # StepError's line is the user's to read; any other is said by run_cli.
        end_active_run(Ending("FAILED", ERROR,
                              first_line(exc) if isinstance(exc, StepError) else ""))
        if full is not None and not isinstance(exc, StepError):
            raise StepError(no_space(full)) from exc
        raise
    end_active_run(Ending("FINISHED"))


class ClosedElsewhere(Exception):
    """This process's run was closed by another process that took this one for lost (a
    tune worker paused past Optuna's heartbeat grace, whose trial a surviving worker gave
    up): :func:`step_run` leaves it as that process left it."""


def take_back(run_id: str) -> bool:
    """Open again a run of this process that another process closed, taking this one for
    lost (see :class:`ClosedElsewhere`); how it had been closed goes to its
    ``pipeline.resumes``. False if it was still RUNNING."""
    import mlflow

    client = mlflow.MlflowClient()
    earlier = client.get_run(run_id)
    if earlier.info.status == "RUNNING":
        return False
    client.update_run(run_id, status="RUNNING")
    _record_continuation(earlier)
    return True


def end_active_run(ending: Ending) -> None:
    """Close the active run as ``ending`` says, its tags first (best effort: the store may be
    what failed)."""
    import mlflow

    if ending.tags():
        with contextlib.suppress(Exception):
            mlflow.set_tags(ending.tags())
    with contextlib.suppress(Exception):
        mlflow.end_run(ending.status)


def end_run(client, run_id: str, ending: Ending) -> None:
    """Close another process's run (one whose process is gone) as ``ending`` says."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in ending.tags().items()])
    client.set_terminated(run_id, ending.status)


ENDING_TAGS = (tags.ENDED_AS, tags.ENDED_CAUSE, tags.ENDED_BECAUSE)


def _record_continuation(earlier) -> None:
    """Add how ``earlier`` (this run, as it was before it was continued) had ended to its
    ``pipeline.resumes``, and clear its ending: it is running again."""
    import mlflow

    ending = ended(earlier)
    add_record(earlier.info.run_id, tags.RESUMES, {
        "after": ending.status, "because": ending.because,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    client = mlflow.MlflowClient()
    for tag in ENDING_TAGS:
        if tag in earlier.data.tags:
            client.delete_tag(earlier.info.run_id, tag)


def records(run_tags: dict, tag: str) -> list[dict]:
    """A run's JSON list tag (``pipeline.resumes``, ``pipeline.restarts``), oldest first."""
    try:
        found = json.loads(run_tags.get(tag, "[]"))
    except ValueError:
        log.warning("warning: the run's %s tag is not JSON; its records are lost", tag)
        return []
    return found if isinstance(found, list) else []


def add_record(run_id: str, tag: str, record: dict, amend: bool = False) -> None:
    """Append ``record`` to the run's JSON list tag ``tag`` (``amend``: merge it into the
    newest record instead), keeping the newest records that fit MLflow's tag limit."""
    import mlflow

    client = mlflow.MlflowClient()
    found = records(client.get_run(run_id).data.tags, tag)
    if amend and found:
        found[-1].update(record)
    else:
        found.append(record)
    client.set_tag(run_id, tag, records_that_fit(found))


def records_that_fit(found: list[dict], limit: int = TAG_VALUE_LIMIT) -> str:
    """The JSON of the newest of ``found`` that fit in ``limit`` characters, each text in
    them shortened to :data:`RECORD_TEXT_LIMIT` first."""
    def shortened(value):
        if isinstance(value, str) and len(value) > RECORD_TEXT_LIMIT:
            return value[:RECORD_TEXT_LIMIT - 3] + "..."
        return value

    kept: list[dict] = []
    for record in reversed(found):
        candidate = [{k: shortened(v) for k, v in record.items()}, *kept]
        if len(json.dumps(candidate)) > limit:
            break
        kept = candidate
    return json.dumps(kept)


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


def process_tags() -> dict[str, str]:
    """Which process runs this run: its host, pid and start time (with the pid it names
    one process, even after the pid is reused)."""
    import psutil

    me = psutil.Process()
    return {tags.HOST: socket.gethostname(), tags.PID: str(me.pid),
            tags.PID_STARTED: f"{me.create_time():.2f}"}


def process_gone(pid: int, started: str = "") -> bool:
    """Whether process ``pid``, started at ``started`` (``create_time``, as
    :func:`process_tags` wrote it; '' if unknown), has ended: no such process, a zombie, or
    another process now holding the pid."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        # Runs tagged before psutil was used carry clock ticks, no decimal point: unknown.
        return "." in started and f"{process.create_time():.2f}" != started
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False  # alive, someone else's


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
        if not pid.isdigit() or not process_gone(int(pid),
                                                 run.data.tags.get(tags.PID_STARTED, "")):
            continue
        end_run(client, run.info.run_id, Ending(
            "KILLED", PROCESS_GONE, f"its process {pid} on {host} was gone (killed or "
            "crashed); marked KILLED by a later run"))
        closed.append(run.info.run_id)
    if closed:
        log.warning("marked KILLED %d run(s) whose process is gone: %s", len(closed),
                    ", ".join(closed))
    return closed


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


def where_else(client, step: str, experiment_id: str) -> str:
    """Where this experiment's missing upstream runs are: ``; <step> runs are in experiment
    'x': add --experiment-name x`` when other experiments hold finished ones, else ''. A step
    run alone under ``mlflow run`` works in the experiment it is given (``Default`` unless
    told), while ``make run`` works in its own."""
    from steps.tracking.runtime.project import MAKE_EXPERIMENT

    names = [e.name for e in client.search_experiments(max_results=100)
             if e.experiment_id != experiment_id
             and newest_runs(client, e.experiment_id, step, max_results=1)]
    if not names:
        return ""
    names.sort(key=lambda n: n != MAKE_EXPERIMENT)
    shown = ", ".join(f"'{n}'" + (" (make run's)" if n == MAKE_EXPERIMENT else "")
                      for n in names[:3])
    return f"; {step} runs are in experiment {shown}: add --experiment-name {names[0]}"


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


def launcher_run_name() -> str | None:
    """The ``--run-name`` given to the ``mlflow run`` that launched this process, if any.

    MLflow's launcher names its run after the step's process has started, so the step
    cannot tell from the run whether the name it finds was given or made up by the store;
    the launcher's own command line (an ancestor: conda and uv start the step through a
    shell) says it."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for process in psutil.Process().parents():
            words = process.cmdline()
            # `mlflow run ...`, or `python .../bin/mlflow run ...` as the script's shebang runs it
            at = next((i for i, w in enumerate(words[:2]) if os.path.basename(w) == "mlflow"),
                      None)
            if at is None or words[at + 1:at + 2] != ["run"]:
                continue
            for i, word in enumerate(words):
                if word == "--run-name" and i + 1 < len(words):
                    return words[i + 1]
                if word.startswith("--run-name="):
                    return word.split("=", 1)[1]
            return None
    return None


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
