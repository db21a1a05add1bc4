"""Tiny, learnable datasets written the way the real ones arrive."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from steps.core.data import encode_idx


def tiny_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 digits: scikit-learn's 8x8 digits upscaled, labels 0-9."""
    from steps.core.data import load_digits_dataset

    ds = load_digits_dataset()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds.y_train), size=n, replace=n > len(ds.y_train))
    return ds.x_train[idx], ds.y_train[idx]


def write_idx_folder(folder: Path, n_train: int = 200, n_test: int = 50, gz: bool = True,
                     layout: str = "flat") -> Path:
    """The four MNIST IDX files, flat or in torchvision's ``MNIST/raw`` layout."""
    target = folder / "MNIST" / "raw" if layout == "torchvision" else folder
    target.mkdir(parents=True, exist_ok=True)
    x_train, y_train = tiny_images(n_train, seed=1)
    x_test, y_test = tiny_images(n_test, seed=2)
    files = {
        "train-images-idx3-ubyte": x_train, "train-labels-idx1-ubyte": y_train,
        "t10k-images-idx3-ubyte": x_test, "t10k-labels-idx1-ubyte": y_test,
    }
    for name, array in files.items():
        raw = encode_idx(array.astype(np.uint8))
        if gz:
            (target / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (target / name).write_bytes(raw)
    return folder
