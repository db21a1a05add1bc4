"""The training loop: in-memory tensors, index slicing, one readable function.

The images stay what they are on disk, uint8, and are placed on the device once (on the CPU
without a copy); each batch is a gather by a shuffled index, converted to float32 there.
Train and validation are index sets into that one array, not copies of it. So memory grows
with the data by about one byte per pixel, and no Dataset/DataLoader or per-sample Python
work sits in the loop: for a model this small the data path, not the arithmetic, is what an
epoch costs.

The recipe besides the network: a one-cycle learning-rate schedule (warm up to
``learning_rate``, then anneal; torch's ``OneCycleLR``, stepped per batch) and random shifts
of each training image by up to :data:`MAX_SHIFT` pixels, drawn per image from a generator of
their own. On 8,000 MNIST images the two together halve the errors of a constant rate on the
unshifted images (``make bench``): with few images, seeing each one a little displaced
is what keeps the network from learning them by heart.

Everything the loop needs to continue exactly where it stopped (weights, optimiser and
schedule state, the shuffling and augmentation generators and the global RNG, the best
epoch with its weights, the history) is one plain dict, :func:`training_state`: tensors, numbers and strings only, so that
``torch.load(weights_only=True)`` reads it back and no pickled code is ever run.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from steps.core.choices import AUGMENTS, DEVICES, LR_SCHEDULES, OPTIMIZERS
from steps.core.model import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replica:
    """This process's place in a data-parallel job (the default: the only one).

    With ``world`` > 1 the process group must already be initialised
    (``steps.tracking.training.elastic`` does it). Every replica holds all the data and walks
    the same shuffled order; each takes its slice of every global batch, so the job trains the
    model one process would have.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # which of this machine's GPUs, on CUDA


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    learning_rate: float = 3e-3
    batch_size: int = 64
    optimizer: str = "adam"
    arch: str = "cnn"
    hidden: tuple[int, int] | None = None
    seed: int = 42
    device: str = "auto"
    patience: int = 0  # stop after this many epochs without a better val_accuracy; 0 = off
    lr_schedule: str = "onecycle"
    augment: str = "shift"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}")
        if self.patience < 0:
            raise ValueError("patience must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}")

    def as_params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def as_record(self) -> dict:
        """Every field as a plain value (hidden as a list, or None): what a checkpoint
        stores to tell whether it can continue this configuration."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    model: nn.Module  # holds the best epoch's weights, on the CPU, in eval mode
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    device: str = "cpu"
    stopped_epoch: int = 0  # the epoch early stopping ended training at; 0 = it ran through
    resumed_from: int = 0  # the checkpoint's epoch when training continued one; 0 = fresh


CHECKPOINT_FORMAT = 2  # 2: the schedule's state and the augmentation generator
MAX_SHIFT = 2  # pixels, each way: a digit stays inside MNIST's 20x20 box in its 28x28 frame


class CheckpointError(ValueError):
    """A checkpoint that cannot continue this training: unreadable, or made for another
    configuration. Its message says what does not match."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice must be available."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if requested == "cuda" and not cuda:
        raise ValueError("device=cuda but no CUDA GPU is available; use device=auto or cpu")
    if requested == "mps" and not mps:
        raise ValueError("device=mps but MPS is not available; use device=auto or cpu")
    return torch.device(requested)


def make_optimizer(name: str, params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernels update every parameter in one call instead of a Python loop of
    # small ops: about a third of a CPU epoch at batch 64 (see `make bench`).
    fused = device.type in ("cpu", "cuda")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=fused)
    # Plain SGD at the same lr as Adam barely moves; momentum makes the two comparable.
    return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=fused)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, epochs: int,
                  steps_per_epoch: int):
    """The learning-rate schedule, stepped once per batch; None for a constant rate. The
    one-cycle schedule peaks at the optimiser's rate after 30% of the steps."""
    if name == "constant":
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=optimizer.param_groups[0]["lr"], epochs=epochs,
        steps_per_epoch=steps_per_epoch)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``images`` (N, 28, 28) moved by ``shifts`` (N, 2: rows, columns, in pixels), the
    uncovered border filled with 0 (MNIST's background); in their dtype."""
    n, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    images = images.reshape(n, height, width)
    rows = torch.arange(height, device=images.device)[None, :] - shifts[:, :1]
    cols = torch.arange(width, device=images.device)[None, :] - shifts[:, 1:]
    inside = (((rows >= 0) & (rows < height))[:, :, None]
              & ((cols >= 0) & (cols < width))[:, None, :])
    moved = images[torch.arange(n, device=images.device)[:, None, None],
                   rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    return moved * inside.to(images.dtype)


def to_device_tensors(
    x: np.ndarray, y: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (kept in their dtype, uint8 for raw pixels) and int64 labels on ``device``;
    on the CPU the images share the array's memory."""
    return (
        torch.from_numpy(np.ascontiguousarray(x)).to(device),
        torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device),
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, ids: torch.Tensor | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Logits for ``x[ids]`` (all of ``x`` when ``ids`` is None), a chunk at a time, so
    that only a chunk is ever float32. 128 images: the cnn's activations for a chunk are
    12 MB. Chunks of 256 to 2048 (24 to 190 MB each) left the freed memory in glibc's heap
    rather than returning it, so the train process's peak grew with the validation split:
    2.6 to 6.6 bytes per pixel of data against 0.9 at 128 (tests/test_memory.py)."""
    model.eval()
    ids = torch.arange(len(x), device=x.device) if ids is None else ids
    return torch.cat([model(x[ids[i : i + batch_size]].float())
                      for i in range(0, len(ids), batch_size)])


def _sum_over_replicas(values: torch.Tensor, replica: Replica) -> torch.Tensor:
    if replica.world > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, val_ids: torch.Tensor,
             replica: Replica = Replica()) -> tuple[float, float]:
    """Validation loss and accuracy over ``val_ids``; each replica scores its share and the
    sums are combined, so every replica gets the same two numbers."""
    mine = val_ids.tensor_split(replica.world)[replica.rank]
    logits = predict_logits(model, x, mine)
    sums = torch.stack([
        nn.functional.cross_entropy(logits, y[mine], reduction="sum"),
        (logits.argmax(1) == y[mine]).sum().to(logits.dtype),
    ]) if len(mine) else torch.zeros(2, device=x.device)
    loss_sum, correct = _sum_over_replicas(sums, replica).tolist()
    return loss_sum / len(val_ids), correct / len(val_ids)


def train(
    config: TrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    progress: bool = False,
    replica: Replica = Replica(),
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
) -> TrainResult:
    """Train a fresh ``config.arch`` network on ``images[train_idx]``, validate on
    ``images[val_idx]``, and return it with the best epoch's weights.

    ``on_epoch_end`` sees each epoch's result (the scripts log it; a tuner may raise there
    to prune a trial). ``progress`` shows epoch and batch progress bars instead of a log
    line per epoch (for terminals).

    Every ``checkpoint_every`` epochs, and at the last one, ``on_checkpoint`` gets the
    :func:`training_state` (before ``on_epoch_end``: an epoch whose result was reported is
    always in a checkpoint). ``resume_from``, such a state, continues that training at its
    next epoch; the result is then exactly the uninterrupted one on the CPU.
    ``config.patience`` > 0 stops once ``val_accuracy`` has not improved for that many
    epochs.

    With a ``replica`` of a larger job, ``config.batch_size`` is the global batch: this
    process trains on its slice of each one under DistributedDataParallel, which averages
    the gradients, and the loss is scaled so that the average is the whole batch's mean.
    Same seed, same result as one process, up to floating-point summation order.
    """
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if device.type == "cuda" and replica.world > 1:
        device = torch.device("cuda", replica.local_rank)
    model = build_model(config.arch, config.hidden).to(device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.learning_rate,
                               device)
    shuffle = torch.Generator(device="cpu").manual_seed(config.seed)
    # Its own stream, so that switching augmentation off leaves the shuffling as it was.
    shifting = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    n = len(train_idx)
    schedule = make_schedule(config.lr_schedule, optimizer, config.epochs,
                             -(-n // config.batch_size))
    result = TrainResult(model=model, device=str(device))
    best_state = None
    if resume_from is not None:
        check_resumable(resume_from, config)
        best_state = _restore(resume_from, model, optimizer, schedule,
                              {"shuffle": shuffle, "augment": shifting}, result)
    stepped = model
    if replica.world > 1:  # after a restore: DDP starts every replica from rank 0's weights
        from torch.nn.parallel import DistributedDataParallel

        stepped = DistributedDataParallel(model, device_ids=[device.index]
                                          if device.type == "cuda" else None)
    x, y = to_device_tensors(images, labels, device)
    train_ids = torch.from_numpy(np.asarray(train_idx, dtype=np.int64)).to(device)
    val_ids = torch.from_numpy(np.asarray(val_idx, dtype=np.int64)).to(device)

    first = result.resumed_from + 1
    if resume_from is not None and _patience_ran_out(result, config):
        first = config.epochs + 1  # the checkpoint had already stopped early
        result.stopped_epoch = result.resumed_from
    epochs = range(first, config.epochs + 1)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="training", unit="epoch", position=0,
                      initial=first - 1, total=config.epochs)
    for epoch in epochs:
        started = time.perf_counter()
        stepped.train()
        order = train_ids[torch.randperm(n, generator=shuffle).to(device)]
        # Summed on the device: a .item() per batch would sync a GPU every step.
        loss_sum = torch.zeros((), device=device)
        batches = range(0, n, config.batch_size)
        if progress:
            batches = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                           leave=False, position=1)
        for start in batches:
            batch = order[start : start + config.batch_size]
            idx = batch.tensor_split(replica.world)[replica.rank]
            xb, yb = x[idx], y[idx]
            if config.augment == "shift":
                # Drawn for the whole global batch, so every replica's share is what one
                # process would have drawn for those images.
                shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (len(batch), 2),
                                       generator=shifting)
                xb = shift_images(xb, shifts.tensor_split(replica.world)[replica.rank]
                                  .to(device))
            xb = xb.float()
            optimizer.zero_grad(set_to_none=True)
            # Summed over this slice, divided by the whole batch, times the replicas that
            # DDP's gradient average divides by: the gradient of the batch mean.
            loss_of_slice = nn.functional.cross_entropy(stepped(xb), yb, reduction="sum")
            (loss_of_slice * (replica.world / len(batch))).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            loss_sum += loss_of_slice.detach()
        train_loss = (_sum_over_replicas(loss_sum, replica) / n).item()
        if not np.isfinite(train_loss):
            raise FloatingPointError(
                f"training diverged at epoch {epoch} (loss is {train_loss}); "
                "lower learning_rate"
            )
        val_loss, val_acc = validate(model, x, y, val_ids, replica)
        epoch_result = EpochResult(
            epoch, train_loss, val_loss, val_acc, time.perf_counter() - started
        )
        result.history.append(epoch_result)
        if progress:
            epochs.set_postfix(train_loss=f"{train_loss:.4f}", val_accuracy=f"{val_acc:.4f}")
        else:
            log.info(
                "epoch %d/%d train_loss=%.4f val_loss=%.4f val_accuracy=%.4f (%.1fs)",
                epoch, config.epochs, train_loss, val_loss, val_acc, epoch_result.seconds,
            )
        if best_state is None or val_acc > result.best_val_accuracy:
            result.best_val_accuracy, result.best_epoch = val_acc, epoch
            best_state = _cpu_copy(model.state_dict())
        stop = _patience_ran_out(result, config)
        if on_checkpoint is not None and checkpoint_every > 0 and (
                epoch % checkpoint_every == 0 or epoch == config.epochs or stop):
            on_checkpoint(training_state(config, model, optimizer, schedule,
                                         {"shuffle": shuffle, "augment": shifting}, result,
                                         best_state))
        if on_epoch_end is not None:
            on_epoch_end(epoch_result)
        if stop:
            result.stopped_epoch = epoch
            log.info("early stop at epoch %d: no better val_accuracy than epoch %d's %.4f in "
                     "%d epochs", epoch, result.best_epoch, result.best_val_accuracy,
                     config.patience)
            break

    best_model = copy.deepcopy(model).to("cpu")
    best_model.load_state_dict(best_state)
    result.model = best_model.eval()
    return result


def _patience_ran_out(result: TrainResult, config: TrainConfig) -> bool:
    epoch = result.history[-1].epoch if result.history else 0
    return config.patience > 0 and epoch - result.best_epoch >= config.patience


def _cpu_copy(tree):
    """``tree`` (nested dicts and lists of tensors) with every tensor copied to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_cpu_copy(v) for v in tree)
    return tree


def training_state(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                   schedule, generators: dict[str, torch.Generator], result: TrainResult,
                   best_state: dict) -> dict:
    """Everything :func:`train` needs to continue after ``result.history[-1]``: on the CPU,
    in types ``torch.load(weights_only=True)`` accepts."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.as_record(),
        "epoch": result.history[-1].epoch,
        "model": _cpu_copy(model.state_dict()),
        "optimizer": _cpu_copy(optimizer.state_dict()),
        "schedule": schedule.state_dict() if schedule is not None else {},
        "best_model": best_state,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "history": [asdict(h) for h in result.history],
        "rng": {**{name: g.get_state() for name, g in generators.items()},
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


STATE_KEYS = ("format", "config", "epoch", "model", "optimizer", "schedule", "best_model",
              "best_epoch", "best_val_accuracy", "history", "rng")


def check_resumable(state: dict, config: TrainConfig) -> None:
    """Raise CheckpointError unless ``state`` is a whole :func:`training_state` of
    ``config``'s training."""
    if not isinstance(state, dict) or set(STATE_KEYS) - set(state):
        missing = sorted(set(STATE_KEYS) - set(state)) if isinstance(state, dict) else []
        raise CheckpointError("it is not a training checkpoint"
                              + (f" (no {', '.join(missing)})" if missing else ""))
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"it has format {state['format']}, this code reads "
                              f"{CHECKPOINT_FORMAT}")
    ours = config.as_record()
    differ = [f"{k}={state['config'].get(k)!r} there, {v!r} here" for k, v in ours.items()
              if state["config"].get(k) != v]
    if differ:
        raise CheckpointError("it was made with other parameters: " + "; ".join(differ))
    if not 1 <= state["epoch"] <= config.epochs or len(state["history"]) != state["epoch"]:
        raise CheckpointError(f"its epoch {state['epoch']} and history of "
                              f"{len(state['history'])} epochs do not fit {config.epochs} epochs")


def _restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
             generators: dict[str, torch.Generator], result: TrainResult) -> dict:
    """Put ``state`` back into the fresh objects; return the best epoch's weights."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        for name, generator in generators.items():
            generator.set_state(state["rng"][name])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        result.history = [EpochResult(**h) for h in state["history"]]
        copy.deepcopy(model).load_state_dict(state["best_model"])  # its shapes must fit too
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointError(f"it does not fit this network or optimiser ({first.strip()})"
                              ) from None
    result.best_epoch, result.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
    result.resumed_from = state["epoch"]
    return state["best_model"]
