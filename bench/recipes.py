"""The recipes `make bench` compares on real MNIST: test accuracy against training seconds.

Split: the first 8,000 images of ``../shared/datasets/mnist-t10k`` (the official test set)
to train, 10% of them held out for validation as the train step holds them out, and its
last 2,000 to test. Recipes are chosen on the validation images; the test images only
report.

The reference is the recipe of pytorch/examples ``mnist/main.py``, typed in from its
published description (two conv layers of 32 and 64, max-pool, dropout 0.25, fc 128,
dropout 0.5; Adadelta at lr 1.0, StepLR with gamma 0.7 per epoch, batch 64), run on the
same images and threads. Ours go through the train step's own loop
(``steps.core.training.train``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from steps.core.model import PIXEL_MEAN, PIXEL_STD
from steps.core.training import TrainConfig, predict_logits, train

N_TRAIN, N_TEST = 8000, 2000

# name -> the train step's parameters (MLproject's defaults for the rest).
OURS = {
    "mlp, constant rate, no shifts (the old default)": dict(
        arch="mlp", learning_rate=1e-3, lr_schedule="constant", augment="none"),
    "cnn, constant rate, no shifts (the old cnn)": dict(
        arch="cnn", learning_rate=1e-3, lr_schedule="constant", augment="none"),
    "mlp, one-cycle + shifts": dict(arch="mlp"),
    "cnn, one-cycle + shifts (the default)": dict(),
    "cnn 32,64, one-cycle + shifts, 8 epochs": dict(hidden=(32, 64), epochs=8),
}
BEST = "cnn 32,64, one-cycle + shifts, 8 epochs"
DEFAULT = "cnn, one-cycle + shifts (the default)"


class ExampleNet(nn.Module):
    """pytorch/examples mnist's ``Net``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.reshape(-1, 1, 28, 28).float() - PIXEL_MEAN) / PIXEL_STD
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = self.dropout1(torch.max_pool2d(x, 2)).flatten(1)
        return self.fc2(self.dropout2(torch.relu(self.fc1(x))))


def train_example(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    net = ExampleNet()
    optimizer = torch.optim.Adadelta(net.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
        schedule.step()
    return net.eval()


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_logits(net, x).argmax(1) == y).float().mean())


def compare(images: np.ndarray, labels: np.ndarray, example_epochs: int = 5) -> list[dict]:
    """One row per recipe: name, epochs, training seconds, validation and test accuracy."""
    images, labels = np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)
    order = np.random.default_rng(0).permutation(N_TRAIN)
    val_idx, train_idx = order[: N_TRAIN // 10], order[N_TRAIN // 10:]
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    test = slice(len(images) - N_TEST, len(images))
    rows = []
    for name, params in OURS.items():
        config = TrainConfig(device="cpu", **params)
        started = time.perf_counter()
        result = train(config, images, labels, train_idx, val_idx)
        rows.append({"recipe": name, "epochs": config.epochs,
                     "train_s": time.perf_counter() - started,
                     "val_accuracy": result.best_val_accuracy,
                     "test_accuracy": _accuracy(result.model, x[test], y[test])})
    started = time.perf_counter()
    net = train_example(x[train_idx], y[train_idx], example_epochs)
    rows.append({"recipe": "pytorch/examples mnist", "epochs": example_epochs,
                 "train_s": time.perf_counter() - started,
                 "val_accuracy": _accuracy(net, x[val_idx], y[val_idx]),
                 "test_accuracy": _accuracy(net, x[test], y[test])})
    return rows


def figure(rows: list[dict], path) -> None:
    """Test accuracy against training seconds, one point per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for row in rows:
        ours = row["recipe"] != "pytorch/examples mnist"
        ax.scatter(row["train_s"], row["test_accuracy"], s=40,
                   marker="o" if ours else "s", color="tab:blue" if ours else "tab:red")
        ax.annotate(f"{row['recipe']} ({row['epochs']} ep.)", (row["train_s"],
                    row["test_accuracy"]), fontsize=7, xytext=(5, -3),
                    textcoords="offset points")
    ax.set_xscale("log")
    seconds = [r["train_s"] for r in rows]
    ax.set_xlim(min(seconds) / 1.5, max(seconds) * 8)  # room for the labels
    ax.set_xlabel("training seconds (8,000 images, 2 CPU cores)")
    ax.set_ylabel("test accuracy (2,000 held-out MNIST images)")
    ax.set_title("Recipes: accuracy against training time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| recipe | epochs | training | validation accuracy | test accuracy |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['recipe']} | {r['epochs']} | {r['train_s']:.1f} s | "
              f"{r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} |" for r in rows]
    return "\n".join(lines)
