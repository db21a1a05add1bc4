"""The training loop: in-memory tensors, index slicing, one readable function.

The images stay what they are on disk, uint8, and are placed on the device once (on the CPU
without a copy); each batch is a gather by a shuffled index, converted to float32 there.
Train and validation are index sets into that one array, not copies of it. So memory grows
with the data by about one byte per pixel, and no Dataset/DataLoader or per-sample Python
work sits in the loop: for a model this small the data path, not the arithmetic, is what an
epoch costs.
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

from steps.core.choices import DEVICES, OPTIMIZERS
from steps.core.model import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replica:
    """This process's place in a data-parallel job (the default: the only one).

    With ``world`` > 1 the process group must already be initialised (``steps.distributed``
    does it). Every replica holds all the data and walks the same shuffled order; each takes
    its slice of every global batch, so the job trains the model one process would have.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # which of this machine's GPUs, on CUDA


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    learning_rate: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    arch: str = "mlp"
    hidden: tuple[int, int] | None = None
    seed: int = 42
    device: str = "auto"

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

    def as_params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


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
    batch_size: int = 2048,
) -> torch.Tensor:
    """Logits for ``x[ids]`` (all of ``x`` when ``ids`` is None), a chunk at a time, so
    that only a chunk is ever float32."""
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
) -> TrainResult:
    """Train a fresh ``config.arch`` network on ``images[train_idx]``, validate on
    ``images[val_idx]``, and return it with the best epoch's weights.

    ``on_epoch_end`` sees each epoch's result (the scripts log it; a tuner may raise there
    to prune a trial). ``progress`` shows epoch and batch progress bars instead of a log
    line per epoch (for terminals).

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
    stepped = model
    if replica.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        stepped = DistributedDataParallel(model, device_ids=[device.index]
                                          if device.type == "cuda" else None)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.learning_rate,
                               device)
    x, y = to_device_tensors(images, labels, device)
    train_ids = torch.from_numpy(np.asarray(train_idx, dtype=np.int64)).to(device)
    val_ids = torch.from_numpy(np.asarray(val_idx, dtype=np.int64)).to(device)
    shuffle = torch.Generator(device="cpu").manual_seed(config.seed)
    n = len(train_ids)

    result = TrainResult(model=model, device=str(device))
    best_state = None
    epochs = range(1, config.epochs + 1)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="training", unit="epoch", position=0)
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
            xb, yb = x[idx].float(), y[idx]
            optimizer.zero_grad(set_to_none=True)
            # Summed over this slice, divided by the whole batch, times the replicas that
            # DDP's gradient average divides by: the gradient of the batch mean.
            loss_of_slice = nn.functional.cross_entropy(stepped(xb), yb, reduction="sum")
            (loss_of_slice * (replica.world / len(batch))).backward()
            optimizer.step()
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
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                          model.state_dict().items()}
        if on_epoch_end is not None:
            on_epoch_end(epoch_result)

    best_model = copy.deepcopy(model).to("cpu")
    best_model.load_state_dict(best_state)
    result.model = best_model.eval()
    return result
