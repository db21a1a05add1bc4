"""The tutorials' training script without its tracking: what `make bench` compares against.

torchvision's MNIST dataset with a per-sample ``ToTensor``, a DataLoader at batch 64, the
784-256-128-10 MLP, Adam, and a test pass after every epoch. Run as its own process, as a
user runs ``python scripts/train.py``, so its wall time includes start-up like the
pipeline's does. Prints one JSON line: per-epoch training seconds and the final accuracy.

    python bench/seed_style.py ROOT EPOCHS    # ROOT holds MNIST/raw/*-ubyte
"""

import json
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def main(root: str, epochs: int) -> dict:
    transform = transforms.Compose([transforms.ToTensor()])
    train_ds = datasets.MNIST(root, train=True, download=False, transform=transform)
    test_ds = datasets.MNIST(root, train=False, download=False, transform=transform)
    train_loader = DataLoader(train_ds, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_ds, batch_size=64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128),
                          nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    epoch_seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for xb, yb in train_loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - started)
        model.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in test_loader:
                correct += (model(xb).argmax(1) == yb).sum().item()
    return {"epoch_seconds": epoch_seconds, "test_accuracy": correct / len(test_ds)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
