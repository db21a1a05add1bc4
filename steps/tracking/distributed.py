"""Data-parallel and multi-node training through PyTorch's own elastic agent.

``train --workers N`` runs N ranks on this machine with torch.distributed's elastic agent
(the engine behind ``torchrun``); ``--nodes M --node-rank R --rdzv-endpoint host:port``
spreads the job over M machines through its c10d rendezvous, whose store node 0 hosts at
``rdzv_endpoint``. ``--max-restarts K`` lets the agent restart every rank up to K times
when one fails (a killed process, an exception, a lost node); the ranks continue from the
run's latest checkpoint, in the same run. A node whose processes die and are started again
(a replaced pod) joins the next rendezvous round. No process pool or queue of our own.

Who touches MLflow:
- the launching process on node 0 (the one ``mlflow run`` starts) owns the run's life: it
  starts it, logs the params, records each restart (``pipeline.restarts``) and ends it
  FINISHED, FAILED with the failing rank's one-line error, or KILLED;
- the tracking rank (local rank 0 on node 0) logs the training into that run (inputs,
  per-epoch metrics, checkpoints, figure, models), never ending it, and sends the data, the
  settings and the checkpoint to the other ranks over the process group;
- every other rank, and every process on the other nodes, never starts, ends or marks a
  run: they need no tracking server at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
import tempfile
from datetime import timedelta

from steps.tracking import tags
from steps.tracking.cli import Interrupted, StepError

log = logging.getLogger("steps.tracking.distributed")

# Set by our launcher on the ranks it starts, to the run they train into ("" off node 0).
LAUNCHED_FOR_RUN = "PIPELINE_RANK_OF_RUN"
# How long a node waits for the others to join, and a collective for a silent peer.
RENDEZVOUS_TIMEOUT_S = 300
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what the agent stops the other ranks with
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


# --------------------------------------------------------------------------- the launcher


def launch(scale: ScaleOut, args: list[str], run_id: str = "") -> None:
    """Run ``python -m steps.train ARGS`` as this node's ``scale.workers`` ranks and wait.

    A rank that fails stops the whole job within about a second (the agent's monitor
    interval, then SIGTERM to the rest, SIGKILL after a grace). With restarts left
    (``scale.max_restarts``) the agent starts every rank again and they continue from the
    run's latest checkpoint; each restart is said on the console and, on node 0, added to
    the run's ``pipeline.restarts``. Otherwise the first real error is raised as a
    StepError naming its rank. SIGINT/SIGTERM here reach every rank and raise Interrupted.
    Nothing of the job outlives this call.
    """
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    # The agent logs every step at WARNING and up, each logger at its own level: we say
    # what happened, once.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # The agent keeps each rank's error file in a log folder; ours goes when the job does.
    logs = tempfile.TemporaryDirectory(prefix="mnist-train-")
    saved = {k: os.environ.get(k) for k in (LAUNCHED_FOR_RUN, "MLFLOW_RUN_ID",
                                            "OMP_NUM_THREADS", NO_SHARED_STORE)}
    os.environ[LAUNCHED_FOR_RUN] = run_id
    # The ranks of each attempt meet in a store of their own. Sharing the rendezvous store
    # (torch's default) hands restarted ranks their predecessors' addresses: gloo then
    # fails with "Connection refused" (pytorch/pytorch#135712).
    os.environ[NO_SHARED_STORE] = "1"
    if run_id:  # `mlflow run` hands every rank the run; only the tracking rank uses it
        os.environ["MLFLOW_RUN_ID"] = run_id
    if "OMP_NUM_THREADS" not in os.environ:  # ranks share this machine's cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // scale.workers))
    where = f" at rdzv_endpoint={scale.rdzv_endpoint}" if scale.rdzv_endpoint else ""
    handler = None
    try:
        try:
            handler = get_rendezvous_handler(RendezvousParameters(**rendezvous(scale)))
        except Exception as exc:  # node 0's port taken, node 0 unreachable, ...
            raise StepError(f"the training job could not start{where}: {cause_of(exc)}"
                            ) from None
        spec = WorkerSpec(role="train", local_world_size=scale.workers,
                          entrypoint=sys.executable, args=("-m", "steps.train", *args),
                          rdzv_handler=handler, max_restarts=scale.max_restarts,
                          monitor_interval=0.1, local_addr=local_address(scale))
        agent = restarting_agent(spec, DefaultLogsSpecs(log_dir=logs.name),
                                 Restarts(scale.max_restarts, run_id))
        try:
            result = agent.run()
        except (StepError, Interrupted):
            raise
        except SignalException as exc:
            raise Interrupted(signal.Signals(exc.sigval).name) from None
        except Exception as exc:  # a rendezvous that never completed
            raise StepError(f"the training job could not start{where}: {cause_of(exc)}"
                            ) from None
        if result.is_failed():
            message, interrupted = root_cause(result.failures)
            if interrupted:
                raise Interrupted(message)
            raise StepError(message)
    finally:
        if handler is not None:  # closed: the other nodes' agents leave too
            with contextlib.suppress(Exception):
                handler.shutdown()
        logs.cleanup()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rendezvous(scale: ScaleOut) -> dict:
    """torch's c10d rendezvous for this job: on one machine a private store on a free
    loopback port (``torchrun --standalone``); across machines node 0's store at
    ``rdzv_endpoint``, which the other nodes, and a restarted one, join."""
    common = {"backend": "c10d", "run_id": "mnist-train", "min_nodes": scale.nodes,
              "max_nodes": scale.nodes, "local_addr": local_address(scale)}
    if scale.nodes == 1:
        return {**common, "endpoint": "127.0.0.1:0", "is_host": True}
    return {**common, "endpoint": scale.rdzv_endpoint, "is_host": scale.node_rank == 0,
            "join_timeout": RENDEZVOUS_TIMEOUT_S}


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
    from steps.tracking.cli import first_line

    said = f"{type(exc).__name__}: {first_line(exc)}"
    inner = exc.__cause__ or exc.__context__
    if inner is not None and first_line(inner) not in said:
        said += f" ({type(inner).__name__}: {first_line(inner)})"
    return said


def restarting_agent(spec, logs_specs, on_restart):
    """torch's LocalElasticAgent for ``spec``, subclassed (the way torch's docs extend an
    agent) to tell ``on_restart`` why it restarts the workers, before it does. torch is
    imported here, by a process that launches ranks, not by every importer of this module."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class RestartingAgent(LocalElasticAgent):
        def __init__(self) -> None:
            super().__init__(spec, logs_specs, start_method="spawn")
            self.last_result = None

        def _monitor_workers(self, worker_group):
            self.last_result = super()._monitor_workers(worker_group)
            return self.last_result

        def _restart_workers(self, worker_group):
            last = self.last_result
            on_restart(last.failures if last is not None and last.is_failed() else {})
            super()._restart_workers(worker_group)

    return RestartingAgent()


class Restarts:
    """What happens at each restart of the job: the line on the console, and on node 0
    the record in the run's ``pipeline.restarts``. A failure no restart can mend (a
    StepError: bad data, diverged training) ends the job at once instead."""

    def __init__(self, max_restarts: int, run_id: str) -> None:
        self.max_restarts, self.run_id, self.count = max_restarts, run_id, 0

    def __call__(self, failures: dict) -> None:
        import time

        if failures:
            because, interrupted = root_cause(failures)
            if not interrupted and any(f.error_file_data.get("final") for f in
                                       failures.values()):
                raise StepError(because)
        else:  # the agent restarts for a new member too (a node that came back)
            because = "a node joined the job"
        self.count += 1
        log.warning("train: %s; restart %d of %d: every rank starts again from the run's "
                    "latest checkpoint", because, self.count, self.max_restarts)
        if self.run_id:
            from steps.tracking.runs import add_record

            add_record(self.run_id, tags.RESTARTS, {
                "restart": self.count, "because": because,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def root_cause(failures: dict) -> tuple[str, bool]:
    """The one line of the rank whose failure started it all, and whether that was an
    interrupt (Ctrl-C or SIGTERM to a rank: the run ends KILLED, not FAILED).

    ``failures`` maps global ranks to torch's ProcessFailure. A rank killed by a signal
    other than the agent's own stop signals is the cause: nothing in the job kills ranks
    until the agent has seen a failure. Otherwise the earliest report wins
    (``report_failure`` times each one before the rank leaves the group), so a rank that
    only lost its peer ("Connection closed by peer") never hides the cause.
    """
    for rank, failure in sorted(failures.items()):
        if failure.exitcode < 0 and -failure.exitcode not in STOP_SIGNALS:
            return f"rank {rank} was killed by signal {failure.signal_name()}", False
    reported = {rank: f.error_file_data for rank, f in failures.items()
                if "pipeline_time" in f.error_file_data}
    if reported:
        rank = min(reported, key=lambda r: reported[r]["pipeline_time"])
        return f"rank {rank} {reported[rank]['message']}", reported[rank]["interrupted"]
    rank, failure = min(failures.items(), key=lambda item: item[1].timestamp)
    return f"rank {rank} exited with code {failure.exitcode}", False


# --------------------------------------------------------------------------- in a rank


def launched_rank():
    """This process's Replica when our launcher started it (joining the process group),
    else None. A rank started by some other launcher is refused: ``train`` starts its own."""
    from steps.core.training import Replica

    if LAUNCHED_FOR_RUN not in os.environ:
        if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise StepError("steps.train starts its own workers: run it once with "
                            "--workers N (and --nodes/--node-rank/--rdzv-endpoint across "
                            "machines) instead of under torchrun")
        return None
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"  # the shared data on the CPU, gradients on the GPUs
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)  # or every rank's NCCL would sit on GPU 0
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Replica(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


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


@contextlib.contextmanager
def joined_run():
    """The tracking rank's view of the run its launcher owns: logged into, never ended.

    The launcher ends the run when the job is over; a rank that fails here leaves it
    RUNNING, so that the agent's restart continues the same run. MLflow's ``end_run``
    always writes a status, so the run is handed back as RUNNING.
    """
    import mlflow

    run = mlflow.start_run(run_id=rank_run_id(), log_system_metrics=True)
    try:
        yield run
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run("RUNNING")


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
    """Leave this rank's one line where the elastic agent reads a worker's error, timed now,
    before the rank leaves the group and its peers start failing for want of it. A
    StepError is ``final``: a restart would meet it again (bad data, diverged training)."""
    import json
    import tempfile
    import time

    from steps.tracking.cli import first_line
    from steps.tracking.redact import redact

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    interrupted = isinstance(exc, KeyboardInterrupt)
    if interrupted:
        message = f"was interrupted ({first_line(exc) or 'SIGINT'})"
    elif isinstance(exc, StepError):
        message = f"failed: {first_line(exc)}"
    else:
        message = f"failed: {type(exc).__name__}: {first_line(exc)}"
    now = time.time()
    record = {"message": redact(message), "timestamp": int(now), "pipeline_time": now,
              "interrupted": interrupted, "final": isinstance(exc, StepError)}
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
