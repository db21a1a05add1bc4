"""Checkpoints of a train run, kept with the run's artifacts so that they live wherever the
run lives (a local store, a server's proxied artifacts, an object store).

A checkpoint is the core's ``training_state`` saved with ``torch.save``: tensors, numbers
and strings, read back with ``torch.load(weights_only=True)``, so no pickled code runs.
Two files take turns, ``checkpoint/state-0.pt`` and ``checkpoint/state-1.pt``; the run tag
``pipeline.checkpoint`` (JSON: which file, its epoch, size and sha256) names the newest
whole one and is written only once its file is complete, in one store transaction. So a
resume never reads a half-written checkpoint (a kill during a write leaves the tag on the
previous file), and a run keeps at most two files, however many epochs it trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from steps.core.text import first_line
from steps.tracking.runtime import tags
from steps.tracking.runtime.cli import StepError

log = logging.getLogger("steps.train")

CHECKPOINT_DIR = "checkpoint"
RESUMABLE_STATUSES = ("KILLED", "FAILED")


@dataclass(frozen=True)
class Pointer:
    """What the ``pipeline.checkpoint`` tag says of the newest whole checkpoint."""

    path: str  # artifact path in the run
    epoch: int
    epochs: int
    sha256: str
    bytes: int

    @classmethod
    def of(cls, run) -> Pointer | None:
        """The run's checkpoint, or None when it has none (or a tag nobody can read)."""
        text = run.data.tags.get(tags.CHECKPOINT)
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return f"{self.path} (epoch {self.epoch} of {self.epochs})"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointWriter:
    """``on_checkpoint`` for the core's ``train``: each call saves the state into the file
    the tag does not name, then points the tag at it."""

    def __init__(self, run_id: str, previous: Pointer | None, epochs: int) -> None:
        self.run_id, self.epochs = run_id, epochs
        self.slot = 1 if previous is not None and previous.path.endswith("-0.pt") else 0
        self.seconds = 0.0  # spent writing, for the log line and `make bench`
        self.last: Pointer | None = previous

    def __call__(self, state: dict) -> None:
        import mlflow
        import torch

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, f"state-{self.slot}.pt")
            torch.save(state, path)
            pointer = Pointer(path=f"{CHECKPOINT_DIR}/{path.name}", epoch=state["epoch"],
                              epochs=self.epochs, sha256=sha256_of(path),
                              bytes=path.stat().st_size)
            mlflow.log_artifact(str(path), CHECKPOINT_DIR, run_id=self.run_id)
        mlflow.MlflowClient().set_tag(self.run_id, tags.CHECKPOINT,
                                      json.dumps(asdict(pointer)))
        self.slot ^= 1
        self.last = pointer
        self.seconds += time.perf_counter() - started


def load(run, config) -> dict | None:
    """The run's newest checkpoint as a training state that can continue ``config``, or
    None when the run has none.

    A checkpoint that is damaged or was made for other parameters is refused: StepError
    naming the run and what does not match, and the run's tag moves to
    ``pipeline.checkpoint_refused``, so that the next pipeline trains afresh instead of
    failing on it again. Nothing is trained on top of it. A store that cannot be read is
    only an error: the checkpoint stays for a later try.
    """
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    from steps.core.training import CheckpointError, check_resumable

    pointer = Pointer.of(run)
    if pointer is None:
        if run.data.tags.get(tags.CHECKPOINT):
            refuse(run, "tag", f"{tags.CHECKPOINT} is not the JSON a checkpoint writes")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=pointer.path, dst_path=tmp))
        except (MlflowException, OSError) as exc:
            raise StepError(f"run {run.info.run_id}: its checkpoint {pointer.describe()} "
                            f"cannot be read ({first_line(exc)})") from None
        found = sha256_of(local)
        if found != pointer.sha256:
            refuse(run, pointer.describe(), f"is corrupt: its sha256 is {found[:16]}..., the "
                   f"checkpoint written had {pointer.sha256[:16]}...")
        try:
            state = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            refuse(run, pointer.describe(), f"cannot be loaded ({first_line(exc)})")
    try:
        check_resumable(state, config)
    except CheckpointError as exc:
        refuse(run, pointer.describe(), f"does not fit: {exc}")
    if state["epoch"] != pointer.epoch:
        refuse(run, pointer.describe(), f"holds epoch {state['epoch']}, its tag says "
               f"{pointer.epoch}")
    return state


def refuse(run, what: str, why: str) -> None:
    """Raise the one-line refusal of ``run``'s checkpoint, after moving its tag aside."""
    import mlflow

    message = f"run {run.info.run_id}: its checkpoint {what} {why}"
    client = mlflow.MlflowClient()
    client.set_tag(run.info.run_id, tags.CHECKPOINT_REFUSED, message[:500])
    client.delete_tag(run.info.run_id, tags.CHECKPOINT)
    raise StepError(f"{message}; nothing was trained on it, and the next pipeline trains "
                    "afresh")


def check_resumable_run(client, run_id: str, differences) -> object:
    """The run ``train --resume RUN_ID`` may continue, or StepError naming ``resume``.

    ``differences(run)`` lists the training parameters that differ between that run and
    this command (``steps.tracking.runtime.runs.param_differences``).
    """
    from mlflow.exceptions import MlflowException

    from steps.tracking.runtime.runs import close_orphans, ended

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise StepError(f"resume={run_id}: no such run in this tracking store") from None
    step = run.data.tags.get(tags.STEP, "")
    if step != "train":
        raise StepError(f"resume={run_id}: that run is not a train run ({tags.STEP}="
                        f"{step or '(none)'})")
    if run.info.status == "RUNNING":  # its process may be gone: then it is an orphan
        close_orphans(client, run.info.experiment_id)
        run = client.get_run(run_id)
    status = ended(run).status  # by the run's own account, not its launcher's
    if status not in RESUMABLE_STATUSES:
        still = "is still RUNNING" if status == "RUNNING" else (
            f"{status}: there is nothing to continue")
        raise StepError(f"resume={run_id}: that run {still}")
    if Pointer.of(run) is None:
        refused = run.data.tags.get(tags.CHECKPOINT_REFUSED)
        raise StepError(f"resume={run_id}: that run has no checkpoint to continue from"
                        + (f" ({refused})" if refused else "; it ended before its first "
                           "checkpoint, or ran with checkpoint_every=0"))
    differ = differences(run)
    if differ:
        raise StepError(f"resume={run_id}: that run was trained with other parameters ("
                        + ", ".join(differ) + "); pass the same ones to continue it")
    return run
