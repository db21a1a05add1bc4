"""Data-parallel and multi-node training through PyTorch's own elastic agent.

``train --workers N`` runs N ranks on this machine with torch.distributed's elastic agent,
through its public launcher (``elastic_launch``, the engine behind ``torchrun``); ``--nodes M
--node-rank R --rdzv-endpoint host:port`` spreads the job over M machines through its c10d
rendezvous, whose store node 0 hosts at ``rdzv_endpoint``. ``--max-restarts K`` lets the agent
restart every rank up to K times when one fails (a killed process, an exception, a lost node);
the ranks continue from the run's latest checkpoint, in the same run. A node whose processes
die and are started again (a replaced pod) joins the next rendezvous round. No process pool or
queue of our own.

Who touches MLflow:
- the train step's own process on node 0 (the one ``mlflow run`` starts, where the agent
  runs) owns the run's life: it starts it, logs the params and ends it FINISHED, FAILED with
  the failing rank's one-line error, or KILLED;
- the tracking rank (local rank 0 on node 0) logs the training into that run (inputs,
  per-epoch metrics, checkpoints, figure, models, and each restart with its cause in
  ``pipeline.restarts``), and sends the data, the settings and the checkpoint to the other
  ranks over the process group; it ends the run only when the agent's process is gone;
- every other rank, and every process on the other nodes, never starts, ends or marks a
  run: they need no tracking server at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from steps.core.text import described, first_line
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import Interrupted, StepError, interrupt_on

log = logging.getLogger("steps.train")

# Set by our agent's process on the ranks it starts: the run they train into ("" off node
# 0), and the agent's pid (a rank whose parent is no longer that process lost its agent).
LAUNCHED_FOR_RUN = "PIPELINE_RANK_OF_RUN"
AGENT_PID = "PIPELINE_AGENT_PID"
# How long a node waits for the others to join, and a collective for a silent peer.
RENDEZVOUS_TIMEOUT_S = 300
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what the agent stops the other ranks with
# What the kernel sends a rank when its agent dies: a signal the agent never sends, because
# at that moment the rank cannot yet tell from its parent (see follow_the_agent).
AGENT_DEATH_SIGNAL = signal.SIGHUP
ENDPOINT_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class ScaleOut:
    """How many processes train one model, and where this one sits."""

    workers: int = 1  # ranks on this machine
    nodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # node 0's host:port; empty on a single machine
    max_restarts: int = 0  # how often the agent may restart every rank after a failure

    @property
    def world(self) -> int:
        return self.workers * self.nodes

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def supervised(self) -> bool:
        """Whether training runs as ranks under torch's agent: several of them, or one that
        the agent may restart."""
        return self.distributed or self.max_restarts > 0

    def check(self, batch_size: int) -> None:
        """Refuse, in one line naming the parameters, a job that cannot run."""
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nodes={self.nodes} needs rdzv_endpoint=host:port (node 0's "
                             "address and a free port, reachable from every node)")
        if self.nodes == 1 and self.rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint={self.rdzv_endpoint} is only used with nodes > 1")
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"node_rank={self.node_rank} must be between 0 and "
                             f"nodes-1={self.nodes - 1}")
        if self.rdzv_endpoint:
            match = ENDPOINT_RE.match(self.rdzv_endpoint)
            if not match or not 0 < int(match["port"]) < 65536:
                raise ValueError(f"rdzv_endpoint={self.rdzv_endpoint!r} is not host:port")
        if batch_size % self.world:
            over = (f"workers={self.workers}" if self.nodes == 1 else
                    f"workers*nodes={self.world} (workers={self.workers}, nodes={self.nodes})")
            raise ValueError(f"batch_size={batch_size} is not divisible by {over}: every "
                             "worker takes an equal slice of each batch")

    def check_devices(self, device: str) -> None:
        """NCCL wants one GPU per worker; sharing one would only be slower."""
        if device != "cuda" or not self.distributed:
            return
        import torch

        have = torch.cuda.device_count()
        if have < self.workers:
            raise ValueError(f"workers={self.workers} needs {self.workers} CUDA GPUs on this "
                             f"machine (one per worker); it has {have}. Use fewer workers "
                             "or device=cpu")


# --------------------------------------------------------------------------- the agent


def launch(scale: ScaleOut, args: list[str], run_id: str = "") -> None:
    """Run ``python -m steps.train ARGS`` as this node's ``scale.workers`` ranks under torch's
    elastic agent (``torch.distributed.launcher.api.elastic_launch``, what ``torchrun``
    runs), in this process, and wait.

    A rank that fails stops the whole job within about a second (the agent's monitor
    interval, then SIGTERM to the rest, SIGKILL after a grace). With restarts left
    (``scale.max_restarts``) the agent starts every rank again and they continue from the
    run's latest checkpoint; the tracking rank says why on the console and records it in
    the run's ``pipeline.restarts`` (:func:`previous_attempt`). Otherwise the first real
    error is raised as a StepError naming its rank. SIGINT/SIGTERM here reach every rank
    and raise Interrupted. The ranks follow this process: if it dies, they stop
    (:func:`follow_the_agent`). Nothing of the job outlives this call.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs every step at WARNING and up, each logger at its own level: we say
    # what happened, once.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # The agent keeps each attempt's error files in a log folder; ours goes when the job
    # does.
    logs = tempfile.TemporaryDirectory(prefix="mnist-train-")
    saved = {k: os.environ.get(k) for k in (LAUNCHED_FOR_RUN, AGENT_PID, "MLFLOW_RUN_ID",
                                            "OMP_NUM_THREADS", NO_SHARED_STORE)}
    os.environ[LAUNCHED_FOR_RUN] = run_id
    os.environ[AGENT_PID] = str(os.getpid())
    # The ranks of each attempt meet in a store of their own. Sharing the rendezvous store
    # (torch's default) hands restarted ranks their predecessors' addresses: gloo then
    # fails with "Connection refused" (pytorch/pytorch#135712).
    os.environ[NO_SHARED_STORE] = "1"
    if run_id:  # `mlflow run` hands every rank the run; only the tracking rank uses it
        os.environ["MLFLOW_RUN_ID"] = run_id
    if "OMP_NUM_THREADS" not in os.environ:  # ranks share this machine's cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // scale.workers))
    where = f" at rdzv_endpoint={scale.rdzv_endpoint}" if scale.rdzv_endpoint else ""
    config = LaunchConfig(
        min_nodes=scale.nodes, max_nodes=scale.nodes, nproc_per_node=scale.workers,
        logs_specs=DefaultLogsSpecs(log_dir=logs.name), run_id="mnist-train", role="train",
        max_restarts=scale.max_restarts, monitor_interval=0.1, start_method="spawn",
        local_addr=local_address(scale), **rendezvous(scale))
    try:
        elastic_launch(config, sys.executable)("-m", "steps.train", *args)
    except ChildFailedError as exc:
        failure = root_cause(exc.failures)
        if failure.kind == INTERRUPTED:
            raise Interrupted(failure.said()) from None
        raise StepError(failure.said()) from None
    except SignalException as exc:
        raise Interrupted(signal.Signals(exc.sigval).name) from None
    except (StepError, Interrupted):
        raise
    except Exception as exc:  # node 0's port taken, node 0 unreachable, no rendezvous
        raise StepError(f"the training job could not start{where}: {cause_of(exc)}"
                        ) from None
    finally:
        logs.cleanup()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rendezvous(scale: ScaleOut) -> dict:
    """torch's c10d rendezvous for this job, as LaunchConfig takes it: on one machine a
    private store on a free loopback port (``torchrun --standalone``); across machines node
    0's store at ``rdzv_endpoint``, which the other nodes, and a restarted one, join."""
    if scale.nodes == 1:
        return {"rdzv_backend": "c10d", "rdzv_endpoint": "127.0.0.1:0",
                "rdzv_configs": {"is_host": True}}
    return {"rdzv_backend": "c10d", "rdzv_endpoint": scale.rdzv_endpoint,
            "rdzv_configs": {"is_host": scale.node_rank == 0,
                             "join_timeout": RENDEZVOUS_TIMEOUT_S}}


def local_address(scale: ScaleOut) -> str | None:
    """The address this node gives the others: loopback when the whole job is on this
    machine (a loopback endpoint), else torch's choice (the host's name)."""
    host = ENDPOINT_RE.match(scale.rdzv_endpoint)["host"] if scale.rdzv_endpoint else ""
    if scale.nodes == 1 or host == "localhost" or host.startswith("127."):
        return "127.0.0.1"
    return None


def cause_of(exc: BaseException) -> str:
    """``Type: first line`` of an error and of what caused it (the rendezvous wraps the
    socket's own error, e.g. ``address already in use``)."""
    said = described(exc)
    inner = exc.__cause__ or exc.__context__
    if inner is not None and first_line(inner) not in said:
        said += f" ({described(inner)})"
    return said


# Kinds of RankFailure.
KILLED_BY_SIGNAL, NO_REPORT, FAILED, INTERRUPTED, ELSEWHERE = (
    "killed by signal", "no report", "failed", "interrupted", "elsewhere")


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """Why a job (or one attempt of it) failed: which rank, and what it said (``detail``: a
    signal's name, a rank's own line). ``final``: a restart would meet it again (bad data,
    diverged training)."""

    kind: str
    rank: int = -1
    detail: str = ""
    final: bool = False

    def said(self) -> str:
        if self.kind == KILLED_BY_SIGNAL:
            return f"rank {self.rank} was killed by signal {self.detail}"
        if self.kind == NO_REPORT:
            return (f"rank {self.rank} was killed without a word (it left no error report: "
                    "SIGKILL, the OOM killer or a crash)")
        if self.kind == INTERRUPTED:
            return f"rank {self.rank} was interrupted ({self.detail})"
        if self.kind == ELSEWHERE:
            return "a rank on another node failed, or a node joined the job"
        return f"rank {self.rank} failed: {self.detail}"


def root_cause(failures: dict) -> RankFailure:
    """The failure of the rank that started it all, from torch's ``ChildFailedError``
    (global rank -> ProcessFailure) once the agent has no restart left.

    A rank killed by a signal other than the agent's own stop signals is the cause: nothing
    in the job kills ranks until the agent has seen a failure. Otherwise the earliest report
    wins (:func:`report_failure` times each one before the rank leaves the group), so a rank
    that only lost its peer ("Connection closed by peer") never hides the cause.
    """
    for rank, failure in sorted(failures.items()):
        if failure.exitcode < 0 and -failure.exitcode not in STOP_SIGNALS:
            return RankFailure(KILLED_BY_SIGNAL, rank, failure.signal_name())
    reports = {rank: f.error_file_data for rank, f in failures.items()
               if "pipeline_time" in f.error_file_data}
    if reports:
        return _earliest(reports)
    rank, failure = min(failures.items(), key=lambda item: item[1].timestamp)
    return RankFailure(FAILED, rank, f"exited with code {failure.exitcode}")


def _earliest(reports: dict[int, dict]) -> RankFailure:
    rank = min(reports, key=lambda r: reports[r]["pipeline_time"])
    report = reports[rank]
    return RankFailure(INTERRUPTED if report["interrupted"] else FAILED, rank,
                       report["detail"], bool(report.get("final")))


# --------------------------------------------------------------------------- in a rank


class RepeatedFailure(StepError):
    """The previous attempt's failure, which this attempt would only meet again: reported
    as that rank's, not this one's."""

    def __init__(self, failure: RankFailure) -> None:
        super().__init__(failure.said())
        self.failure = failure


def started_by_our_agent() -> bool:
    """Whether this process is a rank of a job our agent started. A rank started by some
    other launcher is refused: ``train`` starts its own."""
    if LAUNCHED_FOR_RUN in os.environ:
        return True
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StepError("steps.train starts its own workers: run it once with "
                        "--workers N (and --nodes/--node-rank/--rdzv-endpoint across "
                        "machines) instead of under torchrun")
    return False


def run_rank(tracked, untracked) -> None:
    """This rank's part: ``tracked(run, replica)`` on the tracking rank, inside the run
    (:func:`joined_run`), ``untracked(replica)`` on every other. Any failure is left in the
    rank's error file first (:func:`report_failure`)."""
    try:
        replica, previous = join_job()
        try:
            if is_tracking_rank(replica):
                with joined_run() as run:
                    if previous is not None:
                        record_restart(run.info.run_id, previous)
                    tracked(run, replica)
            else:
                untracked(replica)
        finally:
            leave()
    except BaseException as exc:
        report_failure(exc)
        raise


def join_job():
    """(this process's Replica, how the job's previous attempt failed or None), after
    joining the process group.

    A restarted rank first reads why the previous attempt failed; a failure that a restart
    would only meet again (``final``) ends this attempt at once with the same line, before
    any work (the agent restarts it again until its restarts are used up)."""
    from steps.core.training import Replica

    follow_the_agent()
    previous = previous_attempt() if restart_count() else None
    if previous is not None and previous.final:
        raise RepeatedFailure(previous)
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"  # the shared data on the CPU, gradients on the GPUs
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)  # or every rank's NCCL would sit on GPU 0
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    replica = Replica(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
    return replica, previous


class AgentLost(Interrupted):
    """The agent that started this rank died (its parent-death signal, or found gone)."""


def follow_the_agent() -> None:
    """Have the kernel send this rank :data:`AGENT_DEATH_SIGNAL` when its agent dies
    (Linux's parent-death signal), so that a lost agent (OOM-killed, its supervisor gone)
    leaves no rank training unsupervised. An agent that died before this call is caught by
    the check after it.

    The signal, not :func:`agent_gone`, says that the agent died: it comes when the thread
    that started the rank ends, and while the agent's other threads are still being torn
    down the rank's parent is still the agent's pid (measured: 1 run in 3)."""
    if sys.platform.startswith("linux"):
        import ctypes

        interrupt_on(AGENT_DEATH_SIGNAL, AgentLost)
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, AGENT_DEATH_SIGNAL)
    if agent_gone():
        raise AgentLost("its agent was gone")


def agent_gone() -> bool:
    """Whether the agent that started this rank has died (the rank was handed to another
    parent)."""
    return str(os.getppid()) != os.environ.get(AGENT_PID, str(os.getppid()))


def rank_run_id() -> str:
    """The run this node's ranks train into (empty on the other nodes)."""
    return os.environ.get(LAUNCHED_FOR_RUN, "")


def is_tracking_rank(replica) -> bool:
    """Whether this rank logs into the run: local rank 0 of node 0. The rendezvous orders
    nodes as it likes (a restarted node may come first), so this need not be global rank 0."""
    return bool(rank_run_id()) and replica.local_rank == 0


def restart_count() -> int:
    """How often the agent has restarted this node's ranks (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def previous_attempt() -> RankFailure:
    """Why the agent restarted this node's ranks, from what the previous attempt's ranks on
    this node left in their error files (torch's layout of DefaultLogsSpecs:
    ``<log_dir>/<run>/attempt_<n>/<local rank>/error.json``). A rank that left none was
    killed outright; ranks that all say they were stopped were stopped by the agent for
    something that happened on another node."""
    mine = Path(os.environ["TORCHELASTIC_ERROR_FILE"])
    attempt = mine.parents[2] / f"attempt_{restart_count() - 1}"
    first = int(os.environ["RANK"]) - int(os.environ["LOCAL_RANK"])  # this node's rank 0
    reports, silent = {}, []
    for local in range(int(os.environ["LOCAL_WORLD_SIZE"])):
        try:
            reports[first + local] = json.loads((attempt / str(local) / "error.json")
                                                .read_text())
        except (OSError, ValueError):
            silent.append(first + local)
    if silent:
        return RankFailure(NO_REPORT, silent[0])
    failed = {rank: r for rank, r in reports.items() if not r.get("interrupted")}
    if failed:
        return _earliest(failed)
    return RankFailure(ELSEWHERE)


def record_restart(run_id: str, cause: RankFailure) -> None:
    """Say why the ranks were restarted, on the console and in the run's
    ``pipeline.restarts`` (where the restart continues is added once it is known)."""
    import time

    from steps.tracking.runtime.runs import add_record

    log.warning("train: %s; restart %d of %d: every rank starts again from the run's latest "
                "checkpoint", cause.said(), restart_count(), max_restarts())
    add_record(run_id, tags.RESTARTS, {
        "restart": restart_count(), "because": cause.said(), "kind": cause.kind,
        "rank": cause.rank, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


@contextlib.contextmanager
def joined_run():
    """The tracking rank's view of the run its agent's process owns: logged into, and
    handed back RUNNING for that process to end when the job is over (or to continue, after
    a restart). MLflow's ``end_run`` always writes a status, hence RUNNING.

    If that process is gone (:func:`agent_gone`), nobody else can end the run: the rank ends
    it, KILLED with its checkpoint when training was stopped, FINISHED when it was done."""
    import mlflow

    from steps.tracking.runtime.runs import AGENT_LOST, Ending, end_active_run

    run = mlflow.start_run(run_id=rank_run_id(), log_system_metrics=True)
    lost = Ending("KILLED", AGENT_LOST, f"its agent (process {os.environ.get(AGENT_PID)}, "
                  "the train step's own) was lost; the run can be continued from its "
                  "checkpoint")
    try:
        yield run
    except BaseException as exc:
        with contextlib.suppress(Exception):
            if isinstance(exc, AgentLost) or agent_gone():
                end_active_run(lost)
            else:
                mlflow.end_run("RUNNING")
        raise
    with contextlib.suppress(Exception):
        end_active_run(Ending("FINISHED")) if agent_gone() else mlflow.end_run("RUNNING")


def share_from_tracking_rank(settings, images=None, labels=None):
    """Every rank gets the tracking rank's ``settings`` (any picklable value) and arrays;
    the others pass None. The arrays travel as tensors, not pickles: no second copy of the
    images."""
    import numpy as np
    import torch
    import torch.distributed as dist

    # Which rank has the data: the one that passes it (any global rank, see is_tracking_rank).
    source = torch.tensor([dist.get_rank() if images is not None else -1])
    dist.all_reduce(source, op=dist.ReduceOp.MAX)
    source = int(source)
    header = [None]
    if images is not None:
        header = [(settings, images.shape, images.dtype.str, labels.shape, labels.dtype.str)]
    dist.broadcast_object_list(header, src=source)
    settings, x_shape, x_dtype, y_shape, y_dtype = header[0]
    arrays = []
    for array, shape, dtype in ((images, x_shape, x_dtype), (labels, y_shape, y_dtype)):
        if array is None:
            array = np.empty(shape, dtype=np.dtype(dtype))
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        dist.broadcast(tensor, src=source)
        arrays.append(tensor.numpy())
    return settings, arrays[0], arrays[1]


def report_failure(exc: BaseException) -> None:
    """Leave this rank's one line where the elastic agent reads a worker's error (and where a
    restarted rank reads why it was restarted), timed now, before the rank leaves the group
    and its peers start failing for want of it. A StepError is ``final``: a restart would
    meet it again (bad data, diverged training)."""
    import time

    from steps.tracking.runtime.redact import redact

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    interrupted = isinstance(exc, KeyboardInterrupt)
    if isinstance(exc, RepeatedFailure):
        failure = exc.failure
    else:
        detail = (first_line(exc) or "SIGINT" if interrupted else
                  first_line(exc) if isinstance(exc, StepError) else described(exc))
        failure = RankFailure(INTERRUPTED if interrupted else FAILED,
                              int(os.environ.get("RANK", "0")), redact(detail),
                              isinstance(exc, StepError))
    now = time.time()
    record = {"message": failure.said(), "timestamp": int(now), "pipeline_time": now,
              "interrupted": interrupted, "final": failure.final, "detail": failure.detail,
              "rank": failure.rank}
    with contextlib.suppress(OSError):  # whole or not at all: the agent parses it
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.replace(tmp, path)


def leave() -> None:
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
