"""Data-parallel and multi-node training through PyTorch's own launcher.

``train --workers N`` runs N ranks on this machine with torch.distributed's elastic agent
(the engine behind ``torchrun``); ``--nodes M --node-rank R --rdzv-endpoint host:port``
spreads the job over M machines through its static rendezvous: node 0 hosts the store at
``rdzv_endpoint`` and holds global rank 0. No process pool or queue of our own.

Who touches MLflow:
- the launching process on node 0 (the one ``mlflow run`` starts) owns the run's life: it
  starts it, logs the params and ends it FINISHED, FAILED with the failing rank's one-line
  error, or KILLED;
- global rank 0 logs the training into that run (inputs, per-epoch metrics, figure, models)
  and sends the data and the settings to the other ranks over the process group;
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

from steps.tracking.cli import Interrupted, StepError

log = logging.getLogger("steps.tracking.distributed")

# Set by our launcher on the ranks it starts, to the run they train into ("" off node 0).
LAUNCHED_FOR_RUN = "PIPELINE_RANK_OF_RUN"
# How long a node waits for the others to join, and a collective for a silent peer.
RENDEZVOUS_TIMEOUT_S = 300
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what the agent stops the other ranks with
ENDPOINT_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class ScaleOut:
    """How many processes train one model, and where this one sits."""

    workers: int = 1  # ranks on this machine
    nodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # node 0's host:port; empty on a single machine

    @property
    def world(self) -> int:
        return self.workers * self.nodes

    @property
    def distributed(self) -> bool:
        return self.world > 1

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
    interval, then SIGTERM to the rest, SIGKILL after a grace); the first real error is
    raised as a StepError naming its rank. SIGINT/SIGTERM here reach every rank and raise
    Interrupted. Nothing of the job outlives this call.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs every step at WARNING and up, each logger at its own level: we say
    # what happened, once.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if scale.nodes == 1:
        # torchrun --standalone: a private store on a free loopback port.
        backend, endpoint, configs = "c10d", "127.0.0.1:0", {}
    else:
        backend, endpoint = "static", scale.rdzv_endpoint
        configs = {"rank": scale.node_rank, "timeout": RENDEZVOUS_TIMEOUT_S}
    # The agent keeps each rank's error file in a log folder; ours goes when the job does.
    logs = tempfile.TemporaryDirectory(prefix="mnist-train-")
    config = LaunchConfig(
        min_nodes=scale.nodes, max_nodes=scale.nodes, nproc_per_node=scale.workers,
        run_id="mnist-train", rdzv_backend=backend, rdzv_endpoint=endpoint,
        rdzv_configs=configs, max_restarts=0, monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=logs.name),
    )
    saved = {k: os.environ.get(k) for k in (LAUNCHED_FOR_RUN, "MLFLOW_RUN_ID",
                                            "OMP_NUM_THREADS")}
    os.environ[LAUNCHED_FOR_RUN] = run_id
    if run_id:  # `mlflow run` hands every rank the run; only rank 0 uses it
        os.environ["MLFLOW_RUN_ID"] = run_id
    if "OMP_NUM_THREADS" not in os.environ:  # ranks share this machine's cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // scale.workers))
    try:
        elastic_launch(config, sys.executable)("-m", "steps.train", *args)
    except ChildFailedError as exc:
        message, interrupted = root_cause(exc)
        if interrupted:
            raise Interrupted(message) from None
        raise StepError(message) from None
    except SignalException as exc:
        raise Interrupted(signal.Signals(exc.sigval).name) from None
    except Exception as exc:  # the rendezvous: node 0 unreachable, its port taken, ...
        from steps.tracking.cli import first_line

        where = f" at rdzv_endpoint={scale.rdzv_endpoint}" if scale.rdzv_endpoint else ""
        raise StepError(f"the training job could not start{where}: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None
    finally:
        logs.cleanup()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def root_cause(exc) -> tuple[str, bool]:
    """The one line of the rank whose failure started it all, and whether that was an
    interrupt (Ctrl-C or SIGTERM to a rank: the run ends KILLED, not FAILED).

    A rank killed by a signal other than the agent's own stop signals is the cause: nothing
    in the job kills ranks until the agent has seen a failure. Otherwise the earliest report wins (``report_failure`` times each
    one before the rank leaves the group), so a rank that only lost its peer ("Connection
    closed by peer") never hides the cause.
    """
    failures = exc.failures
    for rank, failure in sorted(failures.items()):
        if failure.exitcode < 0 and -failure.exitcode not in STOP_SIGNALS:
            return f"rank {rank} was killed by signal {failure.signal_name()}", False
    reported = {rank: f.error_file_data for rank, f in failures.items()
                if "pipeline_time" in f.error_file_data}
    if reported:
        rank = min(reported, key=lambda r: reported[r]["pipeline_time"])
        return f"rank {rank} {reported[rank]['message']}", reported[rank]["interrupted"]
    rank, failure = exc.get_first_failure()
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
    """The run global rank 0 logs into (empty on other nodes)."""
    return os.environ.get(LAUNCHED_FOR_RUN, "")


def share_from_rank0(settings, images=None, labels=None):
    """Every rank gets rank 0's ``settings`` (any picklable value) and arrays; the others
    pass None. The arrays travel as tensors, not pickles: no second copy of the images."""
    import numpy as np
    import torch
    import torch.distributed as dist

    header = [None]
    if dist.get_rank() == 0:
        header = [(settings, images.shape, images.dtype.str, labels.shape, labels.dtype.str)]
    dist.broadcast_object_list(header, src=0)
    settings, x_shape, x_dtype, y_shape, y_dtype = header[0]
    arrays = []
    for array, shape, dtype in ((images, x_shape, x_dtype), (labels, y_shape, y_dtype)):
        if array is None:
            array = np.empty(shape, dtype=np.dtype(dtype))
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        dist.broadcast(tensor, src=0)
        arrays.append(tensor.numpy())
    return settings, arrays[0], arrays[1]


def report_failure(exc: BaseException) -> None:
    """Leave this rank's one line where the elastic agent reads a worker's error, timed now,
    before the rank leaves the group and its peers start failing for want of it."""
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
              "interrupted": interrupted}
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
